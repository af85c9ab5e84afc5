"""Ablation sweeps over ml-collections overrides: one workdir per grid point, resumable.

  python -m launch.sweep --config=configs/sft.py:small --workdir=runs/sweep \\
      --grid=optimizer.learning_rate=1e-4,3e-4,1e-3 --grid=lora.rank=8,32 [--parallel=2] \\
      [-- --config.train.steps=200 ...]

Every point of the grids' product runs the config's trainer (configs/<stage>.py ->
trainers.<stage>; configs/lora.py and qlora.py -> trainers.lora; --trainer= says otherwise) in
WORKDIR/<point>, e.g. runs/sweep/learning_rate=1e-4,rank=8, with the point's values as
`--config.KEY=VALUE` overrides after the arguments given after `--`. Grid keys are checked
against the config before anything runs (a key that does not exist is an error naming it).
Points run --parallel at a time, each logging to its workdir's sweep.log; a point that finished
writes sweep.json (its values, command, exit status and wall time). Rerunning the same command
skips the finished points and reruns the rest, which resume from their own checkpoints (every
stage resumes exactly). It ends with the results table (each point's values, final loss, eval
metrics, wall time) printed and written as WORKDIR/results.md and results.csv, and eval.compare's
plots of the points' curves in WORKDIR/plots/. (One point per Cloud TPU VM is launch.tpu's job;
this tool runs points on the machine it runs on.)
"""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

def load_config(spec: str):
  """`path.py[:preset]` -> the config its get_config(preset) returns."""
  path, _, preset = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'--config={spec}: {path} does not exist')
  module_spec = importlib.util.spec_from_file_location('_sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def parse_grids(grids: list[str], config, spec: str) -> list[tuple[str, list[str]]]:
  out = []
  for grid in grids:
    key, eq, values = grid.partition('=')
    values = [v for v in values.split(',') if v]
    if not eq or not key or not values:
      raise ValueError(f'--grid={grid!r}: expected KEY=V1,V2,...')
    node = config
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        raise ValueError(f'--grid key {key!r} is not a key of {spec}')
      node = node[part]
    if hasattr(node, 'keys'):
      raise ValueError(f'--grid key {key!r} is a block of {spec}, not a value')
    if key in (k for k, _ in out):
      raise ValueError(f'--grid key {key!r} is given twice')
    out.append((key, values))
  if not out:
    raise ValueError('no --grid: give at least one KEY=V1,V2,...')
  return out


def trainer_for(spec: str) -> str:
  stem = os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]
  return 'trainers.lora' if stem in ('lora', 'qlora') else f'trainers.{stem}'


def points(grids) -> list[dict[str, str]]:
  keys = [k for k, _ in grids]
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grids))]


def point_name(point: dict[str, str]) -> str:
  """learning_rate=1e-4,rank=8: the keys' last parts, whole keys where two end alike."""
  tails = [k.split('.')[-1] for k in point]
  names = [t if tails.count(t) == 1 else k for t, k in zip(tails, point)]
  return ','.join(f'{n}={v}' for n, v in zip(names, point.values())).replace('/', '_')


def finished(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'sweep.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return record if record.get('returncode') == 0 else None


def run_sweep(spec: str, sweep_dir: str, grids: list[str], extra: list[str], *,
              parallel: int = 1, trainer: str = '', dry_run: bool = False) -> list[dict]:
  config = load_config(spec)
  grid = parse_grids(grids, config, spec)
  module = trainer or trainer_for(spec)
  todo = []
  for point in points(grid):
    workdir = os.path.join(sweep_dir, point_name(point))
    command = [sys.executable, '-m', module, f'--config={spec}', f'--workdir={workdir}', *extra,
               *(f'--config.{k}={v}' for k, v in point.items())]
    todo.append((point, workdir, command))
  if dry_run:
    for _, _, command in todo:
      print(' '.join(command))
    return []
  os.makedirs(sweep_dir, exist_ok=True)
  pending = [t for t in todo if not finished(t[1])]
  print(f'sweep of {len(todo)} points ({len(todo) - len(pending)} finished before), '
        f'{parallel} at a time, in {sweep_dir}', flush=True)
  running, done = [], len(todo) - len(pending)
  while pending or running:
    while pending and len(running) < parallel:
      point, workdir, command = pending.pop(0)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, 'sweep.log'), 'a')
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
      running.append((proc, log, point, workdir, command, time.time()))
      print(f'started {point_name(point)}', flush=True)
    time.sleep(0.2)
    for item in list(running):
      proc, log, point, workdir, command, start = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      wall = time.time() - start
      with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
        json.dump({'point': point, 'command': command, 'returncode': proc.returncode,
                   'wall_s': wall}, f, indent=2)
      done += 1
      status = 'done' if proc.returncode == 0 else (
          f'FAILED (exit {proc.returncode}; see {os.path.join(workdir, "sweep.log")})')
      print(f'[{done}/{len(todo)}] {status}: {point_name(point)} in {wall:.0f} s', flush=True)
  return results(sweep_dir, todo)


def results(sweep_dir: str, todo) -> list[dict]:
  """The results table of the points: printed, and written as results.md and results.csv."""
  from eval import compare
  rows = []
  for point, workdir, _ in todo:
    summary = compare.summarize(workdir) if os.path.isdir(workdir) else {}
    record = finished(workdir)
    row = dict(point)
    row['status'] = 'done' if record else 'failed'
    row['step'] = summary.get('step')
    row['loss'] = summary.get('loss')
    row.update({k: v for k, v in summary.items() if k.startswith('eval_') or '.' in k})
    row['wall_s'] = round(record['wall_s'], 1) if record else None
    rows.append(row)
  markdown = compare.write_table(rows, os.path.join(sweep_dir, 'results'),
                                 list(dict.fromkeys(k for r in rows for k in r)))
  workdirs = [w for _, w, _ in todo if os.path.isdir(w)]
  plots_dir = os.path.join(sweep_dir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  plots = compare.plot(workdirs, plots_dir)
  print(markdown)
  print(f'\nwrote {sweep_dir}/results.md, results.csv and {len(plots)} plots in {plots_dir}',
        flush=True)
  return rows


def main():
  config = flags.DEFINE_string('config', None, 'Config file and preset, e.g. configs/sft.py:small.',
                               required=True)
  workdir = flags.DEFINE_string('workdir', None, 'Sweep directory: one workdir per point in it.',
                                required=True)
  grid = flags.DEFINE_multi_string('grid', [], 'KEY=V1,V2,...: a config key and its values '
                                   '(repeat for more keys; the sweep runs their product).')
  parallel = flags.DEFINE_integer('parallel', 1, 'Points running at once.')
  trainer = flags.DEFINE_string('trainer', '', 'Trainer module (default: from the config file).')
  dry_run = flags.DEFINE_bool('dry_run', False, 'Print each point\'s command; run nothing.')

  def _main(argv):
    try:
      rows = run_sweep(config.value, workdir.value, grid.value, argv[1:],
                       parallel=max(1, parallel.value), trainer=trainer.value,
                       dry_run=dry_run.value)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'error: {e}')
    if any(r['status'] != 'done' for r in rows):
      sys.exit(1)
  app.run(_main)


if __name__ == '__main__':
  main()
