"""The Llama-family decoder every stage shares: RMSNorm, RoPE, SwiGLU, grouped-query attention.

One forward serves training (full sequences, packed documents kept apart by segment ids) and
inference (a KV cache written at each token's position: prefill a prompt, then one-token decode
steps), so the serving engine and the RL rollouts run the very model the trainer trains.

Weights are stored in `param_dtype` (fp32 master weights) and matmuls run in `dtype` (bf16 by
default); norms, softmax and logits are computed in fp32. Every parameter carries logical axis
names that models/sharding.py maps to the mesh.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.decode_attention import decode_attention
from models.presets import LlamaConfig
from models.sharding import Rules, constrain, named_shardings

Cache = list[dict[str, jax.Array]]  # One {'k', 'v'} per layer, each [batch, max_len, kv_heads, hd].


def _init(names, std=None):
  init = nnx.initializers.normal(std) if std else nnx.initializers.lecun_normal()
  return nnx.with_partitioning(init, names)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    # y = x / sqrt(mean(x^2) + eps) * scale
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> jax.Array:
  """inv_freq_i = theta^(-2i/h); with Llama 3.1 scaling (factor f, low/high frequency factors l
  and u, original context C) wavelengths 2pi/inv_freq above C/l are divided by f, those below
  C/u kept, and those between interpolated by s = (C/wavelength - l) / (u - l):
  inv_freq' = (1 - s) * inv_freq / f + s * inv_freq."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  factor, low, high, context = scaling
  wavelength = 2 * jnp.pi / inv_freq
  smooth = jnp.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary embedding, half-split layout (as in Hugging Face Llama). x: [B, T, N, H]."""
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def cache_attention(q, k, v, cache, positions, attend_len=None):
  """XLA's path through a KV cache: q [B, T, N, H], k and v [B, T, KVH, H] of a chunk at
  `positions` [B, T] -> (attention output [B, T, N, H], the cache with the chunk written).

  Write this chunk's keys/values at their positions, then attend over the cache. Slots hold
  sequences of different lengths; a key is visible iff its index <= the query's position, which
  also hides whatever a previous sequence left beyond the current one. attend_len (static):
  attend over the cache's first attend_len positions only, which the caller guarantees hold every
  position of these queries (the engine's length buckets)."""
  rows = jnp.arange(q.shape[0])[:, None]
  cache = {'k': cache['k'].at[rows, positions].set(k.astype(cache['k'].dtype)),
           'v': cache['v'].at[rows, positions].set(v.astype(cache['v'].dtype))}
  span = cache['k'].shape[1] if attend_len is None else attend_len
  visible = jnp.arange(span)[None, None, :] <= positions[:, :, None]  # [B, T, S]
  if q.shape[1] == 1 and jax.default_backend() == 'cpu':
    return _one_token_attention(q, cache['k'][:, :span], cache['v'][:, :span], visible), cache
  o = jax.nn.dot_product_attention(q, cache['k'][:, :span].astype(q.dtype),
                                   cache['v'][:, :span].astype(q.dtype),
                                   mask=visible[:, None], implementation='xla')
  return o, cache


def _one_token_attention(q, k, v, visible):
  """Attention of one query per sequence, q [B, 1, N, H], over k and v [B, S, KVH, H] with
  visible [B, 1, S], as products and sums along the cache's own layout. XLA's CPU dots want the
  batch dimensions (sequence, kv head) leading, so dot_product_attention transposed every layer's
  keys and values each step: on a CPU at 64 sequences (`small`, fp32) this took the layers'
  decode time from 14.5 to 10.9 ms. GPUs and TPUs keep the dots (not measured there)."""
  b, _, n, h = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, 1, kvh, n // kvh, h).astype(jnp.float32)  # [B, 1, KVH, G, H]
  scores = (qg * k[:, :, :, None, :].astype(jnp.float32)).sum(-1) * (h ** -0.5)  # [B, S, KVH, G]
  scores = jnp.where(visible[:, 0, :, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=1)
  o = (probs[..., None] * v[:, :, :, None, :].astype(jnp.float32)).sum(1)  # [B, KVH, G, H]
  return o.reshape(b, 1, n, h).astype(q.dtype)


def _linear(d_in, d_out, names, cfg, rngs, bias=False):
  return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=_init(names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
                    dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def attention_impl(cfg: LlamaConfig) -> str | None:
  if cfg.attention != 'auto':
    return cfg.attention
  # cuDNN flash attention on GPU (DESIGN.md: ~10x XLA's at the 374m shape); XLA on CPU.
  return 'cudnn' if jax.default_backend() == 'gpu' and cfg.dtype == 'bfloat16' else 'xla'


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rules: Rules | None, rngs: nnx.Rngs):
    self.cfg, self.rules = cfg, rules
    d, hd = cfg.d_model, cfg.head_dim
    self.wq = _linear(d, cfg.n_heads * hd, ('embed', 'q_heads'), cfg, rngs, cfg.qkv_bias)
    self.wk = _linear(d, cfg.n_kv_heads * hd, ('embed', 'kv_heads'), cfg, rngs, cfg.qkv_bias)
    self.wv = _linear(d, cfg.n_kv_heads * hd, ('embed', 'kv_heads'), cfg, rngs, cfg.qkv_bias)
    self.wo = _linear(cfg.n_heads * hd, d, ('q_heads', 'embed'), cfg, rngs)

  def __call__(self, x, positions, segment_ids, cache, attend_len=None, decode_kernel=None):
    cfg = self.cfg
    b, t, _ = x.shape
    heads = ('act_batch', 'act_length', 'act_heads', None)
    q = constrain(self.wq(x).reshape(b, t, cfg.n_heads, cfg.head_dim), heads, self.rules)
    k = self.wk(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = self.wv(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
    k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)

    if cache is None:
      # Packed rows: a token sees earlier tokens of its own document only.
      same_doc = None if segment_ids is None else (
          segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
      o = jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=True,
                                       implementation=attention_impl(cfg))
    elif decode_kernel == 'pallas' and t == 1:
      # One token per sequence: the cache write and the attention in one Pallas kernel.
      span = cache['k'].shape[1] if attend_len is None else attend_len
      o, ck, cv = decode_attention(q[:, 0], k[:, 0].astype(cache['k'].dtype),
                                   v[:, 0].astype(cache['v'].dtype), cache['k'], cache['v'],
                                   positions[:, 0], span=span)
      o, cache = o[:, None], {'k': ck, 'v': cv}
    else:
      o, cache = cache_attention(q, k, v, cache, positions, attend_len)
    o = constrain(o, heads, self.rules)
    return self.wo(o.reshape(b, t, -1)), cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rules: Rules | None, rngs: nnx.Rngs):
    self.rules = rules
    self.gate = _linear(cfg.d_model, cfg.d_ff, ('embed', 'mlp'), cfg, rngs)
    self.up = _linear(cfg.d_model, cfg.d_ff, ('embed', 'mlp'), cfg, rngs)
    self.down = _linear(cfg.d_ff, cfg.d_model, ('mlp', 'embed'), cfg, rngs)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(constrain(h, ('act_batch', 'act_length', 'act_mlp'), self.rules))


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rules: Rules | None, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))
    self.attn = Attention(cfg, rules, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))
    self.mlp = MLP(cfg, rules, rngs)

  def __call__(self, x, positions, segment_ids, cache, attend_len=None, decode_kernel=None):
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, attend_len,
                         decode_kernel)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


def _block_forward(block, x, positions, segment_ids, cache, attend_len=None, decode_kernel=None):
  return block(x, positions, segment_ids, cache, attend_len, decode_kernel)


_REMAT = {
    'none': _block_forward,
    'full': nnx.remat(_block_forward),
    'dots': nnx.remat(_block_forward,
                      policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rules: Rules | None = None, rngs: nnx.Rngs):
    self.cfg, self.rules = cfg, rules
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=_init(('vocab', 'embed'), 0.02), rngs=rngs)
    self.layers = nnx.List([Block(cfg, rules, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    self.lm_head = None if cfg.tie_embeddings else _linear(
        cfg.d_model, cfg.vocab_size, ('embed', 'vocab'), cfg, rngs)

  def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, *,
               return_hidden: bool = False, attend_len: int | None = None,
               decode_kernel: str | None = None, logits_at: jax.Array | None = None):
    """tokens [B, T] -> logits [B, T, vocab] in fp32, and the updated cache when one is given.

    positions: [B, T] position of each token in its sequence (default 0..T-1); with a cache they
    are also the cache indices written. segment_ids: [B, T] document ids of packed rows (training).
    return_hidden: return the final-norm hidden states [B, T, d_model] instead of the logits, for
    callers that apply `head` to a few positions at a time (chunked log-probs). It is a flag of
    `__call__` rather than a call of `hidden_states` because qwix's LoRA intercepts `__call__`
    only: a LoRA model must be run through it. attend_len (static, with a cache): attention reads
    only the cache's first attend_len positions, which must hold every query position (decode
    steps of sequences shorter than the cache). decode_kernel (static, with a cache): 'pallas'
    runs one-token steps' cache write and attention as one kernel a layer
    (models/decode_attention.py); None or 'xla' leaves them to XLA. logits_at: indices [B, K]
    along T: the output covers those positions only, [B, K, ...]. A prefill needs the logits of
    a prompt's last position, and the head over every position was 37% of a `small` preset's
    prefill (the vocabulary is wide); like return_hidden it is a flag of `__call__`, so that
    quantized and LoRA heads run through qwix's interception.
    """
    x, new_cache = self.hidden_states(tokens, positions, segment_ids, cache, attend_len,
                                      decode_kernel)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
    out = x if return_hidden else self.head(x)
    return out if cache is None else (out, new_cache)

  def head(self, x):
    """Final-norm hidden states [B, T, d_model] -> fp32 logits [B, T, vocab]."""
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'),
                     self.rules)

  def hidden_states(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
                    attend_len: int | None = None, decode_kernel: str | None = None):
    """The final-norm hidden states [B, T, d_model] (what the LM head reads; a reward or value
    head reads them too), and the updated cache (None without one)."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    act = ('act_batch', 'act_length', 'act_embed')
    # FSDP gathers a weight just before use: gathering the table's `embed` dimension first lets
    # the lookup keep the batch sharded (a lookup into an fsdp-sharded table forces XLA into a
    # full rematerialisation).
    table = constrain(self.embed.embedding[...], ('vocab', None), self.rules)
    x = constrain(jnp.take(table, tokens, axis=0).astype(self.cfg.dtype), act, self.rules)
    new_cache = []
    for i, layer in enumerate(self.layers):
      if cache is None:
        x, layer_cache = _REMAT[self.cfg.remat](layer, x, positions, segment_ids, None)
      else:
        x, layer_cache = _block_forward(layer, x, positions, segment_ids, cache[i], attend_len,
                                        decode_kernel)
      x = constrain(x, act, self.rules)
      new_cache.append(layer_cache)
    return self.final_norm(x), (None if cache is None else new_cache)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache for `batch` sequences of up to `max_len` tokens."""
  if max_len > cfg.max_seq_len:
    raise ValueError(f'cache length {max_len} exceeds the model max_seq_len={cfg.max_seq_len}')
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def abstract_model(cfg: LlamaConfig, mesh=None, rules: Rules | None = None):
  """(graphdef, abstract state, NamedShardings) of the model, allocating nothing. Without a mesh
  every parameter goes to the default device."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Llama(cfg, rules=rules if mesh is not None else None,
                                            rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if mesh is not None:
    shardings = named_shardings(nnx.get_partition_spec(state), mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  return graphdef, state, shardings


def create_model(cfg: LlamaConfig, *, seed: int, mesh=None, rules: Rules | None = None) -> Llama:
  """Initialises the model with every parameter placed on `mesh` as `rules` say.

  Parameters are created inside one jit whose out_shardings come from their logical names, so no
  host ever holds the whole model. Without a mesh the model lives on the default device.
  """
  rules = rules if mesh is not None else None
  # Same random numbers, but a GPU kernel instead of inlined threefry: without it XLA took ~3 min
  # to compile the 374m initialiser on an H100 (bench/RESULTS.md).
  jax.config.update('jax_threefry_gpu_kernel_lowering', True)
  graphdef, _, shardings = abstract_model(cfg, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(Llama(cfg, rules=rules, rngs=nnx.Rngs(seed)))

  if mesh is None:
    return nnx.merge(graphdef, init())
  with jax.set_mesh(mesh):
    return nnx.merge(graphdef, init())


def param_shardings(model: Llama, mesh, rules: Rules):
  """NamedShardings of the model's parameters (for restoring checkpoints onto a mesh)."""
  return named_shardings(nnx.get_partition_spec(nnx.state(model)), mesh, rules)
