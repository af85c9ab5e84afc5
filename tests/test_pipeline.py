"""The end-to-end runner behind `make demo`, on its tiny preset: every stage runs, writes its
workdir, and the report and table carry what each stage measured."""
import json
import os

import jax.numpy as jnp
import numpy as np

from configs import pipeline as pipeline_config
from launch import pipeline
from models import checkpoint


def test_tiny_pipeline_runs_every_stage(tmp_path, capsys):
  config = pipeline_config.get_config('tiny')
  for stage in ('pretrain', 'sft', 'grpo', 'reward', 'ppo', 'dpo'):
    config[stage].mesh.data = 1
  config.pretrain.data.max_chars = 200_000
  report = pipeline.run(config, str(tmp_path))
  out = capsys.readouterr().out
  for stage in ('pretrain', 'sft', 'grpo', 'reward', 'ppo', 'dpo'):
    assert os.path.exists(tmp_path / stage / 'metrics.jsonl'), stage
  assert report['pretrain']['final_loss'] < report['pretrain']['first_loss']
  assert report['eval']['perplexity'] < 512  # Below uniform over the tiny vocabulary.
  assert len(report['samples']) == 3 and all(s['continuation'] for s in report['samples'])
  assert report['sft']['steps'] == config.sft.train.steps
  assert 0 <= report['sft']['accuracy_before'] <= 1
  with open(tmp_path / 'report.json') as f:
    assert json.load(f)['eval']['perplexity'] == report['eval']['perplexity']
  assert report['grpo']['steps'] == config.grpo.train.steps
  assert 0 <= report['grpo']['accuracy_after'] <= 1
  assert report['grpo']['format_rate_before'] == report['sft']['format_rate']
  assert 0 <= report['grpo']['format_rate_after'] <= 1
  assert report['reward']['steps'] == config.reward.train.steps
  assert 0 <= report['reward']['accuracy'] <= 1
  assert report['dpo_pairs']['pairs'] > 0  # DPO trained on the SFT model's own answers.
  sft_model, _ = checkpoint.load_model(str(tmp_path / 'sft'), dtype='float32')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (1, 16)), jnp.int32)
  sft_logits = np.asarray(sft_model(tokens))
  for stage in ('ppo', 'dpo'):
    assert report[stage]['steps'] == config[stage].train.steps
    # The SFT baseline is scored on the stage's own held-out problems (beside the stage's).
    with open(tmp_path / 'sft' / f'eval_reward_score_on_{stage}.json') as f:
      baseline = json.load(f)
    assert baseline['task_from'] == str(tmp_path / stage)
    assert report[stage]['accuracy_before'] == baseline['accuracy']
    # The policy moved: its saved weights give other logits than the SFT model's (two tiny
    # steps need not change a greedy answer, so the reward-model score may stay put).
    moved, _ = checkpoint.load_model(str(tmp_path / stage), dtype='float32')
    assert np.abs(np.asarray(moved(tokens)) - sft_logits).max() > 1e-6, stage
  # Each accuracy change comes with its paired count: fixed minus broken problems is the change
  # in correct answers, and the cell prints them with McNemar's p.
  for stage, scores in (('sft', 'eval_accuracy.json'), ('grpo', 'eval_accuracy.json'),
                        ('ppo', 'eval_reward_score.json'), ('dpo', 'eval_reward_score.json')):
    with open(tmp_path / stage / scores) as f:
      n = json.load(f)['problems']
    r, paired = report[stage], report[stage]['paired']
    assert paired['fixed'] - paired['broken'] == round((r['accuracy_after'] -
                                                        r['accuracy_before']) * n), stage
    assert 0 < paired['p_value'] <= 1
    assert f"({paired['fixed']} fixed, {paired['broken']} broken, p=" in out, stage
  assert 'held-out perplexity' in out and 'exact-match accuracy' in out and 'grpo' in out
  assert 'answers showing working' in out
  assert 'held-out pair accuracy' in out and 'reward-model score' in out
