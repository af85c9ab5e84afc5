"""Where the serving engine's time goes, kernel by kernel: one profiled wave per concurrency.

  python -m bench.decode_profile                                  # CPU: tiny, fp32 (a smoke run)
  python -m bench.decode_profile --preset=374m --dtype=bfloat16 --prompt=128 --max_len=1024 \\
      --concurrency=1,64 --out=$OUT                              # the GPU shape of serve_throughput

For each concurrency c, the `many` path of bench/serve_throughput.py (random weights, c prompts of
--prompt tokens): after a compiling warm-up, one wave runs under `jax.profiler.trace` in three
phases, each ended by a block_until_ready: `prefill` (prefill_batch_of: --prefill_batch prompts a
call), `insert` (c inserts into the decode state) and `decode` (--chunks generate_many dispatches of
--decode_steps steps). From the trace (perfetto JSON) it prints, per phase: wall time, the time the
device was busy (the union of its kernels' intervals), the number of kernels and the sum of their
durations; per decode step: kernels and busy time; then the kernels that took the most time in
decode. Wall time well above busy time is time the device sat idle (host dispatch, syncs, launch
gaps); busy time far above the bandwidth floor is slow or too many kernels. On a CPU the "kernels"
are XLA's thunks on its worker threads, so only the GPU figures mean what they say.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import tempfile
import time

import numpy as np


def _events(trace_dir):
  path = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  if not path:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}')
  with gzip.open(path[0]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return events, path[0]


def device_kernels(events):
  """[(start_us, end_us, name)] of the device's kernels: the events of processes named for a GPU
  (or TPU) device; on a CPU-only trace, those of XLA's worker threads (not the Python thread)."""
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  device = {pid for pid, name in procs.items() if '/device:' in name}
  out = []
  for e in events:
    if e.get('ph') != 'X':
      continue
    if device:
      keep = e['pid'] in device and 'Stream' in threads.get((e['pid'], e['tid']), 'Stream')
    else:
      keep = threads.get((e['pid'], e['tid']), '').startswith('tf_XLAEigen')
    if keep and not e['name'].startswith('ThreadpoolListener'):
      out.append((float(e['ts']), float(e['ts']) + float(e['dur']), e['name']))
  return sorted(out)


def busy_us(intervals):
  """Length of the union of [start, end) intervals (sorted by start)."""
  total, end = 0.0, -np.inf
  for s, e, *_ in intervals:
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def phases(events, names):
  """{name: (start_us, end_us)} of the TraceAnnotations named `names` on the host."""
  out = {}
  for e in events:
    if e.get('ph') == 'X' and e['name'] in names and e['name'] not in out:
      out[e['name']] = (float(e['ts']), float(e['ts']) + float(e['dur']))
  return out


def profile(args, c, out_dir):
  import jax
  from models import llama, presets
  from serving.engine import Engine
  cfg = presets.resolve(args.preset, dtype=args.dtype, param_dtype=args.dtype)
  engine = Engine(llama.create_model(cfg, seed=0), max_concurrent_decodes=c, max_len=args.max_len,
                  max_prefill_length=max(16, 1 << (args.prompt - 1).bit_length()),
                  decode_steps=args.decode_steps, prefill_batch=args.prefill_batch,
                  decode_attention=args.decode_attention)
  prompts = list(np.random.default_rng(0).integers(3, cfg.vocab_size, (c, args.prompt)))
  n_new = 1 + args.chunks * args.decode_steps

  def wave(annotate):
    marks = []
    state = engine.init_decode_state()
    jax.block_until_ready(state)
    with annotate('prefill'):
      prefixes = engine.prefill_batch_of(params=engine.params, prompts=prompts, max_tokens=n_new)
      jax.block_until_ready(prefixes)
    with annotate('insert'):
      state = engine.insert_many(prefixes, state, range(c))
      jax.block_until_ready(state)
    state, step = engine.generate_many(engine.params, state, 1)
    jax.block_until_ready(step)
    with annotate('decode'):
      for _ in range(args.chunks):
        state, step = engine.generate_many(engine.params, state)
        marks.append(step['valid'])
      jax.block_until_ready((state, marks))
    return int(sum(np.asarray(m)[0].sum() for m in marks))

  import contextlib
  wave(lambda name: contextlib.nullcontext())  # Compiles every shape the wave uses.
  trace_dir = tempfile.mkdtemp(prefix='decode_profile_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    steps = wave(jax.profiler.TraceAnnotation)
  events, path = _events(trace_dir)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    name = f'trace_{args.preset}_c{c}_{args.decode_attention}.json.gz'
    shutil.copy(path, os.path.join(out_dir, name))
  shutil.rmtree(trace_dir, ignore_errors=True)
  kernels = device_kernels(events)
  if not kernels:
    print('no device kernels found; processes in the trace:', sorted(
        {e['args']['name'] for e in events if e.get('name') == 'process_name'}), flush=True)
  rows = {}
  for name, (start, end) in phases(events, ('prefill', 'insert', 'decode')).items():
    inside = [k for k in kernels if k[0] >= start and k[1] <= end]
    rows[name] = {'wall_ms': (end - start) / 1e3, 'busy_ms': busy_us(inside) / 1e3,
                  'kernels': len(inside), 'kernel_sum_ms': sum(k[1] - k[0] for k in inside) / 1e3}
    if name == 'decode':
      by_name = collections.defaultdict(lambda: [0, 0.0])
      for s, e, n in inside:
        by_name[n][0] += 1
        by_name[n][1] += e - s
      rows[name]['top'] = sorted(((v[1] / 1e3, v[0], n) for n, v in by_name.items()),
                                 reverse=True)[:args.top]
  return {'c': c, 'steps': steps, 'device': jax.devices()[0].device_kind, 'phases': rows}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--prompt', type=int, default=32)
  p.add_argument('--max_len', type=int, default=256)
  p.add_argument('--concurrency', default='1,8')
  p.add_argument('--decode_steps', type=int, default=8)
  p.add_argument('--prefill_batch', type=int, default=8)
  p.add_argument('--chunks', type=int, default=4, help='generate_many dispatches profiled')
  p.add_argument('--top', type=int, default=12, help='kernels listed per concurrency')
  p.add_argument('--decode_attention', default='xla', help="the engine's: xla or pallas")
  p.add_argument('--out', default='', help='folder for the traces and decode_profile_*.json')
  args = p.parse_args()
  results = []
  for c in (int(x) for x in args.concurrency.split(',')):
    start = time.perf_counter()
    r = profile(args, c, args.out)
    r['seconds'] = time.perf_counter() - start
    results.append(r)
    print(f'\n{r["device"]} {args.preset} {args.dtype}: c={c}, prompt {args.prompt}, cache '
          f'{args.max_len}, prefill_batch {args.prefill_batch}, decode_steps {args.decode_steps}, '
          f'decode_attention {args.decode_attention}, '
          f'{r["steps"]} decode steps profiled ({r["seconds"]:.0f} s with compilation)', flush=True)
    print(f'{"phase":<8} {"wall ms":>9} {"busy ms":>9} {"kernels":>8} {"sum ms":>9} '
          f'{"busy/wall":>9}')
    for name, row in r['phases'].items():
      print(f'{name:<8} {row["wall_ms"]:>9.2f} {row["busy_ms"]:>9.2f} {row["kernels"]:>8} '
            f'{row["kernel_sum_ms"]:>9.2f} {row["busy_ms"] / max(row["wall_ms"], 1e-9):>9.0%}')
    decode = r['phases'].get('decode')
    if decode and r['steps']:
      per_step = r['steps']  # Steps slot 0 ran: every slot runs each step of the dispatch.
      print(f'per decode step: {decode["wall_ms"] / per_step:.3f} ms wall, '
            f'{decode["busy_ms"] / per_step:.3f} ms busy, '
            f'{decode["kernels"] / per_step:.0f} kernels')
      for ms, count, name in decode['top']:
        print(f'  {ms:>8.2f} ms {count:>6}x  {name[:110]}')
  if args.out:
    with open(os.path.join(args.out, f'decode_profile_{args.decode_attention}.json'), 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
