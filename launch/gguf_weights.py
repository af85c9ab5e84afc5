"""GGUF (llama.cpp) checkpoints -> Hugging Face-named tensors, our config and the tokenizer.

Used by launch/import_checkpoint.py, which then places the tensors exactly as for a Hugging Face
directory (launch/hf_weights.py). Three things differ from safetensors:
- tensors are quantized: the `gguf` package dequantizes them, block by block along each row, so a
  device's rows are dequantized alone;
- llama.cpp's converter reorders the rows of each Q and K head for its interleaved (GPT-J) rotary
  layout; we undo it to get back the half-split layout of transformers and models/llama.py;
- the tokenizer is stored as metadata (tokens, merges, token types), rebuilt here as a
  `tokenizers` byte-level BPE with the file's chat template.
"""
import gguf
import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

from data.hf_tokenizer import HFTokenizer
from models.presets import LlamaConfig

# GGUF architecture -> (whether Q/K rows are permuted, whether q/k/v carry biases). llama.cpp
# permutes only for its `llama` family (Llama, Mistral, SmolLM); Qwen2 keeps the HF layout.
ARCHITECTURES = {'llama': (True, False), 'qwen2': (False, True)}

_LAYER_TENSORS = {
    'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
}
_TOP_TENSORS = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm',
                'output': 'lm_head'}

# tokenizer.ggml.pre -> the pre-tokenizer of the checkpoint's original tokenizer.json.
_PRE_TOKENIZERS = {
    'gpt2': lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    'smollm': lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types.


def _hf_name(gguf_name: str) -> str:
  module, leaf = gguf_name.rsplit('.', 1)
  parts = module.split('.')
  if parts[0] == 'blk' and parts[2] in _LAYER_TENSORS:
    return f'model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{leaf}'
  if module in _TOP_TENSORS:
    return f'{_TOP_TENSORS[module]}.{leaf}'
  raise ValueError(f'GGUF tensor {gguf_name!r} has no counterpart in the model')


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
  """Row order that undoes llama.cpp's Q/K permutation: hf = gguf[order].

  llama.cpp stores head h's row (c * hd/2 + j) (c in {0, 1}: first or second rotary half, j < hd/2)
  at row (2 * j + c) of that head, i.e. it interleaves the two halves.
  """
  half = n_rows // n_heads // 2
  return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


class _GGUFTensor:
  """A lazily dequantized tensor in torch layout ([out, in]); indexing dequantizes only the rows
  asked for (quantization blocks run along rows)."""

  def __init__(self, tensor, row_order=None):
    self._tensor, self._rows = tensor, row_order
    self.shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first.

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    rows = np.arange(self.shape[0])[index[0]]
    if self._rows is not None:
      rows = self._rows[rows]
    values = gguf.quants.dequantize(self._tensor.data[rows], self._tensor.tensor_type)
    return values[(slice(None),) + tuple(index[1:])].astype(np.float32)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _float32(value) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. Keep the shortest decimal
  # that float32 value stands for, as the original config wrote it.
  return float(str(np.float32(value)))


def read_gguf(path: str) -> tuple[LlamaConfig, dict, HFTokenizer]:
  """(config, {HF name: lazily dequantized tensor}, tokenizer) of a GGUF file."""
  reader = gguf.GGUFReader(path)
  arch = _field(reader, 'general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'unsupported GGUF architecture {arch!r}: expected one of '
                     f'{sorted(ARCHITECTURES)}')
  permuted, qkv_bias = ARCHITECTURES[arch]
  meta = lambda key, default=None: _field(reader, f'{arch}.{key}', default)
  names = {t.name for t in reader.tensors}
  scaling = meta('rope.scaling.type', 'none')
  if scaling != 'none' or 'rope_freqs.weight' in names:
    raise ValueError(f'unsupported rope scaling ({scaling!r}, or per-frequency factors as in '
                     'Llama 3.1): models/llama.py implements plain RoPE only')
  n_heads = meta('attention.head_count')
  n_kv = meta('attention.head_count_kv', n_heads)
  tokens = _field(reader, 'tokenizer.ggml.tokens') or []
  cfg = LlamaConfig(
      vocab_size=meta('vocab_size', len(tokens)), d_model=meta('embedding_length'),
      n_layers=meta('block_count'), n_heads=n_heads, n_kv_heads=n_kv,
      d_ff=meta('feed_forward_length'), rope_theta=_float32(meta('rope.freq_base', 10_000.0)),
      max_seq_len=meta('context_length', 2048), tie_embeddings='output.weight' not in names,
      qkv_bias=qkv_bias, norm_eps=_float32(meta('attention.layer_norm_rms_epsilon', 1e-5)))

  tensors = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    order = None
    if permuted and t.name.endswith(('attn_q.weight', 'attn_k.weight')):
      heads = n_heads if 'attn_q' in t.name else n_kv
      order = unpermute_rows(int(t.shape[-1]), heads)
    tensors[name] = _GGUFTensor(t, order)
  return cfg, tensors, read_gguf_tokenizer(reader)


def read_gguf_tokenizer(reader) -> HFTokenizer:
  """The byte-level BPE tokenizer and chat template stored in a GGUF file's metadata."""
  model, pre = _field(reader, 'tokenizer.ggml.model'), _field(reader, 'tokenizer.ggml.pre', 'gpt2')
  if model != 'gpt2' or pre not in _PRE_TOKENIZERS:
    raise ValueError(f'unsupported GGUF tokenizer (model={model!r}, pre={pre!r}): only byte-level '
                     f'BPE with pre-tokenizer {sorted(_PRE_TOKENIZERS)} is implemented')
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  types = _field(reader, 'tokenizer.ggml.token_type')
  merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges')]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
  tok.decoder = tokenizers.decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are matched whole before BPE, as in the original file.
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False)
                  for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  config = {'chat_template': _field(reader, 'tokenizer.chat_template')}
  if _field(reader, 'tokenizer.ggml.add_bos_token') is not None:  # SmolLM2's says False.
    config['add_bos_token'] = bool(_field(reader, 'tokenizer.ggml.add_bos_token'))
  for key in ('bos', 'eos', 'padding', 'unknown'):
    i = _field(reader, f'tokenizer.ggml.{key}_token_id')
    if i is not None:
      config[{'padding': 'pad', 'unknown': 'unk'}.get(key, key) + '_token'] = tokens[i]
  return HFTokenizer(tok, config)
