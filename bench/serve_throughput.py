"""Decode throughput: our engine (serving/engine.py) against Hugging Face `generate`, one run.

  python -m bench.serve_throughput                         # CPU: tiny and small, fp32
  python -m bench.serve_throughput --presets=374m --prompt=128 --new=256 --max_len=1024 \\
      --dtype=bfloat16                                     # the GPU shape (DESIGN.md)

For each preset and concurrency c (default 1, 8, 64): c requests with random P-token prompts
arrive at once and each generates exactly N tokens (random weights; EOS ignored), greedy.
- `ours`: the engine as it was before issue 10's changes, the baseline: Engine with c slots and
  a max_len-token cache attended over whole every step; one prefill + insert per request, then
  one generate step per dispatch, each step's tokens copied to the host one step behind (as
  JetStream's orchestrator does). TTFT: arrival to the first returned token (all c prefills happen first, so
  it grows with c); ITL: mean time per later step; tokens/s: c * N / total time.
- `many`: the same engine as the server and offline generation run it: prompts prefilled up to
  --prefill_batch per call (prefill_batch_of), inserted into their slots together (insert_many:
  one dispatch per batch), then generate_many: --decode_steps steps per
  dispatch in one compiled loop, each request ending on the device at its N tokens, attention
  over the filled part of the cache only (a power-of-two span >= 128), the host reading each
  chunk once. TTFT: arrival to the first step's token.
- `kern`: `many` with the decode step's cache write and attention in one Pallas kernel a layer
  (Engine(decode_attention='pallas'), models/decode_attention.py; Triton on a GPU, Pallas'
  interpreter on a CPU).
- `exit`: `many` with a decode loop that stops as soon as no request is live (Engine(early_exit=
  True), the default on CPUs and TPUs; on a GPU the engine runs a fixed trip count, which XLA
  queues without reading the loop condition on the host after every step).
- `hf`: transformers.LlamaForCausalLM of the same shape and dtype, `generate(do_sample=False,
  min_new_tokens=N, max_new_tokens=N)` on the batch of c prompts (dynamic cache, SDPA). TTFT:
  a generate of one token; ITL: (total - TTFT) / (N - 1).
Each side runs in its own child process, one after the other, after a warm-up run of the same
shape (compilation excluded); each figure is the fastest of --repeat runs (shared CPUs are
noisy). On GPU the memory-bandwidth floor of a decode step is the bytes it must read (weights
in --param_dtype, plus the K and V cache of every slot over the whole max_len, as `ours` reads
them) at --copy_rate (2.9 TB/s, DESIGN.md's H100 figure; 4.3e12 on the H200); the fraction
reported is floor / measured ITL. `many` reads only the filled span of the cache (and int8
weights with --quantize), so for it the fraction overstates how close it is to its own floor.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

COPY_RATE = 2.9e12  # bytes/s, H100 device-to-device copy (DESIGN.md)
BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


def shape(args, preset):
  from models import presets
  return presets.resolve(preset, dtype=args.dtype, param_dtype=args.param_dtype)


def run_ours(args, preset, c):
  import jax
  from models import llama
  from serving.engine import Engine
  cfg = shape(args, preset)
  engine = Engine(llama.create_model(cfg, seed=0), max_concurrent_decodes=c, max_len=args.max_len,
                  max_prefill_length=max(16, 1 << (args.prompt - 1).bit_length()),
                  decode_steps=1, prefill_batch=1)
  engine.attend_buckets = [engine.max_len]  # The whole cache every step, as before issue 10.
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (c, args.prompt))

  def once(n_new):
    start = time.perf_counter()
    state = engine.init_decode_state()
    for slot, p in enumerate(prompts):
      padded, n = engine.pad_prompt(p)
      state = engine.insert(engine.prefill(params=engine.params, padded_tokens=padded,
                                           true_length=n), state, slot)
    state, step = engine.generate(engine.params, state)
    np.asarray(step['tokens'])
    first = time.perf_counter()
    previous = None
    for _ in range(n_new - 1):
      state, step = engine.generate(engine.params, state)
      step['tokens'].copy_to_host_async()
      if previous is not None:
        np.asarray(previous)  # One step behind, so the host copy overlaps the next step.
      previous = step['tokens']
    np.asarray(previous)
    end = time.perf_counter()
    return first - start, (end - first) / max(1, n_new - 1), end - start

  once(4)  # Compiles every function of this shape.
  # Each figure the fastest of the runs (the TTFT of the run with the best total was noisier).
  ttft, itl, total = map(min, zip(*(once(args.new) for _ in range(args.repeat))))
  return {'ttft_ms': 1e3 * ttft, 'itl_ms': 1e3 * itl, 'tokens_per_s': c * args.new / total,
          'device': jax.devices()[0].device_kind}


def run_many(args, preset, c, decode_attention='xla', early_exit=None):
  """Our engine as the server and offline generation run it: generate_many, --decode_steps
  steps per dispatch with stopping on the device (each request's max_tokens = N)."""
  import jax
  from models import llama
  from serving.engine import Engine
  cfg = shape(args, preset)
  model = llama.create_model(cfg, seed=0)
  if args.quantize != 'none':
    from models.quantize import quantize_weights
    model = quantize_weights(model, args.quantize)
  engine = Engine(model, max_concurrent_decodes=c, max_len=args.max_len,
                  max_prefill_length=max(16, 1 << (args.prompt - 1).bit_length()),
                  decode_steps=args.decode_steps, prefill_batch=args.prefill_batch,
                  kv_dtype=args.kv_dtype, decode_attention=decode_attention,
                  early_exit=early_exit)
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (c, args.prompt))

  def once(n_new):
    start = time.perf_counter()
    state = engine.init_decode_state()
    prefixes = engine.prefill_batch_of(params=engine.params, prompts=list(prompts),
                                       max_tokens=n_new)
    state = engine.insert_many(prefixes, state, range(c))
    # The first token after one step (as a request sees it), then the rest in chunks.
    state, step = engine.generate_many(engine.params, state, 1)
    np.asarray(step['tokens'])
    first = time.perf_counter()
    returned = 1
    while returned < n_new:
      state, step = engine.generate_many(engine.params, state)
      returned += int(np.asarray(step['valid'])[0].sum())
    end = time.perf_counter()
    return first - start, (end - first) / max(1, n_new - 1), end - start

  once(4)  # Compiles every function of this shape.
  # Each figure the fastest of the runs (the TTFT of the run with the best total was noisier).
  ttft, itl, total = map(min, zip(*(once(args.new) for _ in range(args.repeat))))
  return {'ttft_ms': 1e3 * ttft, 'itl_ms': 1e3 * itl, 'tokens_per_s': c * args.new / total,
          'device': jax.devices()[0].device_kind}


def run_hf(args, preset, c):
  import torch
  import transformers
  cfg = shape(args, preset)
  gpu = torch.cuda.is_available()
  dtype = getattr(torch, args.dtype)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, rms_norm_eps=cfg.norm_eps,
      attn_implementation='sdpa', eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).to(dtype).to('cuda' if gpu else 'cpu').eval()
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (c, args.prompt))
  prompts = torch.as_tensor(prompts, device=model.device)

  def timed(n_new):
    if gpu:
      torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
      model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                     min_new_tokens=n_new, max_new_tokens=n_new)
    if gpu:
      torch.cuda.synchronize()
    return time.perf_counter() - start

  timed(4)
  ttft = min(timed(1) for _ in range(args.repeat))
  total = min(timed(args.new) for _ in range(args.repeat))
  return {'ttft_ms': 1e3 * ttft, 'itl_ms': 1e3 * (total - ttft) / max(1, args.new - 1),
          'tokens_per_s': c * args.new / total,
          'device': torch.cuda.get_device_name() if gpu else 'cpu'}


def floor_ms(args, preset, c):
  cfg = shape(args, preset)
  weight_bytes = cfg.num_params() * BYTES[args.param_dtype]
  cache_bytes = (2 * cfg.n_layers * c * args.max_len * cfg.n_kv_heads * cfg.head_dim *
                 BYTES[args.dtype])
  return 1e3 * (weight_bytes + cache_bytes) / args.copy_rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', default='tiny,small')
  parser.add_argument('--concurrency', default='1,8,64')
  parser.add_argument('--prompt', type=int, default=64, help='prompt tokens P')
  parser.add_argument('--new', type=int, default=64, help='generated tokens N')
  parser.add_argument('--max_len', type=int, default=256, help='our cache length per slot')
  parser.add_argument('--dtype', default='float32', help='compute dtype (both sides)')
  parser.add_argument('--param_dtype', default=None, help='weight dtype (default: --dtype)')
  parser.add_argument('--sides', default='ours,many,hf', help='of ours, many, kern, exit, hf')
  parser.add_argument('--decode_steps', type=int, default=8, help="`many`'s steps per dispatch")
  parser.add_argument('--copy_rate', type=float, default=COPY_RATE, help='device copy bytes/s for '
                      'the floor (H100 2.9e12, H200 4.3e12)')
  parser.add_argument('--prefill_batch', type=int, default=8, help="`many`'s prompts per prefill")
  parser.add_argument('--quantize', default='none', help="`many`'s weights: none, int8 or int4")
  parser.add_argument('--kv_dtype', default=None, help="`many`'s KV cache dtype (default: --dtype)")
  parser.add_argument('--repeat', type=int, default=3, help='timed runs; the fastest is kept')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.param_dtype = args.param_dtype or args.dtype
  if args.child:
    side, preset, c = args.child.split(':')
    result = {'ours': run_ours, 'many': run_many, 'hf': run_hf,
              'kern': functools.partial(run_many, decode_attention='pallas'),
              'exit': functools.partial(run_many, early_exit=True)}[side](
                  args, preset, int(c))
    print('RESULT ' + json.dumps(result), flush=True)
    return
  print(f'P={args.prompt} N={args.new} max_len={args.max_len} dtype={args.dtype} '
        f'param_dtype={args.param_dtype}; many: decode_steps={args.decode_steps} '
        f'prefill_batch={args.prefill_batch} quantize={args.quantize} kv_dtype={args.kv_dtype}')
  print(f'{"preset":8} {"c":>3} {"side":5} {"TTFT ms":>9} {"ITL ms":>8} {"tok/s":>9} '
        f'{"floor":>7}  device')
  for preset in args.presets.split(','):
    for c in map(int, args.concurrency.split(',')):
      rates = {}
      for side in args.sides.split(','):
        out = subprocess.run([sys.executable, '-m', 'bench.serve_throughput', *sys.argv[1:],
                              f'--child={side}:{preset}:{c}'], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        if not lines:
          print(f'{preset:8} {c:>3} {side:5} failed: {out.stderr[-600:]}')
          continue
        r = json.loads(lines[-1][7:])
        frac = ''
        if 'cpu' not in r['device'].lower():
          frac = f'{floor_ms(args, preset, c) / r["itl_ms"]:.0%}'
        print(f'{preset:8} {c:>3} {side:5} {r["ttft_ms"]:9.1f} {r["itl_ms"]:8.2f} '
              f'{r["tokens_per_s"]:9.0f} {frac:>7}  {r["device"]}', flush=True)
        rates[side] = r['tokens_per_s']
      for side, peers in (('many', ('ours', 'exit', 'hf')), ('kern', ('many', 'hf'))):
        if side in rates and any(peer in rates for peer in peers):
          print(f'{preset:8} {c:>3} {side}: ' + ', '.join(
              f'{rates[side] / rates[peer]:.2f}x the tokens/s of {peer}'
              for peer in peers if peer in rates), flush=True)


if __name__ == '__main__':
  main()
