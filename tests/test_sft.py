"""Full SFT end to end on the `tiny` preset: the workdir contract, and held-out exact-match accuracy
on arithmetic problems it never saw rises far above the pretrained model's."""
import os

import numpy as np
import pytest

from configs import sft as sft_config
from eval.accuracy import evaluate_accuracy, paired_comparison
from tests.helpers import read_metrics, tiny_config
from trainers import pretrain, sft


def _config(**overrides):
  return tiny_config(sft_config, **overrides)


def test_sft_needs_a_model_to_start_from(tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    sft.run(_config(), str(tmp_path))


def test_sft_raises_held_out_accuracy(tmp_path):
  pre, run = str(tmp_path / 'pre'), str(tmp_path / 'sft')
  pretrain.run(tiny_config(), pre)
  result = sft.run(_config(init_from=pre), run)
  assert result.completed
  for name in ('config.json', 'model.json', 'tokenizer.model', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(run, name)), name
  records = read_metrics(run)
  assert records[-1]['loss'] < 0.2 * records[0]['loss'] and 'eval_loss' in records[-1]

  before = evaluate_accuracy(pre, task_from=run)  # The same held-out problems, pretrained model.
  after = evaluate_accuracy(run)
  assert os.path.exists(os.path.join(run, 'eval_accuracy.json'))
  assert after['problems'] == before['problems'] == 100
  assert before['accuracy'] <= 0.02 and after['accuracy'] >= 0.15, (before, after)
  assert len(after['correct']) == 100 and np.mean(after['correct']) == after['accuracy']
  paired = paired_comparison(before['correct'], after['correct'])
  assert paired['fixed'] - paired['broken'] == round(100 * (after['accuracy'] -
                                                            before['accuracy']))
  assert paired['p_value'] < 0.01  # 15 or more fixed, at most 2 broken: p <= 0.0024
  # The fine-tuned model answers in the trained shape (working, then `#### N`); the pretrained
  # one does not.
  assert before['format_rate'] <= 0.02 and after['format_rate'] >= 0.5, (before, after)
  assert after['eval_loss'] < 0.2 * before['eval_loss']


def test_paired_comparison_counts_changed_verdicts_and_tests_them_exactly():
  # 5 fixed, none broken: the exact two-sided McNemar p is 2 * 0.5**5; a problem without a
  # reference (None) is left out; unchanged verdicts do not count.
  before = [True, False, False, False, False, False, None, True]
  after = [True, True, True, True, True, True, False, True]
  assert paired_comparison(before, after) == {'fixed': 5, 'broken': 0, 'p_value': 0.0625}
  swapped = paired_comparison(after, before)
  assert (swapped['fixed'], swapped['broken'], swapped['p_value']) == (0, 5, 0.0625)
  assert paired_comparison([True, False], [False, True])['p_value'] == 1.0
  assert paired_comparison([True], [True]) == {'fixed': 0, 'broken': 0, 'p_value': 1.0}
  with pytest.raises(ValueError, match='same problems'):
    paired_comparison([True], [True, False])


def test_streamed_sft_resumes_exactly_and_scores_its_held_out_lines(tmp_path):
  """data.streaming: a JSONL set read line by line as training reaches it. The loss falls, a run
  stopped and resumed logs exactly the uninterrupted run's metrics, and eval.accuracy scores the
  lines the run's hash held out (never trained on)."""
  import json
  from data import sft_sources, streaming
  from tests.helpers import without_timing
  pre = str(tmp_path / 'pre')
  pretrain.run(tiny_config(**{'train.steps': 10}), pre)
  examples = sft_sources.task_split('basic_arithmetic', _config().data, 0)[0][:600]
  path = tmp_path / 'arithmetic.jsonl'
  path.write_text(''.join(json.dumps(e) + '\n' for e in examples))
  keys = {'init_from': pre, 'data.streaming': True, 'data.source': str(path), 'train.steps': 16,
          'train.log_every': 1, 'train.eval_every': 8, 'train.checkpoint_every': 4}
  assert sft.run(_config(**keys), str(tmp_path / 'straight')).completed
  assert not sft.run(_config(**keys, **{'train.stop_after': 6}), str(tmp_path / 'resumed')).completed
  assert sft.run(_config(**keys), str(tmp_path / 'resumed')).completed
  records = without_timing(read_metrics(tmp_path / 'straight'))
  assert without_timing(read_metrics(tmp_path / 'resumed')) == records
  assert records[-1]['loss'] < 0.5 * records[0]['loss'] and 'eval_loss' in records[-1]

  held = np.flatnonzero(streaming.held_out(np.arange(600), seed=0, eval_fraction=0.05))
  held_questions = {examples[i]['messages'][0]['content'] for i in held}
  result = evaluate_accuracy(str(tmp_path / 'straight'), num_problems=8)
  assert result['problems'] == min(8, len(held))
  assert {s['question'] for s in result['samples']} <= held_questions
