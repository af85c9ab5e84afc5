"""What fine-tuning costs: full SFT vs LoRA vs QLoRA on one model, side by side, one run.

  python -m bench.finetune_memory                                   # CPU: small, 8 x 256
  python -m bench.finetune_memory --preset=1b --batch=4 --seq=1024 --steps=5   # the GPU shape

Each method runs in its own child process (so each has its own peak-memory counter) through the
real shared loop, `trainers.loop.train`, with `trainers.sft`'s loss, on random-token batches (the
costs do not depend on the data or on the weights, so the model is freshly initialised):
- full: every parameter trained (trainable = nnx.Param);
- lora: configs/lora.py's adapters (rank, alpha, target) on every attention and MLP projection,
  trainable = nnx.LoRAParam;
- qlora: the same adapters over a base quantized to NF4 (configs/qlora.py's tile size).
Reported: trainable parameters; optimizer-state bytes (AdamW moments of the trainable variables);
checkpoint bytes (the final step's params + opt_state items on disk, as the loop writes them);
peak memory (jax `peak_bytes_in_use` on an accelerator; on a CPU the child's peak resident set,
which includes the framework itself); and step time, the loop's tokens/s over the steps after the
compiling first one, turned into seconds per step.
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

METHODS = ('full', 'lora', 'qlora')


def _random_batches(batch: int, seq: int, vocab: int):
  import numpy as np
  rng = np.random.default_rng(0)
  ones = np.ones((batch, seq), np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
  while True:
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    yield {'inputs': tokens[:, :-1].copy(), 'targets': tokens[:, 1:].copy(),
           'positions': positions, 'segment_ids': ones, 'loss_mask': ones.astype(np.float32)}


def _tree_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def child(args) -> dict:
  import jax
  from flax import nnx

  from configs import lora as lora_config, qlora as qlora_config, sft as sft_config
  from models import presets
  from models.llama import create_model
  from trainers import common, loop, sft
  from trainers import lora as adapters

  module = {'full': sft_config, 'lora': lora_config, 'qlora': qlora_config}[args.child]
  config = module.get_config('small')
  config.model.preset = args.preset
  config.data.seq_len = args.seq
  config.train.batch_size = args.batch
  config.train.steps = args.steps
  config.train.log_every = args.steps - 1
  config.train.eval_batches = 0
  config.mesh.data = 1
  config.model.dtype = args.dtype
  model_cfg = common.model_config(config, presets.PRESETS[args.preset].vocab_size)
  mesh = common.mesh_from_config(config)
  model = create_model(model_cfg, seed=0, mesh=mesh, rules=config.sharding_rules)
  spec = adapters.spec(config)
  if spec is not None:
    model = adapters.adapt(model, spec, seed=0, mesh=mesh)
  trainable = adapters.trainable(spec)
  params = nnx.state(model, trainable)
  opt_bytes = _tree_bytes(loop.make_optimizer(config).init(params))
  workdir = tempfile.mkdtemp(prefix=f'finetune_{args.child}_')
  try:
    loop.train(config, workdir, model, adapters.wrap_loss(sft.sft_loss, spec),
               _random_batches(args.batch, args.seq, model_cfg.vocab_size), None, mesh=mesh,
               rules=config.sharding_rules, trainable=trainable)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      tokens_per_s = [json.loads(line) for line in f][-1]['tokens_per_s']
    step_dir = os.path.join(workdir, 'checkpoints', str(args.steps))
    ckpt_bytes = sum(_dir_bytes(os.path.join(step_dir, item)) for item in ('params', 'opt_state'))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  peak = (stats['peak_bytes_in_use'] if stats else
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return {'method': args.child, 'device': dev.device_kind, 'params': model_cfg.num_params(),
          'trainable': int(sum(x.size for x in jax.tree.leaves(params))),
          'optimizer_bytes': opt_bytes, 'checkpoint_bytes': ckpt_bytes, 'peak_bytes': peak,
          'peak_kind': 'device peak_bytes_in_use' if stats else 'process peak RSS',
          'step_s': args.batch * args.seq / tokens_per_s if tokens_per_s else float('nan')}


def _run_child(method: str, args) -> dict:
  fd, result_file = tempfile.mkstemp(prefix=f'bench_{method}_', suffix='.json')
  os.close(fd)
  cmd = [sys.executable, '-m', 'bench.finetune_memory', f'--child={method}',
         f'--result_file={result_file}', f'--preset={args.preset}', f'--batch={args.batch}',
         f'--seq={args.seq}', f'--steps={args.steps}', f'--dtype={args.dtype}']
  print(f'=== {method}', flush=True)
  t0 = time.perf_counter()
  rc = subprocess.call(cmd)
  try:
    with open(result_file) as f:
      result = json.load(f)
  except (OSError, ValueError):
    result = {'method': method, 'error': f'exit {rc}'}
  finally:
    os.unlink(result_file)
  result['wall_s'] = time.perf_counter() - t0
  return result


def _mb(b) -> str:
  return f'{b / 2**20:,.1f} MiB'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small', help='Model preset (models/presets.py).')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--steps', type=int, default=12, help='Steps per method (the first compiles).')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--dtype', default='bfloat16', help='Compute dtype (model.dtype).')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--result_file', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    with open(args.result_file, 'w') as f:
      json.dump(child(args), f)
    return
  results = [_run_child(m, args) for m in args.methods.split(',')]
  print(json.dumps(results, indent=1))
  ok = [r for r in results if 'error' not in r]
  if ok:
    print(f'\n{ok[0]["device"]}, preset {args.preset} ({ok[0]["params"]:,} parameters), '
          f'batch {args.batch} x {args.seq}, {args.dtype} compute, AdamW; '
          f'peak = {ok[0]["peak_kind"]}')
    print(f'{"method":<7} {"trainable":>13} {"optimizer state":>16} {"checkpoint":>13} '
          f'{"peak memory":>13} {"step":>9}')
    for r in ok:
      print(f'{r["method"]:<7} {r["trainable"]:>13,} {_mb(r["optimizer_bytes"]):>16} '
            f'{_mb(r["checkpoint_bytes"]):>13} {_mb(r["peak_bytes"]):>13} '
            f'{r["step_s"] * 1000:>7.0f}ms')


if __name__ == '__main__':
  main()
