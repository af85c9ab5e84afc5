"""The server under load: TTFT and tokens/s percentiles at several concurrencies, one run.

  python -m bench.serve_load                                  # CPU: a random `tiny` model
  python -m bench.serve_load --workdir=runs/sft --concurrency=1,8,32 --max_tokens=64
  python -m bench.serve_load --preset=374m --dtype=bfloat16 --max_len=1024 --max_tokens=256

Starts `serving.server` in a subprocess (on --workdir, or on a random-weight model of --preset
with a tokenizer trained on this repository's sources), with as many decode slots as the largest
concurrency unless --slots says otherwise. For each concurrency c, c client threads (the official
`openai` client, streaming, `stream_options.include_usage`) send --requests requests in all,
back to back, with prompts of --prompt_words random words, temperature 1 and a seed per request,
so answers differ and their lengths are the model's own (EOS ends some early; tokens are counted
from the usage). Per request: TTFT (send to the first streamed token), decode tokens/s ((tokens -
1) / (last - first token)); per concurrency: aggregate output tokens/s over the wall time. Printed
as percentiles, with the ratios against c=1 of the same run (the peer): how much TTFT grows and
how much throughput scales with load.
"""
import argparse
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_workdir(preset: str, path: str) -> str:
  """A random-weight model of `preset` with a tokenizer trained on the repository's Python."""
  from flax import nnx
  from data.tokenizer import save_tokenizer, train_tokenizer
  from models import checkpoint, llama, presets
  cfg = presets.resolve(preset, dtype='float32')
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'), async_save=False)
  ckpt.save(0, nnx.state(llama.create_model(cfg, seed=0), nnx.Param))
  ckpt.close()
  checkpoint.save_model_config(path, cfg)
  sources = []
  for folder in ('serving', 'models', 'trainers'):
    sources += [open(os.path.join(REPO, folder, f)).read()
                for f in sorted(os.listdir(os.path.join(REPO, folder))) if f.endswith('.py')]
  save_tokenizer(train_tokenizer(sources, vocab_size=min(cfg.vocab_size, 8192)), path)
  return path


def start(args, workdir: str, slots: int):
  import portpicker
  port = portpicker.pick_unused_port()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'serving.server', f'--workdir={workdir}', f'--port={port}',
       f'--max_concurrent_decodes={slots}', f'--max_len={args.max_len}',
       f'--max_queue={max(64, slots)}', f'--dtype={args.dtype}', '--model_name=bench',
       f'--decode_steps={args.decode_steps}'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    print('  server:', line.rstrip(), flush=True)
    if 'warm-up took' in line:
      return proc, port
  raise SystemExit(f'the server exited before serving (status {proc.wait()})')


def one_request(client, prompt: str, max_tokens: int, seed: int) -> dict:
  sent = time.perf_counter()
  first = last = None
  tokens = 0
  for chunk in client.completions.create(model='bench', prompt=prompt, max_tokens=max_tokens,
                                         temperature=1.0, seed=seed, stream=True,
                                         stream_options={'include_usage': True}):
    now = time.perf_counter()
    if chunk.choices and chunk.choices[0].text:
      first = first or now
      last = now
    if chunk.usage is not None:
      tokens = chunk.usage.completion_tokens
  first = first or time.perf_counter()
  last = last or first
  return {'ttft': first - sent, 'tokens': tokens, 'end': last,
          'decode_tps': (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def run_level(client, words, c: int, args) -> dict:
  rng = random.Random(c)
  prompts = [' '.join(rng.choice(words) for _ in range(args.prompt_words))
             for _ in range(args.requests)]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(c) as pool:
    done = list(pool.map(lambda i: one_request(client, prompts[i], args.max_tokens, i),
                         range(args.requests)))
  wall = max(d['end'] for d in done) - start
  ttft = np.array([d['ttft'] for d in done]) * 1e3
  tps = np.array([d['decode_tps'] for d in done if d['decode_tps']])
  tokens = sum(d['tokens'] for d in done)
  pct = lambda x, q: float(np.percentile(x, q)) if len(x) else float('nan')
  return {'concurrency': c, 'requests': args.requests, 'output_tokens': tokens,
          'ttft_ms_p50': pct(ttft, 50), 'ttft_ms_p90': pct(ttft, 90),
          'ttft_ms_p99': pct(ttft, 99), 'decode_tps_p50': pct(tps, 50),
          'decode_tps_p10': pct(tps, 10), 'tokens_per_s': tokens / wall, 'wall_s': wall}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='serve this workdir (default: random)')
  parser.add_argument('--preset', default='tiny', help='random model shape without --workdir')
  parser.add_argument('--concurrency', default='1,16,64')
  parser.add_argument('--requests', type=int, default=64, help='requests per concurrency')
  parser.add_argument('--prompt_words', type=int, default=24)
  parser.add_argument('--max_tokens', type=int, default=32)
  parser.add_argument('--slots', type=int, default=0, help='decode slots (0: max concurrency)')
  parser.add_argument('--max_len', type=int, default=512)
  parser.add_argument('--dtype', default='auto')
  parser.add_argument('--decode_steps', type=int, default=4, help="the server's decode steps "
                      'per dispatch')
  args = parser.parse_args()
  levels = [int(c) for c in args.concurrency.split(',')]
  slots = args.slots or max(levels)
  import jax
  import openai
  tmp = None
  if args.workdir is None:
    tmp = tempfile.mkdtemp(prefix='serve_load_')
    print(f'random {args.preset} model in {tmp}', flush=True)
    workdir = random_workdir(args.preset, tmp)
  else:
    workdir = args.workdir
  words = open(os.path.join(REPO, 'README.md')).read().split()
  proc, port = start(args, workdir, slots)
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none', max_retries=0,
                         timeout=600)
  results = []
  try:
    for c in levels:
      results.append(run_level(client, words, c, args))
      print(json.dumps(results[-1]), flush=True)
  finally:
    proc.terminate()
    proc.wait(60)
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  base = results[0]
  print(f'\nserver on {jax.default_backend()} ({jax.devices()[0].device_kind}), {slots} slots of '
        f'{args.max_len}, {args.decode_steps} decode steps per dispatch, prompts of {args.prompt_words} words, up to {args.max_tokens} tokens, '
        f'{args.requests} requests per level')
  print('| concurrency | TTFT p50 / p90 / p99 (ms) | decode tok/s per request p50 (p10) | '
        f'output tok/s | TTFT p50 vs c={base["concurrency"]} | tok/s vs c={base["concurrency"]} |')
  print('|---|---|---|---|---|---|')
  for r in results:
    print(f'| {r["concurrency"]} | {r["ttft_ms_p50"]:.0f} / {r["ttft_ms_p90"]:.0f} / '
          f'{r["ttft_ms_p99"]:.0f} | {r["decode_tps_p50"]:.0f} ({r["decode_tps_p10"]:.0f}) | '
          f'{r["tokens_per_s"]:.0f} | {r["ttft_ms_p50"] / base["ttft_ms_p50"]:.2f}x | '
          f'{r["tokens_per_s"] / base["tokens_per_s"]:.2f}x |')


if __name__ == '__main__':
  main()
