"""Set-up every stage shares: the workdir, the mesh, the tokenizer, the model and its start point.

Checks that can fail run before anything is written, so a bad command never touches what an
earlier run saved in the same workdir.
"""
import json
import os

import jax
import ml_collections

from data.tokenizer import find_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from models import checkpoint, presets
from models.llama import Llama, create_model
from models.sharding import make_mesh

def mesh_from_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> presets.LlamaConfig:
  m = config.model
  overrides = {k: m[k] for k in m.keys() if k != 'preset'}
  overrides['vocab_size'] = m.vocab_size or vocab_size
  cfg = presets.resolve(m.preset, **overrides)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f'model.vocab_size={cfg.vocab_size} is smaller than the tokenizer '
                     f'vocabulary ({vocab_size})')
  if config.data.seq_len > cfg.max_seq_len:
    raise ValueError(f'data.seq_len={config.data.seq_len} exceeds the model limit '
                     f'model.max_seq_len={cfg.max_seq_len} (preset {m.preset!r})')
  return cfg


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, docs=None):
  """The workdir's own tokenizer if it has one (a resumed run), else init_from's, else
  tokenizer.path, else a new BPE tokenizer trained on `docs`."""
  for source in (workdir, config.init_from):
    if source and os.path.isdir(source) and find_tokenizer(source):
      return load_tokenizer(source)
  if config.init_from:
    raise FileNotFoundError(f'init_from={config.init_from!r} holds no tokenizer')
  if config.tokenizer.path:
    if not os.path.exists(config.tokenizer.path):
      raise FileNotFoundError(f'tokenizer.path={config.tokenizer.path!r} does not exist')
    return load_tokenizer(config.tokenizer.path)
  print(f'Training a {config.tokenizer.vocab_size}-token BPE tokenizer on {len(docs)} documents.')
  return train_tokenizer(docs, vocab_size=config.tokenizer.vocab_size,
                         max_chars=config.tokenizer.train_chars, seed=config.seed)


def write_workdir(config: ml_collections.ConfigDict, workdir: str, tokenizer,
                  model_cfg: presets.LlamaConfig):
  """The resolved config, the model's architecture and the tokenizer, beside the checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
  checkpoint.save_model_config(workdir, model_cfg)
  if not find_tokenizer(workdir):
    save_tokenizer(tokenizer, workdir)


def initial_model(config: ml_collections.ConfigDict, workdir: str,
                  model_cfg: presets.LlamaConfig, mesh) -> Llama:
  """A fresh model, or init_from's final parameters, on the mesh. (A resumed run then overwrites
  these from its own checkpoint in the loop.)"""
  rules = config.sharding_rules
  if not config.init_from or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return create_model(model_cfg, seed=config.seed, mesh=mesh, rules=rules)
  src = checkpoint.load_model_config(config.init_from)
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                'tie_embeddings'):
    if getattr(src, field) != getattr(model_cfg, field):
      raise ValueError(f'init_from={config.init_from!r} has {field}={getattr(src, field)}, but '
                       f'this config asks for {getattr(model_cfg, field)}')
  model, step = checkpoint.load_model(config.init_from, mesh=mesh, rules=rules,
                                      dtype=model_cfg.dtype, remat=model_cfg.remat,
                                      attention=model_cfg.attention)
  print(f'Initialised from {config.init_from} (step {step}).')
  return model
