"""The Pallas decode-attention kernel writes the cache and attends exactly as the XLA path does,
the engine decodes the same with it, and it lowers to a Triton kernel for a GPU.

On a CPU the kernel runs in Pallas' interpreter (the same kernel body, evaluated by XLA), which
checks its arithmetic; exporting for 'cuda' from this host runs Pallas' Triton lowering, which
checks that Triton takes it (block shapes, types), though not how fast it runs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, presets
from models.decode_attention import decode_attention, default_splits
from serving import offline
from serving.engine import Engine, SamplingParams, _generate

CFG = presets.resolve('tiny', dtype='float32')
TRITON = '__gpu$xla.gpu.triton'


def _reference(q, k_new, v_new, cache_k, cache_v, positions, span):
  """The model's XLA path (llama.cache_attention) for one token per sequence."""
  o, cache = llama.cache_attention(q[:, None], k_new[:, None], v_new[:, None],
                                   {'k': cache_k, 'v': cache_v}, positions[:, None], span)
  return o[:, 0], cache['k'], cache['v']


@pytest.mark.parametrize('b,h,kvh,hd,length,span,splits,dtype,kv_dtype', [
    (2, 4, 2, 16, 96, 96, 1, 'float32', 'float32'),        # the tiny model's engine shape
    (3, 4, 2, 16, 512, 256, 4, 'float32', 'float32'),      # positions in different splits
    (2, 9, 3, 64, 256, 256, 2, 'float32', 'float32'),      # groups of 3 (SmolLM2's heads)
    (2, 16, 16, 64, 1024, 512, None, 'bfloat16', 'bfloat16'),  # 374m at one request
    (2, 4, 4, 32, 128, 128, 1, 'float32', 'bfloat16'),     # a bfloat16 cache under fp32 compute
])
def test_the_kernel_writes_and_attends_like_xla(b, h, kvh, hd, length, span, splits, dtype,
                                                kv_dtype):
  rng = np.random.default_rng(b * span + hd)
  normal = lambda shape, dt: jnp.asarray(rng.normal(size=shape), dt)
  q = normal((b, h, hd), dtype)
  k_new, v_new = normal((b, kvh, hd), kv_dtype), normal((b, kvh, hd), kv_dtype)
  cache_k, cache_v = normal((b, length, kvh, hd), kv_dtype), normal((b, length, kvh, hd), kv_dtype)
  # The first and last position of the span, and one in between.
  positions = jnp.asarray([0, span - 1, span // 2 + 3][:b], jnp.int32)
  want = _reference(q, k_new, v_new, cache_k, cache_v, positions, span)
  got = decode_attention(q, k_new, v_new, cache_k, cache_v, positions, span=span, splits=splits)
  tol = 2e-2 if dtype == 'bfloat16' else 1e-5
  assert got[0].dtype == q.dtype
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                             atol=tol, rtol=tol)
  # The cache: the new key and value at each position, nothing else touched.
  np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
  np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(want[2], np.float32))


def test_splits_spread_few_sequences_over_the_span():
  assert default_splits(2, 16, 512) == 2  # one request on the 374m shape: 64 programs
  assert default_splits(2, 16, 2048) == 4
  assert default_splits(64, 16, 512) == 1  # enough programs already
  assert default_splits(2, 2, 96) == 1  # too short to split


def _export_for_gpu(fn, *args):
  exported = jax.export.export(
      jax.jit(fn), platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize('b,h,kvh,length,span', [(2, 16, 16, 1024, 512), (64, 9, 3, 1008, 1008)])
def test_the_kernel_lowers_to_triton_for_a_gpu(b, h, kvh, length, span):
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  module = _export_for_gpu(functools.partial(decode_attention, span=span),
                           spec(b, h, 64), spec(b, kvh, 64), spec(b, kvh, 64),
                           spec(b, length, kvh, 64), spec(b, length, kvh, 64),
                           jax.ShapeDtypeStruct((b,), jnp.int32))
  assert module.count(TRITON) == 1
  assert 'stablehlo.while' not in module  # the Triton kernel, not the CPU interpreter's loop


@pytest.fixture(scope='module')
def model():
  return llama.create_model(CFG, seed=1)


PROMPTS = [[5, 17, 300, 2], list(range(30, 50)), [9], list(range(100, 140)), [44, 45, 46]]


def test_the_engine_decodes_the_same_with_the_kernel(model):
  # A spare decode row (as on a GPU), slots refilled mid-flight, greedy and sampled requests.
  kw = dict(max_concurrent_decodes=2, max_len=96, max_prefill_length=64, decode_steps=4)
  xla = Engine(model, **kw)
  pallas = Engine(model, decode_attention='pallas', min_decode_rows=3, **kw)
  assert pallas.rows == 3
  for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_k=40, seed=5)):
    want = offline.generate(xla, PROMPTS, max_tokens=16, sampling=sampling)
    got = offline.generate(pallas, PROMPTS, max_tokens=16, sampling=sampling)
    for a, b in zip(want, got):
      assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_the_kernel_ends_a_sequence_at_a_full_cache(model):
  small = Engine(model, max_concurrent_decodes=1, max_len=32, max_prefill_length=16,
                 decode_attention='pallas')
  done = offline.generate(small, [list(range(1, 15))], max_tokens=50)[0]
  want = offline.generate(Engine(model, max_concurrent_decodes=1, max_len=32,
                                 max_prefill_length=16), [list(range(1, 15))], max_tokens=50)[0]
  assert len(done.tokens) == 32 - 14 and done.finish_reason == 'length'
  assert done.tokens == want.tokens


def test_the_engine_decode_step_lowers_for_a_gpu(model):
  # The whole generate_many dispatch (a loop of decode steps, as a GPU runs it), exported for a
  # GPU: the Triton kernel (one function, jitted) called once per layer inside it.
  engine = Engine(model, max_concurrent_decodes=2, max_len=96, max_prefill_length=64,
                  decode_attention='pallas')
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  step = functools.partial(_generate, engine.graphdef, engine.max_len, engine.slots, 'greedy',
                           4, 96, 'pallas', False)
  module = _export_for_gpu(step, abstract(engine.params), abstract(engine.init_decode_state()))
  assert module.count(TRITON) == 1
  assert module.count('call @decode_attention(') == CFG.n_layers


def test_bad_decode_attention_settings_are_errors(model):
  with pytest.raises(ValueError, match="decode_attention='flash'"):
    Engine(model, max_len=96, max_prefill_length=32, decode_attention='flash')
  with pytest.raises(ValueError, match='multiple of 16'):
    Engine(model, max_len=100, max_prefill_length=32, decode_attention='pallas')
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  with pytest.raises(ValueError, match='one device'):
    Engine(model, max_len=96, max_prefill_length=32, mesh=mesh, decode_attention='pallas')
