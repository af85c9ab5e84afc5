"""Final-answer accuracy on held-out problems, greedy and sampled (pass@k, maj@k), and the held-out
SFT loss.

  python -m eval.accuracy --workdir=runs/sft [--num_problems=100]
  python -m eval.accuracy --workdir=runs/grpo --samples=8 --temperature=1.0
  python -m eval.accuracy --workdir=runs/grpo --data=my_problems.jsonl

Problems: by default the run's own held-out ones, rebuilt from its config.json (same source, seed
and sizes, so none was trained on); `--task=NAME` picks another built-in task of the same shape;
`--data=FILE.jsonl` scores the user's problems, one {"prompt": str | messages, "answer": ...} or
{"messages": [...], "answer": ...} per line (data/prompts.py). Each prompt is rendered the way
the policy was fine-tuned (chat template for messages), decoded until the end of the turn, and
an answer counts as correct when its final answer (after the last `#### `, or the last
\\boxed{}) equals the reference by data/rewards.answers_match, the check the GRPO reward uses.

Reports `accuracy` (greedy); with --samples=k also `sample_accuracy` (the mean over k samples at
--temperature), `pass@k` (some sample right) and `maj@k` (the most frequent final answer right,
a tie going to the answer reached first), and `format_rate`, the share of greedy answers that show
working before a last line `#### N` (data/rewards.format_reward). For built-in tasks also
`eval_loss`, the masked cross-entropy of the held-out reference conversations. JSON on stdout
and in the workdir (eval_accuracy.json, or eval_accuracy_<file stem>.json with --data), with
`correct`, each problem's greedy verdict in order, for `paired_comparison` of two models.

Works on any workdir with a tokenizer: an SFT, LoRA or GRPO run, or a pretrained one (pass
--task_from= an SFT workdir, or rely on the default problems, to measure its baseline).
"""
import collections
import json
import os

import jax
import numpy as np
from absl import flags
from flax import nnx

from configs import entry
from configs import sft as sft_config
from data import chat, prompts as prompt_sources, rewards, sft_sources
from data.tokenizer import load_tokenizer
from eval.perplexity import load_run_config
from models import checkpoint
from models.losses import token_cross_entropy
from serving import offline
from serving.engine import SamplingParams


def task_config(workdir: str, task_from: str = ''):
  """The data/eval settings that define the problems: those of task_from, else the workdir's own
  run when it was an SFT or RL run, else the `tiny` SFT preset's."""
  config = load_run_config(task_from or workdir)
  if 'eval' not in config:
    defaults = sft_config.get_config('tiny')
    defaults.seed = config.seed
    return defaults
  return config


def _answer_key(answer: str | None):
  """Answers that answers_match treats as equal share a key when they are plain numbers."""
  if answer is None:
    return None
  value = rewards.as_number(answer)
  return ('number', value) if value is not None else ('text', answer.strip())


def majority_answer(answers: list[str | None]) -> str | None:
  """The most frequent non-empty final answer, a tie going to the one reached first."""
  keys = [_answer_key(a) for a in answers]
  counts = collections.Counter(k for k in keys if k is not None)
  if not counts:
    return None
  best = max(counts.values())
  return next(a for a, k in zip(answers, keys) if k is not None and counts[k] == best)


class Answerer:
  """Answers a model gives to problems ({'prompt': str | messages, ...}): each prompt rendered
  the way the policy was fine-tuned (data/prompts.encode_prompt), decoded until the end of the
  turn, through one engine whose slots are refilled as answers finish (serving/offline.py).
  Used by this eval, eval/reward.py's score_policy and launch/onpolicy_pairs.py."""

  def __init__(self, model, tokenizer, problems: list[dict], max_new_tokens: int, *,
               batch_size: int = 32):
    chat_prompts = any(not isinstance(p['prompt'], str) for p in problems)
    self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
    self.eos = chat.end_of_turn_id(tokenizer) if chat_prompts else tokenizer.eos_id
    self.prompts = [prompt_sources.encode_prompt(tokenizer, p['prompt']) for p in problems]
    self.engine = offline.engine_for(model, self.prompts, max_new_tokens, max_slots=batch_size)

  def __call__(self, *, n: int = 1, sampling: SamplingParams = SamplingParams()):
    """(completions, texts), n per problem in order; greedy unless sampling says otherwise."""
    outs = offline.generate(self.engine, self.prompts, n=n, max_tokens=self.max_new_tokens,
                            eos_id=self.eos, sampling=sampling)
    return outs, [self.tokenizer.decode([t for t in o.tokens if t != self.eos]) for o in outs]


def _held_out_loss(model, tokenizer, conversations, seq_len, batch_size) -> float:
  @nnx.jit
  def batch_loss(model, batch):
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    return token_cross_entropy(logits, batch['targets'], batch['loss_mask'])

  encoded = [chat.encode_conversation(tokenizer, e['messages']) for e in conversations]
  rows = chat.pack_conversations(encoded, seq_len, tokenizer.pad_id)
  totals = np.zeros(3)
  for i in range(0, len(rows['inputs']), batch_size):
    totals += np.array(jax.device_get(batch_loss(model, {k: v[i:i + batch_size]
                                                         for k, v in rows.items()})))
  return float(totals[0] / totals[1])


def evaluate_accuracy(workdir: str, *, task_from: str = '', task: str = '', data: str = '',
                      num_problems: int = 0, samples: int = 0, temperature: float = 1.0,
                      seed: int = 0, batch_size: int = 32, dtype: str = 'auto') -> dict:
  if samples < 0 or (samples and temperature <= 0):
    raise ValueError(f'--samples={samples} --temperature={temperature}: sampling needs '
                     'samples >= 1 and a temperature > 0')
  config = task_config(workdir, task_from)
  if task:
    if task not in sft_sources.TASKS:
      raise ValueError(f'--task={task!r}: expected one of {sft_sources.TASKS}')
    config.data.source = task
  tokenizer = load_tokenizer(workdir)
  model, step = checkpoint.load_model(workdir, dtype=dtype)
  conversations = []
  if data:
    problems = prompt_sources.jsonl_prompts(data)
  else:
    conversations = sft_sources.held_out_examples(config.data, config.seed)
    problems = [{'prompt': e['messages'][:-1], 'answer': e['answer']} for e in conversations
                if e['answer'] is not None]
  missing = sum(p['answer'] is None for p in problems)
  if missing:
    raise ValueError(f'{data or config.data.source}: {missing} of {len(problems)} problems have '
                     f'no "answer" to check against')
  problems = problems[:num_problems or config.eval.num_problems]
  if not problems:
    raise ValueError(f'{data or config.data.source}: no problems to score')
  answer = Answerer(model, tokenizer, problems, config.eval.max_new_tokens,
                    batch_size=batch_size)
  outs, greedy = answer()
  right = answer_verdicts(greedy, problems)
  # The share of greedy answers in the trained shape (working, then `#### N`, ended by the model):
  # what the RL stages' format reward checks, and how a mixed-format SFT model's answers change.
  formatted = rewards.format_reward([p['prompt'] for p in problems], greedy,
                                    truncated=[o.finish_reason == 'length' for o in outs])
  result = {'workdir': workdir, 'step': int(step), 'dtype': model.cfg.dtype,
            'source': data or config.data.source, 'problems': len(problems),
            'accuracy': float(np.mean(right)), 'format_rate': float(np.mean(formatted)),
            'correct': [bool(r) for r in right]}
  if samples:
    _, texts = answer(n=samples, sampling=SamplingParams(temperature=temperature, seed=seed))
    answers = [[rewards.extract_answer(t) for t in texts[i * samples:(i + 1) * samples]]
               for i in range(len(problems))]
    correct = np.array([[rewards.answers_match(a, p['answer']) for a in row]
                        for row, p in zip(answers, problems)])
    result.update({
        'samples_per_problem': samples, 'temperature': temperature,
        'sample_accuracy': float(correct.mean()),
        f'pass@{samples}': float(correct.any(axis=1).mean()),
        f'maj@{samples}': float(np.mean([rewards.answers_match(majority_answer(row), p['answer'])
                                         for row, p in zip(answers, problems)]))})
  if conversations:
    result['eval_loss'] = _held_out_loss(model, tokenizer, conversations, config.data.seq_len,
                                         batch_size)
  result['samples'] = [{'question': str(p['prompt'] if isinstance(p['prompt'], str)
                                        else p['prompt'][-1]['content']),
                        'answer': text, 'expected': p['answer']}
                       for p, text in zip(problems[:3], greedy)]
  name = 'eval_accuracy.json' if not data else \
      f'eval_accuracy_{os.path.splitext(os.path.basename(data))[0]}.json'
  with open(os.path.join(workdir, name), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def answer_verdicts(texts: list[str], problems: list[dict]) -> list[bool | None]:
  """Whether each text's final answer matches its problem's reference (None without one)."""
  return [None if p['answer'] is None else
          bool(rewards.answers_match(rewards.extract_answer(t), p['answer']))
          for t, p in zip(texts, problems)]


def paired_comparison(before: list, after: list) -> dict:
  """Two models' greedy verdicts on the same problems (`correct` lists, None where a problem
  has no reference): how many problems the second fixed and broke, and the exact McNemar test's
  two-sided p-value (a binomial test of the fixed among the changed; scipy's binomtest).

  On 100 problems one accuracy's standard error is about 5 points, but two models on the same
  problems differ only where their verdicts do, which is what this counts: a gain whose p is
  well under 0.05 is not a reseed away from vanishing."""
  from scipy import stats
  if len(before) != len(after):
    raise ValueError(f'paired_comparison: {len(before)} verdicts against {len(after)}; the two '
                     'models must be scored on the same problems')
  pairs = [(b, a) for b, a in zip(before, after) if b is not None and a is not None]
  fixed = sum(a and not b for b, a in pairs)
  broken = sum(b and not a for b, a in pairs)
  p = stats.binomtest(fixed, fixed + broken, 0.5).pvalue if fixed + broken else 1.0
  return {'fixed': int(fixed), 'broken': int(broken), 'p_value': float(p)}


def describe_change(before: float, after: float, paired: dict, baseline: str) -> str:
  """A table cell: `43% (SFT) -> 60% (26 fixed, 9 broken, p=0.006)`."""
  return (f'{before:.0%} ({baseline}) -> {after:.0%} ({paired["fixed"]} fixed, '
          f'{paired["broken"]} broken, p={paired["p_value"]:.1g})')


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Run directory to evaluate.', required=True)
  task_from = flags.DEFINE_string('task_from', '', 'Take the problems from this run\'s config.')
  task = flags.DEFINE_string('task', '', f'A built-in task instead: one of {sft_sources.TASKS}.')
  data = flags.DEFINE_string('data', '', 'A JSONL of {"prompt" | "messages", "answer"} instead.')
  num_problems = flags.DEFINE_integer('num_problems', 0, 'Problems to score (0 = the config\'s).')
  samples = flags.DEFINE_integer('samples', 0, 'Also draw k samples per problem: pass@k, maj@k.')
  temperature = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (with --samples).')
  seed = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  dtype = entry.define_dtype_flag()
  entry.run_main(lambda argv: print(json.dumps(evaluate_accuracy(
      workdir.value, task_from=task_from.value, task=task.value, data=data.value,
      num_problems=num_problems.value, samples=samples.value, temperature=temperature.value,
      seed=seed.value, dtype=dtype.value))))


if __name__ == '__main__':
  main()
