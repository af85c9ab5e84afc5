"""The chat template, the SFT loss mask, and packing conversations into training rows.

SFT (trainers/sft.py) and serving both turn a list of messages into tokens here, so a model is
always prompted exactly the way it was fine-tuned. Our template is ChatML with the reserved
special tokens of data/tokenizer.py, each a single id that no text can produce:

  <bos> <|im_start|><|system|> ...text <|im_end|> <|im_start|><|user|> ...text <|im_end|>
        <|im_start|><|assistant|> ...text <|im_end|>

A tokenizer that brings its own template (an imported Hugging Face model's, data/hf_tokenizer.py)
has a `chat_template` and `apply_chat_template(messages, add_generation_prompt=...) -> ids`, and
that is used instead.

The loss mask marks the tokens the model is trained to produce: every assistant turn's content and
its end-of-turn token, nothing else. It is found from prefixes of the rendered conversation, so it
holds for any template that renders a conversation as the concatenation of its turns:
    assistant turn i covers render(messages[:i], generation prompt)..render(messages[:i+1]).
"""
from collections.abc import Sequence

import numpy as np

ROLES = ('system', 'user', 'assistant')
IM_START, IM_END = '<|im_start|>', '<|im_end|>'
_ROLE_TOKENS = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>'}


def validate_messages(messages, where: str = 'messages') -> list[dict]:
  """Checks the common `messages` format: a list of {'role', 'content'} with known roles."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f'{where}: expected a non-empty list of {{"role", "content"}} objects')
  for i, m in enumerate(messages):
    if (not isinstance(m, dict) or m.get('role') not in ROLES
        or not isinstance(m.get('content'), str)):
      raise ValueError(f'{where}[{i}]: expected {{"role": one of {ROLES}, "content": str}}, '
                       f'got {m!r}')
  return list(messages)


def end_of_turn_id(tokenizer) -> int:
  """The token that ends a turn, where generation stops: ChatML's <|im_end|>, or for a template
  without it (an imported model's) the tokenizer's end of sequence."""
  try:
    return tokenizer.token_id(IM_END)
  except KeyError:
    return tokenizer.eos_id


def apply_chat_template(tokenizer, messages: Sequence[dict],
                        add_generation_prompt: bool = True) -> list[int]:
  """Token ids of a conversation; with add_generation_prompt it ends with the header of an
  assistant turn, ready for the model to continue."""
  if getattr(tokenizer, 'chat_template', None):  # The tokenizer's own template wins.
    return list(tokenizer.apply_chat_template(list(messages),
                                              add_generation_prompt=add_generation_prompt))
  start, end = tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)
  ids = [tokenizer.bos_id]
  # Content is encoded turn by turn, so a turn's tokens never depend on its neighbours.
  for m in messages:
    ids += [start, tokenizer.token_id(_ROLE_TOKENS[m['role']])] + tokenizer.encode(m['content'])
    ids.append(end)
  if add_generation_prompt:
    ids += [start, tokenizer.token_id(_ROLE_TOKENS['assistant'])]
  return ids


def encode_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(ids, loss_mask): loss_mask[i] is 1 iff ids[i] is part of an assistant turn's content or its
  end-of-turn token."""
  messages = validate_messages(messages)
  if not getattr(tokenizer, 'chat_template', None):
    # Our ChatML rendering is turn by turn, so one pass gives what the prefix renders below
    # would (tests/test_chat.py checks the two agree), encoding each turn once.
    start, end = tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
      content = tokenizer.encode(m['content']) + [end]
      ids += [start, tokenizer.token_id(_ROLE_TOKENS[m['role']])] + content
      mask += [0, 0] + [int(m['role'] == 'assistant')] * len(content)
    return ids, mask
  return _encode_by_prefixes(tokenizer, messages)


def _encode_by_prefixes(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """encode_conversation for any template: each assistant turn located by rendering the
  conversation up to it (with and without the turn), which a template must render as a prefix."""
  ids = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
  mask = [0] * len(ids)
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    begin = len(apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True))
    upto = apply_chat_template(tokenizer, messages[:i + 1], add_generation_prompt=False)
    if ids[:len(upto)] != upto:
      raise ValueError('the chat template does not render a conversation as the concatenation of '
                       'its turns, so the assistant tokens cannot be located')
    mask[begin:len(upto)] = [1] * (len(upto) - begin)
  return ids, mask


def pack_conversations(examples: Sequence[tuple[list[int], list[int]]], seq_len: int,
                       pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs (ids, mask) conversations, in order, into rows of seq_len (input, target) pairs.

  A conversation of n tokens takes n - 1 slots: inputs ids[:-1], targets ids[1:] and loss_mask
  mask[1:] (the mask of the token being predicted). It goes into the current row if it fits, else
  starts a new one; one longer than a row is cut to seq_len + 1 tokens. Segment ids 1, 2, ... keep
  conversations of a row apart (attention and loss); the tail of a row is padding: pad_id,
  segment 0, loss_mask 0. Returns [N, seq_len] arrays in the format of data/pipeline.py.
  """
  fields = {'inputs': np.int32, 'targets': np.int32, 'positions': np.int32,
            'segment_ids': np.int32, 'loss_mask': np.float32}
  rows, row, used = [], None, seq_len  # `used` = seq_len forces a new row for the first one.
  for ids, mask in examples:
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    n = len(ids) - 1
    if n < 1:
      continue
    if used + n > seq_len:
      row = {k: np.zeros(seq_len, t) for k, t in fields.items()}
      row['inputs'][:] = pad_id
      row['targets'][:] = pad_id
      rows.append(row)
      used, segment = 0, 0
    segment += 1
    span = slice(used, used + n)
    row['inputs'][span], row['targets'][span] = ids[:-1], ids[1:]
    row['positions'][span] = np.arange(n)
    row['segment_ids'][span] = segment
    row['loss_mask'][span] = mask[1:]
    used += n
  if not rows:
    raise ValueError('no conversation has two or more tokens to pack')
  return {k: np.stack([r[k] for r in rows]) for k in fields}
