"""Shared test helpers: tiny configs and reading a run's outputs."""
import json
import os

from configs import pretrain


def tiny_config(config_module=pretrain, **overrides):
  """A config module's `tiny` preset in float32 on one device, locked (like the command line: a
  key that does not exist is an error), with dotted-key overrides: tiny_config(**{'a.b': 1})."""
  c = config_module.get_config('tiny')
  c.model.dtype = 'float32'
  c.mesh.data = 1
  if config_module is pretrain:
    c.data.max_chars = 200_000
  c.lock()
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    setattr(node, last, value)
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


TIMING_KEYS = ('tokens_per_s', 'tflops_per_device', 'mfu')  # Measured speeds: differ run to run.


def without_timing(records):
  """A run's metrics without its measured speeds, for comparing two runs exactly."""
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


SERVE_PROMPTS = ['In the beginning', 'And God said', 'Let there be light', 'x', 'def f(a, b):',
                 'y = 1']


def make_serve_workdir(wd, repo_root):
  """A random tiny float32 model with a tokenizer trained on serving/'s sources: a workdir that
  serving.server and the engine load in seconds."""
  from flax import nnx
  from data.tokenizer import save_tokenizer, train_tokenizer
  from models import checkpoint, llama, presets
  cfg = presets.resolve('tiny', dtype='float32')
  ckpt = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), async_save=False)
  ckpt.save(0, nnx.state(llama.create_model(cfg, seed=3), nnx.Param))
  ckpt.close()
  checkpoint.save_model_config(wd, cfg)
  sources = [open(os.path.join(repo_root, 'serving', f)).read() for f in os.listdir(
      os.path.join(repo_root, 'serving')) if f.endswith('.py')]
  save_tokenizer(train_tokenizer(sources + SERVE_PROMPTS * 10, vocab_size=cfg.vocab_size), wd)
  return wd


def start_server(workdir, repo_root, *flags, timeout=120):
  """serving.server on free ports in a subprocess, returned once /health answers 200, as a dict:
  port, grpc_port, proc, health (the (status, state) answers seen while it warmed up), log (the
  lines it printed until then). stop_server(server) ends it."""
  import http.client
  import subprocess
  import sys
  import time
  import portpicker
  port, grpc_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'serving.server', f'--workdir={workdir}', f'--port={port}',
       f'--grpc_port={grpc_port}', *flags],
      cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline, health = time.time() + timeout, []
  try:
    while time.time() < deadline:
      assert proc.poll() is None, proc.stdout.read()
      try:
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/health')
        resp = conn.getresponse()
        status, state = resp.status, json.loads(resp.read())['status']
        conn.close()
      except OSError:
        time.sleep(0.5)
        continue
      health.append((status, state))
      if status == 200:
        break
      time.sleep(0.05)
    log = []  # The lines the server printed before it answered 200 (it prints, then serves).
    while not any('warm-up took' in line for line in log):
      log.append(proc.stdout.readline())
  except BaseException:
    stop_server({'proc': proc})
    raise
  return {'port': port, 'grpc_port': grpc_port, 'proc': proc, 'health': health, 'log': log}


def stop_server(server):
  import subprocess
  proc = server['proc']
  proc.terminate()
  try:
    proc.wait(15)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
