"""QLoRA: configs/lora.py over a base frozen in 4-bit NormalFloat (NF4, blockwise absmax scales).

  python -m trainers.lora --config=configs/qlora.py:tiny --workdir=runs/qlora \
      --config.init_from=runs/pretrain        (SFT; any stage as configs/qlora.py:STAGE.PRESET)

The base's targeted weights are stored as 4-bit codes plus one scale (in the compute dtype) per
output column and tile of `lora.tile_size` input rows: 4.25 bits per weight at tile 64 in bf16.
The adapters stay float32 and get all the gradients. Expect a slightly higher loss than LoRA: the
base is perturbed by quantization, each weight by at most 0.152 x its tile's largest magnitude
(tests/test_lora.py). Embeddings, norms and the LM head are not quantized.
"""
from configs import lora


def get_config(arg: str = 'tiny'):
  c = lora.get_config(arg)
  c.lora.weight_qtype = 'nf4'  # NF4 base (Dettmers et al., 2023); 'int4' / 'int8' also work.
  c.lora.tile_size = 32 if arg.endswith('tiny') else 64  # Rows per quantization scale (tiny has d 64).
  return c
