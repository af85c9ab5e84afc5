"""launch.sweep (one workdir per grid point, resumable, a results table and plots) and
eval.compare (the table and curves of any workdirs)."""
import csv
import json
import os
import subprocess
import sys

import pytest

from eval import compare
from launch import sweep

FAKE = 'tests.sweep_trainer_for_tests'


def _sweep(repo_root, sweep_dir, *args):
  return subprocess.run([sys.executable, '-m', 'launch.sweep', f'--workdir={sweep_dir}', *args],
                        cwd=repo_root, capture_output=True, text=True, timeout=600)


def test_a_sweep_runs_every_point_once_and_reruns_only_the_unfinished(repo_root, tmp_path):
  sweep_dir = str(tmp_path / 'sweep')
  args = ['--config=configs/sft.py:tiny', f'--trainer={FAKE}', '--parallel=2',
          '--grid=optimizer.learning_rate=1e-3,2e-3', '--grid=lora.rank=0,8']
  out = _sweep(repo_root, sweep_dir, *args)
  assert out.returncode == 0, out.stderr + out.stdout
  names = sorted(os.listdir(sweep_dir))
  assert names == sorted(['learning_rate=1e-3,rank=0', 'learning_rate=1e-3,rank=8',
                          'learning_rate=2e-3,rank=0', 'learning_rate=2e-3,rank=8',
                          'plots', 'results.csv', 'results.md'])
  record = json.load(open(os.path.join(sweep_dir, 'learning_rate=2e-3,rank=8', 'sweep.json')))
  assert record['returncode'] == 0 and '--config.lora.rank=8' in record['command']
  rows = list(csv.DictReader(open(os.path.join(sweep_dir, 'results.csv'))))
  by_lr = {(r['optimizer.learning_rate'], r['lora.rank']): r for r in rows}
  assert float(by_lr['2e-3', '8']['loss']) == pytest.approx(0.25)
  assert float(by_lr['1e-3', '0']['eval_loss']) == pytest.approx(2.0)
  assert all(r['status'] == 'done' and float(r['wall_s']) >= 0 for r in rows)
  assert os.path.exists(os.path.join(sweep_dir, 'plots', 'loss.png'))
  assert '| optimizer.learning_rate | lora.rank | status |' in out.stdout
  # Rerun after one point lost its record (as if killed): only that point runs again.
  os.remove(os.path.join(sweep_dir, 'learning_rate=1e-3,rank=8', 'sweep.json'))
  out = _sweep(repo_root, sweep_dir, *args)
  assert out.returncode == 0 and '(3 finished before)' in out.stdout
  runs = {n: len(open(os.path.join(sweep_dir, n, 'runs.txt')).readlines())
          for n in names if '=' in n}
  assert runs == {'learning_rate=1e-3,rank=0': 1, 'learning_rate=1e-3,rank=8': 2,
                  'learning_rate=2e-3,rank=0': 1, 'learning_rate=2e-3,rank=8': 1}


def test_a_failed_point_is_reported_and_the_sweep_exits_nonzero(repo_root, tmp_path):
  out = _sweep(repo_root, str(tmp_path / 's'), '--config=configs/sft.py:tiny', f'--trainer={FAKE}',
               '--grid=train.steps=2,fail')
  assert out.returncode == 1 and 'FAILED (exit 3' in out.stdout
  rows = list(csv.DictReader(open(tmp_path / 's' / 'results.csv')))
  assert [r['status'] for r in rows] == ['done', 'failed']


@pytest.mark.parametrize('grid, words', [
    ('optimizer.lr=1e-3', "'optimizer.lr' is not a key of configs/sft.py:tiny"),
    ('optimizer=1', "'optimizer' is a block"),
    ('optimizer.learning_rate', 'expected KEY=V1,V2'),
])
def test_bad_grids_are_errors_before_anything_runs(grid, words, tmp_path):
  config = sweep.load_config('configs/sft.py:tiny')
  with pytest.raises(ValueError, match=words):
    sweep.parse_grids([grid], config, 'configs/sft.py:tiny')


def test_a_real_trainer_point_runs_and_the_dry_run_prints_its_command(repo_root, tmp_path):
  sweep_dir = str(tmp_path / 'real')
  args = ['--config=configs/pretrain.py:tiny', '--grid=optimizer.learning_rate=3e-3', '--',
          '--config.train.steps=3', '--config.train.eval_every=3', '--config.train.log_every=1',
          '--config.data.max_chars=100000', '--config.model.dtype=float32', '--config.mesh.data=1']
  dry = _sweep(repo_root, sweep_dir, '--dry_run', *args)
  assert dry.returncode == 0 and not os.path.exists(sweep_dir)
  assert '-m trainers.pretrain --config=configs/pretrain.py:tiny' in dry.stdout
  assert dry.stdout.strip().endswith('--config.optimizer.learning_rate=3e-3')
  out = _sweep(repo_root, sweep_dir, *args)
  assert out.returncode == 0, out.stdout[-3000:]
  point = os.path.join(sweep_dir, 'learning_rate=3e-3')
  assert json.load(open(os.path.join(point, 'config.json')))['optimizer']['learning_rate'] == 3e-3
  rows = list(csv.DictReader(open(os.path.join(sweep_dir, 'results.csv'))))
  assert rows[0]['step'] == '3' and float(rows[0]['loss']) > 0 and rows[0]['eval_loss']


def test_compare_tables_and_plots_any_workdirs(tmp_path):
  for name, losses in (('a', [3.0, 2.0]), ('b', [4.0, 1.5])):
    wd = tmp_path / name
    wd.mkdir()
    with open(wd / 'metrics.jsonl', 'w') as f:
      for step, loss in enumerate(losses, 1):
        f.write(json.dumps({'step': step, 'loss': loss, 'lr': 0.1}) + '\n')
    (wd / 'eval_accuracy.json').write_text(json.dumps({'accuracy': 0.25 if name == 'a' else 0.5,
                                                       'nested': {'x': 1}}))
  result = compare.compare([str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'out'))
  rows = {r['run']: r for r in result['rows']}
  assert rows['a']['loss'] == 2.0 and rows['b']['accuracy.accuracy'] == 0.5
  assert rows['a']['accuracy.nested.x'] == 1 and rows['a']['step'] == 2
  assert sorted(os.path.basename(p) for p in result['plots']) == ['loss.png']  # lr is skipped
  assert '| run | step |' in open(tmp_path / 'out' / 'compare.md').read()
  with pytest.raises(FileNotFoundError, match='not a directory'):
    compare.compare([str(tmp_path / 'missing')], str(tmp_path / 'out'))
