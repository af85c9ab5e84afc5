"""Faults lose nothing: a damaged newest checkpoint, a kill inside an asynchronous save, a full
disk, a torn metrics line, two runs on one workdir, an interrupted import. Each test injects the
fault and checks what survives and what the error says."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from models import checkpoint
from tests.helpers import read_metrics, tiny_config, without_timing
from trainers import metrics as metrics_lib
from trainers import pretrain
from trainers import workdir as workdir_lib

# 12 steps, a checkpoint every 4 (steps 4, 8, 12), every step logged.
KEYS = {'train.steps': 12, 'train.log_every': 1, 'train.eval_every': 6,
        'train.checkpoint_every': 4}


def _strip(records):
  return without_timing(records)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The uninterrupted run every faulted run must reproduce."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  pretrain.run(tiny_config(**KEYS), workdir)
  return _strip(read_metrics(workdir))


def _run_script(code: str, repo_root, timeout=300):
  """A tiny pretraining run in a child process (faults that kill or limit a process)."""
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=repo_root,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _damage(workdir: str, step: int, how: str):
  step_dir = os.path.join(workdir, 'checkpoints', str(step))
  if how == 'truncated':  # As a half-finished copy to or from a bucket leaves it.
    for path in glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True):
      with open(path, 'r+b') as f:
        f.truncate(100)
  else:  # The commit marker of one item is missing: that item's copy never finished.
    os.remove(os.path.join(step_dir, 'opt_state', checkpoint.COMMIT_FILE))


@pytest.mark.parametrize('how', ['truncated', 'no_commit_marker'])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_still_matches(
    tmp_path, straight, how, capsys, repo_root):
  workdir = str(tmp_path / 'run')
  first = pretrain.run(tiny_config(**KEYS, **{'train.stop_after': 8}), workdir)
  assert first.step == 8
  _damage(workdir, 8, how)

  # Readers: one clear error naming the checkpoint and what to do; the CLI prints it as one line
  # (before, orbax's OUT_OF_RANGE was buried in a dozen tracebacks of its threads at exit).
  if how == 'truncated':
    with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/8 cannot be restored '
                       r'\(item params: .*--step=4'):
      checkpoint.load_model(workdir)
    model, step = checkpoint.load_model(workdir, step=4)
    assert step == 4
    cli = subprocess.run([sys.executable, '-m', 'eval.perplexity', f'--workdir={workdir}'],
                         cwd=repo_root, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert cli.returncode == 2, cli.stderr[-2000:]
    errors = [line for line in cli.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'checkpoints/8 cannot be restored' in errors[0], cli.stderr
    assert 'Traceback' not in cli.stderr and 'Event loop is closed' not in cli.stderr

  # The trainer resumes from step 4, says what it skipped, keeps the damaged one aside, and logs
  # exactly the uninterrupted run's metrics.
  capsys.readouterr()
  again = pretrain.run(tiny_config(**KEYS), workdir)
  out = capsys.readouterr().out
  assert again.completed
  assert f'Skipping checkpoint {workdir}/checkpoints/8' in out
  assert 'Resumed from' in out and 'checkpoints/4.' in out
  assert os.path.isdir(os.path.join(workdir, checkpoint.DAMAGED_DIR, '8'))  # Kept, not deleted.
  assert _strip(read_metrics(workdir)) == straight


def test_when_no_checkpoint_restores_the_run_stops_and_deletes_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  pretrain.run(tiny_config(**{**KEYS, 'train.steps': 4}), workdir)
  _damage(workdir, 4, 'truncated')
  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint under .* restores: step '
                     r'4: .*Nothing was deleted'):
    pretrain.run(tiny_config(**KEYS), workdir)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))


def test_a_kill_inside_an_async_save_keeps_the_previous_checkpoint(tmp_path, straight,
                                                                    repo_root):
  """SIGKILL while the step-8 save is being written in the background (its temporary directory
  exists, the rename has not happened): step 4 survives and the rerun reproduces the run."""
  workdir = str(tmp_path / 'run')
  killed = _run_script(f'''
      import os, signal
      from orbax.checkpoint._src.path import atomicity  # (private: the commit step of a save)
      from tests.helpers import tiny_config
      from trainers import pretrain

      finalize = atomicity.AtomicRenameTemporaryPath.finalize
      async def die_at_commit(self):  # In orbax's background thread, the items all written.
        if self._final_path.name == '8':
          os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)
      atomicity.AtomicRenameTemporaryPath.finalize = die_at_commit
      pretrain.run(tiny_config(**{KEYS!r}), {workdir!r})
      ''', repo_root)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.manager.all_steps() == [4]  # The half-written step 8 is not a checkpoint.
  ckpt.close()
  assert pretrain.run(tiny_config(**KEYS), workdir).completed
  assert _strip(read_metrics(workdir)) == straight


def test_a_full_disk_stops_the_run_naming_the_path_and_keeps_the_last_checkpoint(tmp_path,
                                                                                 repo_root):
  """The file-size limit of the process (RLIMIT_FSIZE) makes the disk 'full' for the step-8
  save: the run stops with an error naming the checkpoint and the free space; step 4 restores
  and metrics.jsonl reads cleanly."""
  workdir = str(tmp_path / 'run')
  pretrain.run(tiny_config(**KEYS, **{'train.stop_after': 4}), workdir)
  run = _run_script(f'''
      import resource, signal
      from tests.helpers import tiny_config
      from trainers import pretrain
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past the limit fail with EFBIG.
      resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
      pretrain.run(tiny_config(**{KEYS!r}), {workdir!r})
      ''', repo_root)
  assert run.returncode != 0
  assert 'CheckpointError: could not write' in run.stderr, run.stderr[-3000:]
  assert 'MiB free on' in run.stderr and 'step 4, is intact' in run.stderr, run.stderr[-3000:]
  model, step = checkpoint.load_model(workdir)
  assert step == 4
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.manager.all_steps() == [4]
  ckpt.close()
  assert read_metrics(workdir)[0]['step'] == 1  # Readable; the rerun will cut it back to 4.


def test_metrics_readers_skip_a_torn_last_line_and_say_so(tmp_path, capsys):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    f.write(json.dumps({'step': 1, 'loss': 2.0}) + '\n' + '{"step": 2, "lo')
  assert metrics_lib.read_metrics(path) == [{'step': 1, 'loss': 2.0}]
  assert 'skipped the torn last line' in capsys.readouterr().err
  # A resumed run rewrites the file without the torn line.
  metrics_lib.MetricsWriter(str(tmp_path), start_step=1, total_steps=3).close()
  with open(path) as f:
    assert f.read() == json.dumps({'step': 1, 'loss': 2.0}) + '\n'
  with open(path, 'w') as f:  # A bad line that is not the last is an error naming it.
    f.write('{"step": 1\n' + json.dumps({'step': 2}) + '\n')
  with pytest.raises(ValueError, match='metrics.jsonl:1: not a JSON record'):
    metrics_lib.read_metrics(path)


def test_a_second_run_on_a_live_workdir_fails_naming_the_first(tmp_path, repo_root):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
          import sys, time
          from trainers import workdir
          workdir.claim({workdir!r}, 'pretrain')
          print('claimed', flush=True)
          time.sleep(120)
          ''')], cwd=repo_root, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'claimed'
    with pytest.raises(workdir_lib.WorkdirError, match=rf'in use by a live process: pretrain run, '
                       rf'pid {holder.pid} on '):
      pretrain.run(tiny_config(**KEYS), workdir)
    assert not os.path.exists(os.path.join(workdir, 'config.json'))  # Nothing was written.
  finally:
    holder.kill()  # A crashed run: its lock goes with it.
    holder.wait()
  # The stale record does not block: the next run takes the workdir...
  workdir_lib.claim(workdir, 'pretrain')
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
    assert json.load(f)['pid'] == os.getpid()
  # ...but another stage may not share it.
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds a 'pretrain' run .* needs its own "
                     r"--workdir"):
    workdir_lib.claim(workdir, 'sft')
  workdir_lib.release(workdir)


def test_an_interrupted_import_leaves_no_workdir_and_a_rerun_completes(tmp_path, monkeypatch,
                                                                         capsys):
  from launch import import_checkpoint, staging
  from tests.test_import_export import _hf_model
  _hf_model(tmp_path / 'hf', 'llama')
  workdir = str(tmp_path / 'run')
  real = checkpoint.Checkpointer.save

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', fail)
  with pytest.raises(OSError, match='No space left'):
    import_checkpoint.import_checkpoint(str(tmp_path / 'hf'), workdir)
  assert not os.path.exists(workdir) and not os.path.exists(workdir + staging.SUFFIX)
  # A SIGKILL leaves the staging directory behind: never mistaken for a workdir, and removed by
  # the next import.
  os.makedirs(workdir + staging.SUFFIX + '/checkpoints')
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', real)
  import_checkpoint.import_checkpoint(str(tmp_path / 'hf'), workdir)
  assert 'left by an earlier run that was interrupted' in capsys.readouterr().out
  assert not os.path.exists(workdir + staging.SUFFIX)
  assert checkpoint.load_model(workdir)[1] == 0

  # Export the same way: a failure midway leaves no output directory; a leftover is replaced.
  from launch import export_checkpoint
  out = str(tmp_path / 'out')
  monkeypatch.setattr(export_checkpoint, '_write_tokenizer', fail)
  with pytest.raises(OSError, match='No space left'):
    export_checkpoint.export_hf(workdir, out)
  assert not os.path.exists(out) and not os.path.exists(out + staging.SUFFIX)
  monkeypatch.undo()
  os.makedirs(out + staging.SUFFIX)
  export_checkpoint.export_hf(workdir, out)
  assert os.path.exists(os.path.join(out, 'config.json'))
  assert not os.path.exists(out + staging.SUFFIX)
