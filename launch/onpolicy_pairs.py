"""On-policy preference pairs: the policy's own best and worst answers to the same prompt.

  python -m launch.onpolicy_pairs --workdir=runs/sft --out=runs/pairs.jsonl          # verifier
  python -m launch.onpolicy_pairs --workdir=runs/sft --out=runs/pairs.jsonl --reward_model=runs/rm
  python -m trainers.dpo --config=configs/dpo.py:small --workdir=runs/dpo_onpolicy \
      --config.init_from=runs/sft --config.data.source=runs/pairs.jsonl

For each training prompt of the run's task (never a held-out one: those stay for eval), k
responses are sampled through the serving engine (one shared prefill per prompt), each is scored,
by the answer verifier and the format check (data/rewards.py: accuracy + 0.1 x format, as GRPO's
default reward) or by a reward model (models/reward.RewardScorer), and the highest-scored
response is kept as chosen and the lowest as rejected, when their scores differ: RLAIF-style
best-vs-worst pairs (as in Self-Rewarding LMs, Yuan et al., 2024, arXiv:2401.10020, and iterative
RPO, Pang et al., 2024, arXiv:2404.19733), so preference training sees the policy's own mistakes
rather than hand-made corruptions. Prompts whose k responses all score the same give no pair.

The output is a preference JSONL in TRL's format (a message-list "prompt" with string "chosen"
and "rejected", plus "score_chosen" / "score_rejected"; data/preferences.py reads it), written whole or not at all (FILE.incomplete, then
renamed). A summary JSON goes to stdout.
"""
import json
import os

import numpy as np
from absl import flags

from configs import entry
from data import prompts as prompt_sources, rewards as reward_lib
from data.tokenizer import load_tokenizer
from eval.accuracy import Answerer, task_config
from models import checkpoint, reward as reward_models
from serving.engine import SamplingParams

VERIFIER = (('accuracy', 'format'), (1.0, 0.1))


def best_and_worst(scores: np.ndarray) -> tuple[int, int] | None:
  """Indices of the highest and lowest score (the first of ties), or None if all are equal."""
  best, worst = int(np.argmax(scores)), int(np.argmin(scores))
  return None if scores[best] == scores[worst] else (best, worst)


def make_pairs(workdir: str, *, out: str, k: int = 8, num_prompts: int = 0,
               reward_model: str = '', temperature: float = 1.0, seed: int = 0,
               max_new_tokens: int = 0, batch_size: int = 64, dtype: str = 'auto') -> dict:
  if k < 2:
    raise ValueError(f'--k={k}: best vs worst needs at least 2 responses per prompt')
  if temperature <= 0:
    raise ValueError(f'--temperature={temperature} must be > 0: k greedy answers are all equal')
  if not out.endswith('.jsonl'):
    raise ValueError(f'--out={out!r} must be a .jsonl path')
  config = task_config(workdir)
  train, _ = prompt_sources.load_prompts(config.data, config.seed)
  problems = train[:num_prompts] if num_prompts else train
  tokenizer = load_tokenizer(workdir)
  if reward_model:
    scorer = reward_models.RewardScorer(reward_model, batch_size=batch_size, mesh=None,
                                        rules=None, dtype=dtype)
  elif any(p['answer'] is None for p in problems):
    raise ValueError(f'{config.data.source}: the verifier needs an "answer" for every prompt; '
                     'pass --reward_model= to rank by a reward model instead')
  model, step = checkpoint.load_model(workdir, dtype=dtype)
  n_new = max_new_tokens or config.eval.max_new_tokens
  answer = Answerer(model, tokenizer, problems, n_new, batch_size=batch_size)
  outs, texts = answer(n=k, sampling=SamplingParams(temperature=temperature, seed=seed))
  prompts = answer.prompts
  truncated = [o.finish_reason == 'length' for o in outs]
  if reward_model:
    scores = scorer([p for p in prompts for _ in range(k)], [o.tokens for o in outs],
                    length=max(len(p) for p in prompts) + n_new)
  else:
    scores, _ = reward_lib.Rewards(*VERIFIER)(
        [p['prompt'] for p in problems for _ in range(k)], texts,
        answer=[p['answer'] for p in problems for _ in range(k)], truncated=truncated,
        completion_ids=[o.tokens for o in outs])
  scores = np.asarray(scores, np.float64).reshape(len(problems), k)

  pairs, best_scores, worst_scores = [], [], []
  for i, p in enumerate(problems):
    picked = best_and_worst(scores[i])
    if picked is None:
      continue
    b, w = picked
    chosen, rejected = texts[i * k + b], texts[i * k + w]
    if not chosen.strip() or not rejected.strip() or chosen == rejected:
      continue  # Not a pair data/preferences.py accepts (an empty or identical response).
    # score_chosen / score_rejected as in UltraFeedback-style sets (the readers ignore them).
    pairs.append({'prompt': p['prompt'], 'chosen': chosen, 'rejected': rejected,
                  'score_chosen': float(scores[i, b]), 'score_rejected': float(scores[i, w])})
    best_scores.append(scores[i, b])
    worst_scores.append(scores[i, w])
  if not pairs:
    raise ValueError(f'none of the {len(problems)} prompts had responses that scored '
                     f'differently; raise --k or --temperature')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  partial = out + '.incomplete'
  with open(partial, 'w') as f:
    for pair in pairs:
      f.write(json.dumps(pair) + '\n')
  os.replace(partial, out)
  return {'workdir': workdir, 'step': int(step), 'out': out, 'prompts': len(problems),
          'samples_per_prompt': k, 'pairs': len(pairs),
          'ranked_by': reward_model or 'verifier (accuracy + 0.1 format)',
          'score_mean': float(scores.mean()), 'chosen_score_mean': float(np.mean(best_scores)),
          'rejected_score_mean': float(np.mean(worst_scores)),
          'truncation_rate': float(np.mean(truncated))}


def main():
  workdir = flags.DEFINE_string('workdir', None, 'The policy (an SFT or later run).',
                                required=True)
  out = flags.DEFINE_string('out', None, 'Preference JSONL to write.', required=True)
  k = flags.DEFINE_integer('k', 8, 'Responses sampled per prompt.')
  num_prompts = flags.DEFINE_integer('num_prompts', 0, 'Training prompts to use (0 = all).')
  reward_model = flags.DEFINE_string('reward_model', '', 'Rank by this reward workdir instead of '
                                     'the verifier.')
  temperature = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
  seed = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  max_new_tokens = flags.DEFINE_integer('max_new_tokens', 0, 'Longest response (0 = the run\'s '
                                        'eval.max_new_tokens).')
  dtype = entry.define_dtype_flag()
  entry.run_main(lambda argv: print(json.dumps(make_pairs(
      workdir.value, out=out.value, k=k.value, num_prompts=num_prompts.value,
      reward_model=reward_model.value, temperature=temperature.value, seed=seed.value,
      max_new_tokens=max_new_tokens.value, dtype=dtype.value))))


if __name__ == '__main__':
  main()
