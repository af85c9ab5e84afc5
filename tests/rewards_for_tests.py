"""A user reward function, loaded by path as `rl.rewards` names it (tests/test_grpo.py)."""


def sevens(prompts, completions, **columns):
  """The number of 7s a completion writes: a reward any policy can climb in a few steps."""
  del prompts, columns
  return [float(c.count('7')) for c in completions]
