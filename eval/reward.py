"""Held-out pair accuracy of a reward model (trainers/reward.py) on any preference source.

  python -m eval.reward --workdir=runs/rm                       # the run's held-out pairs
  python -m eval.reward --workdir=runs/rm --data=prefs.jsonl    # every pair of a file
  python -m eval.reward --workdir=runs/rm --task=chain_sum      # another built-in task
  python -m eval.reward --workdir=runs/rm --policy=runs/ppo      # score a policy's answers

Each pair's chosen and rejected response gets a scalar reward; accuracy is the fraction of pairs
with r_chosen > r_rejected (a tie counts one half, as in training, so an untrained zero head
scores 0.5), reported with the mean margin and the mean rewards. By default the pairs are the
held-out ones of the run's own config, which training never saw; with --data, every line of the
file (data/preferences.py's formats). The JSON goes to stdout and to the workdir as
eval_reward_accuracy[_<source>].json.

With --policy=WORKDIR it scores a policy instead: the reward model's mean score of the policy's
greedy answers to the held-out prompts of the policy's task (data/prompts.py, the problems
eval/accuracy.py uses), with their exact-match accuracy, the before/after measure of PPO and DPO
(`score_policy`; the JSON goes to the policy's workdir as eval_reward_score.json), and each
problem's verdict (`correct`). --task_from=RUN scores it on RUN's held-out prompts instead
(eval_reward_score_on_<RUN's name>.json): a baseline for eval.accuracy.paired_comparison.
"""
import json
import os

import jax
import numpy as np
from absl import flags
from flax import nnx

from configs import entry
from data import preferences
from data.tokenizer import load_tokenizer
from eval.perplexity import load_run_config
from models import reward
from trainers.sft import eval_batches


def evaluate_reward_accuracy(workdir: str, *, data: str = '', task: str = '',
                             step: int | None = None, max_pairs: int = 0, seq_len: int = 0,
                             batch_size: int = 32, dtype: str = 'auto') -> dict:
  config = load_run_config(workdir)
  if data and task:
    raise ValueError('give --data or --task, not both')
  if data:
    pairs, source = preferences.jsonl_pairs(data), data
  else:
    if task:
      if task not in preferences.PAIR_TASKS:
        raise ValueError(f'--task={task!r}: expected one of {preferences.PAIR_TASKS}')
      config.data.source = task
    _, pairs = preferences.load_preference_pairs(config.data, config.seed)
    source = config.data.source
  pairs = pairs[:max_pairs] if max_pairs else pairs
  if not pairs:
    raise ValueError(f'{source!r} gives no pairs to score (the run held none out?)')
  rows = preferences.encode_pairs(load_tokenizer(workdir), pairs, seq_len or config.data.seq_len)
  model, step = reward.load_reward_model(workdir, step=step, dtype=dtype)
  score = nnx.jit(reward.pair_rewards)
  rewards = np.concatenate([np.asarray(jax.device_get(score(model, batch)))
                            for batch in eval_batches(rows, batch_size=batch_size,
                                                      max_batches=len(pairs))])[:len(pairs)]
  chosen, rejected = rewards[:, 0], rewards[:, 1]
  margin = chosen - rejected
  result = {'workdir': workdir, 'step': int(step), 'dtype': model.backbone.cfg.dtype,
            'source': source, 'pairs': len(pairs),
            'accuracy': float(np.mean((margin > 0) + 0.5 * (margin == 0))),
            'margin': float(margin.mean()), 'chosen_reward': float(chosen.mean()),
            'rejected_reward': float(rejected.mean())}
  name = 'eval_reward_accuracy.json' if not (data or task) else \
      f'eval_reward_accuracy_{os.path.splitext(os.path.basename(source))[0]}.json'
  with open(os.path.join(workdir, name), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def score_policy(reward_workdir: str, policy_workdir: str, *, task_from: str = '',
                 num_problems: int = 0, batch_size: int = 32, dtype: str = 'auto') -> dict:
  """The reward model's mean score of a policy's greedy answers to its held-out prompts (those
  of `task_from`'s run when given: a baseline scored on another run's problems), and their
  exact-match accuracy."""
  from data import prompts as prompt_sources
  from eval.accuracy import Answerer, answer_verdicts, task_config
  from models import checkpoint
  config = task_config(policy_workdir, task_from)
  _, held_out = prompt_sources.load_prompts(config.data, config.seed)
  problems = held_out[:num_problems or config.eval.num_problems]
  if not problems:
    raise ValueError(f'{policy_workdir}: its task holds out no prompts to score')
  n_new = config.eval.max_new_tokens
  model, step = checkpoint.load_model(policy_workdir, dtype=dtype)
  answer = Answerer(model, load_tokenizer(policy_workdir), problems, n_new, batch_size=batch_size)
  outs, texts = answer()
  scorer = reward.RewardScorer(reward_workdir, batch_size=batch_size, mesh=None, rules=None,
                               dtype=dtype)
  scores = scorer(answer.prompts, [o.tokens for o in outs],
                  length=max(map(len, answer.prompts)) + n_new)
  correct = answer_verdicts(texts, problems)
  known = [c for c in correct if c is not None]
  result = {'policy': policy_workdir, 'step': int(step), 'reward_model': reward_workdir,
            'reward_model_step': scorer.step, 'problems': len(problems),
            'score_mean': float(np.mean(scores)), 'score_std': float(np.std(scores)),
            'accuracy': float(np.mean(known)) if known else None,
            'correct': correct}  # per problem, None without a reference (paired_comparison)
  name = 'eval_reward_score.json'
  if task_from:
    result['task_from'] = task_from
    name = f'eval_reward_score_on_{os.path.basename(os.path.normpath(task_from))}.json'
  with open(os.path.join(policy_workdir, name), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Reward-model workdir (trainers/reward.py).',
                                required=True)
  policy = flags.DEFINE_string('policy', '', 'Score this policy\'s greedy held-out answers '
                               'instead of pairs.')
  num_problems = flags.DEFINE_integer('num_problems', 0, 'With --policy: prompts to score (0: '
                                      'the policy run\'s eval.num_problems).')
  task_from = flags.DEFINE_string('task_from', '', 'With --policy: score it on this run\'s '
                                  'held-out prompts instead of its own.')
  data = flags.DEFINE_string('data', '', 'A preference JSONL to score, every line of it.')
  task = flags.DEFINE_string('task', '', f'A built-in pair task: one of {preferences.PAIR_TASKS}.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
  max_pairs = flags.DEFINE_integer('max_pairs', 0, 'Score at most this many pairs (0: all).')
  seq_len = flags.DEFINE_integer('seq_len', 0, 'Tokens per response row (0: the run\'s).')
  dtype = entry.define_dtype_flag()

  def _main(argv):
    del argv
    if policy.value:
      result = score_policy(workdir.value, policy.value, task_from=task_from.value,
                            num_problems=num_problems.value, dtype=dtype.value)
    else:
      result = evaluate_reward_accuracy(
          workdir.value, data=data.value, task=task.value, step=step.value,
          max_pairs=max_pairs.value, seq_len=seq_len.value, dtype=dtype.value)
    print(json.dumps(result))

  entry.run_main(_main)


if __name__ == '__main__':
  main()
