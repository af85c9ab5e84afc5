"""Group Relative Policy Optimization and its family: GRPO, BNPO, Dr. GRPO, DAPO, GSPO, RLOO.

  python -m trainers.grpo --config=configs/grpo.py:tiny --workdir=runs/grpo \
      --config.init_from=runs/sft

GRPO (Shao et al., 2024, "DeepSeekMath", arXiv:2402.03300): for each prompt q, sample a group of
G completions o_1..o_G from the old policy, score them with rewards r_i, and use the reward
relative to the group as every token's advantage, so no value model is needed:
    A_i = (r_i - mean(r)) / (std(r) + eps)
The policy maximises the clipped surrogate with a KL penalty to the frozen reference:
    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it,
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | ...),   KL_it = k3 = e^(ref - logp) - (ref - logp) - 1.
eps_high > eps_low is DAPO's clip-higher. The variants differ in how l_it is averaged
(`grpo.loss_type`, named as in TRL) and in the advantage (`grpo.advantage`):
  grpo      1/G sum_i 1/|o_i| sum_t l_it: each sequence's token mean, then the mean over sequences.
  bnpo      sum_it l_it / sum_i |o_i| over each micro-batch (the local batch), averaged.
  dapo      sum_it l_it / sum_i |o_i| over all tokens of the optimizer step (Yu et al., 2025,
            "DAPO", arXiv:2503.14476): long completions weigh by their length.
  dr_grpo   sum_it l_it / (B * L_max), L_max = rl.max_completion_tokens, a constant (Liu et al.,
            2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783); with it A_i is not
            divided by std(r) (scale_rewards='auto' -> 'none'), removing both of GRPO's biases.
  gspo      a sequence-level ratio s_i = exp(1/|o_i| sum_t (logp_it - logp_old_it)) in
            1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) (Zheng et al., 2025,
            "Group Sequence Policy Optimization", arXiv:2507.18071); its clip ranges are ~1e-3.
  gspo_token  s_it = sg[s_i] * pi(o_it) / sg[pi(o_it)]: GSPO's ratio with per-token advantages,
            averaged like grpo.
  advantage='rloo': A_i = r_i - 1/(G-1) sum_{j != i} r_j, the leave-one-out baseline (Ahmadian et
            al., 2024, "Back to Basics", arXiv:2402.14740), not divided by std.
DAPO's dynamic sampling (`grpo.dynamic_sampling`) drops groups whose rewards are all equal (their
advantages are all zero: no gradient, only a diluted batch) and draws more prompts until the batch
is full, at most grpo.max_draws generation rounds per step. Overlong handling (mask or soft
penalty), rollouts, log-probs, importance correction and updates are trainers/rl.py's.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import prompts as prompt_sources
from data import rewards as reward_lib
from models.losses import token_logprobs
from trainers import cli, common, rl
from trainers import workdir as workdir_lib
from trainers import lora as adapters

LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'gspo', 'gspo_token')


def group_advantages(rewards: np.ndarray, *, scale: str = 'group', leave_one_out: bool = False,
                     eps: float = 1e-4) -> np.ndarray:
  """Advantages [P, G] of rewards [P, G], each relative to its own group:
      A_i = r_i - mean(r)                                   (GRPO's baseline), or
      A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean(r))   (leave_one_out: RLOO),
  then divided by the group's std + eps ('group'), by the whole batch's ('batch', as TRL offers
  it) or not at all ('none'). std is the unbiased (G - 1) estimate, as in TRL."""
  g = rewards.shape[1]
  adv = rewards - rewards.mean(axis=1, keepdims=True)
  if leave_one_out:
    adv = adv * g / (g - 1)
  if scale == 'none':
    return adv
  std = rewards.std(axis=1, ddof=1, keepdims=True) if scale == 'group' else rewards.std(ddof=1)
  return adv / (std + eps)


def process_advantages(steps: list[list[tuple[int, float]]], token_starts: list[list[int]],
                       eps: float = 1e-4) -> list[np.ndarray]:
  """GRPO with process supervision (Shao et al., 2024, section 4.1.3) for one group: the step
  rewards of its G completions are normalised together, r~ = (r - mean(R)) / std(R) over the
  pooled set R, and token t of completion i gets the normalised rewards of its own step and of
  every later step:  A_it = sum_{j : end_ij > start_it} r~_ij  (the last step also covers any
  token after it, such as the end of turn). Returns one [len(completion)] array per completion.
  steps[i] lists completion i's (end character, reward) in order; token_starts[i] the character
  where each of its tokens starts."""
  pooled = np.array([r for s in steps for _, r in s], np.float64)
  std = pooled.std(ddof=1) if len(pooled) > 1 else 0.0
  out = []
  for s, starts in zip(steps, token_starts):
    if not s:
      raise ValueError('a process reward returned no steps for a completion')
    ends = np.array([e for e, _ in s])
    normalised = (np.array([r for _, r in s]) - pooled.mean()) / (std + eps)
    to_go = np.cumsum(normalised[::-1])[::-1]
    step_of = np.minimum(np.searchsorted(ends, np.asarray(starts, np.int64), side='right'),
                         len(s) - 1)
    out.append(to_go[step_of].astype(np.float32))
  return out


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, is_weight, *, loss_type: str,
              beta: float, epsilon_low: float, epsilon_high: float, max_completion_tokens: int):
  """(loss_sum, weight, metric sums) of a batch, as trainers/loop.py's step takes them.

  logp, old_logp, ref_logp, mask, is_weight: [B, L]; advantages: [B], or [B, L] with one per
  token (process supervision; not for gspo). mask marks completion tokens (0 for padding and
  excluded completions); is_weight is the importance weight of each token (1 when no mismatch
  correction).
  """
  mask = mask.astype(jnp.float32)
  lengths = mask.sum(-1)
  has_tokens = (lengths > 0).astype(jnp.float32)
  adv = advantages[:, None] if advantages.ndim == 1 else advantages
  kl = rl.k3_kl(logp, jax.lax.stop_gradient(ref_logp))
  lo, hi = 1.0 - epsilon_low, 1.0 + epsilon_high

  if loss_type == 'gspo':
    seq_log_ratio = ((logp - old_logp) * mask).sum(-1) / jnp.maximum(lengths, 1.0)
    ratio = jnp.exp(seq_log_ratio)  # [B]
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, lo, hi) * advantages)
    w = (is_weight * mask).sum(-1) / jnp.maximum(lengths, 1.0)
    seq_kl = (kl * mask).sum(-1) / jnp.maximum(lengths, 1.0)
    per_seq = -surrogate * w + beta * seq_kl
    loss_sum, weight = (per_seq * has_tokens).sum(), has_tokens.sum()
    low = (ratio < lo) & (advantages < 0)
    high = (ratio > hi) & (advantages > 0)
    units = lambda x: ((x * has_tokens).sum(), has_tokens.sum())
  else:
    if loss_type == 'gspo_token':
      seq_log_ratio = ((logp - old_logp) * mask).sum(-1, keepdims=True) / jnp.maximum(
          lengths[:, None], 1.0)
      log_ratio = jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp)
    else:
      log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
    per_token = (-surrogate * is_weight + beta * kl) * mask
    if loss_type in ('grpo', 'gspo_token'):
      loss_sum = (per_token.sum(-1) / jnp.maximum(lengths, 1.0)).sum()
      weight = has_tokens.sum()
    elif loss_type == 'bnpo':
      loss_sum = per_token.sum() / jnp.maximum(mask.sum(), 1.0)
      weight = (mask.sum() > 0).astype(jnp.float32)
    elif loss_type == 'dapo':
      loss_sum, weight = per_token.sum(), mask.sum()
    elif loss_type == 'dr_grpo':
      loss_sum = per_token.sum() / max_completion_tokens
      weight = jnp.float32(mask.shape[0])
    else:
      raise ValueError(f'grpo.loss_type={loss_type!r}: expected one of {LOSS_TYPES}')
    low = (ratio < lo) & (adv < 0)
    high = (ratio > hi) & (adv > 0)
    units = lambda x: ((x * mask).sum(), mask.sum())
  tokens = lambda x: ((x * mask).sum(), mask.sum())
  low, high = low.astype(jnp.float32), high.astype(jnp.float32)
  return loss_sum, weight, {
      'clip_low': units(low), 'clip_high': units(high), 'clip_region': units(low + high),
      'ratio_mean': units(ratio), 'ratio_sq_mean': units(ratio ** 2),
      'policy_kl': tokens(kl)}


def make_algorithm(config: ml_collections.ConfigDict) -> rl.Algorithm:
  g, r = config.grpo, config.rl
  if g.num_generations < 2:
    raise ValueError(f'grpo.num_generations={g.num_generations}: a group needs at least 2 '
                     'completions to compare')
  if g.loss_type not in LOSS_TYPES:
    raise ValueError(f'grpo.loss_type={g.loss_type!r}: expected one of {LOSS_TYPES}')
  if g.advantage not in ('group', 'rloo'):
    raise ValueError(f"grpo.advantage={g.advantage!r}: expected 'group' or 'rloo'")
  scale = g.scale_rewards
  if scale == 'auto':
    scale = 'none' if g.loss_type == 'dr_grpo' or g.advantage == 'rloo' else 'group'
  if scale not in ('group', 'batch', 'none'):
    raise ValueError(f"grpo.scale_rewards={g.scale_rewards!r}: expected 'auto', 'group', "
                     "'batch' or 'none'")
  if g.dynamic_sampling and g.max_draws < 1:
    raise ValueError(f'grpo.max_draws={g.max_draws} must be >= 1')

  if r.process_reward and g.loss_type == 'gspo':
    raise ValueError('grpo.loss_type=gspo takes one advantage per sequence; rl.process_reward '
                     'gives one per token (use gspo_token)')

  def advantages(groups, rewards, batch):
    del batch  # Group-relative: the rewards alone.
    if r.process_reward:
      return [a for grp in groups for a in process_advantages(grp.steps, grp.token_starts)]
    return group_advantages(rewards, scale=scale, leave_one_out=g.advantage == 'rloo')

  chunk = r.logprob_chunk

  def loss_fn(model, batch, rng):
    del rng
    logp, _ = token_logprobs(model, batch['inputs'], batch['targets'], batch['positions'],
                             chunk=chunk)
    return grpo_loss(logp, batch['old_logp'], batch['ref_logp'], batch['advantages'],
                     batch['mask'], batch['is_weight'], loss_type=g.loss_type, beta=g.beta,
                     epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                     max_completion_tokens=r.max_completion_tokens)

  keep = (lambda rewards: bool(np.ptp(rewards) > 0)) if g.dynamic_sampling else None
  return rl.Algorithm(name=g.loss_type, group_size=g.num_generations, loss_fn=loss_fn,
                      advantages=advantages, keep_group=keep,
                      max_draws=g.max_draws if g.dynamic_sampling else 1)


@workdir_lib.stage('grpo')  # One live run per workdir; see trainers/workdir.py.
def run(config: ml_collections.ConfigDict, workdir: str):
  if not config.init_from:
    raise ValueError('GRPO starts from a fine-tuned model: set --config.init_from=WORKDIR')
  algorithm = make_algorithm(config)
  rewards = reward_lib.Rewards(config.rl.rewards, config.rl.reward_weights)
  train, held_out = prompt_sources.load_prompts(config.data, config.seed)
  if rewards.needs_answers:
    for e in train + held_out:
      if e['answer'] is None:
        raise ValueError(f'data.source={config.data.source!r}: the accuracy reward needs an '
                         f'"answer" for every prompt; this one has none: '
                         f'{str(e["prompt"])[:120]!r}')
  rl.prompts_per_step(config, algorithm.group_size)
  spec = adapters.spec(config)
  tokenizer = common.tokenizer_for(config, workdir)
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  base = common.load_init_from(config, model_cfg, mesh)
  policy, rollouts = rl.setup(config, base, spec, tokenizer, train, held_out,
                              group_size=algorithm.group_size, model_cfg=model_cfg, mesh=mesh)
  print(f'GRPO data {config.data.source!r}: {len(train)} training prompts, {len(held_out)} held '
        f'out; {algorithm.group_size} completions per prompt, loss {config.grpo.loss_type}, '
        f'beta {config.grpo.beta}.')
  adapters.write_workdir(config, workdir, tokenizer, model_cfg, spec)
  return rl.train(config, workdir, policy, rollouts, algorithm, mesh=mesh,
                  rules=config.sharding_rules)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/grpo.py:tiny')
