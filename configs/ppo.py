"""PPO against a reward model (trainers/ppo.py) from a fine-tuned workdir: InstructGPT's RLHF stage.

  python -m trainers.reward --config=configs/reward.py:tiny --workdir=runs/rm --config.init_from=runs/sft
  python -m trainers.ppo --config=configs/ppo.py:tiny --workdir=runs/ppo \
      --config.init_from=runs/sft --config.ppo.reward_model=runs/rm
  python -m eval.accuracy --workdir=runs/ppo

Each step draws train.batch_size / ppo.num_generations prompts (data.source, as for GRPO), generates
completions through the serving engine, scores each with the reward model (plus any rl.rewards),
and runs ppo.epochs passes over rl.minibatches minibatches, updating the policy and the critic.
train.steps counts PPO steps (rollout batches); the learning-rate schedules count optimizer
updates. With init_from the architecture is always that workdir's own (LoRA on the policy: set
lora.rank, as in configs/lora.py).

Presets (the `:arg`):
  tiny   tests: from a tiny SFT run and a tiny reward model, 32 prompts with completions of up to
         40 tokens per step, 2 epochs of 2 minibatches, full parameters.
  small  the CPU demo (make demo): from the demo's SFT model and reward model on its arithmetic
         task, 30 steps of 32 prompts, 2 epochs of 2 minibatches, LoRA rank 4 at lr 3e-4 on the
         policy (critic lr 1e-5), the reward model's score plus the accuracy reward (weight 1).
         From runs/demo_1202/sft (2026-12-02): exact match 23% -> 23%, the reward model's score
         of the greedy held-out answers 0.60 -> 0.68, about 4.7 s a step on 2 shared cores.
         The reward model alone lowered exact match at every setting tried (full parameters at
         lr 1e-5: 23% -> 17%; LoRA at 1e-3 even with the accuracy reward: -> 13%) while its
         score rose: a 0.61-accurate reward model is exploited (bench/RESULTS.md).
         With the reward model that reads the SFT model's likelihood (0.95 on held-out pairs)
         and the 43% SFT model of 2026-12-02: 43% -> 43%, the score of greedy answers (their
         mean log-probability, near 0) -0.01 -> -0.01, per-token KL 0.004, 151 s in make demo.
         From the demo's SFT model trained on half bare answers (17%, 2026-12-03): 17% -> 40%,
         score -0.25 -> -0.07, KL 0.014, 134 s: the policy learns to show its working.
"""
import ml_collections

from configs import sft
from configs.base import base_config, rl_config, rl_schedule

_PRESETS = {
    'tiny': dict(steps=12, batch=32, completion=40, lr=3e-4, warmup=2, eval_every=6,
                 eval_problems=32, epochs=2, minibatches=2),
    'small': dict(steps=30, batch=32, completion=40, lr=3e-4, warmup=4, eval_every=10,
                  eval_problems=100, epochs=2, minibatches=2, lora_rank=4, value_lr=1e-5,
                  rewards=('accuracy',), reward_weights=(1.0,)),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/ppo.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = arg
  c.init_from = ''  # Required: the fine-tuned workdir; it is both the start and the reference.
  # Prompts (data/prompts.py): basic_arithmetic, chain_sum, products, gsm_symbolic, several joined
  # with '+', or a .jsonl of {"prompt" | "messages"} (an "answer" only for eval accuracy).
  c.data.source = 'basic_arithmetic'
  sft.add_task_keys(c)  # The task's shape: keep it equal to the init_from SFT run's.
  c.eval.num_problems = p['eval_problems']  # Held-out prompts scored greedily at eval steps.
  c.lora = sft.lora_keys()  # lora.rank > 0: adapters on the policy (the critic trains fully).
  if p.get('lora_rank'):
    c.lora.rank = p['lora_rank']
    c.lora.alpha = 2.0 * p['lora_rank']

  c.rl = rl_config()
  c.rl.max_completion_tokens = p['completion']
  c.rl.logprob_chunk = 16
  # Rule rewards added to the reward model's score, e.g. ('accuracy',), with their weights.
  c.rl.rewards = p.get('rewards', ())
  c.rl.reward_weights = p.get('reward_weights', ())
  c.rl.minibatches = p['minibatches']
  c.rl.updates_per_batch = p['epochs'] * p['minibatches']  # = ppo.epochs x rl.minibatches.

  c.ppo = ml_collections.ConfigDict()
  c.ppo.reward_model = ''  # Required: a trainers/reward.py workdir trained from the same SFT model.
  # The critic's start: 'reward_model' (its backbone and head, as TRL does) or 'policy' (the SFT
  # backbone with a zero head).
  c.ppo.critic = 'reward_model'
  c.ppo.num_generations = 1  # Completions per prompt.
  c.ppo.epochs = p['epochs']  # Passes over each rollout batch.
  c.ppo.epsilon = 0.2  # Policy ratio clip range [1 - epsilon, 1 + epsilon].
  c.ppo.value_clip = 0.2  # Value clip range around the rollout-time values.
  # The critic's peak learning rate; 0 = optimizer.learning_rate.
  c.ppo.value_learning_rate = p.get('value_lr', 0.0)
  c.ppo.entropy_coef = 0.0  # Weight of the entropy bonus in the policy loss.
  c.ppo.gamma = 1.0  # Discount of GAE (1: the score counts fully at every token).
  c.ppo.lam = 0.95  # GAE's lambda.
  c.ppo.kl_coef = 0.05  # beta of the per-token KL penalty in the reward (its start if adaptive).
  c.ppo.kl_estimator = 'k1'  # 'k1' (log-ratio, as TRL and InstructGPT) or 'k3' (never negative).
  # Adaptive beta (Ziegler et al., 2019): the per-sequence KL it steers to; 0 = beta fixed.
  c.ppo.kl_target = 0.0
  c.ppo.kl_horizon = 10000  # Adaptive beta's horizon (in completions).
  c.ppo.whiten_rewards = False  # Scale the per-token rewards to unit std before GAE (mean kept).
  c.ppo.whiten_advantages = True  # Advantages to mean 0, std 1 over the batch's tokens.
  c.ppo.missing_eos_penalty = 0.0  # Subtracted from the score of completions cut at max length.

  rl_schedule(c, p)
  return c
