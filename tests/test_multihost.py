"""Multi-host training on one machine: two processes of 4 CPU devices each, joined by
jax.distributed (--multihost --coordinator --num_processes --process_id), train exactly the steps
one process of 8 devices trains, and save and restore their checkpoint together."""
import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

FLAGS = ['--config=configs/pretrain.py:tiny', '--config.model.dtype=float32',
         '--config.mesh.data=-1', '--config.train.batch_size=8', '--config.train.steps=6',
         '--config.train.log_every=1', '--config.train.eval_every=3',
         '--config.train.eval_batches=2', '--config.train.checkpoint_every=3',
         '--config.data.max_chars=60000', '--config.tokenizer.vocab_size=512']


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _two_processes(repo_root, workdir, *extra):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'trainers.pretrain', f'--workdir={workdir}', *FLAGS, *extra,
       '--multihost', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=repo_root, env=_env(4), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  return [p.returncode for p in procs], outs


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.timeout(900)
def test_two_processes_train_what_one_process_trains_and_resume_together(repo_root, tmp_path):
  one = str(tmp_path / 'one')
  single = subprocess.run([sys.executable, '-m', 'trainers.pretrain', f'--workdir={one}',
                           *FLAGS], cwd=repo_root, env=_env(8), capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  two = str(tmp_path / 'two')
  codes, outs = _two_processes(repo_root, two, '--config.train.stop_after=3')
  assert codes == [143, 143], outs[0][-3000:] + outs[1][-3000:]  # stopped with a checkpoint
  assert 'process 1 of 2: 4 of 8 devices' in outs[1]
  codes, outs = _two_processes(repo_root, two)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f'Resumed from {two}/checkpoints/3.' in outs[0], outs[0][-2000:]
  want, got = _metrics(one), _metrics(two)
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for a, b in zip(want, got):
    for key in ('loss', 'eval_loss'):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=f'step {a["step"]} {key}')
  assert sorted(os.listdir(os.path.join(two, 'checkpoints'))) == sorted(
      os.listdir(os.path.join(one, 'checkpoints')))


@pytest.mark.timeout(900)
def test_two_processes_stream_their_own_documents_and_resume_exactly(repo_root, tmp_path):
  """data.streaming across processes: each packs its own share of the documents (so the losses
  are not one process's), and a stopped run resumes each process's iterator exactly."""
  streamed = ['--config.data.streaming=True', '--config.data.source=kjv']
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  codes, outs = _two_processes(repo_root, straight, *streamed)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  codes, outs = _two_processes(repo_root, resumed, *streamed, '--config.train.stop_after=3')
  assert codes == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  codes, outs = _two_processes(repo_root, resumed, *streamed)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f'Resumed from {resumed}/checkpoints/3.' in outs[0], outs[0][-2000:]
  want, got = _metrics(straight), _metrics(resumed)
  assert [r['step'] for r in got] == list(range(1, 7))
  for a, b in zip(want, got):
    for key in ('loss', 'eval_loss'):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=f'step {a["step"]} {key}')
