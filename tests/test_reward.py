"""The Bradley-Terry reward model (models/reward.py, trainers/reward.py): the loss against values
worked out by hand, and training end to end from a tiny SFT run, reloaded from its workdir."""
import json
import math
import os

import jax
import numpy as np
import pytest

from configs import reward as reward_config
from data import preferences
from data.tokenizer import load_tokenizer
from models import reward
from tests.helpers import read_metrics, tiny_config
from trainers import reward as reward_trainer


def test_bradley_terry_loss_matches_hand_worked_values():
  loss = lambda c, r, w=None: float(reward.bradley_terry_loss(
      np.float32(c), np.float32(r), None if w is None else np.float32(w)))
  # Margin 0: -log sigmoid(0) = log 2.
  assert loss([1.5], [1.5]) == pytest.approx(math.log(2))
  # Margin 1: log(1 + e^-1) = 0.313262; margin -1: log(1 + e) = 1.313262; their mean 0.813262.
  assert loss([1.0], [0.0]) == pytest.approx(0.313262, abs=1e-6)
  assert loss([0.0, -2.0], [-1.0, -1.0]) == pytest.approx(0.813262, abs=1e-6)
  # A pair of weight 0 does not count.
  assert loss([0.0, -2.0], [-1.0, -1.0], [1.0, 0.0]) == pytest.approx(0.313262, abs=1e-6)


def test_last_response_index():
  mask = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
  assert reward.last_response_index(mask).tolist() == [2, 4, 4]


def test_pooling_reads_the_last_response_position_or_the_mean_over_the_response():
  from flax import nnx
  from models import presets
  from models.llama import create_model
  backbone = create_model(presets.resolve('tiny', vocab_size=64, dtype='float32'), seed=0)
  model = reward.RewardModel(backbone, head_init_std=0.5, pooling='mean', rngs=nnx.Rngs(0))
  tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jax.numpy.int32)
  mask = np.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]], np.float32)
  v = np.asarray(reward.values(model, tokens))  # The head at every position.
  np.testing.assert_allclose(reward.reward(model, tokens, None, None, mask),
                             (v * mask).sum(-1) / mask.sum(-1), rtol=1e-5)
  model.pooling = 'last'
  np.testing.assert_allclose(reward.reward(model, tokens, None, None, mask), [v[0, 4], v[1, 6]],
                             rtol=1e-5)
  with pytest.raises(ValueError, match='pooling'):
    reward.RewardModel(backbone, pooling='max', rngs=nnx.Rngs(0))


def test_likelihood_adds_the_weighted_mean_token_log_probability_of_the_response():
  from flax import nnx
  from models import presets
  from models.llama import create_model
  from models.losses import token_logprobs
  backbone = create_model(presets.resolve('tiny', vocab_size=64, dtype='float32'), seed=0)
  rows = np.random.default_rng(1).integers(0, 64, (2, 9))
  tokens = jax.numpy.asarray(rows[:, :-1], jax.numpy.int32)
  targets = jax.numpy.asarray(rows[:, 1:], jax.numpy.int32)
  mask = np.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]], np.float32)
  plain = reward.RewardModel(backbone, head_init_std=0.5, rngs=nnx.Rngs(0))
  reading = reward.RewardModel(backbone, head_init_std=0.5, likelihood=2.0, rngs=nnx.Rngs(0))
  logp = np.asarray(token_logprobs(backbone, tokens, targets)[0])
  mean_logp = (logp * mask).sum(-1) / mask.sum(-1)  # Over the response's 3 and 6 targets.
  np.testing.assert_allclose(
      reward.reward(reading, tokens, None, None, mask, targets),
      np.asarray(reward.reward(plain, tokens, None, None, mask)) + 2.0 * mean_logp, rtol=1e-5)
  with pytest.raises(ValueError, match='targets'):
    reward.reward(reading, tokens, None, None, mask)
  with pytest.raises(ValueError, match='likelihood'):
    reward.RewardModel(backbone, likelihood=-1.0, rngs=nnx.Rngs(0))


def test_reward_model_with_likelihood_trains_reloads_and_scores_rollouts_alike(
    tiny_sft_workdir, tmp_path):
  """reward.likelihood: the weight is trained and checkpointed, and every reader (the reloaded
  model, eval/reward.py, PPO's RewardScorer on token lists) gives the trained model's rewards."""
  from eval.reward import evaluate_reward_accuracy
  run = str(tmp_path / 'rm')
  config = tiny_config(reward_config, init_from=tiny_sft_workdir)
  config.reward.likelihood = 1.0
  config.train.steps = 8
  result = reward_trainer.run(config, run)
  # Step 0 already ranks by the fine-tuned model's likelihood of each response.
  start = read_metrics(run)[0]
  assert start['step'] == 0 and start['eval_accuracy'] != 0.5 and start['eval_margin'] != 0
  weight = float(result.model.likelihood_weight[...])
  assert weight != 1.0  # Learned, not a constant.
  loaded, _ = reward.load_reward_model(run)
  assert float(loaded.likelihood_weight[...]) == weight
  _, held_out = preferences.load_preference_pairs(config.data, config.seed)
  tok = load_tokenizer(run)
  rows = preferences.encode_pairs(tok, held_out[:8], config.data.seq_len)
  batch = {k: jax.device_put(v) for k, v in rows.items()}
  trained = np.asarray(reward.pair_rewards(result.model, batch))
  np.testing.assert_allclose(np.asarray(reward.pair_rewards(loaded, batch)), trained, atol=1e-5)
  assert evaluate_reward_accuracy(run)['accuracy'] == pytest.approx(
      read_metrics(run)[-1]['eval_accuracy'], abs=1e-6)
  # PPO's scorer: the same chosen responses given as prompt and completion token lists.
  from data import chat
  prompts, completions = [], []
  for pair in held_out[:8]:
    ids, _ = chat.encode_conversation(tok, list(pair['prompt']) + [
        {'role': 'assistant', 'content': pair['chosen']}])
    n = len(chat.apply_chat_template(tok, pair['prompt'], add_generation_prompt=True))
    prompts.append(ids[:n])
    completions.append(ids[n:])
  scorer = reward.RewardScorer(run, batch_size=8, mesh=None, rules=None, dtype='float32')
  np.testing.assert_allclose(scorer(prompts, completions, length=config.data.seq_len),
                             trained[:, 0], atol=1e-4)


def test_reward_model_needs_a_model_to_start_from(tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    reward_trainer.run(tiny_config(reward_config), str(tmp_path))


def test_reward_model_learns_and_reloads(tiny_reward_run, tmp_path):
  run, config, result = tiny_reward_run
  assert result.completed and os.path.exists(os.path.join(run, reward.REWARD_FILE))
  records = read_metrics(run)
  last = records[-1]
  assert last['step'] == config.train.steps and 'eval_perplexity' not in last
  # Held-out accuracy starts at 0.5 (zero head: every margin is 0), written as step 0;
  # measured 0.64, margin 0.081.
  assert records[0]['step'] == 0 and records[0]['eval_accuracy'] == 0.5, records[0]
  assert last['eval_accuracy'] >= 0.56 and last['eval_margin'] > 0.03, last

  # The reloaded model scores held-out pairs exactly as the trained one does.
  loaded, step = reward.load_reward_model(run)
  assert step == config.train.steps
  _, held_out = preferences.load_preference_pairs(config.data, config.seed)
  rows = preferences.encode_pairs(load_tokenizer(run), held_out[:8], config.data.seq_len)
  batch = {k: jax.device_put(v) for k, v in rows.items()}
  trained = np.asarray(reward.pair_rewards(result.model, batch))
  np.testing.assert_allclose(np.asarray(reward.pair_rewards(loaded, batch)), trained, atol=1e-5)
  assert np.abs(trained).max() > 0  # The head has moved off zero.

  # eval/reward.py scores the same 100 held-out pairs as the trainer's last eval, and
  # the same pairs given as a user's JSONL score the same.
  from eval.reward import evaluate_reward_accuracy
  result = evaluate_reward_accuracy(run)
  assert result['pairs'] == len(held_out) == 100 and result['step'] == config.train.steps
  assert result['accuracy'] == pytest.approx(last['eval_accuracy'], abs=1e-6)
  assert result['margin'] == pytest.approx(last['eval_margin'], abs=1e-4)
  path = str(tmp_path / 'held_out.jsonl')
  with open(path, 'w') as f:
    for p in held_out:
      f.write(json.dumps({k: p[k] for k in ('prompt', 'chosen', 'rejected')}) + '\n')
  from_file = evaluate_reward_accuracy(run, data=path)
  assert from_file['accuracy'] == result['accuracy'] and from_file['pairs'] == 100
  assert os.path.exists(os.path.join(run, 'eval_reward_accuracy_held_out.json'))
