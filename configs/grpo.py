"""GRPO and its family (trainers/grpo.py) from a fine-tuned workdir, on prompts with verifiable
answers.

  python -m trainers.grpo --config=configs/grpo.py:tiny --workdir=runs/grpo \
      --config.init_from=runs/sft
  python -m eval.accuracy --workdir=runs/grpo

Each step draws train.batch_size / grpo.num_generations prompts, generates num_generations
completions of each through the serving engine, scores them (rl.rewards: the answer verifier
and the format check), and takes rl.updates_per_batch optimizer steps. train.steps counts RL
steps; the learning-rate schedule (optimizer.warmup_steps included) counts optimizer updates.
With init_from the architecture is always that workdir's own (LoRA: set lora.rank, as in
configs/lora.py; QLoRA: also lora.weight_qtype='nf4').

Presets (the `:arg`):
  tiny   tests: from a tiny SFT run, 8 prompts x 4 completions of up to 48 tokens per step,
         full parameters; about 0.35 s a step on 2 CPU cores.
  small  the CPU demo (make demo): from the demo's SFT model on its arithmetic task, 60 steps of
         8 prompts x 8 completions, LoRA rank 4 at lr 5e-4; about 4 minutes with its evals on
         2 cores of an AMD EPYC, 3.3 s a step. The demo's SFT data is half bare answers
         (configs/pipeline.py), so its SFT model shows its working on about a quarter of the
         problems and gets 17% right; GRPO teaches it to work every sum out: 17 -> 40, 34, 39%
         at steps 20, 40, 60 and 26% -> 100% of answers showing working (2026-12-03). From SFT
         models trained on more worked solutions the gain is smaller: 60% worked, 29 -> 31%;
         70%, 42 -> 39%; all worked, 43 -> 51% (45, 48, 52, 51, 52, 51, 54, 54% at steps 10 to
         80, the gentlest of the settings tried: lr 2e-3 gave 48% at step 10, then 45-47%; full
         parameters at 3e-5 50% at 40, at 5e-5 43-52% without a trend, at 1e-4 down to 35%).
         There the remaining mistakes are arithmetic facts, learned a few prompts at a time:
         sampled accuracy on the training prompts stays flat over 60 steps unless prompts repeat
         (39 prompts: 0.39 -> 0.61 in 40 steps, held out unchanged), so the gain is sharpening
         (bench/RESULTS.md, 2026-12-03: temperature, dynamic sampling, minibatches, batch and
         rank all tried).
  gpu    a GPU shape (not yet measured): gsm_symbolic from an imported or SFT model, 16 prompts x
         16 completions of up to 512 tokens, bf16.
"""
import ml_collections

from configs import sft
from configs.base import base_config, rl_config, rl_schedule

_PRESETS = {
    'tiny': dict(steps=40, batch=32, group=4, completion=48, lr=1e-3, warmup=2, eval_every=20,
                 eval_problems=32),
    'small': dict(steps=60, batch=64, group=8, completion=40, lr=5e-4, warmup=5, eval_every=20,
                  lora_rank=4),
    'gpu': dict(steps=200, batch=256, group=16, completion=512, lr=1e-6, warmup=10,
                eval_every=50),
}


def get_config(arg: str = 'tiny'):
  if arg not in _PRESETS:
    raise ValueError(f'configs/grpo.py: unknown preset {arg!r}; choose from {sorted(_PRESETS)}')
  p = _PRESETS[arg]
  c = base_config()
  c.model.preset = '374m' if arg == 'gpu' else arg
  c.init_from = ''  # Required: the fine-tuned workdir; it is both the start and the reference.
  # Prompts with answers (data/prompts.py): basic_arithmetic, chain_sum, products, gsm_symbolic,
  # several joined with '+', or a .jsonl of {"prompt" | "messages", "answer"}.
  c.data.source = 'gsm_symbolic' if arg == 'gpu' else 'basic_arithmetic'
  sft.add_task_keys(c)  # The task's shape: keep it equal to the init_from SFT run's.
  # Held-out prompts scored greedily at eval steps (eval_accuracy) and by eval/accuracy.py.
  c.eval.num_problems = p.get('eval_problems', 100)
  c.lora = sft.lora_keys()
  if p.get('lora_rank'):  # Adapters only: full-parameter GRPO on `small` lost accuracy (below).
    c.lora.rank = p['lora_rank']
    c.lora.alpha = 2.0 * p['lora_rank']

  c.rl = rl_config()
  c.rl.max_completion_tokens = p['completion']
  c.rl.logprob_chunk = 16 if arg != 'gpu' else 128  # rows of 64 tokens here: 4 chunks
  c.grpo = ml_collections.ConfigDict()
  c.grpo.num_generations = p['group']  # G, completions per prompt (at least 2).
  # How token losses are averaged: grpo, bnpo, dr_grpo, dapo, gspo or gspo_token (see
  # trainers/grpo.py).
  c.grpo.loss_type = 'grpo'
  c.grpo.beta = 0.04  # Weight of the k3 KL penalty to the reference (0 = none; KL still logged).
  # Clipped ratio range [1 - epsilon_low, 1 + epsilon_high]; epsilon_high > epsilon_low is DAPO's
  # clip-higher (0.28). GSPO's sequence ratios want ~3e-4 / 4e-4.
  c.grpo.epsilon_low = 0.2
  c.grpo.epsilon_high = 0.2
  c.grpo.advantage = 'group'  # 'group' (mean baseline) or 'rloo' (leave-one-out baseline).
  # Divide advantages by the group's std ('group'), the batch's ('batch') or not ('none');
  # 'auto' = 'none' for dr_grpo and rloo, 'group' otherwise.
  c.grpo.scale_rewards = 'auto'
  c.grpo.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal, draw more.
  c.grpo.max_draws = 3  # Generation rounds per step at most, with dynamic sampling.

  rl_schedule(c, p)
  if arg == 'gpu':
    c.data.num_examples = 20000
    c.eval.max_new_tokens = 512
    c.rl.max_slots = 256
  return c
