"""Token-level losses shared by training and evaluation."""
import jax.numpy as jnp
import optax


def token_cross_entropy(logits, targets, mask):
  """Summed next-token cross-entropy over the tokens where mask is 1.

  Returns (loss_sum, token_count, correct_count): sums rather than means, so micro-batches and
  eval batches combine exactly (mean = sum over all batches / count over all batches).
  """
  mask = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (ce * mask).sum(), mask.sum(), (correct * mask).sum()
