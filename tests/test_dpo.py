"""DPO (trainers/dpo.py) and its preference pairs (data/preferences.py): the loss against values
worked out by hand, the pairs and their response mask, and DPO end to end from a tiny SFT run."""
import math
import os
import random
import re

import numpy as np
import pytest

from configs import dpo as dpo_config
from data import chat, preferences
from data.sft_sources import arithmetic_steps, final_answer
from data.tokenizer import load_tokenizer
from models import checkpoint
from tests.helpers import read_metrics, tiny_config
from trainers import common, dpo


def test_dpo_loss_matches_hand_worked_values():
  def loss(pc, pr, rc, rr, beta, eps=0.0):
    out = dpo.dpo_loss(np.float32(pc), np.float32(pr), np.float32(rc), np.float32(rr), beta, eps)
    return [float(x) for x in out]

  # Policy == reference: z = 0, loss = -log sigmoid(0) = log 2, whatever the smoothing.
  assert loss(-5.0, -7.0, -5.0, -7.0, 0.1) == pytest.approx([math.log(2), 0.0, 0.0])
  assert loss(-5.0, -7.0, -5.0, -7.0, 0.1, 0.3)[0] == pytest.approx(math.log(2))
  # Chosen up by 1 and rejected down by 1 against the reference: z = 2, beta * z = 1, rewards
  # +-0.5, loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262.
  assert loss(-1.0, -3.0, -2.0, -2.0, 0.5) == pytest.approx([0.313262, 0.5, -0.5], abs=1e-6)
  # Conservative DPO with eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e) = 0.413262 (as
  # log(1 + e) = 1 + log(1 + e^-1)).
  assert loss(-1.0, -3.0, -2.0, -2.0, 0.5, 0.1)[0] == pytest.approx(0.413262, abs=1e-6)
  # The rejected one preferred: beta * z = -1, loss = log(1 + e) = 1.313262.
  assert loss(-3.0, -1.0, -2.0, -2.0, 0.5)[0] == pytest.approx(1.313262, abs=1e-6)


def _family(loss_type, pc, pr, rc, rr, n_c, n_r, **cfg):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(dict(beta=0.5, label_smoothing=0.0, rpo_alpha=1.0,
                                            simpo_gamma=0.5, orpo_lambda=0.1), **cfg))
  out = dpo.preference_loss(loss_type, *map(np.float32, (pc, pr, rc, rr, n_c, n_r)), cfg)
  return [float(x) for x in out]


def test_every_loss_type_matches_hand_worked_values():
  # The pair of the DPO test: summed log-probs chosen -1 (4 tokens), rejected -3 (2 tokens),
  # reference -2 and -2; beta = 0.5, so beta * z = 1.
  pair = (-1.0, -3.0, -2.0, -2.0, 4, 2)
  sigmoid = math.log1p(math.exp(-1))  # 0.313262
  assert _family('sigmoid', *pair)[0] == pytest.approx(sigmoid, abs=1e-6)
  # robust, eps = 0.1: (0.9 * log(1 + e^-1) - 0.1 * log(1 + e)) / 0.8 = 0.188262.
  assert _family('robust', *pair, label_smoothing=0.1)[0] == pytest.approx(0.188262, abs=1e-6)
  # hinge: max(0, 1 - beta z) = 0 at beta z = 1, and 0.5 at beta = 0.25.
  assert _family('hinge', *pair)[0] == pytest.approx(0.0)
  assert _family('hinge', *pair, beta=0.25)[0] == pytest.approx(0.5)
  # ipo: (z - 1 / (2 beta))^2 = (2 - 1)^2 = 1; at the target margin z = 1 / (2 beta) it is 0.
  assert _family('ipo', *pair)[0] == pytest.approx(1.0)
  assert _family('ipo', -1.0, -3.0, -2.0, -2.0, 4, 2, beta=0.25)[0] == pytest.approx(0.0)
  # rpo: sigmoid + alpha * (chosen NLL per token = 1 / 4).
  loss, _, _, nll = _family('rpo', *pair)
  assert (loss, nll) == pytest.approx((sigmoid + 0.25, 0.25), abs=1e-6)
  # simpo (no reference), beta = 2: 2 * (-1/4 - (-3/2)) - 0.5 = 2, loss log(1 + e^-2) = 0.126928;
  # the reference log-probs change nothing.
  simpo = _family('simpo', *pair, beta=2.0)
  assert simpo[:3] == pytest.approx([0.126928, -0.5, -3.0], abs=1e-6)
  assert _family('simpo', -1.0, -3.0, 9.0, -9.0, 4, 2, beta=2.0) == simpo
  # orpo: log odds(m) = m - log(1 - e^m): 1.258692 (m = -1/4) and -1.247518 (m = -3/2);
  # loss = NLL 0.25 + 0.1 * log(1 + e^-(1.258692 + 1.247518)) = 0.257842.
  orpo = _family('orpo', *pair)
  assert orpo == pytest.approx([0.257842, 1.258692, -1.247518, 0.25], abs=1e-5)
  # The preferred response losing the margin costs more, for every type.
  for kind in dpo.LOSS_TYPES:
    assert _family(kind, -3.0, -1.0, -2.0, -2.0, 2, 4)[0] > _family(kind, *pair)[0], kind


def test_bad_dpo_settings_are_named():
  c = dpo_config.get_config('tiny')
  c.dpo.loss_type = 'kto'
  with pytest.raises(ValueError, match="dpo.loss_type='kto'"):
    dpo.make_loss(c.dpo)
  c.dpo.loss_type, c.dpo.label_smoothing = 'robust', 0.5
  with pytest.raises(ValueError, match='must be in'):
    dpo.make_loss(c.dpo)
  c.dpo.loss_type, c.dpo.label_smoothing = 'simpo', 0.1
  with pytest.raises(ValueError, match='applies to sigmoid'):
    dpo.make_loss(c.dpo)


def _is_worked_out(steps: list[str]) -> bool:
  """Every step follows from the one before by one correct operation."""
  return all(arithmetic_steps(a)[1] == b for a, b in zip(steps, steps[1:]))


def test_corrupted_solutions_are_wrong_at_one_place():
  solution = '0 - 6 + 10\n= -6 + 10\n= 4\n#### 4'
  rng = random.Random(0)
  seen = set()
  for _ in range(60):
    wrong = preferences.corrupt_solution(solution, rng)
    lines = wrong.split('\n')
    assert lines[0] == '0 - 6 + 10' and final_answer(wrong) != '4', wrong
    if lines[1] != '= -6 + 10':
      seen.add('step')  # A slip in the first operation, carried through correctly.
      assert _is_worked_out([line.removeprefix('= ') for line in lines[1:-1]]), wrong
    elif lines[2] != '= 4':
      seen.add('last step')
    else:
      seen.add('answer')  # Working right, final answer not its result.
      assert lines[3] != '#### 4', wrong
  assert seen == {'step', 'last step', 'answer'}
  assert preferences.corrupt_solution(solution, random.Random(3)) == \
      preferences.corrupt_solution(solution, random.Random(3))


def test_preference_pairs_hold_out_whole_problems():
  config = tiny_config(dpo_config)
  train, held_out = preferences.load_preference_pairs(config.data, config.seed)
  assert len(held_out) >= 90 and len(train) > 1000
  train_prompts = {p['prompt'][0]['content'] for p in train}
  assert not any(p['prompt'][0]['content'] in train_prompts for p in held_out)
  for p in train[:50]:
    assert final_answer(p['chosen']) == p['answer'] != final_answer(p['rejected'])


def test_pair_rows_mask_exactly_the_responses(tiny_sft_workdir):
  tokenizer = load_tokenizer(tiny_sft_workdir)
  pair = {'prompt': [{'role': 'user', 'content': 'Calculate 1 + 2.'}],
          'chosen': '1 + 2\n= 3\n#### 3', 'rejected': '1 + 2\n= 4\n#### 4', 'answer': '3'}
  rows = preferences.encode_pairs(tokenizer, [pair], 64)
  assert rows['inputs'].shape == (1, 2, 64)
  end = chat.end_of_turn_id(tokenizer)
  for side, response in enumerate((pair['chosen'], pair['rejected'])):
    mask = rows['loss_mask'][0, side] > 0
    # The predicted tokens under the mask are the response and its end of turn, nothing else.
    assert rows['targets'][0, side][mask].tolist() == tokenizer.encode(response) + [end]
    prompt = chat.apply_chat_template(tokenizer, pair['prompt'], add_generation_prompt=True)
    assert not mask[:len(prompt) - 1].any() and mask[len(prompt) - 1]
  with pytest.raises(ValueError, match='data.seq_len'):
    preferences.encode_pairs(tokenizer, [pair], 8)


def _write_jsonl(path, records):
  import json
  with open(path, 'w') as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records)
  return str(path)


def test_users_preference_jsonl_in_trls_formats(tiny_sft_workdir, tmp_path):
  tokenizer = load_tokenizer(tiny_sft_workdir)
  end = chat.end_of_turn_id(tokenizer)
  user = lambda text: {'role': 'user', 'content': text}
  bot = lambda text: {'role': 'assistant', 'content': text}
  history = [user('What is 2 + 2?'), bot('4'), user('And 2 + 3?')]
  records = [
      {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'},  # standard
      {'prompt': [user('Say hi')], 'chosen': 'hi', 'rejected': 'no'},  # prompt as messages
      {'prompt': history, 'chosen': [bot('5')], 'rejected': [bot('6')]},  # conversational
      {'chosen': history + [bot('5')], 'rejected': history + [bot('7')]},  # implicit prompt
  ]
  path = _write_jsonl(tmp_path / 'prefs.jsonl', records)
  config = dpo_config.get_config('tiny')
  config.data.source, config.data.eval_fraction = path, 0.25
  train, held_out = preferences.load_preference_pairs(config.data, seed=0)
  assert len(train) == 3 and len(held_out) == 1
  pairs = preferences.jsonl_pairs(path)
  assert pairs[3]['prompt'] == history and pairs[3]['rejected'] == [bot('7')]
  rows = preferences.encode_pairs(tokenizer, pairs, 64)
  masked = lambda i, side: rows['targets'][i, side][rows['loss_mask'][i, side] > 0].tolist()
  # Exactly the response is trained on: plain text ends with EOS, a chat turn with its end of
  # turn; the assistant turn inside the history is context, never part of the response.
  assert masked(0, 0) == tokenizer.encode(' blue.') + [tokenizer.eos_id]
  assert rows['inputs'][0, 0, 0] == tokenizer.bos_id  # add_bos, as for any plain prompt
  assert masked(1, 1) == tokenizer.encode('no') + [end]
  for i in (2, 3):
    assert masked(i, 0) == tokenizer.encode('5') + [end]
  assert masked(3, 1) == tokenizer.encode('7') + [end]
  # Built-in pairs and a JSONL mix with '+'.
  config.data.source = 'basic_arithmetic'
  built_in, _ = preferences.load_preference_pairs(config.data, seed=0)
  config.data.source = f'basic_arithmetic+{path}'
  mixed, _ = preferences.load_preference_pairs(config.data, seed=0)
  assert len(mixed) == len(built_in) + 3 and pairs[0] in mixed + held_out


@pytest.mark.parametrize('record, words', [
    ('{"prompt": "x", "chosen": "a"', 'line 2: not valid JSON'),
    ({'prompt': 'x', 'chosen': 'a'}, 'expected an object with "chosen" and "rejected"'),
    ({'prompt': 'x', 'chosen': 'a', 'rejected': ''}, '"rejected" must be a non-empty string'),
    ({'chosen': 'a', 'rejected': 'b'}, '"prompt" is missing'),
    ({'prompt': 'x', 'chosen': 'a', 'rejected': 'a'}, 'are the same response'),
    ({'prompt': [{'role': 'user', 'content': 'x'}], 'chosen': [{'role': 'user', 'content': 'a'}],
      'rejected': [{'role': 'assistant', 'content': 'b'}]}, '"chosen": a response holds assistant'),
    ({'chosen': [{'role': 'assistant', 'content': 'a'}],
      'rejected': [{'role': 'assistant', 'content': 'b'}]}, 'share no leading turn'),
    ({'prompt': [{'role': 'robot', 'content': 'x'}], 'chosen': 'a', 'rejected': 'b'},
     '"prompt"[0]: expected'),
])
def test_bad_preference_lines_are_named(tmp_path, record, words):
  good = {'prompt': 'x', 'chosen': 'a', 'rejected': 'b'}
  path = _write_jsonl(tmp_path / 'bad.jsonl', [good, record])
  with pytest.raises(ValueError, match=re.escape(words)) as e:
    preferences.jsonl_pairs(path)
  assert 'bad.jsonl:2' in str(e.value) or 'bad.jsonl, line 2' in str(e.value), e.value


def test_dpo_needs_a_model_to_start_from(tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    dpo.run(tiny_config(dpo_config), str(tmp_path))


def _held_out_logp_margin(workdir, config):
  """Mean log pi(chosen) - log pi(rejected) over the held-out pairs."""
  tokenizer = load_tokenizer(workdir)
  _, held_out = preferences.load_preference_pairs(config.data, config.seed)
  rows = preferences.encode_pairs(tokenizer, held_out, config.data.seq_len)
  model, _ = checkpoint.load_model(workdir, dtype='float32')
  logps = dpo.reference_logps(model, rows, batch_size=config.train.batch_size,
                              mesh=common.mesh_from_config(config), rules=config.sharding_rules)
  return float((logps[:, 0] - logps[:, 1]).mean())


def test_dpo_prefers_correct_solutions_on_held_out_pairs(tiny_sft_workdir, tmp_path):
  run = str(tmp_path / 'dpo')
  config = tiny_config(dpo_config, init_from=tiny_sft_workdir)
  result = dpo.run(config, run)
  assert result.completed
  for name in ('config.json', 'model.json', 'tokenizer.model', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(run, name)), name
  assert os.path.isdir(os.path.join(run, 'checkpoints', str(config.train.steps)))
  records = read_metrics(run)
  assert all('step' in r and 'loss' in r and 'reward_accuracy' in r for r in records)
  last = records[-1]
  assert last['step'] == config.train.steps
  # Held-out reward accuracy starts at 0.5 (policy == reference: every margin is 0).
  assert last['eval_reward_accuracy'] >= 0.58 and last['eval_reward_margin'] > 0.03, last
  assert last['eval_chosen_reward'] > last['eval_rejected_reward']
  assert 'eval_perplexity' not in last  # A pair loss has no perplexity.
  before = _held_out_logp_margin(tiny_sft_workdir, config)
  after = _held_out_logp_margin(run, config)
  assert after > before + 0.3, (before, after)


def test_dpo_resumes_exactly(tiny_sft_workdir, tmp_path):
  # The reference log-probs are recomputed on a resumed start: they must come out the same.
  short = {'init_from': tiny_sft_workdir, 'data.num_examples': 300, 'train.steps': 12,
           'train.log_every': 4, 'train.eval_every': 0}
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  dpo.run(tiny_config(dpo_config, **short), whole)
  assert not dpo.run(tiny_config(dpo_config, **short, **{'train.stop_after': 6}), split).completed
  assert dpo.run(tiny_config(dpo_config, **short), split).completed
  by_step = lambda workdir: {r['step']: r['loss'] for r in read_metrics(workdir)}
  assert by_step(split)[12] == by_step(whole)[12]


@pytest.mark.parametrize('loss_type, beta', [('simpo', 2.0), ('orpo', 0.1)])
def test_reference_free_losses_train_without_a_reference_pass(tiny_sft_workdir, tmp_path,
                                                                monkeypatch, loss_type, beta):
  def no_reference(*args, **kwargs):
    raise AssertionError('simpo and orpo must not run the reference model')
  monkeypatch.setattr(dpo, 'reference_logps', no_reference)
  run = str(tmp_path / loss_type)
  config = tiny_config(dpo_config, init_from=tiny_sft_workdir, **{
      'dpo.loss_type': loss_type, 'dpo.beta': beta, 'train.steps': 40, 'train.eval_every': 40})
  assert dpo.run(config, run).completed
  last = read_metrics(run)[-1]  # Held out: the pairs' margin under the loss's own reward.
  assert last['eval_reward_accuracy'] > 0.6 and last['eval_reward_margin'] > 0, last
  monkeypatch.undo()
  before = _held_out_logp_margin(tiny_sft_workdir, config)
  assert _held_out_logp_margin(run, config) > before + 0.3
