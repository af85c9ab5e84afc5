"""Bad input fails early with a message naming the problem, and never costs what a run saved."""
import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models import checkpoint
from tests.helpers import read_metrics, tiny_config
from trainers import loop, pretrain
from trainers import workdir as workdir_lib


def _cli(repo_root, *args):
  cmd = [sys.executable, '-m', 'trainers.pretrain', '--config=configs/pretrain.py:tiny', *args]
  return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)


def test_unknown_config_key_is_named(repo_root, tmp_path):
  out = _cli(repo_root, f'--workdir={tmp_path}', '--config.train.stepz=3')
  assert out.returncode == 1
  # One line naming the flag and the closest key, not ml_collections' chained traceback.
  assert out.stderr.strip().splitlines() == [
      "FATAL Flags parsing error: --config.train.stepz: 'stepz' is not a key of "
      "configs/pretrain.py:tiny (did you mean 'steps'?)"], out.stderr[-2000:]
  assert not os.listdir(tmp_path)
  with pytest.raises(AttributeError, match='stepz'):
    tiny_config(**{'train.stepz': 3})


def test_wrong_type_is_named(repo_root, tmp_path):
  out = _cli(repo_root, f'--workdir={tmp_path}', '--config.train.steps=many')
  assert out.returncode != 0
  assert 'train.steps' in out.stderr or "'steps'" in out.stderr, out.stderr[-2000:]
  assert not os.listdir(tmp_path)  # Nothing was written.


def test_a_style_that_cannot_render_a_task_is_named_before_any_work(repo_root, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'eval.benchmarks', f'--workdir={tmp_path}',
                        '--tasks=arc_easy,gsm8k', '--style=lighteval'],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.startswith('FATAL Flags parsing error:') and (
      '--style=lighteval renders the 0-shot prompts of' in out.stderr and 'gsm8k' in out.stderr
  ), out.stderr[-2000:]
  assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished run whose files the failing commands below must leave untouched."""
  workdir = str(tmp_path_factory.mktemp('done'))
  pretrain.run(tiny_config(**{'train.steps': 4, 'train.checkpoint_every': 2}), workdir)
  snapshot = str(tmp_path_factory.mktemp('snapshot') / 'copy')
  shutil.copytree(workdir, snapshot)
  return workdir, snapshot


def _assert_unchanged(workdir, snapshot):
  # (.lock is the workdir's lock record: each start rewrites who holds it, nothing more.)
  cmp = filecmp.dircmp(workdir, snapshot, ignore=[workdir_lib.LOCK_FILE])
  assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, cmp.report()
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == 4


def test_empty_corpus(finished_run, tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n\n ')
  with pytest.raises(ValueError, match='empty'):
    pretrain.run(tiny_config(**{'data.source': str(empty), 'train.steps': 8}), finished_run[0])
  _assert_unchanged(*finished_run)


def test_missing_file(finished_run, tmp_path):
  missing = str(tmp_path / 'nope.jsonl')
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    pretrain.run(tiny_config(**{'data.source': missing, 'train.steps': 8}), finished_run[0])
  _assert_unchanged(*finished_run)


def test_seq_len_beyond_model_limit(finished_run):
  with pytest.raises(ValueError, match='data.seq_len=1024 exceeds'):
    pretrain.run(tiny_config(**{'data.seq_len': 1024, 'train.steps': 8}), finished_run[0])
  _assert_unchanged(*finished_run)


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys):
  rng = np.random.default_rng(0)
  words = ['the', 'king', 'and', 'queen', 'of', 'a', 'land', 'far', 'away', 'said']
  text = '\n\n'.join(' '.join(rng.choice(words, 60)) for _ in range(200)).encode()
  corpus = tmp_path / 'bad.txt'
  corpus.write_bytes(text[:500] + b'\xff\xfe' + text[500:2000] + b'\xc3(' + text[2000:])
  result = pretrain.run(tiny_config(**{'data.source': str(corpus), 'train.steps': 2,
                                       'tokenizer.vocab_size': 300}), str(tmp_path / 'run'))
  assert result.completed
  assert 'undecodable byte sequences replaced' in capsys.readouterr().out


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  """A loss that turns NaN at step 4 stops the run; nothing non-finite is applied or saved."""
  config = tiny_config(**{'train.steps': 10, 'train.log_every': 1,
                          'train.checkpoint_every': 2})
  data = pretrain.prepare_data(config, str(tmp_path))
  from data import pipeline
  from models import llama
  from trainers import common
  model_cfg = common.model_config(config, data.tokenizer.vocab_size)
  batches = pipeline.make_train_iterator(pipeline.PackedRows(data.train, 64), batch_size=4,
                                         seed=0)

  def poisoned():
    for i, batch in enumerate(batches):
      yield {**batch, 'poison': np.full((4, 1), float('nan') if i == 3 else 0.0, np.float32)}

  def loss_fn(model, batch, rng):
    loss_sum, count, metrics = pretrain.next_token_loss(model, batch, rng)
    return loss_sum + batch['poison'].sum(), count, metrics

  mesh = common.mesh_from_config(config)
  model = llama.create_model(model_cfg, seed=0, mesh=mesh, rules=config.sharding_rules)
  common.write_workdir(config, str(tmp_path), data.tokenizer, model_cfg)
  with pytest.raises(FloatingPointError, match='step 4.*checkpoint \\(step 2\\) is kept'):
    loop.train(config, str(tmp_path), model, loss_fn, poisoned(), None, mesh=mesh,
               rules=config.sharding_rules)
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3]
  restored, step = checkpoint.load_model(str(tmp_path))
  assert step == 2
  from flax import nnx
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(restored)))
