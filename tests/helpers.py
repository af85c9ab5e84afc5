"""Shared test helpers: tiny configs and reading a run's outputs."""
import json
import os

from configs import pretrain


def tiny_config(**overrides):
  """The `tiny` pretraining preset in float32 on one device, with dotted-key overrides."""
  c = pretrain.get_config('tiny')
  c.model.dtype = 'float32'
  c.mesh.data = 1
  c.data.max_chars = 200_000
  c.lock()  # Like the command line: a key that does not exist is an error.
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
