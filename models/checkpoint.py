"""Orbax checkpoints of a run, and loading a workdir's model for eval, serving and later stages.

Layout under WORKDIR/checkpoints/<step>/: `params` (the trained parameters), `opt_state`, `meta`
(step and anything else a stage keeps as JSON) and `data` (the grain iterator's position). Params
are their own item so eval and serving restore them alone, straight onto their own mesh. Saves are
asynchronous and atomic (orbax writes a temporary directory and renames it), so a crash mid-save
never damages the newest complete checkpoint.
"""
import contextlib
import dataclasses
import json
import os

import jax
from flax import nnx
import orbax.checkpoint as ocp

from models.llama import Llama, abstract_model
from models.presets import LlamaConfig

MODEL_CONFIG_FILE = 'model.json'


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state=None, meta: dict | None = None, data_iter=None,
           force: bool = False):
    import grain  # Imported here: the params-only readers (serving) do not need grain.
    items = {'params': ocp.args.StandardSave(params),
             'meta': ocp.args.JsonSave(dict(meta or {}, step=step))}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    if hasattr(data_iter, 'get_state'):  # grain iterators; a plain iterator is not saved.
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, params, opt_state=None, data_iter=None):
    """Restores into the shapes, dtypes and shardings of the given (live or abstract) trees."""
    import grain
    items = {'params': ocp.args.StandardRestore(_abstract(params)), 'meta': ocp.args.JsonRestore()}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(_abstract(opt_state))
    if hasattr(data_iter, 'get_state'):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_model_config(workdir: str, cfg: LlamaConfig):
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_model_config(workdir: str, **overrides) -> LlamaConfig:
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a workdir written by a trainer')
  with open(path) as f:
    fields = json.load(f)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return LlamaConfig(**fields)


def load_model(workdir: str, *, step: int | None = None, mesh=None, rules=None,
               **config_overrides) -> tuple[Llama, int]:
  """The model of a workdir at its newest (or the given) checkpoint, placed on `mesh`.

  config_overrides change non-architectural fields (dtype, attention, remat) for the reader.
  A LoRA/QLoRA workdir (one with models/lora.py's lora.json) gives its base with the adapters
  merged in: a plain Llama like any other. Returns (model, step).
  """
  cfg = load_model_config(workdir, **config_overrides)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt = Checkpointer(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
  step = ckpt.latest_step() if step is None and ckpt else step
  if ckpt is None or step is None:
    raise FileNotFoundError(f'no checkpoint under {ckpt_dir}')
  from models import lora  # Here: qwix is only needed for adapter workdirs.
  spec = lora.read_spec(workdir)
  if spec is not None:
    return _load_lora_merged(ckpt, step, spec, mesh, rules, config_overrides), step
  graphdef, abstract_params, shardings = abstract_model(cfg, mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_params, shardings)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target)))
  ckpt.close()
  return nnx.merge(graphdef, restored['params']), step


def _load_lora_merged(ckpt: Checkpointer, step: int, spec, mesh, rules, config_overrides) -> Llama:
  """The base workdir's model with the adapters of `ckpt` (adapters only) applied and merged."""
  from models import lora
  base, _ = load_model(spec.base, mesh=mesh, rules=rules, **config_overrides)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    model = lora.apply_lora(base, spec)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(nnx.state(model, nnx.LoRAParam)))))
  ckpt.close()
  nnx.update(model, restored['params'])
  return lora.merge_lora(model, spec)
