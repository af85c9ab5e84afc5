"""Where a decode step's time goes: the engine's step against the bare model step, per layer, and
with the host dispatch removed, so a slow step can be pinned on kernels, layers or the host.

  python -m bench.decode_step --preset=374m --dtype=bfloat16 --batches=1,64 --max_len=1024

For each batch size B (random weights, a max_len cache filled to 128 tokens):
- engine: serving.engine.Engine.generate, dispatched step after step (what serving runs);
- model: the jitted, cache-donating model forward of one token per row, no sampling;
- model_1layer: the same with one layer, so (model - model_1layer) / (L - 1) is one layer's cost;
- model_scan16: 16 model steps inside one jit (lax.fori_loop): no per-step host dispatch.
Each figure is the median of --reps timed runs of --steps steps, after a compiling warm-up, and the
floor is the bytes a step must read (weights + every slot's whole cache) at DESIGN.md's 2.9 TB/s.
"""
import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import llama, presets
from serving.engine import Engine

COPY_RATE = 2.9e12


def _time(fn, steps, reps):
  fn()  # Compile and warm up.
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps)
  return 1e3 * float(np.median(times))


def model_step_fn(cfg, batch, max_len, unrolled):
  model = llama.create_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  state = {'cache': llama.init_cache(cfg, batch, max_len),
           'tokens': jnp.zeros((batch,), jnp.int32), 'pos': jnp.full((batch,), 128, jnp.int32)}

  def one(params, state):
    m = nnx.merge(graphdef, params)
    logits, cache = m(state['tokens'][:, None], state['pos'][:, None], cache=state['cache'])
    return {'cache': cache, 'tokens': jnp.argmax(logits[:, 0], -1).astype(jnp.int32),
            'pos': state['pos'] + 1}

  if unrolled > 1:
    step = jax.jit(lambda p, s: jax.lax.fori_loop(0, unrolled, lambda i, s: one(p, s), s),
                   donate_argnums=1)
  else:
    step = jax.jit(one, donate_argnums=1)
  box = [state]

  def run():
    box[0] = step(params, box[0])
    box[0]['pos'] = jnp.full((batch,), 128, jnp.int32) if unrolled > 1 else box[0]['pos']
    return box[0]['tokens']
  return run


def engine_step_fn(cfg, batch, max_len):
  engine = Engine(llama.create_model(cfg, seed=0), max_concurrent_decodes=batch, max_len=max_len,
                  max_prefill_length=128)
  state = engine.init_decode_state()
  prompt = np.arange(3, 131) % cfg.vocab_size
  for slot in range(batch):
    padded, n = engine.pad_prompt(prompt)
    state = engine.insert(engine.prefill(params=engine.params, padded_tokens=padded,
                                         true_length=n), state, slot)
  box = [state]

  def run():
    box[0], step = engine.generate(engine.params, box[0])
    return step['tokens']
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--batches', default='1,8')
  p.add_argument('--max_len', type=int, default=256)
  p.add_argument('--steps', type=int, default=32)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--json_out', default='')
  args = p.parse_args()
  cfg = presets.resolve(args.preset, dtype=args.dtype, param_dtype=args.dtype,
                        max_seq_len=max(args.max_len, 256))
  one_layer = dataclasses.replace(cfg, n_layers=1)
  itemsize = jnp.dtype(args.dtype).itemsize
  rows = []
  for b in [int(x) for x in args.batches.split(',')]:
    cache_bytes = 2 * cfg.n_layers * b * args.max_len * cfg.n_kv_heads * cfg.head_dim * itemsize
    floor = 1e3 * (cfg.num_params() * itemsize + cache_bytes) / COPY_RATE
    r = {'batch': b, 'floor_ms': floor,
         'engine_ms': _time(engine_step_fn(cfg, b, args.max_len), args.steps, args.reps),
         'model_ms': _time(model_step_fn(cfg, b, args.max_len, 1), args.steps, args.reps),
         'model_1layer_ms': _time(model_step_fn(one_layer, b, args.max_len, 1), args.steps,
                                  args.reps),
         'model_scan16_ms': _time(model_step_fn(cfg, b, args.max_len, 16), max(args.steps // 16, 2),
                                  args.reps) / 16}
    r['per_layer_ms'] = (r['model_ms'] - r['model_1layer_ms']) / max(cfg.n_layers - 1, 1)
    rows.append(r)
    print(json.dumps(r), flush=True)
  print(f'\n{jax.devices()[0].device_kind}, {args.preset} {args.dtype}, cache {args.max_len}')
  cols = ['batch', 'floor_ms', 'engine_ms', 'model_ms', 'model_scan16_ms', 'model_1layer_ms',
          'per_layer_ms']
  print(' '.join(f'{c:>15}' for c in cols))
  for r in rows:
    print(' '.join(f'{r[c]:>15.3f}' if isinstance(r[c], float) else f'{r[c]:>15}' for c in cols))
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
