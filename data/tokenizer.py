"""The tokenizer every stage shares: a SentencePiece BPE model trained on the pretraining corpus.

`train_tokenizer` runs before pretraining; the resulting model bytes are saved into each workdir
(`Tokenizer.save`) and loaded by every later stage (`Tokenizer.load`), so a workdir always carries
the exact tokenizer its checkpoints were trained with.

The model is lossless: no Unicode normalization, whitespace kept as is, and byte fallback for any
character outside the learned vocabulary, so `decode(encode(text)) == text` for every string but
those holding U+2581 ('▁'), the character SentencePiece itself writes for a space.
"""
import io
import os
from collections.abc import Sequence

import sentencepiece as spm

# Single ids that are never split, reserved for the chat template (SFT and later stages).
SPECIAL_TOKENS = ('<|im_start|>', '<|im_end|>', '<|system|>', '<|user|>', '<|assistant|>') + tuple(
    f'<|reserved_{i}|>' for i in range(8))

# SentencePiece skips training lines longer than its max_sentence_length (in bytes); lines of at
# most 1,000 characters are at most 4,000 UTF-8 bytes.
_MAX_LINE_CHARS = 1000


class Tokenizer:
  """A SentencePiece model with pad 0, unk 1, bos 2, eos 3."""

  pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
  FILENAME = 'tokenizer.model'  # Its name in a workdir.
  add_bos = True  # Every document our models train on starts with BOS, so every prompt does.

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> 'Tokenizer':
    return cls(model_proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    with open(path, 'rb') as f:
      return cls(f.read())

  def save(self, path: str | os.PathLike) -> None:
    with open(path, 'wb') as f:
      f.write(self._proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode_prompt(self, text: str) -> list[int]:
    """A plain-text prompt (completions, eval, RL): BOS first, as in training."""
    return self.encode(text, bos=True)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    return self._sp.encode(text, add_bos=bos, add_eos=eos)

  def encode_batch(self, texts: Sequence[str], bos: bool = False,
                   eos: bool = False) -> list[list[int]]:
    return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=os.cpu_count())

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i != self.pad_id])

  def token_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    # SentencePiece maps unknown pieces to unk instead of failing.
    if i == self.unk_id and piece != self._sp.id_to_piece(i):
      raise KeyError(f'{piece!r} is not in the tokenizer vocabulary')
    return i


def _training_lines(docs: Sequence[str], max_chars: int):
  """Yields the corpus line by line, long lines in pieces, up to max_chars characters."""
  n_chars = 0
  for doc in docs:
    for line in doc.split('\n'):
      for start in range(0, len(line), _MAX_LINE_CHARS):
        piece = line[start:start + _MAX_LINE_CHARS]
        if n_chars >= max_chars:
          return
        n_chars += len(piece)
        yield piece


def train_tokenizer(docs: Sequence[str], *, vocab_size: int, max_chars: int = 20_000_000,
                    seed: int = 0) -> Tokenizer:
  """Trains a byte-fallback BPE tokenizer on the first `max_chars` characters of `docs`."""
  if not any(doc.strip() for doc in docs):
    raise ValueError('cannot train a tokenizer on an empty corpus')
  # Training reads every line in corpus order (no sentence sampling); the seed only pins what
  # randomness SentencePiece has left, so the same corpus always gives the same model.
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(docs, max_chars),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,  # rarer characters go to byte fallback
        split_digits=True,
        user_defined_symbols=list(SPECIAL_TOKENS),
        pad_id=Tokenizer.pad_id, unk_id=Tokenizer.unk_id,
        bos_id=Tokenizer.bos_id, eos_id=Tokenizer.eos_id,
        # Lossless: keep text byte for byte (the defaults apply NFKC and collapse spaces), and
        # let runs of spaces be single pieces, which matters for indented code.
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4 * _MAX_LINE_CHARS,
        num_threads=os.cpu_count(),
        minloglevel=2,
    )
  except RuntimeError as e:
    # The corpus fixes the range of possible sizes: at most what BPE can merge from it, at
    # least the special, byte and required character pieces. SentencePiece's message says which.
    raise ValueError(f'cannot train a {vocab_size}-piece tokenizer on this corpus: lower '
                     '`tokenizer.vocab_size` (a small corpus has few merges to learn), or raise it '
                     f'if it is below the pieces the corpus requires. SentencePiece: {e}') from e
  return Tokenizer(model.getvalue())


# Tokenizer files a workdir may hold, in the order they are looked for: our own sentencepiece
# model, or an imported checkpoint's Hugging Face tokenizer.json (data/hf_tokenizer.py).
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json')


def find_tokenizer(directory: str | os.PathLike) -> str | None:
  """The path of the tokenizer file in `directory`, or None."""
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_tokenizer(path: str | os.PathLike):
  """A tokenizer from a workdir (or any directory holding one of TOKENIZER_FILES) or a file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    found = find_tokenizer(path)
    if found is None:
      raise FileNotFoundError(f'{path} holds no tokenizer (looked for {TOKENIZER_FILES})')
    path = found
  if path.endswith('.json'):
    from data.hf_tokenizer import HFTokenizer  # Only imported checkpoints need `tokenizers`.
    return HFTokenizer.load(path)
  return Tokenizer.load(path)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> str:
  """Writes the tokenizer into `directory` under its own file name; returns the path."""
  path = os.path.join(directory, tokenizer.FILENAME)
  tokenizer.save(path)
  return path
