"""Rewards for RL on verifiable tasks: a math answer verifier, a format check, users' own functions.

GRPO (trainers/grpo.py) scores every completion with the weighted sum of the functions named in
its config (`grpo.rewards`, `grpo.reward_weights`), and eval/accuracy.py counts an answer right
with the same `answers_match`, so the metric a run optimises is the one it is judged by.

A reward function scores a batch, with TRL's signature (extra columns arrive as keyword lists):

    fn(prompts: list, completions: list[str], *, answer: list[str | None],
       truncated: list[bool], completion_ids: list[list[int]], **kwargs) -> list[float]

`prompts` are the prompts as the source gave them (a message list or a string), `completions` the
decoded responses without the end-of-turn token, `truncated` is True where a completion hit the
token limit. Built-ins are named ('accuracy', 'format'); anything else is a `module:function` or
`path/to/file.py:function` path, resolved and checked before a run writes anything.
"""
import ast
import fractions
import importlib
import importlib.util
import operator
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from data.sft_sources import ANSWER_MARK, final_answer

RewardFn = Callable[..., Sequence[float]]

_NUMBER = re.compile(r'^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$')
_THOUSANDS = re.compile(r'(?<=\d),(?=\d{3}(\D|$))')


def boxed_answer(text: str) -> str | None:
  """The content of the last \\boxed{...} (braces balanced), or None."""
  start = text.rfind('\\boxed{')
  if start < 0:
    return None
  depth, i = 0, start + len('\\boxed')
  for j in range(i, len(text)):
    depth += {'{': 1, '}': -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j].strip() or None
  return None


def extract_answer(text: str) -> str | None:
  """A completion's final answer: the text after its last `#### ` (GSM8K's convention, which our
  SFT solutions end with), else the last \\boxed{} (MATH's), else None."""
  return final_answer(text) if ANSWER_MARK in text else boxed_answer(text)


def as_number(text: str) -> fractions.Fraction | None:
  """Plain numbers exactly: '1,234', '-3', '+3.50', '.5', '7/2'; None for anything else."""
  text = _THOUSANDS.sub('', text.strip().rstrip('.').replace('$', '').strip())
  if not _NUMBER.match(text):
    return None
  try:
    return fractions.Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


def answers_match(predicted: str | None, gold: str | None) -> bool:
  """Whether a predicted final answer equals the reference.

  Plain numbers (thousands commas, signs, decimals, fractions a/b) are compared exactly as
  rationals, so '1,234' == '1234.0' and '1/2' == '0.5'. Anything else (LaTeX, expressions, sets)
  goes to Hugging Face's math-verify, which parses both sides with sympy. The fast path is ours
  because math-verify takes about 10 ms per comparison, a second per GRPO step of 128
  completions on a CPU, and the arithmetic tasks only ever need it for numbers.
  """
  if predicted is None or gold is None:
    return False
  p, g = as_number(predicted), as_number(str(gold))
  if p is not None and g is not None:
    return p == g
  import math_verify  # Imported here: sympy takes a second to import.
  try:
    return bool(math_verify.verify(math_verify.parse(f'${gold}$'),
                                   math_verify.parse(f'${predicted}$')))
  except Exception:  # math-verify raises on input it cannot parse: not a match.
    return False


def accuracy_reward(prompts, completions, *, answer, **_) -> list[float]:
  """1 when the completion's final answer equals the reference answer, else 0."""
  return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer)]


_FORMAT = re.compile(r'^(?:.*\S.*\n)+#### [^\n]*\S[^\n]*$')


def format_reward(prompts, completions, *, truncated, **_) -> list[float]:
  """1 for the structure our SFT data teaches: at least one line of working, then a last line
  `#### <answer>` with nothing after it, the marker used once, and the completion ended by the
  model (not cut at the token limit); else 0."""
  return [float(not t and c.count(ANSWER_MARK) == 1 and bool(_FORMAT.match(c.strip())))
          for c, t in zip(completions, truncated)]


BUILTIN: dict[str, RewardFn] = {'accuracy': accuracy_reward, 'format': format_reward}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def expression_value(text: str) -> fractions.Fraction | None:
  """The exact value of an arithmetic expression of numbers, + - * / and parentheses, or None
  for anything else (no names, calls or powers: it is evaluated, so nothing else is allowed)."""
  def value(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool):
      return fractions.Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      v = value(node.operand)
      return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](value(node.left), value(node.right))
    raise ValueError('not arithmetic')
  if len(text) > 200:
    return None
  try:
    return value(ast.parse(text.strip(), mode='eval').body)
  except (SyntaxError, ValueError, ZeroDivisionError, TypeError, RecursionError):
    return None


def arithmetic_steps(prompts, completions, *, answer, **_) -> list[list[tuple[int, float]]]:
  """A process reward for step-by-step arithmetic (the solutions of data/sft_sources.py):
  one reward per line, each ending at the character where its line ends.

    line 1, the problem restated:   1 if its value equals the reference answer
    each '= ...' line:              1 if its value equals the line before's (one correct step,
                                    whatever came before it)
    the '#### N' line:              1 if N equals the line before's value

  so every step is judged on its own and the final answer is right exactly when all of them are.
  Anything after the answer line, or a completion without one, ends with a 0 step. GRPO turns
  these into per-token advantages (trainers/grpo.py, rl.process_reward)."""
  out = []
  for text, gold in zip(completions, answer):
    gold_value = as_number(str(gold)) if gold is not None else None
    steps, start, previous, done = [], 0, None, False
    for i, line in enumerate(text.split('\n')):
      end = start + len(line) + 1  # the newline belongs to its line
      stripped = line.strip()
      if done:
        steps.append((min(end, len(text)), 0.0))
        break
      if stripped.startswith(ANSWER_MARK.strip()):
        final = as_number(stripped[len(ANSWER_MARK.strip()):])
        ok = final is not None and final == previous
        done = True
      else:
        v = expression_value(stripped.removeprefix('=') if i else stripped)
        ok = v is not None and (v == gold_value if i == 0 else v == previous)
        previous = v
      steps.append((min(end, len(text)), float(ok)))
      start = end
    if not done:
      steps.append((len(text), 0.0))
    out.append(steps)
  return out


PROCESS_BUILTIN: dict[str, Callable] = {'arithmetic_steps': arithmetic_steps}


def resolve(name: str, builtin: dict = BUILTIN) -> RewardFn:
  """A built-in reward by name, or a user's function by 'module:function' or 'file.py:function'."""
  if name in builtin:
    return builtin[name]
  if ':' not in name:
    raise ValueError(f'reward {name!r}: not a built-in ({sorted(builtin)}) and not a '
                     f"'module:function' path")
  module_name, fn_name = name.rsplit(':', 1)
  try:
    if module_name.endswith('.py'):
      if not os.path.exists(module_name):
        raise FileNotFoundError(module_name)
      spec = importlib.util.spec_from_file_location(
          os.path.splitext(os.path.basename(module_name))[0], module_name)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except (ImportError, FileNotFoundError) as e:
    raise ValueError(f'reward {name!r}: cannot import {module_name!r} ({e})') from e
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f'reward {name!r}: {module_name!r} has no function {fn_name!r}')
  return fn


class Rewards:
  """Several reward functions combined with weights: total = sum_k w_k * r_k."""

  def __init__(self, names: Sequence[str], weights: Sequence[float]):
    if not names:
      raise ValueError('no reward functions given')
    if len(weights) != len(names):
      raise ValueError(f'{len(names)} rewards {list(names)} but {len(weights)} reward_weights')
    self.names = list(names)
    self.weights = [float(w) for w in weights]
    self.fns = [resolve(n) for n in names]

  @property
  def needs_answers(self) -> bool:
    return 'accuracy' in self.names

  def __call__(self, prompts, completions, **columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total [N], {name: [N]}) for N completions."""
    parts = {}
    for name, fn in zip(self.names, self.fns):
      values = fn(prompts, completions, **columns)
      values = np.asarray(list(values), np.float64)
      if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
        raise ValueError(f'reward {name!r} must return one finite float per completion '
                         f'({len(completions)}), got {values.shape} values')
      parts[name] = values.astype(np.float32)
    total = sum(w * parts[n] for n, w in zip(self.names, self.weights))
    return np.asarray(total, np.float32), parts


def overlong_penalty(lengths: np.ndarray, max_tokens: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, eq. 13), with
  L_max = max_tokens and L_cache = buffer:
      R(y) = 0                                  if |y| <= L_max - L_cache
             ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
             -1                                 if |y| > L_max
  """
  free = max_tokens - buffer
  lengths = np.asarray(lengths, np.float32)
  soft = np.where(lengths <= free, 0.0, (free - lengths) / max(buffer, 1))
  return np.where(lengths > max_tokens, -1.0, soft).astype(np.float32)
