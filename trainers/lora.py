"""LoRA and QLoRA for every stage: the one place that puts adapters on a stage's model and wraps
its loss (the adapters are models/lora.py's, through qwix).

  python -m trainers.lora --config=configs/lora.py:small --workdir=runs/lora \
      --config.init_from=runs/demo/pretrain                       # adapter SFT
  python -m trainers.lora --config=configs/lora.py:dpo.tiny --workdir=runs/dpo_lora \
      --config.init_from=runs/sft                                 # adapter DPO
  python -m trainers.lora --config=configs/qlora.py:reward.tiny ...   # a QLoRA reward model

Every stage's config has a `lora` block (configs/sft.py's lora_keys); lora.rank > 0 turns it on,
whether the stage is started here or with its own module (python -m trainers.dpo ...
--config.lora.rank=16 is the same run). This module runs the stage the config belongs to (by
its block: ppo, grpo, dpo, reward, else SFT) and refuses lora.rank = 0.

With adapters, a stage
- loads the init_from model as the frozen base on every start (resumed ones included: the
  checkpoints hold only what trains), quantized to NF4/int4/int8 for QLoRA (lora.weight_qtype);
- trains the adapters only (nnx.LoRAParam), plus the scalar head for a reward model or critic,
  which has no counterpart in the base: those alone are in the optimizer and the checkpoints;
- writes lora.json, so every reader (models.checkpoint.load_model, models.reward.
  load_reward_model, eval, serving, export) gets the base with the adapters merged in, a plain
  model; the base workdir is never written (bit-identical, tested);
- for the reference of DPO, GRPO and PPO uses the base itself (the adapters at zero), never a
  second copy of the weights.
"""
import os

import jax
import ml_collections
from flax import nnx

from models import lora, reward
from trainers import cli, common


def spec(config: ml_collections.ConfigDict) -> lora.LoraSpec | None:
  """The adapter spec of the config's lora block, or None for full fine-tuning."""
  l = config.lora
  if l.rank == 0:
    return None
  return lora.LoraSpec(base=os.path.abspath(config.init_from), rank=l.rank, alpha=l.alpha,
                       dropout=l.dropout, target=l.target, weight_qtype=l.weight_qtype,
                       tile_size=l.tile_size)


def trainable(adapter_spec: lora.LoraSpec | None, *, with_head: bool = False):
  """The variables a stage optimises: all parameters, or the adapters (and the scalar head)."""
  if adapter_spec is None:
    return nnx.Param
  return nnx.Any(nnx.LoRAParam, reward.own_head) if with_head else nnx.LoRAParam


def prepare_model(config: ml_collections.ConfigDict, workdir: str, tokenizer, model_cfg, mesh):
  """The stage's Llama (the workdir written beside it) and its adapter spec:
  full fine-tuning: a fresh model or init_from's (common.initial_model);
  adapters: init_from's model as the base, adapters applied, lora.json written."""
  adapter_spec = spec(config)
  if adapter_spec is None:
    common.write_workdir(config, workdir, tokenizer, model_cfg)
    return common.initial_model(config, workdir, model_cfg, mesh), None
  base = common.load_init_from(config, model_cfg, mesh)
  write_workdir(config, workdir, tokenizer, model_cfg, adapter_spec)
  return adapt(base, adapter_spec, seed=config.seed, mesh=mesh), adapter_spec


def write_workdir(config, workdir: str, tokenizer, model_cfg, adapter_spec):
  """common.write_workdir, plus lora.json for an adapter run (what readers merge by)."""
  from trainers.workdir import is_primary
  common.write_workdir(config, workdir, tokenizer, model_cfg)
  if adapter_spec is not None and is_primary():
    lora.save_spec(workdir, adapter_spec)


def adapt(base, adapter_spec: lora.LoraSpec, *, seed: int, mesh):
  with jax.set_mesh(mesh):
    return lora.apply_lora(base, adapter_spec, seed=seed)


def wrap_loss(loss_fn, adapter_spec: lora.LoraSpec | None):
  """The stage's loss with the adapters' dropout drawing from the step's key (no-op without)."""
  if adapter_spec is None or adapter_spec.dropout == 0:
    return loss_fn

  def loss_with_adapter_dropout(model, batch, rng):
    lora.set_dropout_rng(model, rng)
    return loss_fn(model, batch, rng)
  return loss_with_adapter_dropout


def describe(model, which, model_cfg, adapter_spec: lora.LoraSpec | None) -> str:
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, which)))
  kind = 'full' if adapter_spec is None else \
      f'LoRA rank {adapter_spec.rank} {adapter_spec.weight_qtype}'.strip()
  return f'Model of {model_cfg.num_params():,} parameters, {n:,} trainable ({kind}).'


def stage_of(config: ml_collections.ConfigDict):
  """The trainer module whose config this is, by the block only it has."""
  from trainers import dpo, grpo, ppo, reward, sft
  for block, module in (('ppo', ppo), ('grpo', grpo), ('dpo', dpo), ('reward', reward)):
    if block in config:
      return module
  return sft


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.lora.rank == 0:
    raise ValueError('trainers.lora trains adapters: set lora.rank > 0 (configs/lora.py and '
                     'configs/qlora.py do), or run the stage\'s own module for full fine-tuning')
  return stage_of(config).run(config, workdir)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/lora.py:tiny')
