"""Preference pairs (prompt, chosen response, rejected response) for DPO and reward models.

No preference data exists offline, so pairs are built from the generated arithmetic tasks of
data/sft_sources.py ('basic_arithmetic', 'chain_sum'): the chosen response is the correct
step-by-step solution, and the rejected one is the same solution corrupted at one seeded step: a
number of one line is shifted by a small nonzero amount and the lines after it are worked out
again from the wrong value, or only the final answer `#### N` is shifted away from the worked
result; either way the final answer is wrong (see corrupt_solution). Chosen and rejected share
the prompt and the correct prefix up to the corrupted line, so they differ exactly where the
error is.

Users' own pairs come as JSONL in the formats TRL's users hold (`jsonl_pairs`): standard
`{"prompt": str, "chosen": str, "rejected": str}` (plain text: the prompt, then the response and
EOS, no chat template), a message-list prompt with string responses (the assistant's reply), or
conversational `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, with the
prompt also given implicitly as the leading turns that "chosen" and "rejected" share. Every line
is validated, and an error names the line and the field.

Held-out pairs come from the held-out problems of `load_sft_examples`, so training never sees a
held-out question; of a JSONL, a seeded data.eval_fraction of its lines. Each pair is encoded
(with the chat template, data/chat.py, unless its prompt is plain text) into two rows, one per
response, with the loss mask on the response tokens only: arrays [N, 2, seq_len] with index
0 = chosen and 1 = rejected, one pair per row, no packing.
"""
import random
import re

import numpy as np

from data import chat, sft_sources, sources
from data.prompts import split_held_out

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


def _responses(value, where: str) -> list[dict]:
  messages = chat.validate_messages(value, where=where)
  if any(m['role'] != 'assistant' for m in messages):
    raise ValueError(f'{where}: a response holds assistant turns only (the prompt goes in '
                     '"prompt", or in the leading turns "chosen" and "rejected" share)')
  return messages


def jsonl_pairs(path: str) -> list[dict]:
  """The preference pairs of a JSONL file (formats in the module docstring), each as
  {'prompt': str | messages, 'chosen': str | messages, 'rejected': str | messages}."""
  pairs = []
  for where, record in sources.read_jsonl_source(path, f'a built-in pair task: {PAIR_TASKS}'):
    if not isinstance(record, dict) or 'chosen' not in record or 'rejected' not in record:
      raise ValueError(f'{where}: expected an object with "chosen" and "rejected" (and "prompt", '
                       'unless both are conversations that share their leading turns)')
    prompt, chosen, rejected = record.get('prompt'), record['chosen'], record['rejected']
    if isinstance(chosen, str) or isinstance(rejected, str):
      for key, value in (('chosen', chosen), ('rejected', rejected)):
        if not isinstance(value, str) or not value:
          raise ValueError(f'{where}: "{key}" must be a non-empty string like the other '
                           f'response, got {value!r}')
      if prompt is None:
        raise ValueError(f'{where}: "prompt" is missing (string responses need an explicit '
                         'prompt)')
      if isinstance(prompt, str):
        if not prompt:
          raise ValueError(f'{where}: "prompt" is empty')
      else:
        prompt = chat.validate_messages(prompt, where=f'{where} "prompt"')
    else:
      chosen = _responses(chosen, f'{where} "chosen"') if prompt is not None else \
          chat.validate_messages(chosen, where=f'{where} "chosen"')
      rejected = _responses(rejected, f'{where} "rejected"') if prompt is not None else \
          chat.validate_messages(rejected, where=f'{where} "rejected"')
      if prompt is None:  # Implicit: the turns both conversations share.
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
          k += 1
        if k == 0:
          raise ValueError(f'{where}: no "prompt", and "chosen" and "rejected" share no leading '
                           'turn to take it from')
        prompt, chosen = chosen[:k], _responses(chosen[k:] or None, f'{where} "chosen"')
        rejected = _responses(rejected[k:] or None, f'{where} "rejected"')
      else:
        prompt = chat.validate_messages(prompt, where=f'{where} "prompt"')
    if chosen == rejected:
      raise ValueError(f'{where}: "chosen" and "rejected" are the same response')
    pairs.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
  if not pairs:
    raise ValueError(f'{path}: no preference pairs')
  return pairs


def load_preference_pairs(data_config, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held_out) pairs {'prompt', 'chosen', 'rejected'} of data.source: built-in pair
  tasks (with 'answer') and/or JSONL files, joined with '+'."""
  names = data_config.source.split('+')
  tasks = [name for name in names if name in PAIR_TASKS]
  train, held_out = [], []
  if tasks:
    built_in = data_config.copy_and_resolve_references()
    built_in.source = '+'.join(tasks)
    t, h = sft_sources.load_sft_examples(built_in, seed)
    # Separate streams: the held-out pairs do not change when the training set grows.
    train, held_out = _pairs(t, random.Random(seed)), _pairs(h, random.Random(seed + 1))
  for name in names:
    if name not in PAIR_TASKS:
      t, h = split_held_out(jsonl_pairs(name), data_config.eval_fraction, seed)
      train, held_out = train + t, held_out + h
  if len(names) > 1:
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held_out)
  return train, held_out


def _encode_side(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of prompt + response with the mask on the response only."""
  if isinstance(prompt, str):  # Plain text: the prompt, then the response and EOS.
    head, tail = tokenizer.encode_prompt(prompt), tokenizer.encode(response) + [tokenizer.eos_id]
    return head + tail, [0] * len(head) + [1] * len(tail)
  turns = response if isinstance(response, list) else [{'role': 'assistant', 'content': response}]
  ids, mask = chat.encode_conversation(tokenizer, list(prompt) + turns)
  # Assistant turns of a multi-turn prompt are context, not the response being compared.
  n = len(chat.apply_chat_template(tokenizer, prompt, add_generation_prompt=True))
  return ids, [0] * n + list(mask[n:])


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
      ids, mask = _encode_side(tokenizer, pair['prompt'], pair[side])
      if len(ids) - 1 > seq_len:
        raise ValueError(f'preference pair {i} ({side}) takes {len(ids) - 1} tokens, more than '
                         f'data.seq_len={seq_len}: raise data.seq_len')
      sides.append(chat.pack_conversations([(ids, mask)], seq_len, tokenizer.pad_id))
    rows.append(sides)
  return {k: np.stack([np.concatenate([c[k], r[k]]) for c, r in rows]) for k in rows[0][0]}
