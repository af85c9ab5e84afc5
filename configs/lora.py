"""LoRA fine-tuning: configs/sft.py with rank-r adapters on every attention and MLP projection.

  python -m trainers.sft --config=configs/lora.py:tiny --workdir=runs/lora \
      --config.init_from=runs/pretrain
  python -m eval.accuracy --workdir=runs/lora      (loads base + adapters merged)

Only the adapters are trained, kept in the optimizer state and checkpointed: for `small` (rank 32)
that is 622,592 of 7.2M parameters and a 6.7 MiB checkpoint instead of 76 MiB
(bench/finetune_memory.py).
Adapters learn more slowly per step than full fine-tuning, hence the higher learning rate. Same
presets and expected results as configs/sft.py.
"""
from configs import sft


def get_config(arg: str = 'tiny'):
  c = sft.get_config(arg)
  c.lora.rank = 16 if arg == 'tiny' else 32  # Adapter rank r.
  c.lora.alpha = 2.0 * c.lora.rank  # Scale alpha / r = 2.
  c.optimizer.learning_rate *= 2  # Adapters start from B = 0 and move little per step.
  return c
