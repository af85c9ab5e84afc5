"""The command line every stage shares:

  python -m trainers.<stage> --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v]

An unknown key or a value of the wrong type is an error naming the key (the config is locked).
Exit status 143 means the run stopped early (SIGTERM or train.stop_after) with a checkpoint saved.
On a multi-host TPU pod (or a GPU cluster) run the same command on every host with --multihost:
`jax.distributed.initialize()` then finds the coordinator from the environment (on Cloud TPU VMs,
SLURM and GKE; launch/tpu.py runs it so), or from --coordinator=HOST:PORT --num_processes=N
--process_id=I where it cannot (a few processes on one machine, another cluster manager). Every
process reads its own part of each global batch; the first writes the workdir's files (config,
tokenizer, metrics, lock), and orbax writes the checkpoints of all of them together.
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
  coordinator = flags.DEFINE_string('coordinator', '', 'With --multihost: HOST:PORT of process 0 '
                                    '(default: detected from the environment).')
  num_processes = flags.DEFINE_integer('num_processes', None, 'With --multihost: processes in the '
                                       'job (default: detected).')
  process_id = flags.DEFINE_integer('process_id', None, 'With --multihost: this process\'s index '
                                    '(default: detected).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    given = [f for f in (coordinator, num_processes, process_id) if f.present]
    if given and not multihost.value:
      raise app.UsageError(f'--{given[0].name} needs --multihost')
    if multihost.value:
      # CPU processes exchange collectives through gloo (TPUs and GPUs have their own).
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=coordinator.value or None,
                                 num_processes=num_processes.value, process_id=process_id.value)
      print(f'process {jax.process_index()} of {jax.process_count()}: '
            f'{jax.local_device_count()} of {jax.device_count()} devices', flush=True)
    if not run_fn(config.value, workdir.value).completed:
      raise SystemExit(143)

  entry.run_main(main)
