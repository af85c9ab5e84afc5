"""LoRA and QLoRA adapters on the Llama model, through qwix (DESIGN.md), and merging them back.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes each targeted weight W [d_in, d_out] and learns a
low-rank update beside it,
    y = x W + (alpha / r) * (x A) B,    A [d_in, r] (He-uniform), B [r, d_out] (zeros),
so at initialisation the model is exactly the base model. QLoRA (Dettmers et al., 2023,
arXiv:2305.14314) stores the frozen W in 4-bit NormalFloat (NF4): blockwise absmax scaling over
tiles of `tile_size` rows, each value rounded to the nearest of 16 quantiles of N(0, 1); the
adapters stay in float32 and receive all the gradients.

qwix intercepts the targeted modules' matmuls: the adapters are `nnx.LoRAParam` variables, so the
training loop optimizes and checkpoints only them (trainable=nnx.LoRAParam). `merge_lora` folds
W + (alpha / r) A B (NF4 weights dequantized first) into a plain Llama for export and serving.
A LoRA workdir records its adapter spec in `lora.json` (models/checkpoint.py reads it).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from models.llama import Llama

LORA_SPEC_FILE = 'lora.json'
WEIGHT_QTYPES = ('', 'nf4', 'int4', 'int8')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  base: str  # The workdir whose final parameters are the frozen base.
  rank: int
  alpha: float
  # Regex over module paths, '/'-joined attribute paths such as 'layers/3/attn/wq' (qwix matches
  # the whole path).
  target: str
  dropout: float = 0.0
  weight_qtype: str = ''  # '' keeps the base as is; 'nf4' (QLoRA), 'int4' or 'int8' quantize it.
  tile_size: int = 64  # Rows of W sharing one quantization scale.

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'lora.rank={self.rank} must be at least 1')
    if self.weight_qtype not in WEIGHT_QTYPES:
      raise ValueError(f'lora.weight_qtype={self.weight_qtype!r}: expected one of {WEIGHT_QTYPES}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def save_spec(workdir: str, spec: LoraSpec):
  with open(os.path.join(workdir, LORA_SPEC_FILE), 'w') as f:
    json.dump(dataclasses.asdict(spec), f, indent=2)


def read_spec(workdir: str) -> LoraSpec | None:
  """The workdir's adapter spec, or None for a workdir of full parameters."""
  path = os.path.join(workdir, LORA_SPEC_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return LoraSpec(**json.load(f))


class _LoraProvider(qwix.LoraProvider):
  """qwix's LoRA with each adapted matmul's output kept in its input's (compute) dtype: the fp32
  adapters would otherwise promote every later activation to fp32, which runs at fp32 speed
  (measured up to 1.8x slower steps on CPU for `small`) and which cuDNN attention refuses."""

  def dot_general(self, lhs, rhs, *args, **kwargs):
    return super().dot_general(lhs, rhs, *args, **kwargs).astype(lhs.dtype)


def _qtype(name: str):
  return {'': None, 'nf4': 'nf4', 'int4': jnp.int4, 'int8': jnp.int8}[name]


def apply_lora(model: Llama, spec: LoraSpec, *, seed: int = 0) -> Llama:
  """The model with adapters on every module matching spec.target (base quantized if asked)."""
  provider = _LoraProvider(
      module_path=spec.target, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
      weight_qtype=_qtype(spec.weight_qtype),
      tile_size=spec.tile_size if spec.weight_qtype else None)
  # qwix creates the adapters while tracing one call of the model on a sample input.
  sample = jnp.zeros((1, 1), jnp.int32)
  lora_model = qwix.apply_lora_to_model(model, provider, sample, rngs=nnx.Rngs(seed))
  adapters = nnx.state(lora_model, nnx.LoRAParam)
  if not jax.tree.leaves(adapters):
    raise ValueError(f'lora.target={spec.target!r} matches no module; paths look like '
                     f"'layers/0/attn/wq' or 'layers/1/mlp/down'")
  # qwix gives the adapters the dtype of the quantization scales, which follow the compute dtype
  # (bf16) when the base is quantized; adapters are trained in the master-weight dtype instead.
  param_dtype = jnp.dtype(lora_model.cfg.param_dtype)
  nnx.update(lora_model, jax.tree.map(lambda x: x.astype(param_dtype), adapters))
  return lora_model


def set_dropout_rng(lora_model, rng: jax.Array):
  """Gives the adapters' dropout a fresh key (qwix draws it from each module's `qwix_rngs`)."""
  rngs = nnx.Rngs(dropout=rng)
  for _, module in nnx.iter_modules(lora_model):
    if hasattr(module, 'qwix_rngs'):
      module.qwix_rngs = rngs


def _weight(value) -> jax.Array:
  """A base weight as float: the array itself, or the dequantized NF4/int array."""
  if isinstance(value, nnx.Variable):
    return value[...]
  q = value.array  # qwix's WithAux around a QArray whose fields are variables.
  unboxed = dataclasses.replace(
      q, qvalue=q.qvalue[...], scale=q.scale[...],
      zero_point=None if q.zero_point is None else q.zero_point[...])
  return qwix.dequantize(unboxed)


def merge_lora(lora_model, spec: LoraSpec) -> Llama:
  """A plain Llama whose weights are W + (alpha / r) A B (W dequantized for QLoRA)."""
  cfg, rules = lora_model.cfg, lora_model.rules
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Llama(cfg, rules=rules, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = []
  for path, var in nnx.to_flat_state(state):
    *module_path, name = path
    module = lora_model
    for key in module_path:
      module = module[key] if isinstance(key, int) else getattr(module, key)
    w = _weight(getattr(module, name))
    if hasattr(module, f'{name}_lora_a'):
      a, b = getattr(module, f'{name}_lora_a')[...], getattr(module, f'{name}_lora_b')[...]
      w = w + spec.scale * (a @ b)
    flat.append((path, var.replace(w.astype(var.value.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
