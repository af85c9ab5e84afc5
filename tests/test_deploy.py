"""Containers and Kubernetes (deploy/): the Dockerfile passes hadolint, the entry point builds the
commands it documents, and every manifest, with the GPU and TPU patches applied as kustomize
applies them, validates against the Kubernetes schemas offline; the probes, scrape annotations
and the autoscaler's metric agree with what the server really serves."""
import copy
import json
import os
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, 'deploy')
K8S_VERSION = '1.33.0'  # GKE's and EKS's current releases are 1.32-1.34.


def _tool(name):
  path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.fail(f'{name} is not installed (the test extra of setup.py installs it)')
  return path


def _documents(path):
  with open(path) as f:
    return [d for d in yaml.safe_load_all(f) if d]


def _base():
  with open(os.path.join(DEPLOY, 'k8s', 'base', 'kustomization.yaml')) as f:
    names = yaml.safe_load(f)['resources']
  return [d for n in names for d in _documents(os.path.join(DEPLOY, 'k8s', 'base', n))]


def _apply_json_patch(doc, ops):
  """RFC 6902 add/replace, the subset the overlays use (kustomize applies the same files)."""
  doc = copy.deepcopy(doc)
  for op in ops:
    *parents, last = op['path'].strip('/').split('/')
    node = doc
    for key in parents:
      node = node[int(key)] if isinstance(node, list) else node[key]
    if op['op'] == 'replace' and (last not in node if isinstance(node, dict) else False):
      raise KeyError(f'replace of a missing {op["path"]}')
    if op['op'] not in ('add', 'replace'):
      raise ValueError(op['op'])
    node[last] = op['value']
  return doc


def _overlay(name):
  with open(os.path.join(DEPLOY, 'k8s', name, 'kustomization.yaml')) as f:
    kustomization = yaml.safe_load(f)
  assert kustomization['resources'] == ['../base']
  docs = _base()
  for patch in kustomization['patches']:
    with open(os.path.join(DEPLOY, 'k8s', name, patch['path'])) as f:
      ops = json.load(f)
    docs = [_apply_json_patch(d, ops) if d['kind'] == patch['target']['kind']
            and d['metadata']['name'] == patch['target']['name'] else d for d in docs]
  return docs


def test_dockerfile_passes_hadolint():
  out = subprocess.run([_tool('hadolint'), '--no-color', os.path.join(DEPLOY, 'Dockerfile')],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize('overlay', ['base', 'gpu', 'tpu'])
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
  docs = _base() if overlay == 'base' else _overlay(overlay)
  assert {d['kind'] for d in docs} == {'Deployment', 'Service', 'PersistentVolumeClaim',
                                       'HorizontalPodAutoscaler', 'ConfigMap'}
  for doc in docs:  # Strict: an unknown or misspelt field is an error.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
  container = next(d for d in docs if d['kind'] == 'Deployment')['spec']['template']['spec'][
      'containers'][0]
  accelerator = {'base': None, 'gpu': 'nvidia.com/gpu', 'tpu': 'google.com/tpu'}[overlay]
  if accelerator:
    assert container['resources']['limits'][accelerator] == '1'
    assert container['image'].endswith({'gpu': ':cuda', 'tpu': ':tpu'}[overlay])


def test_a_misspelt_field_is_caught():
  deployment = copy.deepcopy(next(d for d in _base() if d['kind'] == 'Deployment'))
  deployment['spec']['template']['spec']['containers'][0]['readinessProbes'] = {}
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_probes_scraping_and_autoscaling_match_the_server():
  from serving.http_api import Metrics
  import prometheus_client
  docs = {d['kind']: d for d in _base()}
  pod = docs['Deployment']['spec']['template']
  container = pod['spec']['containers'][0]
  port = container['ports'][0]
  annotations = pod['metadata']['annotations']
  assert annotations['prometheus.io/port'] == str(port['containerPort'])
  assert annotations['prometheus.io/path'] == '/metrics'
  env = {e['name']: e.get('value') for e in container['env']}
  assert env['PORT'] == str(port['containerPort'])
  for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
    assert container[probe]['httpGet'] == {'path': '/health', 'port': port['name']}
  assert docs['Service']['spec']['ports'][0]['targetPort'] == port['name']
  hpa = docs['HorizontalPodAutoscaler']['spec']
  assert hpa['scaleTargetRef']['name'] == docs['Deployment']['metadata']['name']
  # The metric the autoscaler reads is one the server exports, and the adapter rule maps it.
  exported = prometheus_client.generate_latest(Metrics({}).registry).decode()
  metric = hpa['metrics'][0]['pods']['metric']['name']
  assert f'\n{metric} ' in exported
  rules = yaml.safe_load(docs['ConfigMap']['data']['config.yaml'])['rules']
  assert metric in [r['name']['as'] for r in rules]
  from serving import server  # The grace period outlasts the server's drain on SIGTERM.
  assert pod['spec']['terminationGracePeriodSeconds'] > server._DRAIN.default
  volume = pod['spec']['volumes'][0]['persistentVolumeClaim']['claimName']
  assert volume == docs['PersistentVolumeClaim']['metadata']['name']


def _entrypoint(*args, **env):
  out = subprocess.run([os.path.join(DEPLOY, 'entrypoint.sh'), *args], capture_output=True,
                       text=True, env={**os.environ, **env})
  return out.returncode, [line.strip() for line in out.stdout.splitlines()], out.stderr


def test_the_entrypoint_imports_once_then_serves(tmp_path):
  model = str(tmp_path / 'model')
  rc, lines, _ = _entrypoint(DRY_RUN='1', MODEL_DIR=model, IMPORT_FROM='smollm2_135m')
  assert rc == 0 and lines == [
      f'python -m launch.import_checkpoint --source=smollm2_135m --workdir={model}/imported',
      f'python -m serving.server --workdir={model}/imported --host=0.0.0.0 --port=8000 '
      '--max_concurrent_decodes=0 --max_len=0 --max_queue=64']
  os.makedirs(f'{model}/imported/checkpoints')  # A restart finds the earlier import.
  rc, lines, _ = _entrypoint(DRY_RUN='1', MODEL_DIR=model, IMPORT_FROM='smollm2_135m',
                             API_KEY='k', SERVER_ARGS='--step=3')
  assert rc == 0 and lines == [
      f'python -m serving.server --workdir={model}/imported --host=0.0.0.0 --port=8000 '
      '--max_concurrent_decodes=0 --max_len=0 --max_queue=64 --api_key=k --step=3']
  rc, lines, _ = _entrypoint('python', '-m', 'trainers.sft', '--help', DRY_RUN='1')
  assert rc == 0 and lines == ['python -m trainers.sft --help']
  rc, _, err = _entrypoint(MODEL_DIR=str(tmp_path / 'empty'))
  assert rc == 2 and 'holds no checkpoints' in err
