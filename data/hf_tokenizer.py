"""An imported checkpoint's own tokenizer: a Hugging Face `tokenizers` model and its chat template.

Pretrained models must be fed the exact tokenizer they were trained with, so a workdir made by
launch/import_checkpoint.py keeps the checkpoint's tokenizer.json (and tokenizer_config.json with
the special tokens and chat template) instead of our sentencepiece model. `HFTokenizer` has the
same interface as data.tokenizer.Tokenizer, which `load_tokenizer` picks by file name, plus
`apply_chat_template` for chat stages (SFT, serving).
"""
import datetime
import json
import os
from collections.abc import Sequence

import jinja2.sandbox
import tokenizers

CONFIG_FILE = 'tokenizer_config.json'
TEMPLATE_FILE = 'chat_template.jinja'  # Where transformers 5 keeps the template.


def _token_text(value) -> str | None:
  # tokenizer_config.json writes a special token as a string or as {"content": ...}.
  return value.get('content') if isinstance(value, dict) else value


class HFTokenizer:
  """A `tokenizers.Tokenizer` plus the special tokens and chat template of its checkpoint."""

  FILENAME = 'tokenizer.json'

  def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict):
    self._tok = tokenizer
    self.config = dict(config)  # tokenizer_config.json: special token names, chat_template.
    ids = {key: self._id_of(key) for key in ('bos_token', 'eos_token', 'pad_token', 'unk_token')}
    self.bos_id, self.eos_id, self.unk_id = ids['bos_token'], ids['eos_token'], ids['unk_token']
    # Batches are padded with pad_id and the padding is masked out, so any id serves when the
    # checkpoint names no pad token (many do not).
    self.pad_id = next(i for i in (ids['pad_token'], self.eos_id, 0) if i is not None)
    self.add_bos = self._adds_bos()

  def _adds_bos(self) -> bool:
    """Whether a plain text prompt starts with BOS, as transformers encodes it for this checkpoint:
    tokenizer_config.json's (or the GGUF's) add_bos_token when it says, else whatever the
    tokenizer.json post-processor adds (Llama 3's adds <|begin_of_text|>; SmolLM2's and Qwen2's
    add nothing). Prefixing a BOS the model never saw there changes its continuations."""
    if self.bos_id is None:
      return False
    flag = self.config.get('add_bos_token')
    if flag is not None:
      return bool(flag)
    with_special = self._tok.encode('a', add_special_tokens=True).ids
    return (len(with_special) > len(self._tok.encode('a', add_special_tokens=False).ids)
            and with_special[0] == self.bos_id)

  def _id_of(self, key: str) -> int | None:
    text = _token_text(self.config.get(key))
    return None if text is None else self._tok.token_to_id(text)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'HFTokenizer':
    """From a tokenizer.json and the tokenizer_config.json / chat_template.jinja beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    config = {}
    if os.path.exists(os.path.join(directory, CONFIG_FILE)):
      with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    if os.path.exists(os.path.join(directory, TEMPLATE_FILE)):
      with open(os.path.join(directory, TEMPLATE_FILE)) as f:
        config['chat_template'] = f.read()
    return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), config)

  @classmethod
  def from_pretrained_dir(cls, directory: str) -> 'HFTokenizer':
    """From a Hugging Face checkpoint directory: its tokenizer.json, or else its sentencepiece
    tokenizer.model converted by transformers (locally; nothing is downloaded)."""
    path = os.path.join(directory, cls.FILENAME)
    if os.path.exists(path):
      return cls.load(path)
    if not os.path.exists(os.path.join(directory, 'tokenizer.model')):
      raise FileNotFoundError(f'{directory} holds no tokenizer.json or tokenizer.model')
    import transformers  # Only the conversion of a sentencepiece-only checkpoint needs it.
    fast = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    config = {key: getattr(fast, key, None) for key in ('bos_token', 'eos_token', 'pad_token',
                                                        'unk_token', 'chat_template',
                                                        'add_bos_token')}
    return cls(fast.backend_tokenizer, config)

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json at `path` and tokenizer_config.json beside it."""
    self._tok.save(os.fspath(path))
    config = dict(self.config, tokenizer_class='PreTrainedTokenizerFast')
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    # Special tokens are added here, not by the tokenizer's post-processor, so `bos`/`eos` mean
    # the same for every checkpoint (a tokenizer without a BOS token adds none).
    head = [self.bos_id] if bos and self.bos_id is not None else []
    tail = [self.eos_id] if eos and self.eos_id is not None else []
    return head + ids + tail

  def encode_prompt(self, text: str) -> list[int]:
    """A plain-text prompt (completions, eval, RL) as the checkpoint expects: BOS iff add_bos."""
    return self.encode(text, bos=self.add_bos)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

  def encode_batch(self, texts: Sequence[str], bos: bool = False,
                   eos: bool = False) -> list[list[int]]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [self._wrap(e.ids, bos, eos) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if i != self.pad_id], skip_special_tokens=False)

  def token_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    if i is None:
      raise KeyError(f'{piece!r} is not in the tokenizer vocabulary')
    return i

  @property
  def chat_template(self) -> str | None:
    return self.config.get('chat_template')

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to [{'role': ..., 'content': ...}, ...], as text."""
    if not self.chat_template:
      raise ValueError('this tokenizer has no chat template')
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=_token_text(self.config.get('bos_token')) or '',
        eos_token=_token_text(self.config.get('eos_token')) or '')

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat; the template writes its own special tokens."""
    return self.encode(self.render_chat(messages, add_generation_prompt))
