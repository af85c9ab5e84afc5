"""One decode step's attention as one Pallas kernel per layer: write the new token's key and value
into the cache and attend over the live positions, in a single launch.

Why a kernel: on an H200 the XLA decode step of the 374m model at one request spends 378 kernels
a token (bench/RESULTS.md); per layer, the cache writes are two scatter kernels and attention over
the cache is five more (scores, mask, softmax reductions, the weighted sum), each a microsecond or
two of launch and ramp for a few hundred kilobytes of work. Here they are one Triton kernel (Pallas'
GPU backend): per (sequence, kv head, split of the span) a program streams the cached keys and
values of its positions, with an online softmax (flash decoding), and the program whose split
holds the new position writes the new key and value there, in place (the cache is aliased, not
copied). With more than one split, the partial results are combined by XLA.

Why not JAX's own `pallas.ops.gpu.decode_attention`: it wants the cache as [batch, kv_heads,
length, head_dim], so with ours ([batch, length, kv_heads, head_dim], what the prefill and the
trainer write) it transposes the whole cache span every call, and it does not write the cache.

The kernel runs wherever Pallas' Triton backend does (NVIDIA and ROCm GPUs); on a CPU it runs in
Pallas' interpreter, which is how the tests check it against the XLA path. TPUs need a Mosaic
kernel (tpu-inference's ragged paged attention); there the XLA path stays.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_K = 64  # cached positions a program reads per loop iteration
_NEG = -1e30  # the running max before any score (finite: exp(_NEG - _NEG) would be NaN at -inf)


def _min_block(n: int) -> int:
  """Triton's dot needs both sides at least 16 long: heads of a group are padded to this."""
  return max(16, 1 << (n - 1).bit_length())


def _kernel(pos_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref, *out_refs, group, block_h, per_split,
            block_k, scale, splits):
  o_ref, ko_ref, vo_ref = out_refs[:3]
  split = pl.program_id(2)
  pos = pos_ref[0]
  rows = jnp.arange(block_h) < group
  q = plgpu.load(q_ref.at[pl.ds(0, block_h), :], mask=rows[:, None], other=0)  # [block_h, hd]
  k_new = kn_ref[...]
  v_new = vn_ref[...]
  q32 = q.astype(jnp.float32)
  # The new token is at `pos`, not yet in the cache: split 0 starts from its score and value.
  s_new = jnp.sum(q32 * k_new.astype(jnp.float32)[None, :], axis=1) * scale  # [block_h]
  # (Arithmetic rather than a select on a scalar: Triton's lowering of the latter mixes types.)
  first = (split == 0).astype(jnp.float32)
  m = s_new * first + _NEG * (1.0 - first)
  l = jnp.full((block_h,), 1.0, jnp.float32) * first
  acc = jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], (block_h, v_new.shape[0])) * first

  # Cached positions [lo, hi): this split's share of those before `pos`.
  lo = split * per_split
  hi = jnp.minimum(lo + per_split, pos)
  offsets = jnp.arange(block_k)

  def body(j, carry):
    m, l, acc = carry
    start = lo + j * block_k
    k = k_ref[pl.ds(start, block_k), :].astype(q.dtype)  # [block_k, hd]
    v = v_ref[pl.ds(start, block_k), :].astype(q.dtype)
    s = plgpu.dot(q, k.T) * scale  # [block_h, block_k], fp32 accumulation
    s = jnp.where((start + offsets < hi)[None, :], s, -jnp.inf)
    m_next = jnp.maximum(m, s.max(axis=1))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    l = l * correction + p.sum(axis=1)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return m_next, l, acc

  # Every block read holds at least one position < hi, so m_next is a real score after it.
  m, l, acc = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - lo, 0), block_k), body, (m, l, acc))
  if splits == 1:
    plgpu.store(o_ref.at[pl.ds(0, block_h), :], (acc / l[:, None]).astype(o_ref.dtype),
                mask=rows[:, None])
  else:
    m_ref, l_ref = out_refs[3:]
    plgpu.store(o_ref.at[pl.ds(0, block_h), :], acc, mask=rows[:, None])
    plgpu.store(m_ref.at[pl.ds(0, block_h)], m, mask=rows)
    plgpu.store(l_ref.at[pl.ds(0, block_h)], l, mask=rows)

  @pl.when(pos // per_split == split)
  def _():
    ko_ref[pl.ds(pos, 1), :] = k_new.astype(ko_ref.dtype)[None, :]
    vo_ref[pl.ds(pos, 1), :] = v_new.astype(vo_ref.dtype)[None, :]


def _block_k(per_split: int) -> int:
  """Positions read per loop iteration: a power of two >= 16 (Triton's dot) dividing per_split."""
  for block in (BLOCK_K, 32, 16):
    if per_split % block == 0:
      return block
  raise ValueError(f'the pallas decode attention needs a span split into multiples of 16 '
                   f'positions, got {per_split}')


def check_shapes(head_dim: int, span: int):
  """Raises ValueError for shapes the kernel does not take (Triton's blocks are powers of two)."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f'the pallas decode attention needs a power-of-two head_dim >= 16, got '
                     f'{head_dim}')
  if span < 16 or span % 16:
    raise ValueError(f'the pallas decode attention needs a span that is a multiple of 16, got '
                     f'{span}')


def default_splits(batch: int, kv_heads: int, span: int) -> int:
  """Splits of the span per (sequence, kv head): enough programs to spread over a GPU's SMs
  (about 128 of them) when there are few sequences, never under 256 positions a split, each a
  whole number of BLOCK_K blocks."""
  splits = 1
  while (batch * kv_heads * splits < 128 and span // (2 * splits) >= 256
         and span % (2 * splits * BLOCK_K) == 0):
    splits *= 2
  return splits


@functools.partial(jax.jit, static_argnames=('span', 'splits', 'interpret'))
def decode_attention(q, k_new, v_new, cache_k, cache_v, positions, *, span: int,
                     splits: int | None = None, interpret: bool | None = None):
  """Attention of one new token per sequence over its cache, with the cache write.

  q [B, H, hd]; k_new, v_new [B, KVH, hd] (the new token's key, after RoPE, and value); cache_k,
  cache_v [B, S, KVH, hd]; positions [B] (the new token's position, < span <= S; a row at or
  beyond span, such as an ended slot the engine carries along, writes nothing and its output is
  meaningless). The token attends to cache positions < its position and to itself (positions
  beyond it hold whatever a previous sequence left and are never read). Query head h uses kv head h // (H / KVH),
  as jax.nn.dot_product_attention groups them. Returns (o [B, H, hd] in q's dtype, cache_k and
  cache_v with the new key and value at `positions`, updated in place).
  """
  b, h, hd = q.shape
  s_len, kvh = cache_k.shape[1], cache_k.shape[2]
  check_shapes(hd, span)
  if span > s_len:
    raise ValueError(f'span={span} exceeds the cache length {s_len}')
  group = h // kvh
  splits = splits or default_splits(b, kvh, span)
  if span % splits:
    raise ValueError(f'splits={splits} does not divide span={span}')
  per_split = span // splits
  block_k = _block_k(per_split)
  block_h = _min_block(group)
  kernel = functools.partial(_kernel, group=group, block_h=block_h, per_split=per_split,
                             block_k=block_k, scale=1.0 / math.sqrt(hd), splits=splits)
  cache_spec = pl.BlockSpec((None, s_len, None, hd), lambda i, j, s: (i, 0, j, 0))
  if splits == 1:
    o_spec = [pl.BlockSpec((None, None, group, hd), lambda i, j, s: (i, j, 0, 0))]
    o_shape = [jax.ShapeDtypeStruct((b, kvh, group, hd), q.dtype)]
  else:
    o_spec = [pl.BlockSpec((None, None, None, group, hd), lambda i, j, s: (s, i, j, 0, 0)),
              pl.BlockSpec((None, None, None, group), lambda i, j, s: (s, i, j, 0)),
              pl.BlockSpec((None, None, None, group), lambda i, j, s: (s, i, j, 0))]
    o_shape = [jax.ShapeDtypeStruct((splits, b, kvh, group, hd), jnp.float32),
               jax.ShapeDtypeStruct((splits, b, kvh, group), jnp.float32),
               jax.ShapeDtypeStruct((splits, b, kvh, group), jnp.float32)]
  call = lambda interpret, *args: pl.pallas_call(
      kernel,
      grid=(b, kvh, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, j, s: (i,)),
                pl.BlockSpec((None, None, group, hd), lambda i, j, s: (i, j, 0, 0)),
                pl.BlockSpec((None, None, hd), lambda i, j, s: (i, j, 0)),
                pl.BlockSpec((None, None, hd), lambda i, j, s: (i, j, 0)),
                cache_spec, cache_spec],
      out_specs=[o_spec[0], cache_spec, cache_spec] + o_spec[1:],
      out_shape=[o_shape[0], jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                 jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)] + o_shape[1:],
      input_output_aliases={4: 1, 5: 2},
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name='decode_attention',
  )(*args)
  args = (positions.astype(jnp.int32), q.reshape(b, kvh, group, hd), k_new, v_new, cache_k,
          cache_v)
  if interpret is None:
    # Chosen when lowering, by the platform lowered for: the interpreter on a CPU, Triton
    # elsewhere (so exporting for a GPU from a CPU host lowers the Triton kernel).
    outs = jax.lax.platform_dependent(*args, cpu=functools.partial(call, True),
                                      default=functools.partial(call, False))
  else:
    outs = call(interpret, *args)
  o, cache_k, cache_v = outs[:3]
  if splits > 1:
    acc, m, l = o, outs[3], outs[4]
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all)
    o = ((acc * w[..., None]).sum(axis=0) / (l * w).sum(axis=0)[..., None]).astype(q.dtype)
  return o.reshape(b, h, hd), cache_k, cache_v
