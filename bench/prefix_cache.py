"""Time to first token with and without automatic prefix caching (serving/prefix_cache.py).

  python -m bench.prefix_cache                        # CPU: small, fp32, a 448-token system prompt
  python -m bench.prefix_cache --preset=374m --dtype=bfloat16 --system=1984 --max_len=4096  # GPU

A chat workload: every request is the same --system-token system prompt followed by its own
--question-token question (random tokens; random weights). Requests come one at a time; for each,
TTFT is the time from the call to the first token on the host (prefill, and for the cached
engine the lookup, the copy of the cached prefix and the prefill of the rest). Two engines in
this process, both warmed up (Engine.warmup: nothing compiles while timing): `plain` without the
cache and `cached` with --cache_tokens; the first request fills the cache (a miss, timed apart),
then --requests more are timed, alternating engines request by request so both see the same
machine load. Prints the median and p90 TTFT of each, their ratio, the prefix cache's counters,
and checks that both engines gave the same first tokens.
"""
import argparse
import time

import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--system', type=int, default=448, help='Tokens of the shared system prompt.')
  p.add_argument('--question', type=int, default=40, help='Tokens of each request of its own.')
  p.add_argument('--requests', type=int, default=20)
  p.add_argument('--max_len', type=int, default=1024)
  p.add_argument('--cache_tokens', type=int, default=8192)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()

  import jax
  from models import llama, presets
  from serving.engine import Engine
  cfg = presets.resolve(args.preset, dtype=args.dtype)
  model = llama.create_model(cfg, seed=args.seed)
  length = args.system + args.question
  kwargs = dict(max_concurrent_decodes=1, max_len=args.max_len,
                max_prefill_length=1 << (length - 1).bit_length())
  engines = {'plain': Engine(model, **kwargs),
             'cached': Engine(model, prefix_cache_tokens=args.cache_tokens, **kwargs)}
  for name, engine in engines.items():
    print(f'{name}: warm-up {engine.warmup():.1f} s', flush=True)

  rng = np.random.default_rng(args.seed)
  system = rng.integers(3, cfg.vocab_size, args.system).tolist()
  prompts = [system + rng.integers(3, cfg.vocab_size, args.question).tolist()
             for _ in range(args.requests + 1)]

  def ttft(engine, prompt):
    padded, n = engine.pad_prompt(prompt)
    start = time.perf_counter()
    prefix = engine.prefill(params=engine.params, padded_tokens=padded, true_length=n)
    token = int(jax.device_get(prefix['token']))
    return time.perf_counter() - start, token

  first = {name: ttft(engine, prompts[0]) for name, engine in engines.items()}
  times = {name: [] for name in engines}
  same = first['plain'][1] == first['cached'][1]
  for prompt in prompts[1:]:
    tokens = {}
    for name, engine in engines.items():
      seconds, tokens[name] = ttft(engine, prompt)
      times[name].append(seconds)
    same &= tokens['plain'] == tokens['cached']
  print(f'\n{args.preset} ({cfg.num_params():,} parameters, {args.dtype}, '
        f'{jax.default_backend()}): {args.system}-token system prompt + {args.question}-token '
        f'question, prompt bucket {engines["plain"].pad_prompt(prompts[0])[0].shape[0]}, '
        f'{args.requests} requests')
  print('| engine | first request ms | median TTFT ms | p90 TTFT ms |')
  print('|---|---|---|---|')
  for name in engines:
    t = np.asarray(times[name]) * 1e3
    print(f'| {name} | {first[name][0] * 1e3:.1f} | {np.median(t):.1f} | '
          f'{np.percentile(t, 90):.1f} |')
  ratio = np.median(times['plain']) / np.median(times['cached'])
  print(f'median TTFT plain / cached: {ratio:.2f}x')
  print(f'prefix cache: {engines["cached"].prefix_cache.stats()}')
  print(f'same first tokens: {same}')
  if not same:
    raise SystemExit('the cached engine drew different first tokens')


if __name__ == '__main__':
  main()
