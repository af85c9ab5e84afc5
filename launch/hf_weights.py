"""Hugging Face Llama-family checkpoints <-> our model: config fields, tensor names and layout.

Shared by launch/import_checkpoint.py (HF and GGUF sources) and launch/export_checkpoint.py.
Transformers' Llama, Mistral and Qwen2 are the same decoder as models/llama.py (pre-norm RMSNorm,
half-split RoPE, SwiGLU, grouped-query attention; Qwen2 adds q/k/v biases), so importing is a
renaming plus a transpose: torch's Linear.weight is [out, in], our kernels are [in, out]. Both use
the same rotary layout, so q/k need no permutation (GGUF files do: launch/gguf_weights.py).

Tensors are read lazily from memory-mapped safetensors files and each parameter is assembled on
the mesh shard by shard (`jax.make_array_from_callback`): every device reads only its own slice,
so no host ever holds the whole model.
"""
import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from models.llama import Llama, abstract_model
from models.presets import LlamaConfig

ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM')

# Our module path -> the Hugging Face module name inside each decoder layer.
_LAYER_MODULES = {
    ('attn_norm',): 'input_layernorm',
    ('mlp_norm',): 'post_attention_layernorm',
    ('attn', 'wq'): 'self_attn.q_proj',
    ('attn', 'wk'): 'self_attn.k_proj',
    ('attn', 'wv'): 'self_attn.v_proj',
    ('attn', 'wo'): 'self_attn.o_proj',
    ('mlp', 'gate'): 'mlp.gate_proj',
    ('mlp', 'up'): 'mlp.up_proj',
    ('mlp', 'down'): 'mlp.down_proj',
}
_TOP_MODULES = {('embed',): 'model.embed_tokens', ('final_norm',): 'model.norm',
                ('lm_head',): 'lm_head'}
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
# Buffers some older exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def hf_name(path: tuple) -> tuple[str, bool]:
  """Our parameter path (e.g. ('layers', 3, 'attn', 'wq', 'kernel')) -> (HF name, transposed)."""
  *module, leaf = path
  if module[0] == 'layers':
    name = f'model.layers.{module[1]}.{_LAYER_MODULES[tuple(module[2:])]}'
  else:
    name = _TOP_MODULES[tuple(module)]
  return f'{name}.{_LEAF_NAMES[leaf]}', leaf == 'kernel'


def config_from_hf(hf: dict) -> LlamaConfig:
  """Our LlamaConfig from a transformers config.json; unsupported variants are errors."""
  arch = (hf.get('architectures') or [None])[0]
  if arch not in ARCHITECTURES:
    raise ValueError(f'unsupported architecture {arch!r}: expected one of {ARCHITECTURES}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'unsupported hidden_act={hf["hidden_act"]!r}: the model uses SwiGLU (silu)')
  if hf.get('mlp_bias') or (arch != 'Qwen2ForCausalLM' and hf.get('attention_bias')):
    raise ValueError('unsupported: biases on the MLP or on every attention projection '
                     '(only Qwen2-style q/k/v biases are implemented)')
  # transformers 5 nests theta and scaling in rope_parameters; older files keep them top level.
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise ValueError(f'unsupported rope scaling {rope_type!r}: models/llama.py implements plain '
                     'RoPE and Llama 3.1\'s "llama3" scaling')
  scaling = None
  if rope_type == 'llama3':
    scaling = (float(rope['factor']), float(rope['low_freq_factor']),
               float(rope['high_freq_factor']), int(rope['original_max_position_embeddings']))
  d, n_heads = hf['hidden_size'], hf['num_attention_heads']
  if hf.get('head_dim') not in (None, d // n_heads):
    raise ValueError(f'unsupported head_dim={hf["head_dim"]}: the model needs hidden_size / '
                     f'num_attention_heads = {d // n_heads}')
  if hf.get('use_sliding_window'):
    raise ValueError('unsupported: sliding-window attention (use_sliding_window=true)')
  max_len = hf.get('max_position_embeddings', 2048)
  if arch == 'MistralForCausalLM' and hf.get('sliding_window'):
    # Within one window sliding and full attention agree, so cap sequences at the window.
    max_len = min(max_len, hf['sliding_window'])
  return LlamaConfig(
      vocab_size=hf['vocab_size'], d_model=d, n_layers=hf['num_hidden_layers'], n_heads=n_heads,
      n_kv_heads=hf.get('num_key_value_heads') or n_heads, d_ff=hf['intermediate_size'],
      rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0))),
      max_seq_len=max_len, tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=arch == 'Qwen2ForCausalLM', norm_eps=hf.get('rms_norm_eps', 1e-6),
      rope_scaling=scaling)


def config_to_hf(cfg: LlamaConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
  """The transformers config.json of our model: a Qwen2 when it has q/k/v biases, else a Llama."""
  arch, model_type = ('Qwen2ForCausalLM', 'qwen2') if cfg.qkv_bias else ('LlamaForCausalLM',
                                                                         'llama')
  rope_scaling = None
  if cfg.rope_scaling is not None:
    factor, low, high, context = cfg.rope_scaling
    rope_scaling = {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low,
                    'high_freq_factor': high, 'original_max_position_embeddings': context}
  return {
      'architectures': [arch], 'model_type': model_type, 'hidden_act': 'silu',
      'rope_scaling': rope_scaling,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model, 'num_hidden_layers': cfg.n_layers,
      'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.n_kv_heads,
      'head_dim': cfg.head_dim, 'intermediate_size': cfg.d_ff, 'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta, 'max_position_embeddings': cfg.max_seq_len,
      'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False, 'mlp_bias': False,
      'bos_token_id': bos_id, 'eos_token_id': eos_id, 'dtype': cfg.param_dtype,
  }


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': ml_dtypes.bfloat16}


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file as a read-only memory map (nothing is read yet).

  The format: an 8-byte little-endian header length, a JSON header of
  {name: {dtype, shape, data_offsets: [begin, end]}} and the raw little-endian data. Mapping it
  ourselves gives slices of bfloat16 tensors, which safetensors' numpy API cannot load.
  """
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  tensors = {}
  for name, info in header.items():
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    begin, _ = info['data_offsets']
    tensors[name] = np.memmap(path, dtype=_SAFETENSORS_DTYPES[info['dtype']], mode='r',
                              offset=8 + n + begin, shape=tuple(info['shape']))
  return tensors


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """The tensors of an HF checkpoint directory: model.safetensors or a sharded index's files."""
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = sorted(name for name in os.listdir(directory) if name.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'{directory} holds no *.safetensors weights (pytorch .bin files are '
                            'not read: convert them with transformers save_pretrained)')
  tensors = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} (listed in {os.path.basename(index)}) is missing')
    tensors.update(_map_safetensors(path))
  return tensors


def load_params(cfg: LlamaConfig, tensors: dict, *, mesh=None, rules=None) -> Llama:
  """Our model from HF-named tensors ([out, in] matrices; any array-like with numpy indexing),
  each parameter assembled on its devices from the slices they hold."""
  graphdef, state, shardings = abstract_model(cfg, mesh, rules)
  dtype = np.dtype(cfg.param_dtype)
  used = set()
  flat_shardings = dict(nnx.to_flat_state(shardings))

  def place(path, leaf):
    name, transposed = hf_name(path)
    if name not in tensors:
      raise KeyError(f'checkpoint has no tensor {name!r}, which the config '
                     f'({"tied" if cfg.tie_embeddings else "untied"} embeddings, qkv_bias='
                     f'{cfg.qkv_bias}) needs')
    src = tensors[name]
    want = leaf.shape[::-1] if transposed else leaf.shape
    if tuple(src.shape) != tuple(want):
      raise ValueError(f'tensor {name!r} has shape {tuple(src.shape)}, but the config needs '
                       f'{tuple(want)}')
    used.add(name)
    if transposed:
      read = lambda idx: np.asarray(src[idx[::-1]], dtype).T
    else:
      read = lambda idx: np.asarray(src[idx], dtype)
    return jax.make_array_from_callback(leaf.shape, flat_shardings[path].get_value(), read)

  flat = nnx.to_flat_state(state)
  placed = nnx.from_flat_state([(path, leaf.replace(place(path, leaf))) for path, leaf in flat])
  unused = sorted(n for n in set(tensors) - used if not n.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f'checkpoint tensors the model has no place for (a different architecture '
                     f'or config?): {unused[:8]}{" ..." if len(unused) > 8 else ""}')
  return nnx.merge(graphdef, placed)


def hf_tensors(model: Llama):
  """Yields (HF name, float numpy array in torch layout) for each parameter, one at a time."""
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = hf_name(path)
    array = np.asarray(jax.device_get(leaf[...]))
    yield name, np.ascontiguousarray(array.T if transposed else array)
