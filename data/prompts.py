"""Prompts with verifiable answers for the RL stages (GRPO, PPO), by name or from the user's JSONL.

`load_prompts(config.data, seed)` gives (train, held_out) lists of examples
{'prompt': list of messages | str, 'answer': str | None}:

- 'basic_arithmetic', 'chain_sum', 'products', 'gsm_symbolic': the reasoning-gym problems of
  data/sft_sources.py with the same held-out split (held-out questions never appear in training),
  the user turn as the prompt and the reference answer beside it. Sources join with '+' (a mixed
  curriculum, e.g. 'basic_arithmetic+products').
- a path to a .jsonl file, one object per line in TRL's prompt-only formats:
  {"prompt": "raw text", "answer": "42"}, {"prompt": [{"role": "user", ...}], "answer": ...}, or
  {"messages": [...], "answer": ...} (a trailing assistant turn is dropped: it is what the policy
  writes). `answer` may be a string or a number; it is required by the accuracy reward. A seeded
  data.eval_fraction of the lines is held out.

`encode_prompt` renders a prompt the way the policy was fine-tuned: message lists through the chat
template with the assistant header appended, plain strings as raw text after BOS.
"""
import random

from data import chat, sft_sources, sources


def _task_prompts(examples: list[dict]) -> list[dict]:
  return [{'prompt': e['messages'][:-1], 'answer': e['answer']} for e in examples]


def jsonl_prompts(path: str) -> list[dict]:
  examples = []
  for where, record in sources.read_jsonl_source(path, f'a built-in name: {sft_sources.TASKS}'):
    if not isinstance(record, dict) or not ('prompt' in record or 'messages' in record):
      raise ValueError(f'{where}: expected an object with "prompt" (a string or a message list) '
                       f'or "messages", and "answer"')
    prompt = record.get('prompt', record.get('messages'))
    if isinstance(prompt, str):
      if not prompt:
        raise ValueError(f'{where}: "prompt" is empty')
    else:
      key = '"prompt"' if 'prompt' in record else '"messages"'
      prompt = chat.validate_messages(prompt, where=f'{where} {key}')
      if prompt[-1]['role'] == 'assistant':
        prompt = prompt[:-1]
      if not prompt:
        raise ValueError(f'{where}: {key} holds no turn before the assistant\'s')
    answer = record.get('answer')
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
      raise ValueError(f'{where}: "answer" must be a string or a number, got {answer!r}')
    examples.append({'prompt': prompt, 'answer': None if answer is None else str(answer)})
  if not examples:
    raise ValueError(f'{path}: no prompts')
  return examples


def split_held_out(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
  """(train, held_out) of a user's records: a seeded fraction held out (at least one when the
  fraction is > 0 and there are two or more records)."""
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  n_eval = (max(1, round(len(examples) * eval_fraction))
            if eval_fraction > 0 and len(examples) > 1 else 0)
  return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def load_prompts(data_config, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held_out) prompts of data_config.source, each list in a seeded random order."""
  train, held_out = [], []
  for name in data_config.source.split('+'):
    if name in sft_sources.TASKS:
      t, h = sft_sources.task_split(name, data_config, seed)
      t, h = _task_prompts(t), _task_prompts(h)
    else:
      t, h = split_held_out(jsonl_prompts(name), data_config.eval_fraction, seed)
    train += t
    held_out += h
  rng = random.Random(seed)
  rng.shuffle(train)
  rng.shuffle(held_out)
  return train, held_out


def encode_prompt(tokenizer, prompt) -> list[int]:
  if isinstance(prompt, str):
    return tokenizer.encode_prompt(prompt)
  return chat.apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
