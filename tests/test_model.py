"""The decoder: KV-cache decoding equals a full forward pass, packed documents stay apart, remat
changes nothing but memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import llama, presets

CFG = presets.resolve('tiny', dtype='float32')


@pytest.fixture(scope='module')
def model():
  return llama.create_model(CFG, seed=0)


def test_cache_decode_matches_full_forward(model):
  b, t, prompt = 3, 24, 7
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, CFG.vocab_size)
  full = model(tokens)
  cache = llama.init_cache(CFG, b, 32)
  pos = jnp.broadcast_to(jnp.arange(prompt), (b, prompt))
  logits, cache = model(tokens[:, :prompt], pos, cache=cache)  # Prefill.
  steps = [logits]
  for i in range(prompt, t):  # One-token decode steps.
    logits, cache = model(tokens[:, i:i + 1], jnp.full((b, 1), i), cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-5)


def test_cache_rows_at_different_positions(model):
  """Slots of a batch decode at different positions without seeing each other's or stale keys."""
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
  cache = llama.init_cache(CFG, 2, 16)
  # Fill row 0 with 12 tokens and row 1 with 12 different ones, then overwrite row 1 with a
  # 5-token prompt: its old keys beyond position 4 must be invisible.
  _, cache = model(tokens, jnp.broadcast_to(jnp.arange(12), (2, 12)), cache=cache)
  other = jax.random.randint(jax.random.key(3), (2, 5), 0, CFG.vocab_size)
  _, cache = model(other, jnp.broadcast_to(jnp.arange(5), (2, 5)), cache=cache)
  nxt = jnp.array([[11], [7]])
  logits, _ = model(nxt, jnp.array([[5], [5]]), cache=cache)
  ref = model(jnp.concatenate([other, nxt], 1))[:, -1]
  np.testing.assert_allclose(logits[:, 0], ref, atol=2e-5, rtol=2e-5)


def test_segments_do_not_attend_across_documents(model):
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, CFG.vocab_size)
  seg = jnp.array([[1] * 6 + [2] * 10] * 2)
  pos = jnp.array([list(range(6)) + list(range(10))] * 2)
  packed = model(tokens, pos, seg)
  np.testing.assert_allclose(packed[:, :6], model(tokens[:, :6]), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(packed[:, 6:], model(tokens[:, 6:]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_same_gradients(remat):
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, CFG.vocab_size)

  def grads(cfg):
    m = llama.create_model(cfg, seed=0)
    loss = lambda m: m(tokens).mean()
    return nnx.grad(loss)(m)

  a = jax.tree.leaves(grads(CFG))
  b = jax.tree.leaves(grads(dataclasses.replace(CFG, remat=remat)))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_tied_embeddings_share_the_table():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  m = llama.create_model(cfg, seed=0)
  assert m.lm_head is None
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m)))
  assert n == cfg.num_params() == CFG.num_params() - CFG.vocab_size * CFG.d_model


def test_qkv_bias_adds_the_bias_parameters():
  cfg = dataclasses.replace(CFG, qkv_bias=True)
  m = llama.create_model(cfg, seed=0)
  assert m.layers[0].attn.wk.bias[...].shape == (cfg.n_kv_heads * cfg.head_dim,)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(m))) == cfg.num_params()


def test_cache_longer_than_model_limit_is_an_error():
  with pytest.raises(ValueError, match='max_seq_len'):
    llama.init_cache(CFG, 1, CFG.max_seq_len + 1)


def test_bad_architecture_is_an_error():
  with pytest.raises(ValueError, match='n_kv_heads'):
    presets.resolve('tiny', n_kv_heads=3)
  with pytest.raises(ValueError, match='not a preset'):
    presets.resolve('gpt5')
