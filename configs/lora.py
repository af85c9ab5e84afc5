"""LoRA fine-tuning: a stage's config with rank-r adapters on every attention and MLP projection.

  python -m trainers.lora --config=configs/lora.py:tiny --workdir=runs/lora \
      --config.init_from=runs/pretrain                  (SFT; = python -m trainers.sft ...)
  python -m eval.accuracy --workdir=runs/lora      (loads base + adapters merged)
  python -m trainers.lora --config=configs/lora.py:dpo.tiny ...      (any stage: STAGE.PRESET with
      STAGE one of sft, reward, dpo, grpo, ppo and PRESET one of that stage's presets)

Only the adapters are trained, kept in the optimizer state and checkpointed: for `small` (rank 32)
that is 622,592 of 7.2M parameters and a 6.7 MiB checkpoint instead of 76 MiB
(bench/finetune_memory.py).
Adapters learn more slowly per step than full fine-tuning, hence the higher learning rate. Same
presets and expected results as configs/sft.py.
"""
import importlib

STAGES = ('sft', 'reward', 'dpo', 'grpo', 'ppo')


def get_config(arg: str = 'tiny'):
  stage, _, preset = arg.rpartition('.')
  stage = stage or 'sft'
  if stage not in STAGES:
    raise ValueError(f'configs/lora.py: unknown stage {stage!r} in {arg!r}; expected STAGE.PRESET '
                     f'with STAGE one of {STAGES}, or an SFT preset')
  c = importlib.import_module(f'configs.{stage}').get_config(preset)
  if c.lora.rank == 0:  # A stage preset that already picked adapters (grpo:small) keeps them.
    c.lora.rank = 16 if preset == 'tiny' else 32  # Adapter rank r.
    c.lora.alpha = 2.0 * c.lora.rank  # Scale alpha / r = 2.
    c.optimizer.learning_rate *= 2  # Adapters start from B = 0 and move little per step.
  return c
