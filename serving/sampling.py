"""Batched sampling with the model's KV cache: prefill the prompts, then one token per step.

Prompts of different lengths share one batch: each row is right-padded to the longest prompt and
then decodes from its own position, writing each new token's keys at that position. Padding keys
a row wrote past its prompt are overwritten before any query can see them (a key is visible only
at indices <= the query's position), so every row decodes exactly as it would alone.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import init_cache


def sample_logits(logits, rng, temperature, top_k):
  """Greedy when temperature == 0, else softmax(logits / T) restricted to the top k (k=0: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits / temperature, axis=-1)


@functools.partial(nnx.jit, static_argnames=('temperature', 'top_k'))
def _prefill(model, tokens, lengths, cache, rng, temperature, top_k):
  b, t = tokens.shape
  logits, cache = model(tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), cache=cache)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return sample_logits(last, rng, temperature, top_k), cache


@functools.partial(nnx.jit, static_argnames=('temperature', 'top_k'), donate_argnames=('cache',))
def _decode(model, tokens, positions, cache, rng, temperature, top_k):
  logits, cache = model(tokens[:, None], positions[:, None], cache=cache)
  return sample_logits(logits[:, 0], rng, temperature, top_k), cache


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt by up to max_new_tokens tokens (stopping after eos_id if given)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  lengths = np.array([len(p) for p in prompts], np.int32)
  total = int(lengths.max()) + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(f'prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) '
                     f'exceeds the model max_seq_len={model.cfg.max_seq_len}')
  tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  rng = jax.random.key(seed)
  cache = init_cache(model.cfg, len(prompts), total)
  nxt, cache = _prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                        jax.random.fold_in(rng, 0), temperature, top_k)
  out = [nxt]
  positions = jnp.asarray(lengths)
  for i in range(1, max_new_tokens):
    nxt, cache = _decode(model, nxt, positions, cache, jax.random.fold_in(rng, i), temperature,
                         top_k)
    positions = positions + 1
    out.append(nxt)
  generated = np.asarray(jnp.stack(out, axis=1))
  results = []
  for row in generated.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return results
