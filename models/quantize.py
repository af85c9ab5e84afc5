"""Weight-only quantization of a Llama for serving, through qwix's post-training quantization.

`quantize_weights(model, 'int8')` stores the attention and MLP projection weights (and an untied
LM head) in int8 with per-channel scales (int4: per 64-weight tile), which is what a decode step
reads from memory: for the 374m shape about half the bytes of bf16 (the embedding table stays,
since a lookup reads one row per token). Activations stay in the compute dtype; qwix dequantizes
inside each matmul. The quantized model is an nnx module like any other: the engine splits it
into graph and parameters and compiles its steps unchanged. (QLoRA's frozen base uses qwix's
quantization the same way, through models/lora.py.)
"""
import jax.numpy as jnp
import qwix

QTYPES = {'int8': (jnp.int8, None), 'int4': (jnp.int4, 64)}  # weight dtype, tile size
# Module paths qwix matches: the blocks' projections and the untied head, not the embedding.
_TARGETS = r'(.*layers/\d+/(attn|mlp)/.*|lm_head)'


def quantize_weights(model, qtype: str):
  """The model with its projection weights quantized to `qtype` (one of QTYPES)."""
  if qtype not in QTYPES:
    raise ValueError(f'quantize={qtype!r}: expected one of {sorted(QTYPES)} (or none)')
  dtype, tile = QTYPES[qtype]
  rule = qwix.QuantizationRule(module_path=_TARGETS, weight_qtype=dtype, tile_size=tile)
  sample = jnp.zeros((1, 8), jnp.int32)  # qwix traces one call to find the matmuls
  return qwix.quantize_model(model, qwix.PtqProvider([rule]), sample)
