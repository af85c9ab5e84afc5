"""The command line every stage shares:

  python -m trainers.<stage> --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v]

An unknown key or a value of the wrong type is an error naming the key (the config is locked).
Exit status 143 means the run stopped early (SIGTERM or train.stop_after) with a checkpoint saved.
On a multi-host TPU pod (or a GPU cluster) run the same command on every host with --multihost:
`jax.distributed.initialize()` then finds the coordinator from the environment (launch/tpu.py runs it so).
"""
import jax
from absl import app, flags
from ml_collections import config_flags

from configs import entry


def run_stage(run_fn, default_config: str):
  config = config_flags.DEFINE_config_file('config', default_config, 'Stage config file:preset.',
                                           lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Run directory (resumed if it exists).',
                                required=True)
  multihost = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if multihost.value:
      jax.distributed.initialize()
    if not run_fn(config.value, workdir.value).completed:
      raise SystemExit(143)

  entry.run_main(main)
