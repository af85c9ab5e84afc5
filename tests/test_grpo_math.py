"""GRPO's advantages and losses (trainers/grpo.py) and the RL machinery's pure parts
(trainers/rl.py) against values worked out by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import grpo, rl


def test_group_advantages_by_hand():
  r = np.array([[1.0, 0.0, 0.0, 1.0]])
  # mean 0.5; unbiased std sqrt((4 * 0.25) / 3) = 0.57735: A = +-0.5 / 0.57735 = +-0.866025.
  np.testing.assert_allclose(grpo.group_advantages(r, eps=0.0), [[0.866025, -0.866025,
                                                                  -0.866025, 0.866025]], atol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(r, scale='none'), [[0.5, -0.5, -0.5, 0.5]])
  # 'batch': centred per group, divided by the std of all four rewards [1, 0, 3, 3]: mean 1.75,
  # squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, / 3 = 2.25, std 1.5.
  r2 = np.array([[1.0, 0.0], [3.0, 3.0]])
  np.testing.assert_allclose(grpo.group_advantages(r2, scale='batch', eps=0.0),
                             [[1 / 3, -1 / 3], [0.0, 0.0]], atol=1e-6)
  # A group whose rewards are all equal has zero advantages (no division by zero).
  np.testing.assert_array_equal(grpo.group_advantages(np.ones((1, 4))), np.zeros((1, 4)))


def test_rloo_is_the_leave_one_out_baseline():
  r = np.array([[1.0, 0.0, 0.0]])
  # A_0 = 1 - (0 + 0) / 2 = 1; A_1 = 0 - (1 + 0) / 2 = -0.5; A_2 likewise.
  np.testing.assert_allclose(grpo.group_advantages(r, scale='none', leave_one_out=True),
                             [[1.0, -0.5, -0.5]])


# Two completions of lengths 2 and 4 in rows of 4 tokens.
MASK = jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def _loss(loss_type, logp, old, ref=None, adv=(1.0, -1.0), mask=MASK, is_weight=None, beta=0.0,
          lo=0.2, hi=0.2, max_tokens=4):
  ref = logp if ref is None else ref
  is_weight = jnp.ones_like(mask) if is_weight is None else is_weight
  return grpo.grpo_loss(logp, old, ref, jnp.asarray(adv), mask, is_weight, loss_type=loss_type,
                        beta=beta, epsilon_low=lo, epsilon_high=hi, max_completion_tokens=max_tokens)


def _mean_loss(loss_type, logp, **kw):
  loss_sum, weight, _ = _loss(loss_type, logp, jax.lax.stop_gradient(logp), **kw)
  return loss_sum / weight


@pytest.mark.parametrize('loss_type, value, grad_00, grad_10', [
    # On-policy (ratio 1) the token loss is -A: -1 on row 0's 2 tokens, +1 on row 1's 4.
    ('grpo', 0.0, -1 / 2 / 2, 1 / 4 / 2),  # mean of sequence means (-1 and +1) over 2 rows
    ('bnpo', 2 / 6, -1 / 6, 1 / 6),  # (-2 + 4) / 6 tokens of this (only) micro-batch
    ('dapo', 2 / 6, -1 / 6, 1 / 6),  # (-2 + 4) / 6 tokens of the whole step
    ('dr_grpo', 2 / 8, -1 / 8, 1 / 8),  # (-2 + 4) / (2 rows x L_max 4)
    ('gspo_token', 0.0, -1 / 2 / 2, 1 / 4 / 2),  # ratio 1: as grpo
    ('gspo', 0.0, -1 / 2 / 2, 1 / 4 / 2),  # -s_i A_i with ds_i/dlogp_t = s_i / |o_i|, 2 rows
])
def test_loss_normalisations_by_hand(loss_type, value, grad_00, grad_10):
  logp = jnp.log(jnp.full((2, 4), 0.5))
  assert float(_mean_loss(loss_type, logp)) == pytest.approx(value, abs=1e-6)
  grad = jax.grad(lambda lp: _mean_loss(loss_type, lp))(logp)
  assert float(grad[0, 0]) == pytest.approx(grad_00, abs=1e-6)
  assert float(grad[1, 0]) == pytest.approx(grad_10, abs=1e-6)
  assert float(grad[0, 3]) == 0.0  # Padding gets no gradient.


def test_bnpo_averages_micro_batches_where_dapo_pools_their_tokens():
  """With micro-batches the loop sums loss_sum and weight: bnpo's weight is 1 per micro-batch, so
  it averages their token means; dapo's is the token count, a mean over all tokens."""
  logp = jnp.log(jnp.full((2, 4), 0.5))
  parts = {t: [_loss(t, logp[i:i + 1], logp[i:i + 1], adv=(a,), mask=MASK[i:i + 1])
               for i, a in enumerate((1.0, -1.0))] for t in ('bnpo', 'dapo')}
  total = lambda t: sum(p[0] for p in parts[t]) / sum(p[1] for p in parts[t])
  assert float(total('bnpo')) == pytest.approx((-1 + 1) / 2)  # mean of -1 and +1
  assert float(total('dapo')) == pytest.approx((-2 + 4) / 6)


def test_clipping_by_hand():
  old = jnp.zeros((3, 1))
  logp = jnp.log(jnp.array([[1.5], [1.5], [0.5]]))  # ratios 1.5, 1.5, 0.5
  mask = jnp.ones((3, 1))
  adv = (1.0, -1.0, -1.0)
  loss_sum, weight, m = _loss('dapo', logp, old, adv=adv, mask=mask, lo=0.2, hi=0.2)
  # Row 0: min(1.5, 1.2) = 1.2 (clipped high); row 1: min(-1.5, -1.2) = -1.5 (a negative
  # advantage is never clipped from above); row 2: min(-0.5, -0.8) = -0.8 (clipped low).
  assert float(loss_sum / weight) == pytest.approx((-1.2 + 1.5 + 0.8) / 3, abs=1e-6)
  frac = lambda k: float(m[k][0] / m[k][1])
  assert frac('clip_high') == pytest.approx(1 / 3) and frac('clip_low') == pytest.approx(1 / 3)
  assert frac('clip_region') == pytest.approx(2 / 3)
  assert frac('ratio_mean') == pytest.approx((1.5 + 1.5 + 0.5) / 3, abs=1e-6)
  # Clip-higher: with epsilon_high = 0.6 row 0 is no longer clipped: min(1.5, 1.6) = 1.5.
  loss_sum, weight, m = _loss('dapo', logp, old, adv=adv, mask=mask, lo=0.2, hi=0.6)
  assert float(loss_sum / weight) == pytest.approx((-1.5 + 1.5 + 0.8) / 3, abs=1e-6)
  assert float(m['clip_high'][0]) == 0.0


def test_gspo_clips_the_sequence_ratio():
  old = jnp.zeros((1, 2))
  logp = jnp.array([[math.log(2.0), 0.0]])  # token ratios 2 and 1
  mask = jnp.ones((1, 2))
  # s = exp((log 2 + 0) / 2) = sqrt(2) = 1.41421 > 1.2: clipped, loss -1.2 for A = 1.
  loss_sum, weight, m = _loss('gspo', logp, old, adv=(1.0,), mask=mask, hi=0.2)
  assert float(loss_sum / weight) == pytest.approx(-1.2, abs=1e-6)
  assert float(m['clip_high'][0] / m['clip_high'][1]) == 1.0
  assert float(m['ratio_mean'][0] / m['ratio_mean'][1]) == pytest.approx(math.sqrt(2), abs=1e-6)
  # Token-level grpo sees ratios 2 and 1: only the first token is clipped: (-1.2 - 1) / 2.
  loss_sum, weight, _ = _loss('grpo', logp, old, adv=(1.0,), mask=mask, hi=0.2)
  assert float(loss_sum / weight) == pytest.approx(-1.1, abs=1e-6)


def test_gspo_token_has_the_gradient_of_gspo_for_sequence_advantages():
  """GSPO's paper: with one advantage per sequence, GSPO-token equals GSPO."""
  logp = jnp.log(jnp.array([[0.5, 0.4, 0.3, 0.2], [0.6, 0.5, 0.4, 0.3]]))
  old = logp + 0.05
  grads = {t: jax.grad(lambda lp: (lambda s, w, _: s / w)(*_loss(
      t, lp, old, hi=10.0, lo=10.0 - 1e-3)))(logp) for t in ('gspo', 'gspo_token')}
  np.testing.assert_allclose(grads['gspo'], grads['gspo_token'], atol=1e-6)


def test_k3_kl_by_hand():
  # logp = log 0.5, ref = log 0.25: d = log 0.5, k3 = 0.5 - log 0.5 - 1 = 0.193147.
  assert float(rl.k3_kl(jnp.log(0.5), jnp.log(0.25))) == pytest.approx(0.193147, abs=1e-6)
  assert float(rl.k3_kl(jnp.log(0.3), jnp.log(0.3))) == 0.0
  # In the loss: beta * k3 on every completion token, no advantage (A = 0).
  logp = jnp.log(jnp.full((1, 2), 0.5))
  loss_sum, weight, m = _loss('dapo', logp, logp, ref=jnp.log(jnp.full((1, 2), 0.25)), adv=(0.0,),
                              mask=jnp.ones((1, 2)), beta=0.1)
  assert float(loss_sum / weight) == pytest.approx(0.0193147, abs=1e-6)
  assert float(m['policy_kl'][0] / m['policy_kl'][1]) == pytest.approx(0.193147, abs=1e-6)


def test_importance_weights_by_hand():
  old = np.log(np.array([[3.0, 0.5, 1.0]]))
  engine = np.zeros((1, 3))
  mask = np.array([[1.0, 1.0, 0.0]])
  w, capped = rl.importance_weights(old, engine, mask, level='token', mode='truncate', cap=2.0)
  np.testing.assert_allclose(w, [[2.0, 0.5, 0.0]], atol=1e-6)  # min(3, 2), 0.5; padding 0
  assert capped == pytest.approx(0.5)
  w, _ = rl.importance_weights(old, engine, mask, level='token', mode='mask', cap=2.0)
  np.testing.assert_allclose(w, [[0.0, 0.5, 0.0]], atol=1e-6)
  # Sequence level: exp(log 3 + log 0.5) = 1.5 for every token of the sequence.
  w, capped = rl.importance_weights(old, engine, mask, level='sequence', mode='truncate', cap=2.0)
  np.testing.assert_allclose(w, [[1.5, 1.5, 0.0]], atol=1e-6)
  assert capped == 0.0
  w, capped = rl.importance_weights(old, engine, mask, level='sequence', mode='mask', cap=1.2)
  np.testing.assert_allclose(w, [[0.0, 0.0, 0.0]]) and capped == 1.0
  w, _ = rl.importance_weights(old, engine, mask, level='', mode='truncate', cap=2.0)
  np.testing.assert_array_equal(w, np.ones_like(mask))


def test_mismatch_stats_by_hand():
  old = np.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
  engine = np.array([[-1.1, -1.8, 5.0], [-0.5, 0.0, 0.0]])
  mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  s = rl.mismatch_stats(old, engine, mask)
  assert s['mismatch_abs_mean'] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
  assert s['mismatch_abs_max'] == pytest.approx(0.2)
  # Sequence ratios exp(0.1 - 0.2) and exp(0).
  assert s['mismatch_seq_ratio_min'] == pytest.approx(math.exp(-0.1))
  assert s['mismatch_seq_ratio_max'] == pytest.approx(1.0)


def test_prompt_order_visits_every_prompt_each_epoch_and_resumes_from_its_cursor():
  order = rl.PromptOrder(5, seed=3)
  first, second = order.take(5), order.take(5)
  assert sorted(first) == sorted(second) == list(range(5)) and first != second
  resumed = rl.PromptOrder(5, seed=3, cursor=7)
  assert resumed.take(3) == (first + second + rl.PromptOrder(5, 3, 10).take(5))[7:10]


class _FakeRollouts:
  """Hands out groups whose rewards are given in advance, one generation round at a time."""

  def __init__(self, rounds):
    self.rounds, self.calls = list(rounds), 0

  def generate(self, params, indices, *, n, seed):
    rewards = self.rounds[self.calls]
    self.calls += 1
    return [rl.Group(i, [None] * n, [''] * n, np.asarray(r, np.float32), {}, np.zeros(n),
                     np.zeros(n)) for i, r in zip(indices, rewards)]


def _dapo_filter(max_draws):
  return rl.Algorithm('dapo', 2, None, None, keep_group=lambda r: bool(np.ptp(r) > 0),
                      max_draws=max_draws)


def test_dynamic_sampling_fills_the_batch_with_groups_that_differ():
  fake = _FakeRollouts([[(1, 1), (0, 1), (0, 0)], [(1, 0), (1, 1), (0, 1)]])
  groups, weights, stats = rl._collect(fake, _dapo_filter(5), rl.PromptOrder(100, 0), None,
                                       n_prompts=3, seed=0, step=0)
  assert [list(g.rewards) for g in groups] == [[0, 1], [1, 0], [0, 1]]
  assert weights.tolist() == [1, 1, 1] and stats['draws'] == 2 == fake.calls
  assert stats['groups_rejected'] == 3 and stats['groups_kept_fraction'] == 1.0


def test_dynamic_sampling_stops_at_its_cap_and_gives_the_filler_no_weight():
  fake = _FakeRollouts([[(1, 1), (0, 1)], [(0, 0), (1, 1)], [(0, 1), (0, 1)]])
  groups, weights, stats = rl._collect(fake, _dapo_filter(2), rl.PromptOrder(100, 0), None,
                                       n_prompts=2, seed=0, step=0)
  assert fake.calls == 2 == stats['draws']  # The third round is never drawn.
  assert len(groups) == 2 and weights.tolist() == [1.0, 0.0]
  assert list(groups[0].rewards) == [0, 1] and stats['groups_kept_fraction'] == 0.5
  # Without the filter every group is kept after one round.
  fake = _FakeRollouts([[(1, 1), (0, 0)]])
  groups, weights, stats = rl._collect(fake, rl.Algorithm('grpo', 2, None, None),
                                       rl.PromptOrder(100, 0), None, n_prompts=2, seed=0, step=0)
  assert weights.tolist() == [1.0, 1.0] and stats['draws'] == 1
