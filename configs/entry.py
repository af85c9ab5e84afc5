"""The absl entry point every command shares (`python -m trainers.*`, `eval.*`, `launch.*`, ...)."""
from absl import app, flags, logging


def run_main(main):
  """app.run(main), with libraries' INFO logs (orbax prints several per checkpoint) hidden unless
  asked for with --verbosity=0; warnings and errors still show."""

  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)

  app.run(quiet_main)
