"""PPO against a reward model: the RLHF stage of InstructGPT (Ouyang et al., 2022, "Training
language models to follow instructions with human feedback", arXiv:2203.02155), as Ziegler et al.
(2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593) set it up and as
TRL's PPOTrainer and "The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024,
arXiv:2403.17031) run it.

  python -m trainers.ppo --config=configs/ppo.py:tiny --workdir=runs/ppo \
      --config.init_from=runs/sft --config.ppo.reward_model=runs/rm

Each step: completions of train.batch_size prompts through the serving engine (trainers/rl.py's
Rollouts, the policy's current weights); their score s from the frozen reward model on the whole
response (models/reward.py), plus any rule rewards (rl.rewards); then per completion token t

    r_t   = -beta * KL_t  (+ s on the last token),    KL_t = k1: logp_old - logp_ref
                                                            or k3: e^(ref-old) - (ref-old) - 1
    delta_t = r_t + gamma V(t+1) - V(t),   A_t = delta_t + gamma lambda A_(t+1)   (GAE, Schulman
              et al., 2016, arXiv:1506.02438), returns R_t = A_t + V(t)

with V the critic's values at rollout time (0 after the last token); rewards may be whitened
(scaled, mean kept) before GAE and the advantages whitened (mean 0, std 1) after it. Then
rl.updates_per_batch optimizer steps (ppo.epochs passes over rl.minibatches minibatches), each
minimising for the policy

    L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) - c_ent * H_t,
    rho_t = pi(y_t) / pi_old(y_t)                        (Schulman et al., 2017, arXiv:1707.06347)

and for the critic (its own optimizer and learning rate, as OpenRLHF and verl train it)

    L_V = 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2).

beta is fixed, or adaptive (Ziegler et al., eq. 2): beta <- beta (1 + clip(KL / KL_target - 1,
-0.2, 0.2) * B / horizon) after each step, with KL the mean per-sequence KL and B the batch.

The critic is a models/reward.RewardModel read at every position: initialised from the reward
model (ppo.critic='reward_model', as TRL does) or from the SFT backbone with a zero head
(ppo.critic='policy'). It is saved as the checkpoint items `critic` and `critic_opt_state` beside
the policy's `params`, so every reader of the workdir loads the policy as from any other stage.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import prompts as prompt_sources
from data import rewards as reward_lib
from data.tokenizer import load_tokenizer
from models import reward as reward_model_lib
from models.losses import token_logprobs
from trainers import cli, common, loop, rl
from trainers import workdir as workdir_lib
from trainers import lora as adapters

CRITICS = ('reward_model', 'policy')


# ----------------------------------------------------------------------------- the math (pure)

def masked_mean(x, mask):
  return (x * mask).sum() / max(float(mask.sum()), 1.0)


def whiten(x: np.ndarray, mask: np.ndarray, *, shift_mean: bool = True) -> np.ndarray:
  """(x - mean) / std over the masked entries (the unbiased variance, as TRL's masked_whiten),
  with the mean added back when not shift_mean (reward whitening keeps the reward's sign);
  entries outside the mask are 0."""
  n = float(mask.sum())
  if n < 2:
    return x * mask
  mean = (x * mask).sum() / n
  var = (((x - mean) * mask) ** 2).sum() / (n - 1)
  out = (x - mean) / np.sqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return (out * mask).astype(np.float32)


def last_token_index(mask: np.ndarray) -> np.ndarray:
  """[N, L] completion mask -> [N] index of each row's last completion token (-1 if none)."""
  has = mask.sum(-1) > 0
  last = mask.shape[-1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=-1)
  return np.where(has, last, -1)


def kl_penalty(old_logp: np.ndarray, ref_logp: np.ndarray, estimator: str) -> np.ndarray:
  """Per-token estimate of KL(pi_old || pi_ref) at the sampled tokens (Schulman, 2020,
  "Approximating KL Divergence"): k1 = log(pi/pi_ref), unbiased but of either sign; k3 =
  e^(ref - logp) - (ref - logp) - 1, unbiased and never negative."""
  d = ref_logp - old_logp
  if estimator == 'k1':
    return -d
  if estimator == 'k3':
    return np.exp(d) - d - 1.0
  raise ValueError(f"ppo.kl_estimator={estimator!r}: expected 'k1' or 'k3'")


def token_rewards(scores: np.ndarray, kl: np.ndarray, mask: np.ndarray, kl_coef: float):
  """r_t = -kl_coef * KL_t on every completion token, plus the sequence's score on its last one."""
  r = -kl_coef * kl * mask
  last = last_token_index(mask)
  rows = np.nonzero(last >= 0)[0]
  r[rows, last[rows]] += scores[rows]
  return r.astype(np.float32)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, *, gamma: float, lam: float):
  """Generalized advantage estimation over each row's completion span (mask, contiguous):
      delta_t = r_t + gamma V_(t+1) - V_t,   A_t = delta_t + gamma lam A_(t+1),
  with V and A zero after the span. Returns (advantages, returns = A + V), both 0 off the span."""
  n, length = rewards.shape
  adv = np.zeros((n, length), np.float64)
  running = np.zeros(n, np.float64)
  for t in range(length - 1, -1, -1):
    m_next = mask[:, t + 1] if t + 1 < length else np.zeros(n)
    v_next = values[:, t + 1] * m_next if t + 1 < length else np.zeros(n)
    delta = rewards[:, t] + gamma * v_next - values[:, t]
    running = delta + gamma * lam * m_next * running
    adv[:, t] = running * mask[:, t]
  returns = (adv + values) * mask
  return adv.astype(np.float32), returns.astype(np.float32)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
  """1 - Var[R - V] / Var[R] over completion tokens: 1 = the critic predicts the returns, 0 = no
  better than their mean, negative = worse."""
  m = mask > 0
  if m.sum() < 2:
    return 0.0
  var = np.var(returns[m])
  return float(1.0 - np.var(returns[m] - values[m]) / var) if var > 0 else 0.0


def adaptive_kl_coef(coef: float, kl: float, *, target: float, horizon: float,
                     batch: int) -> float:
  """Ziegler et al. (2019), eq. 2: beta_(t+1) = beta_t (1 + K e_t), e_t = clip(KL_t / KL_target
  - 1, -0.2, 0.2), with K = batch / horizon as in TRL's AdaptiveKLController."""
  error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
  return float(coef * (1.0 + error * batch / horizon))


def policy_loss(logp, old_logp, advantages, mask, is_weight, entropy, *, epsilon: float,
                entropy_coef: float):
  """(loss_sum, weight, metric sums) of PPO's clipped surrogate with an entropy bonus, averaged
  over the tokens of the minibatch (TRL's masked mean). All inputs [B, L]."""
  mask = mask.astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
  per_token = (jnp.maximum(unclipped, clipped) * is_weight - entropy_coef * entropy) * mask
  tokens = lambda x: ((x * mask).sum(), mask.sum())
  return per_token.sum(), mask.sum(), {
      'clip_fraction': tokens((clipped > unclipped).astype(jnp.float32)),
      'approx_kl': tokens(0.5 * (logp - old_logp) ** 2),  # John Schulman's k2, as TRL logs it.
      'ratio_mean': tokens(ratio), 'ratio_sq_mean': tokens(ratio ** 2),
      'policy_entropy': tokens(entropy)}


def value_loss(values, old_values, returns, mask, *, clip: float):
  """(loss_sum, weight, metric sums) of the clipped value loss (PPO2's, as TRL and OpenAI's
  baselines clip it): 1/2 max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2)."""
  mask = mask.astype(jnp.float32)
  clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
  loss_a, loss_b = (values - returns) ** 2, (clipped_values - returns) ** 2
  per_token = 0.5 * jnp.maximum(loss_a, loss_b) * mask
  return per_token.sum(), mask.sum(), {
      'value_clipfrac': ((loss_b > loss_a).astype(jnp.float32) * mask).sum()}


# ----------------------------------------------------------------------------- the models

class Critic:
  """The value function V: a RewardModel read at every position, with its own optimizer (the
  loop's AdamW, schedule and clipping, at ppo.value_learning_rate) and jitted steps."""

  def __init__(self, config: ml_collections.ConfigDict, model: reward_model_lib.RewardModel,
               mesh):
    p = config.ppo
    self.graphdef, self.params, self.frozen = nnx.split(model, nnx.Param, ...)
    c = rl.optimizer_config(config)  # The schedule counts optimizer updates, as the policy's.
    c.optimizer.learning_rate = p.value_learning_rate or config.optimizer.learning_rate
    tx = loop.make_optimizer(c)
    self.opt_state = loop.init_optimizer_state(tx, self.params, mesh)
    graphdef, frozen, clip = self.graphdef, self.frozen, p.value_clip

    def loss_fn(model, batch, rng):
      del rng
      v = reward_model_lib.values(model, batch['inputs'], batch['positions'])
      return value_loss(v, batch['values'], batch['returns'], batch['mask'], clip=clip)

    with jax.set_mesh(mesh):
      self._step = jax.jit(loop.make_train_step(c, graphdef, frozen, loss_fn, tx),
                           donate_argnums=(0, 1))
    self._values = jax.jit(lambda params, batch: reward_model_lib.values(
        nnx.merge(graphdef, params, frozen), batch['inputs'], batch['positions']))

  def values(self, rows: dict, *, batch_size: int, mesh, rules) -> np.ndarray:
    out = []
    with jax.set_mesh(mesh):
      for s in range(0, len(rows['inputs']), batch_size):
        batch = rl.global_batch({k: rows[k][s:s + batch_size] for k in ('inputs', 'positions')},
                                mesh, rules)
        out.append(jax.device_get(self._values(self.params, batch)))
    return np.concatenate(out).astype(np.float32)

  def update(self, batch: dict, update: int) -> dict:
    self.params, self.opt_state, out = self._step(self.params, self.opt_state, batch,
                                                  jnp.int32(update))
    return out

  def items(self) -> dict:
    return {'critic': self.params, 'critic_opt_state': self.opt_state}

  def load(self, restored):
    self.params, self.opt_state = restored['critic'], restored['critic_opt_state']


# ----------------------------------------------------------------------------- the algorithm

def check_config(config: ml_collections.ConfigDict):
  p, r = config.ppo, config.rl
  if not p.reward_model:
    raise ValueError('PPO optimises against a reward model: set --config.ppo.reward_model='
                     'REWARD_WORKDIR (trainers/reward.py)')
  if p.critic not in CRITICS:
    raise ValueError(f'ppo.critic={p.critic!r}: expected one of {CRITICS}')
  if p.kl_estimator not in ('k1', 'k3'):
    raise ValueError(f"ppo.kl_estimator={p.kl_estimator!r}: expected 'k1' or 'k3'")
  if p.kl_target < 0 or (p.kl_target > 0 and p.kl_horizon <= 0):
    raise ValueError(f'ppo.kl_target={p.kl_target} must be >= 0 (0 = a fixed kl_coef), with '
                     f'ppo.kl_horizon={p.kl_horizon} > 0')
  if not (0.0 <= p.gamma <= 1.0 and 0.0 <= p.lam <= 1.0):
    raise ValueError(f'ppo.gamma={p.gamma} and ppo.lam={p.lam} must lie in [0, 1]')
  if p.epochs < 1 or r.updates_per_batch != p.epochs * r.minibatches:
    raise ValueError(f'rl.updates_per_batch={r.updates_per_batch} must equal ppo.epochs='
                     f'{p.epochs} x rl.minibatches={r.minibatches} (configs/ppo.py sets it)')
  if p.num_generations < 1:
    raise ValueError(f'ppo.num_generations={p.num_generations} must be >= 1')


def make_algorithm(config: ml_collections.ConfigDict, critic: Critic) -> rl.Algorithm:
  p, r = config.ppo, config.rl
  check_config(config)
  state = {'kl_coef': float(p.kl_coef)}
  chunk = r.logprob_chunk

  def advantages(groups, rewards, batch):
    mask = batch['mask']
    truncated = np.array([c.finish_reason == 'length' for g in groups for c in g.completions])
    scores = rewards.reshape(-1) - p.missing_eos_penalty * truncated
    kl = kl_penalty(batch['old_logp'], batch['ref_logp'], p.kl_estimator) * mask
    coef = state['kl_coef']
    per_token = token_rewards(scores, kl, mask, coef)
    if p.whiten_rewards:
      per_token = whiten(per_token, mask, shift_mean=False)
    adv, returns = gae(per_token, batch['values'], mask, gamma=p.gamma, lam=p.lam)
    if p.whiten_advantages:
      adv = whiten(adv, mask)
    seqs = mask.sum(-1) > 0
    seq_kl = kl.sum(-1)[seqs]
    non_score = -coef * seq_kl
    metrics = {'score': float(scores[seqs].mean()) if seqs.any() else 0.0,
               'kl_sequence': float(seq_kl.mean()) if seqs.any() else 0.0,
               'non_score_reward': float(non_score.mean()) if seqs.any() else 0.0,
               'rlhf_reward': float((scores[seqs] + non_score).mean()) if seqs.any() else 0.0,
               'kl_coef': coef,
               'value_mean': masked_mean(batch['values'], mask),
               'returns_mean': masked_mean(returns, mask),
               'explained_variance': explained_variance(batch['values'], returns, mask),
               'advantage_std': float(np.sqrt(masked_mean(adv ** 2, mask)))}
    if p.kl_target > 0:  # The coefficient the next step uses.
      state['kl_coef'] = adaptive_kl_coef(coef, metrics['kl_sequence'], target=p.kl_target,
                                          horizon=p.kl_horizon, batch=config.train.batch_size)
    return {'advantages': adv, 'returns': returns, 'metrics': metrics}

  def loss_fn(model, batch, rng):
    del rng
    logp, entropy = token_logprobs(model, batch['inputs'], batch['targets'], batch['positions'],
                                   chunk=chunk)
    return policy_loss(logp, batch['old_logp'], batch['advantages'], batch['mask'],
                       batch['is_weight'], entropy, epsilon=p.epsilon,
                       entropy_coef=p.entropy_coef)

  return rl.Algorithm(name='ppo', group_size=p.num_generations, loss_fn=loss_fn,
                      advantages=advantages, critic=critic, state=state)


def _check_same_tokenizer(policy_tokenizer, reward_workdir: str):
  theirs = load_tokenizer(reward_workdir)
  probe = 'Compute 12 + 7 - 3 step by step.\n= 16\n#### 16'
  if theirs.vocab_size != policy_tokenizer.vocab_size or \
      theirs.encode(probe) != policy_tokenizer.encode(probe):
    raise ValueError(f'ppo.reward_model={reward_workdir!r} has another tokenizer than the '
                     'policy: train the reward model from the same SFT workdir (init_from)')


@workdir_lib.stage('ppo')  # One live run per workdir; see trainers/workdir.py.
def run(config: ml_collections.ConfigDict, workdir: str):
  if not config.init_from:
    raise ValueError('PPO starts from a fine-tuned model: set --config.init_from=WORKDIR')
  check_config(config)
  p = config.ppo
  if not os.path.exists(os.path.join(p.reward_model, reward_model_lib.REWARD_FILE)):
    raise FileNotFoundError(f'ppo.reward_model={p.reward_model!r} is not a reward-model workdir '
                            f'(no {reward_model_lib.REWARD_FILE}; trainers/reward.py writes one)')
  train, held_out = prompt_sources.load_prompts(config.data, config.seed)
  if config.rl.rewards and reward_lib.Rewards(config.rl.rewards,
                                              config.rl.reward_weights).needs_answers:
    if any(e['answer'] is None for e in train + held_out):
      raise ValueError('rl.rewards has the accuracy reward, which needs an "answer" for every '
                       'prompt')
  rl.prompts_per_step(config, p.num_generations)
  spec = adapters.spec(config)
  tokenizer = common.tokenizer_for(config, workdir)
  _check_same_tokenizer(tokenizer, p.reward_model)
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh, rules = common.mesh_from_config(config), config.sharding_rules
  base = common.load_init_from(config, model_cfg, mesh)

  if p.critic == 'reward_model':
    critic_model, _ = reward_model_lib.load_reward_model(
        p.reward_model, mesh=mesh, rules=rules,
        **{k: getattr(model_cfg, k) for k in common.RUNTIME_FIELDS})
  else:  # A copy of the policy's backbone with a zero head (the policy's buffers are donated).
    graphdef, state = nnx.split(base)
    backbone = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    critic_model = reward_model_lib.new_reward_model(backbone, mesh, seed=config.seed)
  critic = Critic(config, critic_model, mesh)
  algorithm = make_algorithm(config, critic)

  # Adapters (spec) go on the policy only; the critic is a model of its own.
  policy, rollouts = rl.setup(config, base, spec, tokenizer, train, held_out,
                              group_size=algorithm.group_size, model_cfg=model_cfg, mesh=mesh)
  scorer = reward_model_lib.RewardScorer(  # In the rollout engine's dtype.
      p.reward_model, batch_size=min(config.train.batch_size, 64), mesh=mesh, rules=rules,
      dtype=policy.engine_model.cfg.dtype)
  rollouts.scorer = scorer
  print(f'PPO data {config.data.source!r}: {len(train)} training prompts, {len(held_out)} held '
        f'out; reward model {p.reward_model} (step {scorer.step}), critic from {p.critic}, '
        f'kl_coef {p.kl_coef} ({"adaptive" if p.kl_target else "fixed"}, {p.kl_estimator}).')
  adapters.write_workdir(config, workdir, tokenizer, model_cfg, spec)
  return rl.train(config, workdir, policy, rollouts, algorithm, mesh=mesh, rules=rules)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/ppo.py:tiny')
