"""Batched KV-cache generation equals decoding each prompt alone without a cache."""
import jax.numpy as jnp
import pytest
from flax import nnx

from models import llama, presets
from serving.sampling import generate

CFG = presets.resolve('tiny', dtype='float32')


def _greedy_without_cache(model, prompt, n):
  """Full recompute each step. The row is zero-padded to one fixed length (one compilation):
  with causal attention the logits at the last real token ignore the padding after it."""
  forward = nnx.jit(lambda m, x: m(x))
  seq, width = list(prompt), len(prompt) + n
  for _ in range(n):
    row = jnp.asarray([seq + [0] * (width - len(seq))])
    seq.append(int(jnp.argmax(forward(model, row)[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_batched_greedy_equals_full_recompute():
  model = llama.create_model(CFG, seed=1)
  prompts = [[5, 17, 300, 2], [9], [44, 45, 46, 47, 48, 49, 50]]
  got = generate(model, prompts, max_new_tokens=12)
  for prompt, row in zip(prompts, got):
    assert row == _greedy_without_cache(model, prompt, 12)


def test_sampling_is_seeded_and_stops_at_eos():
  model = llama.create_model(CFG, seed=1)
  a = generate(model, [[5, 6]] * 4, max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
  b = generate(model, [[5, 6]] * 4, max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
  assert a == b and len({tuple(r) for r in a}) > 1  # Same seed, same draws; rows differ.
  eos = a[0][3]
  cut = generate(model, [[5, 6]], max_new_tokens=10, temperature=1.0, top_k=20, seed=3,
                 eos_id=eos)[0]
  assert cut[-1] == eos and len(cut) <= 10


def test_prompt_longer_than_the_model_is_an_error():
  model = llama.create_model(CFG, seed=1)
  with pytest.raises(ValueError, match='max_seq_len'):
    generate(model, [[1] * 500], max_new_tokens=20)
