"""Which compute dtype is faster here, per kind of work: the measurement behind model.dtype='auto'.

  python -m bench.cpu_dtype                      # small, the demo's shapes; about 2 minutes on CPU
  python -m bench.cpu_dtype --preset=smollm2_135m --batch=4 --seq=128

For float32 and bfloat16 compute (fp32 weights either way, as the trainers keep them), one process:
- train: the real loop (`trainers.loop.train` through bench.train_throughput's `ours`), batch x seq
  random tokens; tokens/s of the timed window after the compiling one;
- forward: one jitted forward pass over batch x seq tokens (what eval.perplexity and the RL
  log-prob pass run), tokens/s, median of --reps;
- decode: one engine decode step with --slots filled slots (serving.engine.Engine.generate, what
  the server, eval.accuracy and RL rollouts run), ms per step, median of --reps x --steps.
It prints each figure for both dtypes and the ratio bfloat16 / float32, then the choice
models.presets.resolve_dtype makes on this backend, so a machine where the ratios differ shows it.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import decode_step, train_throughput
from models import llama, presets

DTYPES = ('float32', 'bfloat16')


def forward_tokens_per_s(cfg, batch: int, seq: int, reps: int) -> float:
  graphdef, params = nnx.split(llama.create_model(cfg, seed=0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)),
                       jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, positions).astype(jnp.float32).sum())
  forward(params, tokens).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    forward(params, tokens).block_until_ready()
    times.append(time.perf_counter() - start)
  return batch * seq / float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--train_steps', type=int, default=6, help='timed training steps per dtype')
  p.add_argument('--slots', type=int, default=8, help='filled decode slots')
  p.add_argument('--max_len', type=int, default=512)
  p.add_argument('--steps', type=int, default=16, help='decode steps per timed run')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--json_out', default='')
  args = p.parse_args(argv)
  results = {}
  for dtype in DTYPES:
    train = train_throughput.child_ours(argparse.Namespace(
        preset=args.preset, steps=args.train_steps, batch=args.batch, seq=args.seq, remat='none',
        attention='', dtype=dtype, segments='mask'))
    cfg = presets.resolve(args.preset, dtype=dtype, max_seq_len=max(args.max_len, args.seq))
    results[dtype] = {
        'train_tokens_per_s': train['tokens_per_s'],
        'forward_tokens_per_s': forward_tokens_per_s(cfg, args.batch, args.seq, args.reps),
        'decode_ms_per_step': decode_step._time(
            decode_step.engine_step_fn(cfg, args.slots, args.max_len), args.steps, args.reps)}
    print(f'{dtype}: {json.dumps(results[dtype])}', flush=True)
  f32, b16 = results['float32'], results['bfloat16']
  print(f'\n{jax.devices()[0].device_kind}, preset {args.preset}, batch {args.batch} x {args.seq}, '
        f'{args.slots} decode slots\n')
  print(f'{"work":<10} {"float32":>15} {"bfloat16":>15} {"bf16/fp32":>10}  faster')
  for key, unit, higher in (('train_tokens_per_s', 'tok/s', True),
                            ('forward_tokens_per_s', 'tok/s', True),
                            ('decode_ms_per_step', 'ms', False)):
    ratio = b16[key] / f32[key]
    faster = 'bfloat16' if (ratio > 1) == higher else 'float32'
    print(f'{key.split("_")[0]:<10} {f32[key]:>9,.1f} {unit:<5} {b16[key]:>9,.1f} {unit:<5}'
          f'{ratio:>9.2f}x  {faster}')
  print(f"\nmodel.dtype='auto' here: training {presets.resolve_dtype('auto', 'train')}, "
        f"inference {presets.resolve_dtype('auto', 'inference')}")
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind, 'args': vars(args), **results}, f,
                indent=2)


if __name__ == '__main__':
  main()
