"""launch.tpu: the gcloud command lines of a Cloud TPU run (dry run), the run's order of
operations with the slice always deleted, and the GKE JobSet for single- and multi-host slices."""
import copy
import subprocess
import sys
import types

import kubernetes_validate
import pytest
import yaml

from launch import tpu

STAGE = ['trainers.pretrain', '--config=configs/pretrain.py:1b', '--workdir=gs://bucket/runs/1b']


@pytest.mark.parametrize('accelerator, chips, hosts, per_host, topology', [
    ('v5e-8', 8, 1, 8, '2x4'), ('v5litepod-16', 16, 4, 4, '4x4'), ('v6e-4', 4, 1, 4, '2x2'),
    ('v5p-8', 4, 1, 4, '2x2x1'), ('v5p-64', 32, 8, 4, '2x4x4'), ('v4-8', 4, 1, 4, '2x2x1'),
    ('v5p-128', 64, 16, 4, '4x4x4'),
])
def test_slice_shapes(accelerator, chips, hosts, per_host, topology):
  shape = tpu.slice_shape(accelerator)
  assert (shape.chips, shape.hosts, shape.chips_per_host, shape.topology) == (
      chips, hosts, per_host, topology)


@pytest.mark.parametrize('accelerator, words', [('v5p-12', 'TensorCores'), ('v5e-12', 'chips'),
                                                ('h100-8', 'expected v4-N')])
def test_bad_accelerators_name_the_problem(accelerator, words):
  with pytest.raises(ValueError, match=words):
    tpu.slice_shape(accelerator)


def _dry(repo_root, *args):
  out = subprocess.run([sys.executable, '-m', 'launch.tpu', '--dry_run', *args], cwd=repo_root,
                       capture_output=True, text=True, timeout=120)
  return out


def test_dry_run_single_host_v5e_8_on_demand(repo_root):
  out = _dry(repo_root, '--name=e8', '--zone=us-west4-a', '--accelerator=v5e-8',
             '--project=proj', '--', 'trainers.sft', '--config=configs/sft.py:small',
             '--workdir=gs://b/sft')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      'v5litepod-8: 8 chips on 1 host(s), topology 2x4',
      'gcloud compute tpus tpu-vm create e8 --accelerator-type=v5litepod-8 '
      '--version=v2-alpha-tpuv5-lite --zone=us-west4-a --project=proj',
      "gcloud compute tpus tpu-vm describe e8 '--format=value(state)' --zone=us-west4-a "
      '--project=proj',
      'tar --exclude=.venv --exclude=runs --exclude=.git --exclude=.cache -czf /tmp/lmforge.tgz .',
      "gcloud compute tpus tpu-vm scp /tmp/lmforge.tgz 'e8:~/' --worker=all --zone=us-west4-a "
      '--project=proj',
      "gcloud compute tpus tpu-vm ssh e8 --worker=all '--command=set -e; mkdir -p ~/lmforge && "
      'tar -C ~/lmforge -xzf ~/lmforge.tgz && cd ~/lmforge && make install PYTHON=python3 && '
      ".venv/bin/pip install -q \"jax[tpu]\"' --zone=us-west4-a --project=proj",
      "gcloud compute tpus tpu-vm ssh e8 --worker=all '--command=cd ~/lmforge && .venv/bin/python "
      "-m trainers.sft --multihost --config=configs/sft.py:small --workdir=gs://b/sft' "
      '--zone=us-west4-a --project=proj',
      'gcloud compute tpus tpu-vm delete e8 --quiet --zone=us-west4-a --project=proj']


def test_dry_run_multi_host_v5p_64_spot_through_a_queued_resource(repo_root):
  out = _dry(repo_root, '--name=p64', '--zone=us-east5-a', '--accelerator=v5p-64', '--spot', '--',
             *STAGE, '--config.mesh.fsdp=-1')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == 'v5p-64: 32 chips on 8 host(s), topology 2x4x4'
  assert lines[1] == ('gcloud compute tpus queued-resources create p64-qr --node-id=p64 '
                      '--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot '
                      '--zone=us-east5-a')
  assert "queued-resources describe p64-qr '--format=value(state.state)'" in lines[2]
  assert lines[6].endswith("--workdir=gs://bucket/runs/1b --config.mesh.fsdp=-1' "
                           '--zone=us-east5-a') and '--worker=all' in lines[6]
  assert '-m trainers.pretrain --multihost' in lines[6]
  assert lines[7] == ('gcloud compute tpus queued-resources delete p64-qr --force --quiet '
                      '--zone=us-east5-a')


@pytest.mark.parametrize('accelerator, stage, keep, words', [
    ('v5p-64', ['trainers.pretrain', '--workdir=runs/local'], False, 'shared storage'),
    ('v5e-8', ['trainers.sft', '--workdir=runs/local'], False, 'or --keep'),
    ('v5e-8', [], False, 'nothing to run'),
])
def test_bad_runs_are_refused_before_any_command(accelerator, stage, keep, words):
  with pytest.raises(ValueError, match=words):
    tpu.plan('x', 'z', accelerator, stage, keep=keep)
  assert tpu.plan('x', 'z', 'v5e-8', ['trainers.sft', '--workdir=runs/local'], keep=True)


class _FakeGcloud:
  def __init__(self, states, fail=None):
    self.states, self.fail, self.calls = list(states), fail, []

  def __call__(self, cmd, **kwargs):
    self.calls.append(cmd)
    if 'describe' in cmd:
      return types.SimpleNamespace(returncode=0, stdout=self.states.pop(0) + '\n')
    failed = self.fail and any(self.fail in part for part in cmd)
    return types.SimpleNamespace(returncode=7 if failed else 0, stdout='')


def _kinds(calls):
  words = ('--multihost', 'make install', 'describe', 'delete', 'scp', 'create', 'tar')
  return [next((w for w in words if any(w in part for part in c)), '?') for c in calls]


def test_a_run_waits_for_the_slice_runs_the_stage_and_always_deletes(capsys):
  steps = tpu.plan('p', 'z', 'v5p-16', STAGE, spot=True)
  fake = _FakeGcloud(['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  assert tpu.execute(steps, keep=False, wait_minutes=5, runner=fake, sleep=lambda s: None) == 0
  assert _kinds(fake.calls) == ['create', 'describe', 'describe', 'describe', 'tar', 'scp',
                                'make install', '--multihost', 'delete']
  # The install fails: the slice is still deleted, and the error says which step.
  fake = _FakeGcloud(['ACTIVE'], fail='make install')
  with pytest.raises(RuntimeError, match='install failed'):
    tpu.execute(steps, keep=False, wait_minutes=5, runner=fake, sleep=lambda s: None)
  assert _kinds(fake.calls)[-1] == 'delete'
  # --keep leaves it running; the stage's exit status is the run's.
  fake = _FakeGcloud(['ACTIVE'], fail='--multihost')
  assert tpu.execute(steps, keep=True, wait_minutes=5, runner=fake, sleep=lambda s: None) == 7
  assert 'delete' not in _kinds(fake.calls)


@pytest.mark.parametrize('accelerator, hosts, chips, selector', [
    ('v5e-8', 1, 8, ('tpu-v5-lite-podslice', '2x4')),
    ('v5p-64', 8, 4, ('tpu-v5p-slice', '2x4x4')),
])
def test_the_jobset_runs_one_pod_per_host_on_the_slices_node_pool(
    accelerator, hosts, chips, selector, repo_root, tmp_path):
  path = tmp_path / 'jobset.yaml'
  out = subprocess.run([sys.executable, '-m', 'launch.tpu', '--name=run1',
                        f'--accelerator={accelerator}', f'--jobset={path}', '--image=img:1',
                        '--', *STAGE], cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  doc = yaml.safe_load(open(path))
  assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and doc['kind'] == 'JobSet'
  job = doc['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == job['completions'] == hosts
  pod = job['template']['spec']
  assert (pod['nodeSelector']['cloud.google.com/gke-tpu-accelerator'],
          pod['nodeSelector']['cloud.google.com/gke-tpu-topology']) == selector
  container = pod['containers'][0]
  assert container['resources']['limits']['google.com/tpu'] == chips
  assert container['command'][:4] == ['python', '-m', 'trainers.pretrain', '--multihost']
  # The replicated job is a valid batch/v1 Job by the Kubernetes schemas.
  wrapped = {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': {'name': 'run1'},
             'spec': copy.deepcopy(job)}
  kubernetes_validate.validate(wrapped, '1.33', strict=True)
