"""The chat template and the SFT loss mask, token by token: exactly the assistant turns (content and
end-of-turn token) count; system, user, headers and padding never do, also once packed."""
import json

import pytest

from data import chat, sft_sources
from data.tokenizer import train_tokenizer

CONVERSATION = [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'What is 2 + 3?'},
    {'role': 'assistant', 'content': '2 + 3\n= 5\n#### 5'},
    {'role': 'user', 'content': 'And 4 - 1?'},
    {'role': 'assistant', 'content': '3'},
]


@pytest.fixture(scope='module')
def tokenizer():
  docs = [' '.join(m['content'] for m in e['messages'])
          for e in sft_sources.chatterbot_conversations()]
  return train_tokenizer(docs, vocab_size=400)


def _turn(tok, role, text):
  return [tok.token_id('<|im_start|>'), tok.token_id(f'<|{role}|>')] + tok.encode(text) + [
      tok.token_id('<|im_end|>')]


def test_mask_covers_exactly_the_assistant_turns(tokenizer):
  tok = tokenizer
  ids, mask = chat.encode_conversation(tok, CONVERSATION)
  expected_ids, expected_mask = [tok.bos_id], [0]
  for m in CONVERSATION:
    turn = _turn(tok, m['role'], m['content'])
    expected_ids += turn
    # Header tokens (im_start, role) never count; the content and im_end count for the assistant.
    expected_mask += [0, 0] + [int(m['role'] == 'assistant')] * (len(turn) - 2)
  assert ids == expected_ids
  assert mask == expected_mask
  masked = [t for t, k in zip(ids, mask) if k]
  assert masked == (tok.encode('2 + 3\n= 5\n#### 5') + [tok.token_id('<|im_end|>')] +
                    tok.encode('3') + [tok.token_id('<|im_end|>')])


def test_the_one_pass_encoding_equals_the_prefix_renders(tokenizer):
  """encode_conversation's one pass over our ChatML turns gives exactly what locating each
  assistant turn by rendering prefixes gives (the path for any tokenizer's own template)."""
  for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:4] + [
      {'role': 'assistant', 'content': ''}], [{'role': 'assistant', 'content': 'only me'}]):
    assert chat.encode_conversation(tokenizer, messages) == chat._encode_by_prefixes(
        tokenizer, messages)


def test_generation_prompt_is_the_prefix_of_the_assistant_turn(tokenizer):
  tok = tokenizer
  prompt = chat.apply_chat_template(tok, CONVERSATION[:2])
  ids, mask = chat.encode_conversation(tok, CONVERSATION)
  assert prompt == ids[:len(prompt)]
  assert prompt[-2:] == [tok.token_id('<|im_start|>'), tok.token_id('<|assistant|>')]
  assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1  # The answer starts right after.
  assert chat.end_of_turn_id(tok) == tok.token_id('<|im_end|>')


def test_packed_rows_keep_the_mask_and_conversations_apart(tokenizer):
  tok = tokenizer
  examples = [chat.encode_conversation(tok, CONVERSATION),
              chat.encode_conversation(tok, [{'role': 'user', 'content': 'Hi'},
                                             {'role': 'assistant', 'content': 'Hello there'}]),
              chat.encode_conversation(tok, [{'role': 'user', 'content': 'Bye now'},
                                             {'role': 'assistant', 'content': 'Bye'}])]
  lengths = [len(ids) for ids, _ in examples]
  seq_len = lengths[0] - 1 + lengths[1] - 1 + 3  # The first two fit one row, the third does not.
  rows = chat.pack_conversations(examples, seq_len, pad_id=tok.pad_id)
  assert rows['inputs'].shape == (2, seq_len)
  placed = [(0, 1), (0, 2), (1, 1)]  # (row, segment) of each conversation, in order.
  for (ids, mask), (r, seg) in zip(examples, placed):
    where = rows['segment_ids'][r] == seg
    assert rows['inputs'][r][where].tolist() == ids[:-1]
    assert rows['targets'][r][where].tolist() == ids[1:]
    # The loss mask of slot t is the mask of the token it predicts (targets[t] = ids[t + 1]).
    assert rows['loss_mask'][r][where].tolist() == mask[1:]
    assert rows['positions'][r][where].tolist() == list(range(len(ids) - 1))
  padding = rows['segment_ids'] == 0
  assert padding.sum() == 2 * seq_len - sum(lengths) + 3
  assert (rows['loss_mask'][padding] == 0).all() and (rows['inputs'][padding] == tok.pad_id).all()
  # Every counted target is an assistant token of its own conversation: nothing crosses over.
  assert rows['loss_mask'].sum() == sum(sum(m) for _, m in examples)


class _TemplatedTokenizer:
  """A tokenizer bringing its own (Hugging Face style ChatML) template, one id per character."""
  pad_id = 0
  chat_template = 'ChatML, rendered below'

  def encode(self, text):
    return [ord(c) for c in text]

  def apply_chat_template(self, messages, add_generation_prompt=True):
    text = ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in messages)
    return self.encode(text + ('<|im_start|>assistant\n' if add_generation_prompt else ''))


def test_a_tokenizers_own_template_is_used_and_masked():
  tok = _TemplatedTokenizer()
  ids, mask = chat.encode_conversation(tok, CONVERSATION[1:3])
  text = ''.join(chr(i) for i in ids)
  assert text.startswith('<|im_start|>user\nWhat is 2 + 3?')
  assert ''.join(chr(i) for i, k in zip(ids, mask) if k) == '2 + 3\n= 5\n#### 5<|im_end|>\n'


def test_bad_messages_are_named(tmp_path):
  with pytest.raises(ValueError, match=r'messages\[1\]'):
    chat.validate_messages([{'role': 'user', 'content': 'a'}, {'role': 'bot', 'content': 'b'}])
  path = tmp_path / 'chats.jsonl'
  path.write_text(json.dumps({'messages': CONVERSATION}) + '\n{"messages": [{"role": "user"}]}\n')
  with pytest.raises(ValueError, match='chats.jsonl:2'):
    sft_sources.jsonl_conversations(str(path))


def test_arithmetic_is_rendered_step_by_step():
  assert sft_sources.arithmetic_steps('4 - 1 - 7') == ['4 - 1 - 7', '3 - 7', '-4']
  assert sft_sources.arithmetic_steps('( 56 + -33 ) - 84') == ['56 + -33 - 84', '23 - 84', '-61']
  assert sft_sources.arithmetic_steps('3 * 4 + 2 * 5') == ['3 * 4 + 2 * 5', '12 + 2 * 5',
                                                           '12 + 10', '22']
  assert sft_sources.final_answer('x\n= 1,024\n#### 1,024') == '1024'
  assert sft_sources.final_answer('no marker') is None


def test_generated_held_out_problems_are_never_trained_on():
  import ml_collections
  data = ml_collections.ConfigDict(dict(source='chain_sum', num_terms=(2, 2), num_digits=(1, 1),
                                        num_examples=300, eval_examples=30, eval_fraction=0.0))
  train, held_out = sft_sources.load_sft_examples(data, seed=0)
  assert held_out and train
  assert not {e['messages'][0]['content'] for e in train} & {
      e['messages'][0]['content'] for e in held_out}
  assert sft_sources.load_sft_examples(data, seed=0) == (train, held_out)  # Deterministic.
  e = train[0]
  assert sft_sources.final_answer(e['messages'][1]['content']) == e['answer']


def test_worked_fraction_strips_the_working_from_a_seeded_share_of_training_solutions():
  import ml_collections
  data = ml_collections.ConfigDict(dict(source='basic_arithmetic', num_terms=(3, 3),
                                        num_digits=(1, 1), operators=('+', '-'),
                                        num_examples=400, eval_examples=40, eval_fraction=0.0,
                                        worked_fraction=1.0))
  worked, held_out = sft_sources.load_sft_examples(data, seed=0)
  data.worked_fraction = 0.5
  mixed, mixed_held_out = sft_sources.load_sft_examples(data, seed=0)
  assert mixed_held_out == held_out  # Held-out references keep their working.
  assert [e['answer'] for e in mixed] == [e['answer'] for e in worked]
  bare = [m for m, w in zip(mixed, worked) if m != w]
  assert 0.4 < len(bare) / len(mixed) < 0.6, len(bare)
  for e in bare:  # The same problem, its solution only the final answer line.
    assert e['messages'][1]['content'] == f'#### {e["answer"]}'
  assert all('\n' in e['messages'][1]['content'] for e in mixed if e not in bare)
  assert sft_sources.load_sft_examples(data, seed=0) == (mixed, held_out)  # Seeded.
