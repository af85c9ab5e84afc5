"""One live writer per workdir, and one stage per workdir.

A stage claims its workdir before it writes anything: an exclusive `flock` on WORKDIR/.lock, held
while the stage runs (the `stage` decorator on each trainer's run). The kernel drops the lock when
its process dies however it dies (SIGKILL, a preempted VM), so a crashed run never leaves a lock
that blocks the next one; the file itself
stays, holding the JSON of the last claimant (stage, pid, host, command, start time), which is
what a second start is told when the lock is taken, and how a different stage on the same
workdir is refused. A lock file is an advisory record only: nothing else reads it. (On NFS,
flock is emulated with fcntl locks by Linux clients, which gives the same semantics.)
"""
import datetime
import fcntl
import functools
import json
import os
import socket
import sys

LOCK_FILE = '.lock'
_held: dict[str, int] = {}  # realpath of a workdir -> the fd holding its lock, in this process


class WorkdirError(RuntimeError):
  """A workdir that this process must not write: busy, or another stage's."""


def claim(workdir: str, stage: str) -> None:
  """Takes the workdir for `stage` until `release` (or this process ends), or raises WorkdirError
  naming the live process that holds it or the stage that made it (holding nothing then).
  Re-entrant within one process."""
  os.makedirs(workdir, exist_ok=True)
  key = os.path.realpath(workdir)
  path = os.path.join(key, LOCK_FILE)
  acquired = key not in _held
  if acquired:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirError(
          f'{workdir} is in use by a live process: {_describe(holder)}. Wait for it to finish, '
          f'stop it, or pass another --workdir.') from None
    _held[key] = fd
  fd = _held[key]
  previous = _read(fd)
  if previous.get('stage') not in (None, stage):
    if acquired:
      release(workdir)
    raise WorkdirError(f'{workdir} holds a {previous["stage"]!r} run ({_describe(previous)}); a '
                       f'{stage!r} run needs its own --workdir (pass the {previous["stage"]} run '
                       f'as --config.init_from instead)')
  record = {'stage': stage, 'pid': os.getpid(), 'host': socket.gethostname(),
            'command': ' '.join(sys.argv),
            'started': datetime.datetime.now().isoformat(timespec='seconds')}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
  os.fsync(fd)


def stage(name: str):
  """Decorates a stage's run(config, workdir): the workdir is claimed for `name` before the run
  writes anything and released when it returns or raises."""
  def wrap(run):
    @functools.wraps(run)
    def claimed(config, workdir, *args, **kwargs):
      if not is_primary():  # In a multi-process job the first process holds the lock.
        return run(config, workdir, *args, **kwargs)
      already = os.path.realpath(workdir) in _held
      created = not os.path.exists(workdir)
      claim(workdir, name)
      try:
        return run(config, workdir, *args, **kwargs)
      except BaseException:
        # Bad input found before the run wrote anything: leave no workdir it did not find.
        if created and os.listdir(workdir) == [LOCK_FILE]:
          release(workdir)
          os.remove(os.path.join(workdir, LOCK_FILE))
          os.rmdir(workdir)
        raise
      finally:
        if not already:
          release(workdir)
    return claimed
  return wrap


def is_primary() -> bool:
  """Whether this process writes the workdir's own files: the first of a multi-process job
  (every process of which runs the stage; orbax coordinates the checkpoints), or the only one."""
  import jax
  return jax.process_index() == 0


def release(workdir: str) -> None:
  """Drops this process's lock on workdir (a no-op if it holds none). The record stays."""
  fd = _held.pop(os.path.realpath(workdir), None)
  if fd is not None:
    os.close(fd)


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 1 << 16, 0).decode() or '{}')
  except ValueError:  # Torn or foreign content: only the lock itself matters.
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return 'unknown process'
  return (f'{holder.get("stage")} run, pid {holder.get("pid")} on {holder.get("host")}, started '
          f'{holder.get("started")}: {holder.get("command")}')
