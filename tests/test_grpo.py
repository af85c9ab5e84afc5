"""GRPO end to end on `tiny` (trainers/grpo.py over trainers/rl.py): trainer and engine agree on
log-probs, the engine never recompiles, rewards rise, LoRA leaves the base untouched, a resumed
run equals an uninterrupted one, and bad input fails before anything is written."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import grpo as grpo_config
from data import prompts as prompt_sources
from data.tokenizer import load_tokenizer
from models import checkpoint
from tests.helpers import read_metrics, tiny_config
from trainers import common, grpo, rl

# A reward any policy can climb quickly: the number of 7s it writes.
SEVENS = os.path.join(os.path.dirname(__file__), 'rewards_for_tests.py')


def _config(sft_dir, **overrides):
  return tiny_config(grpo_config, init_from=sft_dir, **overrides)


def _policy_and_rollouts(sft_dir, config, lora_rank=0):
  tokenizer = load_tokenizer(sft_dir)
  train, held_out = prompt_sources.load_prompts(config.data, config.seed)
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  model = common.load_init_from(config, model_cfg, mesh)
  spec = None
  if lora_rank:
    from models import lora
    spec = lora.LoraSpec(base=sft_dir, rank=lora_rank, alpha=2.0 * lora_rank,
                         target=config.lora.target)
    model = lora.apply_lora(model, spec, seed=1)
  policy = rl.Policy(model, spec, chunk=8)
  rollouts = rl.Rollouts(config, policy, tokenizer, train, held_out, group_size=4, mesh=mesh,
                         rules=config.sharding_rules)
  return policy, rollouts, mesh


@pytest.mark.parametrize('lora_rank', [0, 4])
def test_trainer_log_probs_equal_the_engines_and_new_weights_do_not_recompile(
    tiny_sft_workdir, lora_rank):
  config = _config(tiny_sft_workdir)
  policy, rollouts, mesh = _policy_and_rollouts(tiny_sft_workdir, config, lora_rank)
  params = policy.initial_params
  if lora_rank:  # Adapters that are not zero, so the merged weights differ from the base.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(0), p.shape),
                          params)
  steps = (rollouts.engine._prefill, *rollouts.engine._generate.values())
  for seed in (0, 1):
    groups = rollouts.generate(policy.engine_params(params), [0, 1, 2, 3], n=4, seed=seed)
    if seed == 0:
      sizes = [f._cache_size() for f in steps]
      # A changed policy: the same compiled functions must serve it.
      params = jax.tree.map(lambda p: p * 1.01, params)
  assert [f._cache_size() for f in steps] == sizes
  rows = rollouts.rows(groups)
  logp, entropy = policy.logprobs(params, rows, batch_size=16, mesh=mesh,
                                  rules=config.sharding_rules)
  mask = rows['mask'] > 0
  assert mask.sum() > 16 and np.all(entropy[mask] >= 0)
  np.testing.assert_allclose(logp[mask], rows['engine_logp'][mask], atol=1e-4)
  # Nothing is off-policy, so every importance weight is 1.
  weights, capped = rl.importance_weights(logp, rows['engine_logp'], rows['mask'], level='token',
                                          mode='truncate', cap=2.0)
  np.testing.assert_allclose(weights[mask], 1.0, atol=1e-4)
  assert capped == 0.0
  stats = rl.mismatch_stats(logp, rows['engine_logp'], rows['mask'])
  assert stats['mismatch_abs_max'] < 1e-4


def test_grpo_raises_the_reward_and_writes_the_workdir(tiny_sft_workdir, tmp_path):
  run = str(tmp_path / 'grpo')
  config = _config(tiny_sft_workdir, **{
      'train.steps': 20, 'train.eval_every': 10, 'rl.rewards': (f'{SEVENS}:sevens',),
      'rl.reward_weights': (1.0,), 'optimizer.learning_rate': 3e-4})
  result = grpo.run(config, run)
  assert result.completed
  for name in ('config.json', 'model.json', 'tokenizer.model', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(run, name)), name
  assert os.path.isdir(os.path.join(run, 'checkpoints', '20'))
  records = read_metrics(run)
  assert records[0]['step'] == 0 and 'eval_accuracy' in records[0]  # The starting point.
  steps = [r for r in records if r['step'] > 0]
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'reward_mean', 'reward_std', 'accuracy',
              'format_rate', 'kl', 'completion_len', 'completion_len_max', 'truncation_rate',
              'clip_low', 'clip_high', 'entropy', 'ratio_mean', 'mismatch_abs_max',
              'mismatch_seq_ratio_mean', 'time_generate_s', 'time_logprobs_s', 'time_update_s',
              'rollout_tokens_per_s'):
    assert all(key in r for r in steps), key
  first = np.mean([r['reward_mean'] for r in steps[:5]])
  last = np.mean([r['reward_mean'] for r in steps[-5:]])
  assert last > first + 0.5, (first, last)
  assert steps[-1]['kl'] > 0 and steps[-1]['mismatch_abs_max'] < 1e-3
  # eval.accuracy reads a GRPO workdir like an SFT one.
  from eval.accuracy import evaluate_accuracy
  assert 0 <= evaluate_accuracy(run, num_problems=8)['accuracy'] <= 1


def test_lora_grpo_trains_adapters_only_and_leaves_the_base_bit_identical(tiny_sft_workdir,
                                                                           tmp_path):
  run = str(tmp_path / 'lora_grpo')
  config = _config(tiny_sft_workdir, **{
      'train.steps': 4, 'train.eval_every': 0, 'lora.rank': 4, 'lora.alpha': 8.0,
      'optimizer.learning_rate': 1e-2})
  result = grpo.run(config, run)
  base, _ = checkpoint.load_model(tiny_sft_workdir, dtype='float32')
  trained_base = nnx.state(result.model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  for a, b in zip(jax.tree.leaves(nnx.state(base)), jax.tree.leaves(trained_base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  adapters = nnx.state(result.model, nnx.LoRAParam)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))
  merged, step = checkpoint.load_model(run, dtype='float32')  # base + adapters, merged
  assert step == 4
  diffs = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(nnx.state(base)), jax.tree.leaves(nnx.state(merged)))]
  assert max(diffs) > 0
  records = read_metrics(run)
  # The engine ran the merged weights of every step: its log-probs are the LoRA model's.
  assert all(r['mismatch_abs_max'] < 1e-3 for r in records)


_TIMING = ('time_', 'tokens_per_s', 'generate_fraction')


def test_a_resumed_run_logs_what_an_uninterrupted_one_does(tiny_sft_workdir, tmp_path, capsys):
  # Stopped at step 4 with checkpoints 2 and 4, and then step 4's files truncated (a half-copied
  # checkpoint): the rerun skips it, resumes from step 2 and still logs the uninterrupted run.
  kw = {'train.steps': 6, 'train.eval_every': 3, 'train.checkpoint_every': 2}
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  grpo.run(_config(tiny_sft_workdir, **kw), whole)
  assert not grpo.run(_config(tiny_sft_workdir, **kw, **{'train.stop_after': 4}), split).completed
  for path in glob.glob(os.path.join(split, 'checkpoints', '4', 'params', '**', 'd', '*'),
                        recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(100)
  capsys.readouterr()
  assert grpo.run(_config(tiny_sft_workdir, **kw), split).completed
  out = capsys.readouterr().out
  assert 'Skipping checkpoint' in out and f'Resumed from {split}/checkpoints/2.' in out
  strip = lambda rs: [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)}
                      for r in rs]
  assert strip(read_metrics(split)) == strip(read_metrics(whole))
  with open(os.path.join(split, 'config.json')) as f:
    assert json.load(f)['grpo']['loss_type'] == 'grpo'


def test_dapo_with_dynamic_sampling_and_overlong_handling_runs(tiny_sft_workdir, tmp_path):
  config = _config(tiny_sft_workdir, **{
      'train.steps': 2, 'train.eval_every': 0, 'grpo.loss_type': 'dapo',
      'grpo.epsilon_high': 0.28, 'grpo.dynamic_sampling': True, 'grpo.max_draws': 2,
      'rl.overlong': 'soft', 'rl.overlong_buffer': 8, 'rl.is_level': 'sequence',
      'rl.updates_per_batch': 2, 'rl.minibatches': 2})
  assert grpo.run(config, str(tmp_path / 'dapo')).completed
  records = [r for r in read_metrics(str(tmp_path / 'dapo')) if r['step'] > 0]
  assert all(1 <= r['draws'] <= 2 and 0 <= r['groups_kept_fraction'] <= 1 for r in records)


def _write_jsonl(path, records):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return str(path)


@pytest.mark.parametrize('overrides, match', [
    ({'rl.rewards': ('no_such_module:fn',), 'rl.reward_weights': (1.0,)}, 'no_such_module'),
    ({'rl.rewards': (f'{SEVENS}:missing',), 'rl.reward_weights': (1.0,)}, 'no function'),
    ({'grpo.num_generations': 1, 'train.batch_size': 8}, 'num_generations'),
    ({'rl.max_prompt_tokens': 8}, 'max_prompt_tokens'),
    ({'rl.max_completion_tokens': 600}, 'max_seq_len'),
    ({'grpo.loss_type': 'ppo'}, 'loss_type'),
    ({'train.batch_size': 30}, 'multiple of the group size'),
])
def test_bad_input_fails_before_anything_is_written(tiny_sft_workdir, tmp_path, overrides, match):
  run = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    grpo.run(_config(tiny_sft_workdir, **overrides), str(run))
  assert not run.exists()


def test_prompts_without_answers_are_refused_for_the_verifier(tiny_sft_workdir, tmp_path):
  data = _write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'What is 2 + 2?'},
                                             {'prompt': 'And 3 + 3?', 'answer': 6}])
  with pytest.raises(ValueError, match='answer'):
    grpo.run(_config(tiny_sft_workdir, **{'data.source': data}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_jsonl_prompt_sources_are_validated_line_by_line(tmp_path):
  good = _write_jsonl(tmp_path / 'good.jsonl', [
      {'prompt': 'What is 2 + 2?', 'answer': 4},
      {'prompt': [{'role': 'user', 'content': 'And 3 + 3?'}], 'answer': '6'},
      {'messages': [{'role': 'user', 'content': 'And 1 + 1?'},
                    {'role': 'assistant', 'content': '2'}], 'answer': '2'}])
  examples = prompt_sources.jsonl_prompts(good)
  assert [e['answer'] for e in examples] == ['4', '6', '2']
  assert examples[2]['prompt'] == [{'role': 'user', 'content': 'And 1 + 1?'}]
  bad = _write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'ok', 'answer': 1},
                                              {'prompt': [{'role': 'robot', 'content': 'x'}]}])
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    prompt_sources.jsonl_prompts(bad)
  with pytest.raises(ValueError, match='bad2.jsonl:1.*answer'):
    prompt_sources.jsonl_prompts(_write_jsonl(tmp_path / 'bad2.jsonl',
                                              [{'prompt': 'x', 'answer': [1]}]))


def test_qlora_grpo_runs_over_an_nf4_base(tiny_sft_workdir, tmp_path):
  run = str(tmp_path / 'qlora_grpo')
  config = _config(tiny_sft_workdir, **{
      'train.steps': 2, 'train.eval_every': 0, 'lora.rank': 4, 'lora.alpha': 8.0,
      'lora.weight_qtype': 'nf4', 'lora.tile_size': 32})
  assert grpo.run(config, run).completed
  records = [r for r in read_metrics(run) if r['step'] > 0]
  # The engine runs the dequantized base + adapters the trainer computes with.
  assert all(r['mismatch_abs_max'] < 1e-2 for r in records), records


def test_eval_accuracy_samples_and_scores_a_user_jsonl(tiny_sft_workdir, tmp_path):
  from eval.accuracy import evaluate_accuracy, majority_answer
  assert majority_answer(['3', '4', '3.0', None, '4']) == '3'  # 3 and 3.0 count together; a
  assert majority_answer([None, 'x']) == 'x'                   # tie goes to the first reached
  assert majority_answer([None]) is None
  data = _write_jsonl(tmp_path / 'mine.jsonl', [
      {'messages': [{'role': 'user', 'content': f'Calculate {a} + {b} - 1.'}], 'answer': a + b - 1}
      for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]])
  out = evaluate_accuracy(tiny_sft_workdir, data=data, samples=4, temperature=1.0)
  assert out['problems'] == 4 and out['source'] == data
  assert 0 <= out['sample_accuracy'] <= out['pass@4'] <= 1 and 0 <= out['maj@4'] <= 1
  assert 'eval_loss' not in out  # a prompt set has no reference conversations
  assert os.path.exists(os.path.join(tiny_sft_workdir, 'eval_accuracy_mine.json'))
  with pytest.raises(ValueError, match='no "answer"'):
    evaluate_accuracy(tiny_sft_workdir, data=_write_jsonl(tmp_path / 'bare.jsonl',
                                                          [{'prompt': 'hi'}]))
