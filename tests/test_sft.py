"""Full SFT end to end on the `tiny` preset: the workdir contract, and held-out exact-match accuracy
on arithmetic problems it never saw rises far above the pretrained model's."""
import os

import pytest

from configs import sft as sft_config
from eval.accuracy import evaluate_accuracy
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
  # The fine-tuned model answers in the trained shape (working, then `#### N`); the pretrained
  # one does not.
  assert before['format_rate'] <= 0.02 and after['format_rate'] >= 0.5, (before, after)
  assert after['eval_loss'] < 0.2 * before['eval_loss']
