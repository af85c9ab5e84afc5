"""Conversations for supervised fine-tuning, by name: built-in sets or the user's JSONL.

`load_sft_examples(config.data, seed)` gives (train, held_out) lists of examples
{'messages': [...], 'answer': str | None}; `answer` is the verifiable final answer of generated
problems (eval/accuracy.py scores it) and None for free chat. Nothing is fetched at run time:

- 'basic_arithmetic', 'chain_sum', 'products', 'gsm_symbolic': reasoning-gym problems rendered
  as instruction -> step-by-step answer ending in `#### N` (the GSM8K convention); `products`
  (multiplications) is the harder arithmetic step of a curriculum. The held-out
  problems come from another seed, and training never sees a question that is held out.
- 'chatterbot': the chatterbot-corpus English conversations (user and assistant alternate).
- a path to a .jsonl file of {"messages": [{"role": ..., "content": ...}, ...]} per line.
Several sources join with '+', e.g. 'chain_sum+chatterbot'.
"""
import ast
import fractions
import glob
import os
import random

from data import sources
from data.chat import validate_messages

TASKS = ('basic_arithmetic', 'chain_sum', 'products', 'gsm_symbolic')
ANSWER_MARK = '#### '


def final_answer(text: str) -> str | None:
  """The answer after the last `#### ` marker, normalised (no commas, no trailing period)."""
  if ANSWER_MARK not in text:
    return None
  answer = text.rsplit(ANSWER_MARK, 1)[1].strip().split('\n')[0].strip()
  return answer.replace(',', '').rstrip('.') or None


def _number(node) -> fractions.Fraction | None:
  """The value of a literal (a constant or a negated constant), else None."""
  if isinstance(node, ast.Constant):
    return fractions.Fraction(node.value)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(
      node.operand, ast.Constant):
    return -fractions.Fraction(node.operand.value)
  return None


def _literal(value: fractions.Fraction) -> ast.expr:
  v = int(value) if value.denominator == 1 else round(float(value), 6)
  return ast.UnaryOp(ast.USub(), ast.Constant(-v)) if v < 0 else ast.Constant(v)


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _reduce_once(node) -> tuple[ast.expr, bool]:
  """Evaluates the leftmost innermost operation whose operands are literals."""
  if _number(node) is not None:
    return node, False
  if isinstance(node, ast.UnaryOp):
    inner = _number(node.operand)
    if inner is not None:
      return _literal(-inner if isinstance(node.op, ast.USub) else inner), True
    node.operand, done = _reduce_once(node.operand)
    return node, done
  a, b = _number(node.left), _number(node.right)
  if a is not None and b is not None:
    return _literal(_OPS[type(node.op)](a, b)), True
  node.left, done = _reduce_once(node.left)
  if not done:
    node.right, done = _reduce_once(node.right)
  return node, done


def arithmetic_steps(expression: str) -> list[str]:
  """The expression, then one line per evaluated operation: ['4 - 1 - 7', '3 - 7', '-4']."""
  tree = ast.parse(expression, mode='eval').body
  steps = [ast.unparse(tree)]
  while _number(tree) is None:
    tree, _ = _reduce_once(tree)
    steps.append(ast.unparse(tree))
  return steps


def _task_example(name: str, entry: dict) -> dict:
  question, answer = entry['question'], str(entry['answer'])
  if name == 'gsm_symbolic':
    solution = entry['metadata']['answer_cot']
  else:
    steps = arithmetic_steps(entry['metadata']['expression'])
    solution = '\n'.join([steps[0]] + [f'= {s}' for s in steps[1:]]) + f'\n{ANSWER_MARK}{answer}'
  return {'messages': [{'role': 'user', 'content': question},
                       {'role': 'assistant', 'content': solution}], 'answer': answer}


def _generate(name: str, n: int, seed: int, data_config) -> list[dict]:
  import reasoning_gym  # Imported here: it is slow to import and only generated tasks need it.
  kwargs = {}
  if name != 'gsm_symbolic':
    kwargs = dict(min_terms=data_config.num_terms[0], max_terms=data_config.num_terms[1],
                  min_digits=data_config.num_digits[0], max_digits=data_config.num_digits[1])
  if name == 'basic_arithmetic':
    kwargs.update(operators=tuple(data_config.operators), allow_parentheses=False,
                  allow_negation=False)
  return [_task_example(name, e)
          for e in reasoning_gym.create_dataset(name, seed=seed, size=n, **kwargs)]


def task_split(name: str, data_config, seed: int) -> tuple[list[dict], list[dict]]:
  held_out, seen = [], set()
  for e in _generate(name, data_config.eval_examples, seed + 1, data_config):
    if e['messages'][0]['content'] not in seen:
      seen.add(e['messages'][0]['content'])
      held_out.append(e)
  train = [e for e in _generate(name, data_config.num_examples, seed, data_config)
           if e['messages'][0]['content'] not in seen]
  worked = data_config.get('worked_fraction', 1.0)
  if worked < 1:  # A seeded share of the training solutions keeps only the final answer.
    rng = random.Random(seed + 2)
    train = [e if rng.random() < worked else
             {**e, 'messages': [e['messages'][0], {'role': 'assistant',
                                                   'content': f'{ANSWER_MARK}{e["answer"]}'}]}
             for e in train]
  return train, held_out


def chatterbot_conversations() -> list[dict]:
  import chatterbot_corpus
  import yaml
  root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), 'data', 'english')
  examples = []
  for path in sorted(glob.glob(os.path.join(root, '*.yml'))):
    with open(path, encoding='utf-8') as f:
      for turns in yaml.safe_load(f).get('conversations', []):
        roles = ('user', 'assistant')
        messages = [{'role': roles[i % 2], 'content': str(t)} for i, t in enumerate(turns)]
        if len(messages) >= 2:
          examples.append({'messages': messages, 'answer': None})
  return examples


def conversation_example(record, where: str) -> dict:
  """A JSONL record {"messages": [...], "answer"?: ...} as an example; an error naming `where`
  (file:line) if it is not one."""
  messages = validate_messages(record.get('messages') if isinstance(record, dict) else None,
                               where=f'{where} "messages"')
  if not any(m['role'] == 'assistant' for m in messages):
    raise ValueError(f'{where}: no assistant turn to train on')
  return {'messages': messages, 'answer': record.get('answer')}


def jsonl_conversations(path: str) -> list[dict]:
  examples = [conversation_example(record, where) for where, record in sources.read_jsonl_source(
      path, f"a built-in name: {TASKS + ('chatterbot',)}")]
  if not examples:
    raise ValueError(f'{path}: no conversations')
  return examples


def _random_split(examples, eval_fraction, seed):
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  n_eval = max(1, round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
  return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def load_sft_examples(data_config, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held_out) examples of data_config.source, both in a seeded random order."""
  train, held_out = [], []
  for name in data_config.source.split('+'):
    if name in TASKS:
      t, h = task_split(name, data_config, seed)
    else:
      convs = chatterbot_conversations() if name == 'chatterbot' else jsonl_conversations(name)
      t, h = _random_split(convs, data_config.eval_fraction, seed)
    train += t
    held_out += h
  rng = random.Random(seed)
  rng.shuffle(train)
  rng.shuffle(held_out)
  return train, held_out


# data.streaming: JSONL sources read line by line as training reaches them (data/streaming.py).


def _built_in_example(item, where: str) -> dict:
  return item  # Built-in examples are made valid.


def streamed_examples(data_config, seed: int) -> tuple[list[tuple[object, float, object]],
                                                       list[dict]]:
  """A streamed SFT run's data, each source opened once: per source (examples, hash-held-out
  share, item -> example) for `streaming.make_sft_iterator` (built-in sets in memory, their
  training examples only; JSONL files by line through an index), and the held-out examples in a
  seeded order (the JSONL lines `streaming.held_out` picks with seed + k for source k, read by
  index; the training lines are not read)."""
  from data import streaming
  parts, held = [], []
  for k, name in enumerate(data_config.source.split('+')):
    if name in TASKS or name == 'chatterbot':
      train, h = (task_split(name, data_config, seed) if name in TASKS else
                  _random_split(chatterbot_conversations(), data_config.eval_fraction, seed))
      parts.append((train, 0.0, _built_in_example))
      held += h
      continue
    if not os.path.exists(name):
      raise FileNotFoundError(f'data.source={name!r}: no such file (and not a built-in name: '
                              f'{TASKS + ("chatterbot",)})')
    records = streaming.open_records(name)
    parts.append((records, data_config.eval_fraction, conversation_example))
    for i in streaming.held_out_order(len(records), seed=seed + k,
                                      eval_fraction=data_config.eval_fraction):
      record = records[i]
      if record is not None:
        held.append(conversation_example(record, records.where(i)))
  random.Random(seed).shuffle(held)
  return parts, held


def held_out_examples(data_config, seed: int) -> list[dict]:
  """The held-out examples of the run's data (eval/accuracy.py): `load_sft_examples`'s, or with
  data.streaming `streamed_examples`'s."""
  if not data_config.get('streaming'):
    return load_sft_examples(data_config, seed)[1]
  return streamed_examples(data_config, seed)[1]
