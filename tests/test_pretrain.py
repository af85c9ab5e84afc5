"""Pretraining end to end on the built-in corpus: the loss falls, perplexity drops far below the
untrained model's, a resumed run reproduces the uninterrupted one, and SIGTERM saves a checkpoint."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from eval.perplexity import evaluate_perplexity
from models import checkpoint, llama
from tests.helpers import read_metrics, tiny_config, without_timing
from trainers import pretrain


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  result = pretrain.run(tiny_config(), workdir)
  return workdir, result


def test_run_writes_the_workdir_contract(trained):
  workdir, result = trained
  assert result.completed and result.step == 40
  for name in ('config.json', 'model.json', 'tokenizer.model', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tb')))
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == 40
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 40
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(5, 41, 5))
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'tflops_per_device'):
    assert all(key in r for r in records), key
  assert 'eval_loss' in records[-1]
  # Model FLOPs: tokens/s x (6N + 12 L d T) per device; no MFU on a CPU (no datasheet peak).
  import jax
  fpt = checkpoint.load_model_config(workdir).train_flops_per_token(64)
  for r in records[1:]:
    assert r['tflops_per_device'] == pytest.approx(
        r['tokens_per_s'] * fpt / jax.device_count() / 1e12, rel=1e-6)
    assert 'mfu' not in r


def test_loss_falls_and_perplexity_drops(trained, tmp_path):
  workdir, _ = trained
  records = read_metrics(workdir)
  assert records[-1]['loss'] < records[0]['loss'] - 1.0

  # The same eval script on the untrained model: a copy of the workdir holding the initial params.
  untrained = str(tmp_path / 'untrained')
  os.makedirs(untrained)
  for name in ('config.json', 'model.json', 'tokenizer.model'):
    shutil.copy(os.path.join(workdir, name), untrained)
  cfg = checkpoint.load_model_config(workdir)
  model = llama.create_model(cfg, seed=0)
  from flax import nnx
  ckpt = checkpoint.Checkpointer(os.path.join(untrained, 'checkpoints'), async_save=False)
  ckpt.save(0, nnx.state(model, nnx.Param))
  ckpt.close()

  before = evaluate_perplexity(untrained)
  after = evaluate_perplexity(workdir)
  assert after['step'] == 40 and before['step'] == 0
  assert before['perplexity'] > 0.5 * cfg.vocab_size  # Untrained: about uniform over the vocab.
  assert after['perplexity'] < 0.5 * before['perplexity']
  with open(os.path.join(workdir, 'eval_perplexity.json')) as f:
    assert json.load(f)['perplexity'] == after['perplexity']


def test_resumed_run_matches_uninterrupted(tmp_path):
  keys = {'train.steps': 12, 'train.log_every': 1, 'train.eval_every': 6,
          'train.checkpoint_every': 4}
  pretrain.run(tiny_config(**keys), str(tmp_path / 'straight'))
  first = pretrain.run(tiny_config(**keys, **{'train.stop_after': 7}), str(tmp_path / 'resumed'))
  assert not first.completed and first.step == 7
  again = pretrain.run(tiny_config(**keys, **{'train.stop_after': 7}), str(tmp_path / 'resumed'))
  assert not again.completed and again.step == 7  # The same command does not creep on.
  second = pretrain.run(tiny_config(**keys), str(tmp_path / 'resumed'))
  assert second.completed

  strip = without_timing
  straight, resumed = strip(read_metrics(tmp_path / 'straight')), strip(read_metrics(tmp_path / 'resumed'))
  assert [r['step'] for r in resumed] == list(range(1, 13))
  assert resumed == straight


def test_streamed_pretraining_resumes_exactly_and_evaluates_its_held_out_documents(tmp_path):
  """data.streaming: a mixture of a JSONL and a text corpus read as training reaches them
  (data/streaming.py); the loss falls, a run stopped and resumed logs exactly the uninterrupted
  run's metrics (the grain iterator's position comes back from the checkpoint), and
  eval.perplexity finds the documents the run held out (its loss equals the trainer's last
  eval)."""
  from data import sources
  kjv = sources.load_corpus('kjv').docs
  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in kjv[:600]))
  (tmp_path / 'b.txt').write_text('\n\n'.join(kjv[600:]))
  keys = {'data.streaming': True, 'data.source': f'{tmp_path / "a.jsonl"}+{tmp_path / "b.txt"}',
          'data.mixture_weights': '0.3,0.7', 'data.max_chars': 1000, 'train.steps': 24, 'train.log_every': 1, 'train.eval_every': 12,
          'train.checkpoint_every': 4}
  straight = pretrain.run(tiny_config(**keys), str(tmp_path / 'straight'))
  assert straight.completed
  assert not pretrain.run(tiny_config(**keys, **{'train.stop_after': 10}),
                          str(tmp_path / 'resumed')).completed
  assert pretrain.run(tiny_config(**keys), str(tmp_path / 'resumed')).completed
  strip = without_timing
  records = strip(read_metrics(tmp_path / 'straight'))
  assert strip(read_metrics(tmp_path / 'resumed')) == records
  assert records[-1]['loss'] < records[0]['loss'] - 1.0

  config = tiny_config(**keys)
  result = evaluate_perplexity(str(tmp_path / 'straight'),
                               max_batches=config.train.eval_batches)
  assert result['step'] == 24 and result['documents'] >= 1
  for key in ('eval_loss', 'eval_loss_a', 'eval_loss_b'):  # Pooled, and each source's.
    assert result[key] == pytest.approx(records[-1][key], rel=1e-4), key
  last = records[-1]
  assert min(last['eval_loss_a'], last['eval_loss_b']) <= last['eval_loss'] <= max(
      last['eval_loss_a'], last['eval_loss_b'])
  assert 'eval_perplexity_b' in last and result['tokens_a'] + result['tokens_b'] == result['tokens']
  # Every held-out document, and data.max_chars (1,000 here) does not cut a streamed corpus.
  assert evaluate_perplexity(str(tmp_path / 'straight'))['tokens'] > 20 * result['tokens'] > 10000
  with pytest.raises(ValueError, match="data.mixture_weights='0.3,0.7' needs data.streaming=True"):
    pretrain.run(tiny_config(**{**keys, 'data.streaming': False}), str(tmp_path / 'in_memory'))


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, repo_root):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'trainers.pretrain', '--config=configs/pretrain.py:tiny',
         f'--workdir={workdir}', '--config.mesh.data=1', '--config.data.max_chars=200000',
         '--config.train.steps=100000', '--config.train.log_every=1',
         '--config.train.checkpoint_every=100000']
  proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 143, out
  assert 'SIGTERM' in out
  saved = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step()
  assert saved == read_metrics(workdir)[-1]['step'] >= 1

  done = subprocess.run(cmd[:-3] + [f'--config.train.steps={saved + 2}'], cwd=repo_root,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  assert f'Resumed from {workdir}/checkpoints/{saved}' in done.stdout
  assert read_metrics(workdir)[-1]['step'] == saved + 2


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  keys = {'train.steps': 3, 'train.log_every': 1, 'train.eval_every': 0}
  pretrain.run(tiny_config(**keys), str(tmp_path / 'one'))
  pretrain.run(tiny_config(**keys, **{'train.grad_accum': 2}), str(tmp_path / 'two'))
  one, two = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'two')
  for a, b in zip(one, two):
    assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)
    assert b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-4)


@pytest.mark.parametrize('kind,want', [
    # Steps 0, 5, 10 (warmup ends), 50, 80 (wsd's decay starts: 20% of 100), 90, 100, 120.
    ('cosine', [0, 0.5, 1, 0.1 + 0.9 * (1 + math.cos(math.pi * 40 / 90)) / 2, None, None, 0.1, 0.1]),
    ('linear', [0, 0.5, 1, 0.6, 0.3, 0.2, 0.1, 0.1]),
    ('wsd', [0, 0.5, 1, 1, 1, 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1, 0.1]),
])
def test_learning_rate_schedules_by_hand(kind, want):
  from trainers import loop
  c = tiny_config(**{'train.steps': 100, 'optimizer.warmup_steps': 10,
                     'optimizer.learning_rate': 1.0, 'optimizer.min_lr_ratio': 0.1,
                     'optimizer.schedule': kind})
  f = loop.learning_rate_schedule(c)
  for step, lr in zip((0, 5, 10, 50, 80, 90, 100, 120), want):
    if lr is not None:
      assert float(f(step)) == pytest.approx(lr, abs=1e-6), (kind, step)
  if kind == 'wsd':
    c = tiny_config(**{'train.steps': 100, 'optimizer.warmup_steps': 10,
                       'optimizer.learning_rate': 1.0, 'optimizer.min_lr_ratio': 0.1,
                       'optimizer.schedule': 'wsd', 'optimizer.decay_shape': 'linear'})
    assert float(loop.learning_rate_schedule(c)(90)) == pytest.approx(0.55)
  for key, value, problem in [('optimizer.schedule', 'step', "optimizer.schedule='step'"),
                              ('optimizer.decay_fraction', 0.0, 'decay_fraction=0.0'),
                              ('optimizer.decay_shape', 'cos', "decay_shape='cos'")]:
    bad = tiny_config(**{'optimizer.schedule': 'wsd', key: value})
    with pytest.raises(ValueError, match=problem):
      loop.learning_rate_schedule(bad)


def test_a_wsd_run_stopped_before_its_decay_extends_to_more_steps(tmp_path):
  """Warmup-stable-decay's point: a run stopped in its stable phase, resumed with a larger
  train.steps, logs exactly what a run given those steps from the start logs (a cosine run
  cannot: its learning rate at every step depends on train.steps)."""
  keys = {'optimizer.schedule': 'wsd', 'optimizer.warmup_steps': 4, 'train.log_every': 1,
          'train.eval_every': 0, 'train.checkpoint_every': 4}
  pretrain.run(tiny_config(**keys, **{'train.steps': 24}), str(tmp_path / 'long'))
  short = tiny_config(**keys, **{'train.steps': 16, 'train.stop_after': 8})  # Decays from 13.
  assert not pretrain.run(short, str(tmp_path / 'extended')).completed
  assert pretrain.run(tiny_config(**keys, **{'train.steps': 24}),
                      str(tmp_path / 'extended')).completed
  strip = without_timing
  long, extended = strip(read_metrics(tmp_path / 'long')), strip(read_metrics(tmp_path / 'extended'))
  assert [r['step'] for r in extended] == list(range(1, 25))
  assert extended == long
  assert [r['lr'] for r in long[4:19]] == [long[4]['lr']] * 15  # The stable phase ...
  assert long[-1]['lr'] < 0.2 * long[4]['lr']  # ... then the decay.


def test_a_mixture_weighted_toward_a_source_learns_that_source_better(tmp_path):
  """What mixture weights are for: the run given more of a source's tokens ends with the lower
  held-out loss on that source (one tokenizer for both runs, the same eval batches)."""
  from data import streaming
  from data.tokenizer import save_tokenizer, train_tokenizer
  docs = streaming.open_sources('kjv+python_stdlib')
  sample = streaming.tokenizer_sample(docs, seed=0, eval_fraction=0.05, max_chars=400_000,
                                      weights=[0.5, 0.5])
  (tmp_path / 'tok').mkdir()
  tokenizer = save_tokenizer(train_tokenizer(sample, vocab_size=512), str(tmp_path / 'tok'))
  last = {}
  for weights in ('0.9,0.1', '0.1,0.9'):
    keys = {'data.streaming': True, 'data.source': 'kjv+python_stdlib', 'tokenizer.path': tokenizer,
            'data.mixture_weights': weights, 'train.steps': 60, 'train.eval_every': 0,
            'train.eval_batches': 4}
    pretrain.run(tiny_config(**keys), str(tmp_path / weights))
    last[weights] = read_metrics(tmp_path / weights)[-1]
  assert last['0.9,0.1']['eval_loss_kjv'] < last['0.1,0.9']['eval_loss_kjv'] - 0.2
  assert last['0.1,0.9']['eval_loss_python_stdlib'] < last['0.9,0.1']['eval_loss_python_stdlib'] - 0.2
