"""Preference pairs (prompt, chosen response, rejected response) for DPO and reward models.

No preference data exists offline, so pairs are built from the generated arithmetic tasks of
data/sft_sources.py ('basic_arithmetic', 'chain_sum'): the chosen response is the correct
step-by-step solution, and the rejected one is the same solution corrupted at one seeded step: a
number of one line is shifted by a small nonzero amount and the lines after it are worked out
again from the wrong value, or only the final answer `#### N` is shifted away from the worked
result; either way the final answer is wrong (see corrupt_solution). Chosen and rejected share
the prompt and the correct prefix up to the corrupted line, so they differ exactly where the
error is.

Held-out pairs come from the held-out problems of `load_sft_examples`, so training never sees a
held-out question. Each pair is encoded with the chat template (data/chat.py) into two rows, one
per response, with the loss mask on the response tokens only: arrays [N, 2, seq_len] with index
0 = chosen and 1 = rejected, one pair per row, no packing.
"""
import random
import re

import numpy as np

from data import chat, sft_sources

PAIR_TASKS = ('basic_arithmetic', 'chain_sum')
# Nonzero shifts of a number; small, so a rejected solution looks plausible.
_SHIFTS = (-3, -2, -1, 1, 2, 3)
_FIRST_NUMBER = re.compile(r'^-?\d+')


def _shift_first_number(line: str, shift: int) -> str:
  return _FIRST_NUMBER.sub(lambda m: str(int(m.group()) + shift), line, count=1)


def corrupt_solution(solution: str, rng: random.Random) -> str:
  """A step-by-step solution ('e\\n= e1\\n...\\n= v\\n#### v') made wrong at one seeded place.

  With steps e, e1, ..., v, the place k is one of 1..len(steps), uniformly:
  - k < len(steps): line k has its first number shifted and the lines after it follow from the
    wrong line by correct arithmetic (the first number of a line is the result of the operation
    just evaluated, left to right without parentheses, so this reads as a slip in it);
  - k = len(steps): the working is right but the final answer `#### N` is not its last value.
  Either way the final answer is wrong.
  """
  lines = solution.split('\n')
  steps = [lines[0]] + [line.removeprefix('= ') for line in lines[1:-1]]
  if len(steps) < 2 or not all(line.startswith('= ') for line in lines[1:-1]) \
      or not lines[-1].startswith(sft_sources.ANSWER_MARK):
    raise ValueError(f'not a step-by-step arithmetic solution: {solution!r}')
  k, shift = rng.randrange(1, len(steps) + 1), rng.choice(_SHIFTS)
  if k == len(steps):
    wrong, answer = steps, _shift_first_number(steps[-1], shift)
  else:
    wrong = steps[:k] + sft_sources.arithmetic_steps(_shift_first_number(steps[k], shift))
    answer = wrong[-1]
    if answer == steps[-1]:  # The slip cancelled out (say, times 0): make the answer wrong.
      answer = _shift_first_number(answer, shift)
  return '\n'.join([wrong[0]] + [f'= {s}' for s in wrong[1:]]
                   + [f'{sft_sources.ANSWER_MARK}{answer}'])


def _pairs(examples: list[dict], rng: random.Random) -> list[dict]:
  pairs = []
  for e in examples:
    solution = e['messages'][-1]['content']
    pairs.append({'prompt': e['messages'][:-1], 'chosen': solution,
                  'rejected': corrupt_solution(solution, rng), 'answer': e['answer']})
  return pairs


def load_preference_pairs(data_config, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held_out) pairs {'prompt': messages, 'chosen': str, 'rejected': str, 'answer'}."""
  names = data_config.source.split('+')
  if not all(name in PAIR_TASKS for name in names):
    raise ValueError(f'data.source={data_config.source!r}: preference pairs are built only from '
                     f'{PAIR_TASKS} (correct vs corrupted solutions)')
  train, held_out = sft_sources.load_sft_examples(data_config, seed)
  # Separate streams: the held-out pairs do not change when the training set grows.
  return _pairs(train, random.Random(seed)), _pairs(held_out, random.Random(seed + 1))


def encode_pairs(tokenizer, pairs: list[dict], seq_len: int) -> dict[str, np.ndarray]:
  """[N, 2, seq_len] rows (index 0 = chosen, 1 = rejected) in data/chat.py's row format.

  The loss mask covers the response tokens and their end-of-turn token, nothing of the prompt.
  A pair whose longer response does not fit in seq_len is an error, not a silent cut: a cut
  response would be scored on a prefix that may not even contain the difference.
  """
  rows = []
  for i, pair in enumerate(pairs):
    sides = []
    for side in ('chosen', 'rejected'):
      messages = list(pair['prompt']) + [{'role': 'assistant', 'content': pair[side]}]
      ids, mask = chat.encode_conversation(tokenizer, messages)
      if len(ids) - 1 > seq_len:
        raise ValueError(f'preference pair {i} ({side}) takes {len(ids) - 1} tokens, more than '
                         f'data.seq_len={seq_len}: raise data.seq_len')
      sides.append(chat.pack_conversations([(ids, mask)], seq_len, tokenizer.pad_id))
    rows.append(sides)
  return {k: np.stack([np.concatenate([c[k], r[k]]) for c, r in rows]) for k in rows[0][0]}
