"""Losses and metrics shared by training and evaluation."""
import jax
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


def _logp_and_entropy(logits, targets):
  """log p(target) and the entropy of each row of fp32 logits [..., V]."""
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  # H = -sum p log p; a metric only, so no gradient flows through it.
  entropy = jax.lax.stop_gradient(-(jnp.exp(logp_all) * logp_all).sum(-1))
  return logp, entropy


def token_logprobs(model, inputs, targets, positions=None, *, chunk: int = 0):
  """log p(targets[:, t] | inputs[:, :t+1]) and the entropy of each position's distribution,
  both [B, T] in fp32, for a causal model (models/llama.py) over unpacked rows.

  With chunk > 0 the vocabulary projection runs over `chunk` positions at a time inside a scan
  whose body is rematerialised (jax.checkpoint), so neither the forward nor the backward pass
  ever holds the [B, T, V] logits: the peak is [B, chunk, V]. That tensor is what runs RL
  trainers out of memory (32 rollouts x 1,024 tokens x a 128k vocabulary is 16 GiB in fp32);
  the rematerialised chunk costs one more head matmul in the backward pass.
  """
  return head_logprobs(model, model(inputs, positions, return_hidden=True), targets, chunk=chunk)


def head_logprobs(model, hidden, targets, *, chunk: int = 0):
  """token_logprobs from the final-norm hidden states [B, T, d_model] the model already computed
  (a reward model reads its backbone's hidden states once for its head and its LM head)."""
  b, t = targets.shape
  if not chunk or chunk >= t:
    return _logp_and_entropy(model.head(hidden), targets)
  n = -(-t // chunk)
  pad = n * chunk - t
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [n, B, chunk, ...]: the scan walks the chunks of every row together.
  hs = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(carry, xs):
    h, tgt = xs
    return carry, _logp_and_entropy(model.head(h), tgt)

  _, (logp, entropy) = jax.lax.scan(one_chunk, None, (hs, ts))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(logp), unchunk(entropy)
