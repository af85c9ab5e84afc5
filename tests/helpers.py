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
