"""Losses and metrics shared by training and evaluation."""
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


def pair_weights_and_accuracy(loss_mask, margin):
  """For preference rows (loss_mask [B, 2, T], chosen first) and the chosen-minus-rejected
  margin [B]: the weight of each pair (0 for eval padding, which has no response tokens) and
  whether it is ranked right (a tie counts one half, so an untrained scorer gets 0.5)."""
  weight = (loss_mask[:, 0].sum(-1) > 0).astype(jnp.float32)
  correct = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
  return weight, correct
