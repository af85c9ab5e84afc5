"""LoRA for every stage (trainers/lora.py): on the reward model, DPO and PPO only the adapters (and
a reward model's scalar head) are in the optimizer and the checkpoint, the base stays
bit-identical, the readers' merged model equals the adapter model, and the reference of DPO and
PPO is the base itself. configs/lora.py:STAGE.PRESET gives any stage adapters."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import dpo as dpo_config, lora as lora_config, ppo as ppo_config, qlora as qlora_config
from configs import reward as reward_config
from data import preferences
from data.tokenizer import load_tokenizer
from models import checkpoint, reward
from tests.helpers import read_metrics, tiny_config
from trainers import dpo, lora as adapters, ppo, reward as reward_trainer, sft

FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a kind of Param.


def _saved_leaves(workdir: str, item: str = 'params') -> list[str]:
  step_dir = os.path.join(workdir, 'checkpoints', str(checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'), async_save=False).latest_step()))
  meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, item))
  tree = getattr(meta, 'item_metadata', meta)
  return ['/'.join(str(getattr(k, 'key', k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _assert_base_untouched(model, sft_dir):
  base, _ = checkpoint.load_model(sft_dir, dtype='float32')
  base_params = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  trained = dict(nnx.to_flat_state(nnx.state(model, FROZEN)))
  assert base_params.keys() == trained.keys()
  for path, var in base_params.items():
    assert np.array_equal(var[...], trained[path][...]), path


def test_lora_reward_model_trains_adapters_and_head_only(tiny_sft_workdir, tmp_path):
  workdir = str(tmp_path / 'rm')
  config = tiny_config(reward_config, init_from=tiny_sft_workdir, **{
      'train.steps': 20, 'train.eval_every': 0, 'train.eval_batches': 1, 'lora.rank': 4,
      'lora.alpha': 8.0, 'optimizer.learning_rate': 3e-3})
  result = reward_trainer.run(config, workdir)
  leaves = _saved_leaves(workdir)
  assert leaves and all('lora' in p or p.startswith('head/') for p in leaves), leaves
  assert any(p.startswith('head/') for p in leaves)
  # Adam's moments exist for exactly those: no frozen backbone weight has any.
  moments = [p for p in _saved_leaves(workdir, 'opt_state') if 'backbone' in p or 'head' in p]
  assert moments and all('lora' in p for p in moments if 'backbone' in p), moments
  _assert_base_untouched(result.model.backbone, tiny_sft_workdir)
  # The reader merges the adapters into the backbone and keeps the head: the same rewards.
  loaded, _ = reward.load_reward_model(workdir, dtype='float32')
  assert not jax.tree.leaves(nnx.state(loaded, nnx.LoRAParam))
  _, held_out = preferences.load_preference_pairs(config.data, config.seed)
  rows = preferences.encode_pairs(load_tokenizer(workdir), held_out[:8], config.data.seq_len)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  trained = np.asarray(reward.pair_rewards(result.model, batch))
  assert np.abs(trained).max() > 0
  np.testing.assert_allclose(np.asarray(reward.pair_rewards(loaded, batch)), trained, atol=1e-5)


def test_lora_dpo_starts_at_the_reference_and_saves_adapters_only(tiny_sft_workdir, tmp_path):
  workdir = str(tmp_path / 'dpo')
  config = tiny_config(dpo_config, init_from=tiny_sft_workdir, **{
      'train.steps': 10, 'train.log_every': 1, 'train.eval_every': 0, 'train.eval_batches': 1,
      'lora.rank': 4, 'lora.alpha': 8.0, 'optimizer.learning_rate': 3e-3})
  result = dpo.run(config, workdir)
  first = read_metrics(workdir)[0]
  # The adapted policy at step 0 is the base, which is the reference: every margin is 0.
  assert first['loss'] == pytest.approx(np.log(2.0), abs=1e-5), first
  leaves = _saved_leaves(workdir)
  assert leaves and all('lora' in p for p in leaves), leaves
  _assert_base_untouched(result.model, tiny_sft_workdir)
  merged, _ = checkpoint.load_model(workdir, dtype='float32')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 24)), jnp.int32)
  np.testing.assert_allclose(merged(tokens), result.model(tokens), atol=1e-5, rtol=1e-5)
  assert not np.allclose(merged(tokens), checkpoint.load_model(tiny_sft_workdir,
                                                               dtype='float32')[0](tokens))


def test_lora_ppo_trains_policy_adapters_beside_a_full_critic(tiny_sft_workdir, tiny_reward_run,
                                                              tmp_path):
  workdir = str(tmp_path / 'ppo')
  config = tiny_config(ppo_config, init_from=tiny_sft_workdir, **{
      'ppo.reward_model': tiny_reward_run[0], 'train.steps': 2, 'train.eval_every': 0,
      'lora.rank': 4, 'lora.alpha': 8.0, 'optimizer.learning_rate': 3e-3})
  result = ppo.run(config, workdir)
  assert read_metrics(workdir)[0]['kl'] == pytest.approx(0.0, abs=1e-6)  # reference = base
  leaves = _saved_leaves(workdir)
  assert leaves and all('lora' in p for p in leaves), leaves
  assert not any('lora' in p for p in _saved_leaves(workdir, 'critic'))
  _assert_base_untouched(result.model, tiny_sft_workdir)
  merged, _ = checkpoint.load_model(workdir, dtype='float32')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 24)), jnp.int32)
  np.testing.assert_allclose(merged(tokens), result.model(tokens), atol=1e-5, rtol=1e-5)


def test_lora_configs_give_every_stage_adapters():
  for stage, block in (('reward', 'reward'), ('dpo', 'dpo'), ('grpo', 'grpo'), ('ppo', 'ppo')):
    c = lora_config.get_config(f'{stage}.tiny')
    assert block in c and c.lora.rank == 16 and c.lora.alpha == 32.0
    assert adapters.stage_of(c).__name__ == f'trainers.{stage}'
  q = qlora_config.get_config('dpo.tiny')
  assert q.lora.weight_qtype == 'nf4' and q.lora.tile_size == 32
  assert adapters.stage_of(lora_config.get_config('tiny')) is sft
  assert lora_config.get_config('grpo.small').lora.rank == 4  # The preset's own rank is kept.
  with pytest.raises(ValueError, match='unknown stage'):
    lora_config.get_config('pretrain.tiny')
  with pytest.raises(ValueError, match='lora.rank > 0'):
    adapters.run(tiny_config(dpo_config), '/nonexistent')
