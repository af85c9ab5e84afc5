"""Where a run's numbers go: metrics.jsonl, TensorBoard events under tb/, and the console.

On resume the records past the restored step are dropped first, so metrics.jsonl always reads as
one uninterrupted run. The console gets one progress display: on a terminal a live tqdm bar with
each logged step printed above it; when output goes to a file or a pipe (a log), no bar, only
the logged steps as plain lines with their progress and ETA, so a log never holds a bar's
refreshes interleaved with them.
"""
import json
import math
import os
import shutil
import sys
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
import tqdm


class MetricsWriter:

  def __init__(self, workdir: str, *, start_step: int, total_steps: int):
    from trainers.workdir import is_primary
    self.path = os.path.join(workdir, 'metrics.jsonl')
    # In a multi-process job only the first process writes (every process has the same metrics:
    # they are computed from global arrays).
    self._primary = is_primary()
    if self._primary:
      self._truncate_after(start_step)
    self._file = open(self.path, 'a') if self._primary else None
    self._tb = EventFileWriter(os.path.join(workdir, 'tb')) if self._primary else None
    self._live = sys.stderr.isatty() and self._primary
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                          mininterval=1.0, smoothing=0.1, disable=not self._live)
    self._total, self._start_step, self._start_time = total_steps, start_step, time.time()

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    keep = [json.dumps(r) + '\n' for r in read_metrics(self.path) if r['step'] <= step]
    # Rewritten beside and renamed over: a kill here leaves the old file or the new, never half.
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(self.path + '.tmp', self.path)

  def advance(self, n: int = 1, **postfix):
    self._bar.update(n)
    if postfix:
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, metrics: dict):
    if not self._primary:
      return
    record = {'step': int(step), **{k: _py(v) for k, v in metrics.items()}}
    try:  # One write per record; a kill or a full disk can tear only the last line.
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
    except OSError as e:
      raise OSError(e.errno, f'could not append to {self.path} ({e.strerror}); '
                    f'{_free(self.path)}') from e
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in record.items() if k != 'step' and isinstance(v, (int, float))]
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary_pb2.Summary(value=values)))
    self._tb.flush()
    text = ' '.join(f'{k} {_fmt(v)}' for k, v in record.items() if k != 'step')
    if self._live:
      self._bar.write(f'step {step}/{self._total}: {text}')
      return
    elapsed, done = time.time() - self._start_time, step - self._start_step
    eta = elapsed / done * (self._total - step) if done > 0 else float('nan')
    print(f'step {step}/{self._total} ({step / max(self._total, 1):.0%}, {_clock(elapsed)} '
          f'elapsed, ETA {_clock(eta)}): {text}', flush=True)

  def close(self):
    self._bar.close()
    if self._primary:
      self._file.close()
      self._tb.close()


class Progress:
  """Progress of a long pass that is not a training run (an eval scoring thousands of items), with
  the same one-display rule: a live tqdm bar on a terminal; otherwise, a plain line on stderr at
  most every `every_s` seconds and at the end, with the count, rate and ETA."""

  def __init__(self, label: str, total: int, unit: str, every_s: float = 60.0):
    self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
    self.done = 0
    self._live = sys.stderr.isatty()
    self._bar = tqdm.tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, mininterval=1.0,
                          disable=not self._live)
    self._start = self._last = time.time()

  def update(self, n: int):
    self.done += n
    self._bar.update(n)
    now = time.time()
    if self._live or (now - self._last < self.every_s and self.done < self.total):
      return
    self._last = now
    elapsed = now - self._start
    eta = elapsed / self.done * (self.total - self.done) if self.done else float('nan')
    print(f'{self.label}: {self.done:,}/{self.total:,} {self.unit} '
          f'({self.done / max(self.total, 1):.0%}, {self.done / max(elapsed, 1e-9):.1f}/s, '
          f'{_clock(elapsed)} elapsed, ETA {_clock(eta)})', file=sys.stderr, flush=True)

  def close(self):
    self._bar.close()


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl. A torn last line (a run killed or out of disk mid-write) is
  skipped with a warning; a bad line anywhere else is an error naming it."""
  with open(path) as f:
    lines = f.readlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1 and not line.endswith('\n'):
        print(f'Warning: skipped the torn last line of {path} ({len(line)} characters without '
              'a newline: the run that wrote it stopped mid-write).', file=sys.stderr)
        break
      raise ValueError(f'{path}:{i + 1}: not a JSON record: {line[:80]!r}') from None
  return records


def _free(path: str) -> str:
  try:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return f'{free / 2**20:,.1f} MiB free there'
  except OSError:
    return 'free space unknown'


def _py(v):
  v = v.item() if hasattr(v, 'item') else v
  return v


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  minutes, s = divmod(int(seconds), 60)
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m{s:02d}s'


def _fmt(v):
  if isinstance(v, float):
    return f'{v:.4g}' if math.isfinite(v) and abs(v) < 1e5 else f'{v:.3e}'
  return str(v)
