"""Set-up every stage shares: the workdir, the mesh, the tokenizer, the model and its start point.

Checks that can fail run before anything is written, so a bad command never touches what an
earlier run saved in the same workdir.
"""
import dataclasses
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


def per_process_batch(config: ml_collections.ConfigDict) -> int:
  """Rows each JAX process reads per step: the global train.batch_size split over processes."""
  n_proc = jax.process_count()
  if config.train.batch_size % n_proc:
    raise ValueError(f'train.batch_size={config.train.batch_size} must divide by the '
                     f'{n_proc} processes')
  return config.train.batch_size // n_proc


# How the model runs, as opposed to what it is: taken from the stage's config even when the
# architecture comes from init_from.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention')


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> presets.LlamaConfig:
  """The model a stage trains: model.preset plus overrides, or with init_from, that run's own
  architecture (model.json), so an imported Qwen2 keeps its biases and norm eps."""
  m = config.model
  dtype = presets.resolve_dtype(m.dtype, 'train')
  print(f'Compute dtype {dtype} (model.dtype={m.dtype!r}, {jax.default_backend()} backend).')
  if config.init_from:
    cfg = checkpoint.load_model_config(config.init_from)
    for key in m.keys():
      if key not in ('preset', *RUNTIME_FIELDS, 'max_seq_len') and m[key] is not None \
          and m[key] != getattr(cfg, key):
        raise ValueError(f'model.{key}={m[key]!r}, but init_from={config.init_from!r} has '
                         f'{key}={getattr(cfg, key)!r}')
    cfg = dataclasses.replace(cfg, **{k: m[k] for k in RUNTIME_FIELDS if k != 'dtype'}, dtype=dtype,
                              max_seq_len=m.max_seq_len or cfg.max_seq_len)
  else:
    overrides = {k: m[k] for k in m.keys() if k != 'preset'}
    overrides['dtype'] = dtype
    overrides['vocab_size'] = m.vocab_size or vocab_size
    cfg = presets.resolve(m.preset, **overrides)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f'model.vocab_size={cfg.vocab_size} is smaller than the tokenizer '
                     f'vocabulary ({vocab_size})')
  if config.data.seq_len > cfg.max_seq_len:
    raise ValueError(f'data.seq_len={config.data.seq_len} exceeds the model limit '
                     f'model.max_seq_len={cfg.max_seq_len}')
  return cfg


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, docs=None):
  """The workdir's own tokenizer if it has one (a resumed run), else init_from's, else
  tokenizer.path, else a new BPE tokenizer trained on `docs` (or on what `docs()` returns, when
  drawing them costs something only a new tokenizer should pay)."""
  for source in (workdir, config.init_from):
    if source and os.path.isdir(source) and find_tokenizer(source):
      return load_tokenizer(source)
  if config.init_from:
    raise FileNotFoundError(f'init_from={config.init_from!r} holds no tokenizer')
  if config.tokenizer.path:
    if not os.path.exists(config.tokenizer.path):
      raise FileNotFoundError(f'tokenizer.path={config.tokenizer.path!r} does not exist')
    return load_tokenizer(config.tokenizer.path)
  docs = docs() if callable(docs) else docs
  print(f'Training a {config.tokenizer.vocab_size}-token BPE tokenizer on {len(docs)} documents.')
  return train_tokenizer(docs, vocab_size=config.tokenizer.vocab_size,
                         max_chars=config.tokenizer.train_chars, seed=config.seed)


def write_workdir(config: ml_collections.ConfigDict, workdir: str, tokenizer,
                  model_cfg: presets.LlamaConfig):
  """The resolved config, the model's architecture and the tokenizer, beside the checkpoints
  (by the first process of a multi-process job; the others hold the same in memory)."""
  from trainers.workdir import is_primary
  if not is_primary():
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
  checkpoint.save_model_config(workdir, model_cfg)
  if not find_tokenizer(workdir):
    save_tokenizer(tokenizer, workdir)


def load_init_from(config: ml_collections.ConfigDict, model_cfg: presets.LlamaConfig,
                   mesh) -> Llama:
  """init_from's final model on the mesh, run as model_cfg says (dtype, remat, attention)."""
  model, step = checkpoint.load_model(
      config.init_from, mesh=mesh, rules=config.sharding_rules, max_seq_len=model_cfg.max_seq_len,
      **{k: getattr(model_cfg, k) for k in RUNTIME_FIELDS})
  print(f'Initialised from {config.init_from} (step {step}).')
  return model


def initial_model(config: ml_collections.ConfigDict, workdir: str,
                  model_cfg: presets.LlamaConfig, mesh) -> Llama:
  """A fresh model, or init_from's final parameters, on the mesh. (A resumed run then overwrites
  these from its own checkpoint in the loop.)"""
  if not config.init_from or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return create_model(model_cfg, seed=config.seed, mesh=mesh, rules=config.sharding_rules)
  return load_init_from(config, model_cfg, mesh)
