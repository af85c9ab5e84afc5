"""The absl entry point every command shares (`python -m trainers.*`, `eval.*`, `launch.*`, ...)."""
import os
import re
import sys

from absl import app, flags, logging


def define_dtype_flag():
  """--dtype of the commands that read a workdir (evals, the server): 'auto' is
  models.presets.resolve_dtype's choice for inference."""
  return flags.DEFINE_string('dtype', 'auto', "Compute dtype: 'auto' (float32 on a CPU, bfloat16 "
                             "on GPU/TPU), 'float32' or 'bfloat16'.")


def run_main(main):
  """app.run(main), with libraries' INFO logs (orbax prints several per checkpoint) hidden unless
  asked for with --verbosity=0; warnings and errors still show. The errors a user acts on (a
  damaged or unwritable checkpoint, a busy workdir) print as one line and exit with status 2,
  instead of a traceback in which they are hard to find."""

  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    sys.unraisablehook = _drop_closed_loop_callbacks
    from models.checkpoint import CheckpointError
    from trainers.workdir import WorkdirError
    try:
      return main(argv)
    except (CheckpointError, WorkdirError) as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.stdout.flush()
      # Not sys.exit: after a failed restore, orbax's and tensorstore's threads print "Event loop
      # is closed" tracebacks during interpreter teardown, burying the one line that matters.
      # Everything of ours is closed by now (the trainers close checkpoints and metrics in
      # `finally`).
      os._exit(2)

  app.run(quiet_main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parser, with an override of a key the config does not have (`--config.data.sourc=x`)
  reported as one line naming the flag instead of ml_collections' chained KeyError traceback.
  Exit status 1, as for absl's own flag errors."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = str(e)
    found = re.search(r"'([A-Za-z0-9_]+)", message)
    if not found:
      raise
    key = found.group(1)
    hint = re.search(r'Did you mean "([^"]+)"', message)
    flag = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.')
                 and key in a.split('=')[0].split('.')[1:]), '--config.' + key)
    spec = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), 'the config')
    sys.stderr.write(f'FATAL Flags parsing error: {flag}: {key!r} is not a key of {spec}'
                     + (f' (did you mean {hint.group(1)!r}?)' if hint else '') + '\n')
    sys.exit(1)


_default_unraisablehook = sys.unraisablehook


def _drop_closed_loop_callbacks(unraisable):
  """When an orbax restore fails, tensorstore's callbacks can still post to the asyncio loop orbax
  has closed, and Python prints each as "Exception ignored ... Event loop is closed" beside the
  real error. Only that message is dropped; every other unraisable exception prints as usual."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'):
    _default_unraisablehook(unraisable)
