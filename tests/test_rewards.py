"""The RL rewards (data/rewards.py): the answer verifier, the format check, the arithmetic process
reward, users' functions by path, and GRPO's process-supervision advantages built on them."""
import numpy as np
import pytest

from data import rewards
from trainers import grpo


@pytest.mark.parametrize('text, expected', [
    ('4 - 1\n= 3\n#### 3', '3'),
    ('so #### 1,234.', '1234'),
    ('The answer is \\boxed{\\frac{1}{2}}.', '\\frac{1}{2}'),
    ('\\boxed{1} then \\boxed{x^{2}}', 'x^{2}'),
    ('no answer here', None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize('predicted, gold, same', [
    ('1,234', '1234', True), ('1234.0', '1234', True), ('-3', '-3.00', True), ('+3', '3', True),
    ('3', '-3', False), ('1/2', '0.5', True), ('.5', '1/2', True), ('7/2', '3.5', True),
    ('\\frac{3}{4}', '0.75', True), ('x^2 + 1', '1 + x^2', True), ('x + 1', 'x + 2', False),
    (None, '3', False), ('3', None, False), ('not a number', '3', False),
])
def test_answers_match_numbers_exactly_and_latex_through_math_verify(predicted, gold, same):
  assert rewards.answers_match(predicted, gold) is same


def test_accuracy_and_format_rewards():
  completions = ['4 - 1\n= 3\n#### 3', '#### 3', '4 - 1\n= 3\n#### 3\n#### 3', '4 - 1\n= 3',
                 '4 - 1\n= 2\n#### 2']
  truncated = [False, False, False, True, False]
  assert rewards.accuracy_reward(None, completions, answer=['3'] * 5) == [1, 1, 1, 0, 0]
  # Working, then one final `#### N` line, ended by the model.
  assert rewards.format_reward(None, completions, truncated=truncated) == [1, 0, 0, 0, 1]
  assert rewards.format_reward(None, ['4 - 1\n= 3\n#### 3'], truncated=[True]) == [0]


def test_expression_value_evaluates_arithmetic_only():
  assert rewards.expression_value('7 - 0 + 8') == 15
  assert rewards.expression_value('-3 - -4 * (2 / 8)') == -2
  for text in ('__import__("os")', '2 ** 100', '7 / 0', 'x + 1', ''):
    assert rewards.expression_value(text) is None, text


def test_arithmetic_steps_judges_every_line_on_its_own():
  steps = lambda text: [r for _, r in rewards.arithmetic_steps(None, [text], answer=['15'])[0]]
  assert steps('7 - 0 + 8\n= 7 + 8\n= 15\n#### 15') == [1, 1, 1, 1]
  assert steps('7 - 0 + 8\n= 7 + 8\n= 14\n#### 14') == [1, 1, 0, 1]  # one slip, then consistent
  assert steps('7 - 0 + 8\n= 5 + 8\n= 13\n#### 13') == [1, 0, 1, 1]  # a later step still counts
  assert steps('7 - 1 + 8\n= 6 + 8\n= 14\n#### 14') == [0, 1, 1, 1]  # the problem misread
  assert steps('7 - 0 + 8\n= 7 + 8') == [1, 1, 0]  # cut before the answer
  assert steps('7 - 0 + 8\n= 15\n#### 15\nmore') == [1, 1, 1, 0]
  ends = [e for e, _ in rewards.arithmetic_steps(None, ['7 - 0 + 8\n= 15\n#### 15'],
                                                 answer=['15'])[0]]
  assert ends == [10, 15, 22]  # each line with its newline


def test_process_advantages_by_hand():
  # Two completions of one group: steps [1, 1] and [1, 0]. Pooled rewards {1, 1, 1, 0}: mean
  # 0.75, unbiased std 0.5; normalised: 1 -> 0.5, 0 -> -1.5. Returns to go: [1.0, 0.5] and
  # [-1.0, -1.5]. Tokens start at characters 0, 4 (step 1 ends at 5) and 5, 9 (step 2); a token
  # starting at the end (the end of turn) belongs to the last step.
  steps = [[(5, 1.0), (10, 1.0)], [(5, 1.0), (10, 0.0)]]
  starts = [[0, 4, 5, 9, 10], [0, 4, 5, 9, 10]]
  a, b = grpo.process_advantages(steps, starts, eps=0.0)
  np.testing.assert_allclose(a, [1.0, 1.0, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(b, [-1.0, -1.0, -1.5, -1.5, -1.5])


def test_user_reward_functions_by_path_and_weights(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('def shout(prompts, completions, **kw):\n'
                  '  return [float(c.isupper()) for c in completions]\n'
                  'def short(prompts, completions, **kw):\n'
                  '  return [1.0]\n'
                  'NOT_A_FUNCTION = 3\n')
  combined = rewards.Rewards(['accuracy', f'{path}:shout'], [1.0, 0.5])
  total, parts = combined(['q', 'q'], ['ok\n#### 3', 'LOUD\n#### 4'], answer=['3', '3'],
                          truncated=[False, False], completion_ids=[[], []])
  np.testing.assert_allclose(total, [1.0, 0.5])
  assert set(parts) == {'accuracy', f'{path}:shout'}
  with pytest.raises(ValueError, match='no function'):
    rewards.resolve(f'{path}:NOT_A_FUNCTION')
  with pytest.raises(ValueError, match='cannot import'):
    rewards.resolve(f'{tmp_path}/missing.py:f')
  with pytest.raises(ValueError, match='not a built-in'):
    rewards.resolve('acuracy')
  with pytest.raises(ValueError, match='reward_weights'):
    rewards.Rewards(['accuracy', 'format'], [1.0])
  short = rewards.Rewards([f'{path}:short'], [1.0])
  with pytest.raises(ValueError, match='one finite float per completion'):
    short(['q', 'q'], ['a', 'b'], answer=['1', '1'], truncated=[False] * 2, completion_ids=[[]] * 2)


def test_overlong_penalty_by_hand():
  # L_max 48, buffer 8: free up to 40 tokens, then (40 - |y|) / 8, -1 beyond 48.
  np.testing.assert_allclose(rewards.overlong_penalty([10, 40, 44, 48, 50], 48, 8),
                             [0.0, 0.0, -0.5, -1.0, -1.0])
