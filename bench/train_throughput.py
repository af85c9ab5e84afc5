"""Training throughput: our trainer against Hugging Face's PyTorch Llama, side by side, one run.

  python -m bench.train_throughput                                  # CPU defaults: small, 8 x 256
  python -m bench.train_throughput --preset=374m --batch=16 --seq=2048 --remat=none,full \\
      --segments=mask,none --attn --deadline=470                    # the GPU benchmark (RESULTS.md)

What runs, each in its own child process (so one's GPU memory, peak-memory counter or crash does not
touch the others; the children run one after another):
- `ours`: the real shared loop, `trainers.loop.train`, with `configs/pretrain.py:<preset>`, the
  model from `models.llama.create_model` and `trainers.pretrain.next_token_loss`, fed random-token
  batches by a plain generator (inputs/targets/positions/segment_ids/loss_mask, segment_ids all
  ones). `--segments=none` runs the same loss with segment_ids=None, which is what makes the model
  take attention's plain causal path (models/llama.py builds a [B,1,T,T] same-document mask
  whenever segment_ids is given, whatever its values). tokens/s is the loop's own `tokens_per_s`
  from the run's metrics.jsonl: train.log_every = --steps and train.steps = 2 x --steps, so the
  first record (steps 2..S, after the compiling first step) is warm-up and the second record, S
  steps with the loop's asynchronous dispatch intact, is the figure reported. The final step's
  checkpoint (the loop always saves one) lands in a temporary workdir after the timed window.
- `hf_eager`, `hf_compile`: transformers.LlamaForCausalLM with the same shape (SDPA attention), fp32
  parameters, AdamW (torch, fused on GPU) with the loop's hyper-parameters and global-norm clipping
  at 1.0, bf16 autocast on GPU and fp32 on CPU; `hf_compile` wraps the model in torch.compile (GPU
  only by default). Timed with a host clock around --steps steps after --warmup steps, with
  torch.cuda.synchronize() at both ends.
  On a CPU the HF child runs with OMP_WAIT_POLICY=PASSIVE (unless set): PyTorch's spinning OpenMP
  threads made its steps 20-40x slower on a 2-core machine that other processes were using.
- `peak`: a large matrix product through JAX (bf16 8192^3 on GPU, fp32 2048^3 on CPU) to measure
  the device's achievable matmul rate, and the device's name.
- `attn` (with --attn): one jax.nn.dot_product_attention call, forward + backward, at this shape with
  the same-document mask and without it (plain causal), timed, with the kernels XLA called.

MFU counts F = 6 * N + 12 * L * d * T FLOPs per trained token, with N the parameters that take
part in matrix products: every parameter except the input embedding table (a lookup, no FLOPs); the
LM head is counted (with tied embeddings nothing is left out). This is the count behind DESIGN.md's
37% / 48% figures. Peak: 989 TFLOP/s (bf16 dense) on an H100 or H200; on a CPU, MFU is taken against
the fp32 matmul rate measured by `peak` in the same run (and says so); other devices: n/a.
Peak memory: jax `peak_bytes_in_use` / torch.cuda.max_memory_allocated on GPU; on CPU the child
process's peak resident set (ru_maxrss), which includes the framework itself.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

DATASHEET_PEAK = {'H100': 989e12, 'H200': 989e12}  # bf16 dense tensor-core FLOP/s (SXM).


def model_shape(preset: str):
  from models import presets
  return presets.PRESETS[preset]


def matmul_params(cfg) -> int:
  """Parameters that take part in matrix products: all but the (untied) input embedding table."""
  return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def flops_per_token(cfg, seq: int) -> float:
  return cfg.train_flops_per_token(seq)  # 6 * matmul_params + 12 L d T, as the trainers count.


def _host_peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
  except OSError:
    pass
  return f'cpu x{os.cpu_count()}'


# ----------------------------------------------------------------------------------------- children

def child_peak(args) -> dict:
  import jax
  import jax.numpy as jnp
  dev = jax.devices()[0]
  gpu = dev.platform == 'gpu'
  n, dtype = (8192, jnp.bfloat16) if gpu else (2048, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 3)  # Random data: zeros run faster (METHOD.md).
  a = jax.random.normal(keys[0], (n, n), dtype)
  bs = [jax.random.normal(k, (n, n), dtype) for k in keys[1:]]
  f = jax.jit(lambda a, b: a @ b)
  for b in bs:
    f(a, b).block_until_ready()
  reps = 20 if gpu else 5
  times = []
  for i in range(reps):
    t0 = time.perf_counter()
    f(a, bs[i % 2]).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  rate = 2.0 * n ** 3 / times[len(times) // 2]
  kind = dev.device_kind if gpu else _cpu_name()
  return {'device': kind, 'platform': dev.platform, 'matmul_flops': rate,
          'matmul_desc': f'{jnp.dtype(dtype).name} {n}^3 via jax, median of {reps}',
          'jax': jax.__version__}


def _random_batches(batch: int, seq: int, vocab: int, seed: int = 0):
  """Endless random-token batches in the pretrain format (one document per row)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
  segment_ids = np.ones((batch, seq), np.int32)
  loss_mask = np.ones((batch, seq), np.float32)
  while True:
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    yield {'inputs': tokens[:, :-1].copy(), 'targets': tokens[:, 1:].copy(),
           'positions': positions, 'segment_ids': segment_ids, 'loss_mask': loss_mask}


def child_ours(args) -> dict:
  import jax
  import configs.pretrain
  from models import llama, presets
  from trainers import common, loop, pretrain

  config = configs.pretrain.get_config(args.preset)
  config.train.steps = 2 * args.steps
  config.train.log_every = args.steps
  config.train.checkpoint_every = 10 ** 9
  config.train.eval_every = 0
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq
  config.model.remat = args.remat
  if args.attention:
    config.model.attention = args.attention
  if args.dtype:
    config.model.dtype = args.dtype
  overrides = {k: config.model[k] for k in config.model.keys() if k != 'preset'}
  cfg = presets.resolve(args.preset, **overrides)
  mesh = common.mesh_from_config(config)
  model = llama.create_model(cfg, seed=0, mesh=mesh, rules=config.sharding_rules)

  if args.segments == 'mask':
    loss_fn = pretrain.next_token_loss
  else:  # The same loss; segment_ids=None sends attention down the plain causal path.
    def loss_fn(model, batch, rng):
      return pretrain.next_token_loss(model, {**batch, 'segment_ids': None}, rng)

  workdir = tempfile.mkdtemp(prefix='bench_ours_')
  try:
    t0 = time.perf_counter()
    loop.train(config, workdir, model, loss_fn, _random_batches(args.batch, args.seq,
                                                                cfg.vocab_size),
               None, mesh=mesh, rules=config.sharding_rules)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return {'tokens_per_s': records[-1]['tokens_per_s'],
          'warmup_tokens_per_s': records[0]['tokens_per_s'] if len(records) > 1 else None,
          'final_loss': records[-1]['loss'],
          'peak_bytes': peak if peak is not None else _host_peak_bytes(),
          'peak_kind': 'device' if peak is not None else 'host RSS',
          'wall_s': wall, 'attention': llama.attention_impl(cfg), 'dtype': cfg.dtype}


def child_hf(args) -> dict:
  import torch
  import transformers

  cfg = model_shape(args.preset)
  cuda = torch.cuda.is_available()
  dev = torch.device('cuda' if cuda else 'cpu')
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
      rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
  hf_cfg._attn_implementation = 'sdpa'
  model = transformers.LlamaForCausalLM(hf_cfg).to(dev).train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
  fwd = torch.compile(model) if args.child == 'hf_compile' else model
  batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev) for _ in range(4)]

  def step(i):
    x = batches[i % len(batches)]
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda):
      loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels itself.
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  for i in range(args.warmup):
    loss = step(i)
  loss.item()
  sync()
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(args.steps):
    loss = step(i)
  sync()
  elapsed = time.perf_counter() - t0
  return {'tokens_per_s': args.batch * args.seq * args.steps / elapsed,
          'final_loss': float(loss.item()), 'warmup_s': warm,
          'peak_bytes': torch.cuda.max_memory_allocated() if cuda else _host_peak_bytes(),
          'peak_kind': 'device' if cuda else 'host RSS',
          'dtype': 'bf16 autocast' if cuda else 'float32',
          'torch': torch.__version__, 'transformers': transformers.__version__}


def child_attn(args) -> dict:
  """Times one attention call, forward + backward, at this run's shape on each path the model can
  take in training: segment_ids given (a [B,1,T,T] mask, which jax.nn.dot_product_attention turns
  into an additive bias for cuDNN) and segment_ids=None (plain causal), and names the kernels."""
  import re
  import jax
  import jax.numpy as jnp
  from models import presets
  cfg = presets.resolve(args.preset)
  impl = args.attention or ('cudnn' if jax.default_backend() == 'gpu' else 'xla')
  b, t, n, h = args.batch, args.seq, cfg.n_heads, cfg.head_dim
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys)
  seg = jnp.ones((b, t), jnp.int32)
  out = {'impl': impl, 'layers': cfg.n_layers}
  for name in ('mask', 'none'):
    def f(q, k, v, seg, name=name):
      mask = seg[:, None, :, None] == seg[:, None, None, :] if name == 'mask' else None
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)
      return jnp.sum(o.astype(jnp.float32))
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    try:
      compiled = g.lower(q, k, v, seg).compile()
      calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
      jax.block_until_ready(compiled(q, k, v, seg))
      times = []
      for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, seg))
        times.append(time.perf_counter() - t0)
      times.sort()
      mem = compiled.memory_analysis()
      out[name] = {'fwd_bwd_ms': 1e3 * times[len(times) // 2], 'custom_calls': calls,
                   'temp_bytes': getattr(mem, 'temp_size_in_bytes', None)}
    except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on.
      out[name] = {'error': f'{type(e).__name__}: {e}'[:500]}
  return out


CHILDREN = {'peak': child_peak, 'attn': child_attn, 'ours': child_ours, 'hf_eager': child_hf,
            'hf_compile': child_hf}


# ------------------------------------------------------------------------------------------- parent

def _run_child(name: str, args, extra: list[str], timeout: float, env=None) -> dict:
  fd, result_file = tempfile.mkstemp(prefix=f'bench_{name}_', suffix='.json')
  os.close(fd)
  cmd = [sys.executable, '-m', 'bench.train_throughput', f'--child={name}',
         f'--result_file={result_file}', f'--preset={args.preset}', f'--batch={args.batch}',
         f'--seq={args.seq}', f'--steps={args.steps}', f'--warmup={args.warmup}',
         f'--attention={args.attention}', f'--dtype={args.dtype}', *extra]
  print(f'\n=== {name} {" ".join(extra)} (timeout {timeout:.0f}s)', flush=True)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, start_new_session=True, env=env)
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)  # The child and anything it started (compile workers).
    proc.wait()
    rc = 'timeout'
  wall = time.perf_counter() - t0
  try:
    with open(result_file) as f:
      result = json.load(f)
  except (OSError, ValueError):
    result = {'error': f'exit {rc}'}
  finally:
    os.unlink(result_file)
  result['child_wall_s'] = wall
  print(f'=== {name} done in {wall:.0f}s: {json.dumps(result)}', flush=True)
  return result


def _fmt_bytes(b):
  return 'n/a' if b is None else f'{b / 2**30:.1f} GiB'


def _table(rows, peer_best, fpt, peak_flops, peak_desc, measured_flops):
  lines = [f"{'implementation':<34} {'tokens/s':>10} {'MFU':>7} {'MFU/mm':>7} {'peak mem':>18} "
           f"{'vs HF best':>10}"]
  for name, r in rows:
    tps = r.get('tokens_per_s')
    if not tps:
      lines.append(f"{name:<34} {'failed: ' + str(r.get('error', '?'))[:60]}")
      continue
    mfu = f'{100 * tps * fpt / peak_flops:.1f}%' if peak_flops else 'n/a'
    mfu_mm = f'{100 * tps * fpt / measured_flops:.1f}%' if measured_flops else 'n/a'
    ratio = f'{tps / peer_best:.2f}x' if peer_best else 'n/a'
    mem = f"{_fmt_bytes(r.get('peak_bytes'))} ({'dev' if r.get('peak_kind') == 'device' else 'RSS'})"
    lines.append(f'{name:<34} {tps:>10,.0f} {mfu:>7} {mfu_mm:>7} {mem:>18} {ratio:>10}')
  lines.append(f'MFU: against {peak_desc}. MFU/mm: against the matmul rate measured in this run.')
  return '\n'.join(lines)


def main_parent(args):
  deadline = time.perf_counter() + args.deadline
  cfg = model_shape(args.preset)
  fpt = flops_per_token(cfg, args.seq)
  print(f'bench.train_throughput: preset {args.preset} ({cfg.num_params():,} parameters, '
        f'{matmul_params(cfg):,} in matmuls), batch {args.batch} x seq {args.seq}, '
        f'{args.steps} timed steps; {fpt / 1e9:.3f} GFLOP per token (6N + 12 L d T)', flush=True)

  peak = _run_child('peak', args, [], timeout=min(180, args.deadline))
  device = peak.get('device', '?')
  gpu = peak.get('platform') == 'gpu'
  measured = peak.get('matmul_flops')
  peak_flops = next((v for k, v in DATASHEET_PEAK.items() if k in device), None) if gpu else None
  if peak_flops:
    peak_desc = f'{peak_flops / 1e12:.0f} TFLOP/s bf16 dense (datasheet, {device})'
  elif not gpu and measured:
    peak_flops = measured
    peak_desc = f'the measured CPU matmul rate, {measured / 1e9:.1f} GFLOP/s ({peak["matmul_desc"]})'
  else:
    peak_desc = 'no known peak for this device (n/a)'
  attn = None
  if args.attn:
    attn = _run_child('attn', args, [], timeout=min(180, args.deadline))
    if all('fwd_bwd_ms' in attn.get(k, {}) for k in ('mask', 'none')):
      extra_ms = (attn['mask']['fwd_bwd_ms'] - attn['none']['fwd_bwd_ms']) * attn['layers']
      print(f"attention fwd+bwd per layer ({attn['impl']}): segment mask "
            f"{attn['mask']['fwd_bwd_ms']:.2f} ms, plain causal {attn['none']['fwd_bwd_ms']:.2f} ms;"
            f" the mask costs {extra_ms:.1f} ms per step over {attn['layers']} layers")
  print(f'host load average before the runs: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)')
  print(f'device: {device}; measured matmul {(measured or 0) / 1e12:.3f} TFLOP/s '
        f'({peak.get("matmul_desc")})', flush=True)

  jobs = []
  for remat in args.remat.split(','):
    for seg in args.segments.split(','):
      jobs.append((f'ours remat={remat} segments={seg}', 'ours',
                   [f'--remat={remat}', f'--segments={seg}']))
  if not args.skip_torch:
    hf = ['hf_eager']
    if args.torch_compile == 'on' or (args.torch_compile == 'auto' and gpu):
      hf.append('hf_compile')
    # Interleave: the first ours variant, then the peers, then the remaining ours variants, so a
    # run cut short by the deadline still has a side-by-side pair.
    jobs = jobs[:1] + [(h.replace('_', ' '), h, []) for h in hf] + jobs[1:]

  rows = []
  for label, child, extra in jobs:
    left = deadline - time.perf_counter()
    if left < 30:
      rows.append((label, {'error': 'skipped: --deadline reached'}))
      continue
    env = None
    if child.startswith('hf') and not gpu and 'OMP_WAIT_POLICY' not in os.environ:
      # PyTorch's OpenMP threads spin while waiting; on a CPU that other processes share, that
      # made HF steps 20-40x slower here. Passive waiting costs little when the CPU is idle.
      env = {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'}
    rows.append((label, _run_child(child, args, extra, timeout=left, env=env)))
    peer_best = max([r.get('tokens_per_s') or 0 for n, r in rows if n.startswith('hf')] or [0])
    print('\n' + _table(rows, peer_best, fpt, peak_flops, peak_desc, measured), flush=True)

  peer_best = max([r.get('tokens_per_s') or 0 for n, r in rows if n.startswith('hf')] or [0])
  print(f'\n==== RESULT: {args.preset}, batch {args.batch} x seq {args.seq}, device {device} '
        f'(jax {peak.get("jax")}) ====')
  print(_table(rows, peer_best, fpt, peak_flops, peak_desc, measured))
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'preset': args.preset, 'batch': args.batch, 'seq': args.seq,
                 'steps': args.steps, 'device': device, 'peak': peak,
                 'flops_per_token': fpt, 'peak_flops': peak_flops,
                 'attn': attn, 'rows': [{'name': n, **r} for n, r in rows]}, f, indent=1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small', help='tiny | small | 374m (models/presets.py)')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--steps', type=int, default=10, help='timed steps per implementation')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed steps before the HF timing (ours: the loop\'s first window, '
                      'steps-1 steps, is its warm-up)')
  p.add_argument('--remat', default='none', help="comma list of 'none', 'full', 'dots'")
  p.add_argument('--segments', default='mask',
                 help="comma list: 'mask' (segment_ids given, the trainer's path) and/or 'none' "
                      "(segment_ids=None: attention's plain causal path)")
  p.add_argument('--attention', default='', help="override model.attention: auto | xla | cudnn")
  p.add_argument('--dtype', default='', help='override model.dtype of ours (default: config)')
  p.add_argument('--skip_torch', action='store_true', help='do not run the Hugging Face peer')
  p.add_argument('--torch_compile', default='auto', choices=['auto', 'on', 'off'],
                 help='also run HF under torch.compile (auto: on GPU only)')
  p.add_argument('--attn', action='store_true',
                 help='also time one attention call (fwd+bwd) at this shape with the segment mask '
                      'and without, and name the kernels each calls')
  p.add_argument('--deadline', type=float, default=3600,
                 help='seconds for the whole run; implementations not started by then are skipped')
  p.add_argument('--json_out', default='', help='also write every number here')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--result_file', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    result = CHILDREN[args.child](args)
    with open(args.result_file, 'w') as f:
      json.dump(result, f)
  else:
    main_parent(args)


if __name__ == '__main__':
  main()
