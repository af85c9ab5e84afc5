"""On-policy preference pairs (launch/onpolicy_pairs.py): the policy's own best and worst sampled
answers, ranked by the verifier or by a reward model, written as a preference JSONL that the
reward model and DPO read."""
import json

import numpy as np
import pytest

from data import preferences, prompts as prompt_sources, rewards as reward_lib
from eval.accuracy import task_config
from launch import onpolicy_pairs


def test_best_and_worst_picks_the_extremes_and_skips_ties():
  assert onpolicy_pairs.best_and_worst(np.array([0.1, 1.1, 0.0, 1.1])) == (1, 2)
  assert onpolicy_pairs.best_and_worst(np.array([0.5, 0.5])) is None


def test_verifier_ranked_pairs_prefer_the_better_answer(tiny_sft_workdir, tmp_path):
  out = str(tmp_path / 'pairs.jsonl')
  summary = onpolicy_pairs.make_pairs(tiny_sft_workdir, out=out, k=4, num_prompts=24, seed=1)
  pairs = preferences.jsonl_pairs(out)  # The format the preference stages read, validated.
  assert summary['pairs'] == len(pairs) > 0 and summary['prompts'] == 24
  assert summary['chosen_score_mean'] > summary['rejected_score_mean']
  with open(out) as f:
    records = [json.loads(line) for line in f]
  # The recorded scores are the verifier's (accuracy + 0.1 format) of the texts, chosen above.
  config = task_config(tiny_sft_workdir)
  answers = {json.dumps(e['prompt']): e['answer']
             for e in prompt_sources.load_prompts(config.data, config.seed)[0][:24]}
  for r in records:
    answer = answers[json.dumps(r['prompt'])]
    for side in ('chosen', 'rejected'):
      total, _ = reward_lib.Rewards(*onpolicy_pairs.VERIFIER)(
          [r['prompt']], [r[side]], answer=[answer], truncated=[False], completion_ids=[[]])
      # A truncated response loses its format point, so the recorded score may be lower.
      assert r[f'score_{side}'] <= float(total[0]) + 1e-6
      assert r[f'score_{side}'] >= float(total[0]) - 0.1 - 1e-6
    assert r['score_chosen'] > r['score_rejected'] and r['chosen'] != r['rejected']


def test_reward_model_ranked_pairs_and_bad_arguments(tiny_sft_workdir, tiny_reward_run, tmp_path):
  out = str(tmp_path / 'rm_pairs.jsonl')
  summary = onpolicy_pairs.make_pairs(tiny_sft_workdir, out=out, k=3, num_prompts=8,
                                      reward_model=tiny_reward_run[0])
  assert summary['pairs'] == len(preferences.jsonl_pairs(out)) > 0
  assert summary['chosen_score_mean'] > summary['rejected_score_mean']
  with pytest.raises(ValueError, match='at least 2'):
    onpolicy_pairs.make_pairs(tiny_sft_workdir, out=out, k=1)
  with pytest.raises(ValueError, match='temperature'):
    onpolicy_pairs.make_pairs(tiny_sft_workdir, out=out, temperature=0.0)
