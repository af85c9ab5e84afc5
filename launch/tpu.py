"""Run a stage on a Cloud TPU slice: create it, wait, copy the code, install, run on every host,
stream the logs, delete. Or write the GKE JobSet that runs the same on a TPU node pool.

  python -m launch.tpu --name=lm1b --zone=us-east5-a --accelerator=v5p-64 --spot [--dry_run] \\
      -- trainers.pretrain --config=configs/pretrain.py:1b --workdir=gs://BUCKET/runs/1b
  python -m launch.tpu --name=lm1b --accelerator=v5p-64 --jobset=lm1b.yaml --image=IMAGE \\
      -- trainers.pretrain --config=configs/pretrain.py:1b --workdir=gs://BUCKET/runs/1b

Accelerators are gcloud's types (v4-8, v5p-64, v5litepod-8, v6e-16; `v5e-N` means
v5litepod-N); the slice's hosts and topology follow from the type (`slice_shape`). Spot slices
(and `--queued`) go through a queued resource, which waits for capacity instead of failing;
on-demand ones through `tpu-vm create`. Every host gets this checkout (a tarball without .venv,
runs and .git), runs `make install` with JAX's TPU wheels, then the stage with --multihost, so
jax.distributed.initialize() joins the hosts into one job (on a TPU VM it finds the coordinator
itself); the workdir must be shared storage every host sees (gs://...). Logs of all hosts stream
to this terminal (gcloud's ssh --worker=all). The slice is deleted at the end, also after a
failure or Ctrl-C, unless --keep. `--dry_run` prints every gcloud command instead of running it.

Nothing here could be run against Google Cloud from this machine (no network or credentials);
tests/test_tpu_launch.py checks the command lines and the manifests.
"""
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

from absl import app, flags

RUNTIMES = {'v4': 'tpu-ubuntu2204-base', 'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v6e': 'v2-alpha-tpuv6e'}
GKE_ACCELERATORS = {'v4': 'tpu-v4-podslice', 'v5p': 'tpu-v5p-slice',
                    'v5litepod': 'tpu-v5-lite-podslice', 'v6e': 'tpu-v6e-slice'}
# 3D slices (v4, v5p; the type counts TensorCores, two per chip) by chip count.
_TOPOLOGY_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
                256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
# 2D slices (v5e, v6e; the type counts chips) by chip count.
_TOPOLOGY_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
                256: '16x16'}


@dataclasses.dataclass(frozen=True)
class SliceShape:
  accelerator: str  # gcloud's type
  generation: str  # v4, v5p, v5litepod, v6e
  chips: int
  hosts: int
  chips_per_host: int
  topology: str


def slice_shape(accelerator: str) -> SliceShape:
  """Hosts, chips and topology of a TPU type (v4 and v5p types count TensorCores, two per
  chip, four chips per host, 3D topologies; v5e and v6e count chips, up to 8 on one host and
  4 per host in multi-host slices, 2D topologies)."""
  m = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', accelerator)
  if not m:
    raise ValueError(f'--accelerator={accelerator!r}: expected v4-N, v5p-N, v5litepod-N (or '
                     'v5e-N) or v6e-N')
  generation, n = m.group(1), int(m.group(2))
  if generation == 'v5e':
    generation = 'v5litepod'
  name = f'{generation}-{n}'
  if generation in ('v4', 'v5p'):
    chips = n // 2
    if chips not in _TOPOLOGY_3D:
      raise ValueError(f'{name}: {generation} slices have {sorted(2 * c for c in _TOPOLOGY_3D)} '
                       'TensorCores')
    topology = _TOPOLOGY_3D[chips]
    return SliceShape(name, generation, chips, max(1, chips // 4), min(4, chips), topology)
  if n not in _TOPOLOGY_2D:
    raise ValueError(f'{name}: {generation} slices have {sorted(_TOPOLOGY_2D)} chips')
  per_host = n if n <= 8 else 4
  return SliceShape(name, generation, n, n // per_host, per_host, _TOPOLOGY_2D[n])


def _gcloud(*args, project='', zone='') -> list[str]:
  cmd = ['gcloud', *args]
  if zone:
    cmd.append(f'--zone={zone}')
  if project:
    cmd.append(f'--project={project}')
  return cmd


def plan(name: str, zone: str, accelerator: str, stage: list[str], *, project: str = '',
         runtime: str = '', spot: bool = False, queued: bool = False, keep: bool = False) -> dict:
  """Every gcloud command of a run: create, ready (a describe whose output is polled), copy,
  install, run, delete."""
  if not stage:
    raise ValueError('nothing to run: give the stage after `--`, e.g. -- trainers.pretrain '
                     '--config=configs/pretrain.py:1b --workdir=gs://BUCKET/run')
  workdirs = [a.split('=', 1)[1] for a in stage if a.startswith('--workdir=')]
  shape = slice_shape(accelerator)
  shared = bool(workdirs) and workdirs[0].startswith('gs://')
  if shape.hosts > 1 and not shared:
    raise ValueError(f'{shape.accelerator} has {shape.hosts} hosts: --workdir must be shared '
                     'storage they all see (gs://...)')
  if not shared and not keep:
    raise ValueError('the slice is deleted at the end and its disk with it: give a gs:// '
                     '--workdir, or --keep')
  runtime = runtime or RUNTIMES[shape.generation]
  kw = dict(project=project, zone=zone)
  use_queue = spot or queued
  if use_queue:
    create = _gcloud('compute', 'tpus', 'queued-resources', 'create', f'{name}-qr',
                     f'--node-id={name}', f'--accelerator-type={shape.accelerator}',
                     f'--runtime-version={runtime}', *(['--spot'] if spot else []), **kw)
    ready = _gcloud('compute', 'tpus', 'queued-resources', 'describe', f'{name}-qr',
                    '--format=value(state.state)', **kw)
    delete = _gcloud('compute', 'tpus', 'queued-resources', 'delete', f'{name}-qr', '--force',
                     '--quiet', **kw)
  else:
    create = _gcloud('compute', 'tpus', 'tpu-vm', 'create', name,
                     f'--accelerator-type={shape.accelerator}', f'--version={runtime}', **kw)
    ready = _gcloud('compute', 'tpus', 'tpu-vm', 'describe', name, '--format=value(state)', **kw)
    delete = _gcloud('compute', 'tpus', 'tpu-vm', 'delete', name, '--quiet', **kw)
  ssh = lambda command: _gcloud('compute', 'tpus', 'tpu-vm', 'ssh', name, '--worker=all',
                                f'--command={command}', **kw)
  module, *args = stage
  install = ('set -e; mkdir -p ~/lmforge && tar -C ~/lmforge -xzf ~/lmforge.tgz && cd ~/lmforge '
             '&& make install PYTHON=python3 && .venv/bin/pip install -q "jax[tpu]"')
  run = (f'cd ~/lmforge && .venv/bin/python -m {shlex.quote(module)} --multihost '
         + ' '.join(shlex.quote(a) for a in args))
  return {
      'shape': shape,
      'create': create,
      'ready': ready,
      'ready_state': 'ACTIVE' if use_queue else 'READY',
      'pack': ['tar', '--exclude=.venv', '--exclude=runs', '--exclude=.git', '--exclude=.cache',
               '-czf', '/tmp/lmforge.tgz', '.'],
      'copy': _gcloud('compute', 'tpus', 'tpu-vm', 'scp', '/tmp/lmforge.tgz', f'{name}:~/',
                      '--worker=all', **kw),
      'install': ssh(install),
      'run': ssh(run),
      'delete': delete,
  }


def jobset(name: str, accelerator: str, stage: list[str], image: str) -> dict:
  """A GKE JobSet (jobset.x-k8s.io/v1alpha2) running the stage on one TPU slice: one pod per
  host on the slice's node pool (accelerator and topology node selectors), each asking for its
  host's chips, all started together, restarted together on a failure."""
  if not stage:
    raise ValueError('nothing to run: give the stage after `--`')
  shape = slice_shape(accelerator)
  module, *args = stage
  container = {
      'name': 'stage', 'image': image,
      'command': ['python', '-m', module, '--multihost', *args],
      'ports': [{'containerPort': 8471, 'name': 'tpu'}, {'containerPort': 8080, 'name': 'coord'}],
      'resources': {'requests': {'google.com/tpu': shape.chips_per_host},
                    'limits': {'google.com/tpu': shape.chips_per_host}},
      'securityContext': {'privileged': False},
  }
  pod = {'metadata': {'labels': {'app': name}},
         'spec': {'restartPolicy': 'Never', 'subdomain': name,
                  'nodeSelector': {
                      'cloud.google.com/gke-tpu-accelerator': GKE_ACCELERATORS[shape.generation],
                      'cloud.google.com/gke-tpu-topology': shape.topology},
                  'containers': [container]}}
  job = {'backoffLimit': 0, 'completions': shape.hosts, 'parallelism': shape.hosts,
         'completionMode': 'Indexed', 'template': pod}
  return {'apiVersion': 'jobset.x-k8s.io/v1alpha2', 'kind': 'JobSet',
          'metadata': {'name': name, 'annotations': {
              'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}},
          'spec': {'failurePolicy': {'maxRestarts': 3},
                   'replicatedJobs': [{'name': 'slice', 'replicas': 1,
                                       'template': {'spec': job}}]}}


def execute(steps: dict, *, keep: bool, wait_minutes: int, runner=subprocess.run,
            sleep=time.sleep) -> int:
  """Runs a plan: create, poll until ready, pack, copy, install, run; deletes the slice at the
  end (also after a failure or Ctrl-C) unless keep. Returns the stage's exit status."""
  def call(name):
    print(f'$ {shlex.join(steps[name])}', flush=True)
    result = runner(steps[name])
    if result.returncode:
      raise RuntimeError(f'{name} failed (exit {result.returncode})')
  created = False
  try:
    call('create')
    created = True
    deadline = time.time() + wait_minutes * 60
    while True:
      state = runner(steps['ready'], capture_output=True, text=True).stdout.strip()
      print(f'slice state: {state or "?"}', flush=True)
      if state == steps['ready_state']:
        break
      if time.time() > deadline:
        raise RuntimeError(f'the slice was not {steps["ready_state"]} after {wait_minutes} min')
      sleep(30)
    for name in ('pack', 'copy', 'install'):
      call(name)
    print(f'$ {shlex.join(steps["run"])}', flush=True)
    return runner(steps['run']).returncode
  finally:
    if created and not keep:
      print(f'$ {shlex.join(steps["delete"])}', flush=True)
      runner(steps['delete'])


def main():
  name = flags.DEFINE_string('name', None, 'TPU VM (and queued resource) name.', required=True)
  zone = flags.DEFINE_string('zone', 'us-central2-b', 'Zone with the accelerator.')
  project = flags.DEFINE_string('project', '', 'Google Cloud project (default: gcloud\'s).')
  accelerator = flags.DEFINE_string('accelerator', 'v5litepod-8', 'TPU type, e.g. v5p-64.')
  runtime = flags.DEFINE_string('runtime', '', 'TPU VM runtime version (default: by generation).')
  spot = flags.DEFINE_bool('spot', False, 'Spot capacity (preemptible, cheaper).')
  queued = flags.DEFINE_bool('queued', False, 'Through a queued resource even when on-demand.')
  keep = flags.DEFINE_bool('keep', False, 'Leave the slice running at the end.')
  dry_run = flags.DEFINE_bool('dry_run', False, 'Print the gcloud commands; run nothing.')
  jobset_path = flags.DEFINE_string('jobset', '', 'Write a GKE JobSet manifest here instead of '
                                    'running.')
  image = flags.DEFINE_string('image', 'lmforge:tpu', 'Container image for --jobset '
                              '(deploy/Dockerfile with --build-arg ACCELERATOR=tpu).')
  wait = flags.DEFINE_integer('wait_minutes', 60, 'How long to wait for the slice to be ready.')

  def _main(argv):
    stage = argv[1:]
    try:
      if jobset_path.value:
        import yaml
        manifest = jobset(name.value, accelerator.value, stage, image.value)
        with open(jobset_path.value, 'w') as f:
          yaml.safe_dump(manifest, f, sort_keys=False)
        print(f'wrote {jobset_path.value}: kubectl apply -f {jobset_path.value}')
        return
      steps = plan(name.value, zone.value, accelerator.value, stage, project=project.value,
                   runtime=runtime.value, spot=spot.value, queued=queued.value, keep=keep.value)
    except ValueError as e:
      sys.exit(f'error: {e}')
    shape = steps['shape']
    print(f'{shape.accelerator}: {shape.chips} chips on {shape.hosts} host(s), topology '
          f'{shape.topology}', flush=True)
    if dry_run.value:
      for step in ('create', 'ready', 'pack', 'copy', 'install', 'run', 'delete'):
        print(shlex.join(steps[step]))
      return
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(execute(steps, keep=keep.value, wait_minutes=wait.value))
  app.run(_main)


if __name__ == '__main__':
  main()
