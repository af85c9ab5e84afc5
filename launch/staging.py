"""Writing a directory all at once: into `<final>.incomplete`, renamed to `<final>` at the end.

An import or export killed midway (SIGKILL, a preempted VM) leaves only the `.incomplete`
directory, which no stage or reader mistakes for a workdir or a checkpoint; the next run into the
same destination removes it and starts over. A rename within one directory is atomic on POSIX
filesystems.
"""
import contextlib
import os
import shutil

SUFFIX = '.incomplete'


@contextlib.contextmanager
def staged_directory(final: str):
  """Yields the temporary directory to fill; on success it becomes `final` (which must not exist,
  or be empty); on an exception it is removed and `final` is left as it was."""
  final = os.path.abspath(final)
  if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
    raise FileExistsError(f'{final} already exists and is not empty; write into a new directory')
  temp = final + SUFFIX
  if os.path.exists(temp):
    print(f'Removing {temp}, left by an earlier run that was interrupted.')
    shutil.rmtree(temp)
  os.makedirs(temp)
  try:
    yield temp
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  if os.path.isdir(final):
    os.rmdir(final)  # Empty (checked above): rename cannot replace a directory portably.
  os.rename(temp, final)
