"""Pretraining (and SFT) on data larger than memory: documents read, tokenized and packed as
training consumes them (`config.data.streaming=True`).

The default path (data/pipeline.py) reads the whole corpus, tokenizes all of it before step 1 (on
every host of a pod) and keeps the token stream in memory: right for the built-in corpora, not for
a pretraining corpus of tens of gigabytes. This one starts in seconds and holds a few batches:

- `open_documents(source)`: document i of a source without reading the others. ArrayRecord
  records and TFDS examples are random-access already (grain's and tfds's data sources); JSONL
  lines and plain-text documents get a byte-offset index built in one pass over the files (numpy
  over memory-mapped bytes: 8 bytes a line, a few seconds a gigabyte); built-in corpora are small
  and come from memory.
- `held_out(indices)`: a document is held out for evaluation when a seeded hash of its index
  falls under `data.eval_fraction`, so the split needs no list of the corpus and every process
  and every eval script draws the same one.
- `make_train_iterator`: a grain pipeline: every epoch a new permutation of the document indices
  (grain's index shuffle, no per-document memory), each process its own share of them, held-out
  and blank documents skipped, each document read and tokenized (BOS iff the tokenizer adds it,
  EOS always) by grain's read threads or worker processes, then packed by grain's concat-then-
  split into rows of `seq_len + 1` tokens and batched. Its state goes into the orbax checkpoints
  as the in-memory iterator's does, so a resumed run reads exactly the batches it would have.
- `eval_stream`: held-out documents in a seeded random order, only as many as the eval batches
  need, as the `TokenStream` that `pipeline.make_eval_batches` cuts.
- Mixtures: `open_sources('a+b+c')` opens each source; each packs its own rows and the
  iterator mixes the rows, so the tokens, by `mixture_weights` (grain's `IterDataset.mix`, keyed
  by source, so each source's position resumes), each with its own shuffle and held-out split
  (seed + k for source k), and `eval_sets` gives each source an equal share of the eval batches
  (the same ones whatever the weights), by name, so the loop reports eval_loss_<source> beside
  the pooled eval_loss.

SFT (`make_sft_iterator`) streams JSONL conversations the same way (`open_records`, the held-out
lines by the same hash), packed whole by grain's first-fit packing instead of concat-then-split.

Rows have the batch layout of data/pipeline.py, with three differences a user may see: a row
holds seq_len + 1 tokens of the stream and the next row starts after them (the in-memory rows
overlap by one token, so each row here predicts one token fewer); positions restart at 0 where a
document cut at a row boundary continues in the next row (it cannot attend to its earlier part
there); and each process (and each of its `data.worker_count` worker processes, whose batches
take turns) packs its own documents, so the rows of a global batch depend on how many read them
(the in-memory path's do not).
"""
import bisect
import json
import mmap
import pathlib
import re

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from data import pipeline, sources

_INDEX_CHUNK = 64 << 20  # Bytes scanned at a time while indexing a JSONL file.
_HELD_OUT_CHUNK = 1 << 20  # Document indices hashed at a time while finding the held-out set.


class _MappedFile:
  """A file's bytes through mmap, opened on first use (and again after pickling, for grain's
  worker processes)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._mm = None

  def __getstate__(self):
    return {'path': self.path, '_mm': None}

  def bytes(self, start: int, end: int) -> bytes:
    if self._mm is None:
      with open(self.path, 'rb') as f:
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return self._mm[start:end]


class _JsonlFile:
  """Line i of a JSONL file (blank lines included, so i + 1 is its line number)."""

  def __init__(self, path: pathlib.Path, text_key: str):
    self.path, self.text_key, self._file = path, text_key, _MappedFile(path)
    size = path.stat().st_size
    ends = []
    with open(path, 'rb') as f:
      offset = 0
      while chunk := f.read(_INDEX_CHUNK):
        ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord('\n')) + offset)
        offset += len(chunk)
    ends = np.concatenate(ends + [np.zeros(0, np.int64)]).astype(np.int64)
    if size and (not len(ends) or ends[-1] != size - 1):
      ends = np.append(ends, size)  # A last line without a newline.
    self._ends = ends
    self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)

  def __len__(self) -> int:
    return len(self._ends)

  def where(self, i: int) -> str:
    return f'{self.path}:{i + 1}'

  def __getitem__(self, i: int) -> str:
    """The line's `text_key` field ('' for a blank line); with text_key None its whole record
    (None for a blank line)."""
    line = sources.decode_text(self._file.bytes(self._starts[i], self._ends[i]))[0]
    if not line.strip():
      return '' if self.text_key else None
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f'{self.path}, line {i + 1}: not valid JSON ({e})') from None
    if self.text_key is None:
      return record
    if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
      raise ValueError(f'{self.path}, line {i + 1}: no string field {self.text_key!r} '
                       '(set data.text_key)')
    return record[self.text_key]


class _TextFile:
  """A plain-text file cut into documents as `sources.split_text` cuts it (at the last blank line
  within DOC_CHARS, else the last line break), on bytes: at most DOC_CHARS bytes a document."""

  def __init__(self, path: pathlib.Path):
    self.path, self._file = path, _MappedFile(path)
    bounds, size = [0], path.stat().st_size
    if size:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 0
        while size - start > sources.DOC_CHARS:
          end = start + sources.DOC_CHARS
          cut = max(mm.rfind(b'\n\n', start, end), mm.rfind(b'\n\r\n', start, end))
          if cut <= start:
            cut = mm.rfind(b'\n', start, end)
          if cut <= start:
            cut = end
            while cut > start + 1 and 0x80 <= mm[cut] < 0xC0:  # Not inside a UTF-8 character.
              cut -= 1
          bounds.append(cut)
          start = cut
      bounds.append(size)
    self._bounds = bounds  # Document i is bytes bounds[i]:bounds[i + 1]; an empty file has none.

  def __len__(self) -> int:
    return len(self._bounds) - 1

  def __getitem__(self, i: int) -> str:
    raw = self._file.bytes(self._bounds[i], self._bounds[i + 1])
    return sources.decode_text(raw)[0].strip('\n')


class _ArrayRecordFile:

  def __init__(self, path: pathlib.Path, text_key: str):
    self.path, self.text_key = path, text_key
    self._records = grain.sources.ArrayRecordDataSource([str(path)])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> str:
    return sources.record_text(self._records[i], self.text_key, f'{self.path}, record {i}')[0]


class _Tfds:

  def __init__(self, source: str, text_key: str):
    self.source, self.text_key = source, text_key
    self._examples = sources.tfds_examples(source)

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i: int) -> str:
    return sources.tfds_example_text(self._examples[i], self.source, self.text_key, i)[0]


class Documents:
  """Random access to the documents of one or more files (or a built-in corpus, or a TFDS split),
  in corpus order: `docs[i]` is a string ('' for a blank line or document, which training
  skips). A grain-friendly source: picklable, read from any thread."""

  def __init__(self, name: str, parts: list):
    self.name, self._parts = name, [p for p in parts if len(p)]
    self._offsets = np.cumsum([0] + [len(p) for p in self._parts]).tolist()
    if not self._parts:
      raise ValueError(f'data source {name!r} is empty: it has no documents')

  def __len__(self) -> int:
    return self._offsets[-1]

  def _locate(self, i) -> tuple[int, int]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'document {i} of {len(self)}')
    part = bisect.bisect_right(self._offsets, i) - 1
    return part, i - self._offsets[part]

  def __getitem__(self, i: int) -> str:
    part, j = self._locate(i)
    return self._parts[part][j]

  def where(self, i: int) -> str:
    """Where document i is, for error messages ('file.jsonl:17', else 'SOURCE, example i')."""
    part, j = self._locate(i)
    return (self._parts[part].where(j) if hasattr(self._parts[part], 'where')
            else f'{self.name}, example {i}')


def open_documents(source: str, *, text_key: str = 'text') -> Documents:
  """`source` as `sources.load_corpus` names it, without reading its documents."""
  if source in sources.BUILTIN_SOURCES:
    return Documents(source, [sources.load_corpus(source).docs])
  if source.startswith('tfds:'):
    return Documents(source, [_Tfds(source, text_key)])
  parts = []
  for path in sources.source_files(source):
    if path.suffix == '.jsonl':
      part = _JsonlFile(path, text_key)
    elif path.suffix == '.array_record':
      part = _ArrayRecordFile(path, text_key)
    else:
      part = _TextFile(path)
    parts.append(part)
  docs = Documents(source, parts)
  for part in docs._parts:  # A wrong text_key or a file that is not JSON Lines fails here, not
    for i in range(min(len(part), 100)):  # at some later step (the rest: when it is read).
      if part[i].strip():
        break
  return docs


def open_sources(source: str, *, text_key: str = 'text') -> list[Documents]:
  """One `Documents` per source of a mixture 'a+b+...' (`sources.split_sources`)."""
  names = sources.split_sources(source)
  if len(set(names)) < len(names) or not all(names):
    raise ValueError(f'data.source={source!r}: sources joined with "+" must be distinct and '
                     'non-empty')
  return [open_documents(name, text_key=text_key) for name in names]


def _part_bytes(part) -> int:
  """A part's size in bytes: its file's, or for one in memory (or a TFDS split) its first
  hundred documents' mean times its count."""
  if hasattr(part, 'path'):
    return part.path.stat().st_size
  sample = [part[i] for i in range(min(len(part), 100))]
  return round(sum(len(t.encode()) for t in sample) / max(len(sample), 1) * len(part))


def mixture_weights(docs: list[Documents], weights: str = '') -> list[float]:
  """The share of the training tokens drawn from each source: `weights` ('0.7,0.3' or
  '0.7:0.3', the form a launch.sweep grid can list; normalised), or in proportion to the
  sources' sizes in bytes (as if they were read one after the other) when it is ''."""
  if not weights:
    sizes = [sum(_part_bytes(p) for p in d._parts) for d in docs]
    return [n / sum(sizes) for n in sizes]
  try:
    values = [float(w) for w in re.split('[,:]', weights)]
  except ValueError:
    raise ValueError(f'data.mixture_weights={weights!r} is not a comma-separated list of '
                     'numbers') from None
  if len(values) != len(docs):
    raise ValueError(f'data.mixture_weights={weights!r} gives {len(values)} weights for '
                     f'{len(docs)} sources ({", ".join(d.name for d in docs)})')
  if not all(v > 0 and np.isfinite(v) for v in values):
    raise ValueError(f'data.mixture_weights={weights!r}: every weight must be positive')
  return [v / sum(values) for v in values]


def _as_list(docs) -> list[Documents]:
  return [docs] if isinstance(docs, Documents) else list(docs)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijection of uint64 that scatters neighbouring inputs."""
  x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def held_out(indices, *, seed: int, eval_fraction: float) -> np.ndarray:
  """Whether each document index is held out: a seeded hash of the index, uniform in [0, 1),
  under eval_fraction. The same for every process, run and eval script with the same seed."""
  if not 0 <= eval_fraction < 1:
    raise ValueError(f'eval_fraction={eval_fraction} is not in [0, 1)')
  idx = np.asarray(indices, np.uint64)
  with np.errstate(over='ignore'):
    h = _mix(idx ^ _mix(np.full(idx.shape, seed % 2**64, np.uint64)))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < eval_fraction


_M64 = (1 << 64) - 1


def _mix_int(x: int) -> int:
  """_mix on one Python int (a few microseconds, against tens for numpy on a 1-element array)."""
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def _is_held_out(i: int, seed: int, eval_fraction: float) -> bool:
  """held_out for one index, as the per-document readers ask it."""
  return (_mix_int(int(i) ^ _mix_int(seed % 2**64)) >> 11) * 2.0 ** -53 < eval_fraction


class _ReadTokens:
  """Document index -> {'tokens': int32 array}, or None (grain skips it) for a held-out or
  blank document."""

  def __init__(self, docs: Documents, tokenizer, *, seed: int, eval_fraction: float):
    self.docs, self.tokenizer = docs, tokenizer
    self.seed, self.eval_fraction = seed, eval_fraction

  def __call__(self, i):
    if self.eval_fraction and _is_held_out(i, self.seed, self.eval_fraction):
      return None
    text = self.docs[i]
    if not text.strip():
      return None
    ids = self.tokenizer.encode(text, bos=self.tokenizer.add_bos, eos=True)
    return {'tokens': np.asarray(ids, np.int32)}


def _to_row(packed: dict) -> dict:
  """A packed run of seq_len + 1 tokens as the batch row of data/pipeline.py."""
  tokens, seg, pos = packed['tokens'], packed['tokens_segment_ids'], packed['tokens_positions']
  return {'inputs': tokens[:-1], 'targets': tokens[1:], 'positions': pos[:-1],
          'segment_ids': seg[:-1],
          'loss_mask': ((seg[1:] == seg[:-1]) & (seg[:-1] > 0)).astype(np.float32)}


def make_train_iterator(docs: Documents | list[Documents], tokenizer, *, seq_len: int,
                        batch_size: int, seed: int, eval_fraction: float,
                        weights: list[float] | None = None, process_index: int = 0,
                        process_count: int = 1, worker_count: int = 0, read_threads: int = 4):
  """An endless, checkpointable iterator over batches of `batch_size` packed rows (per process)
  of the documents that are not held out; see the module docstring. Several sources each pack
  their own rows, mixed row by row (so token by token) in proportion to `weights` (grain's
  `IterDataset.mix`; default: the sources' sizes in bytes); source k shuffles and holds out with
  seed + k."""
  docs = _as_list(docs)
  weights = weights or (mixture_weights(docs) if len(docs) > 1 else [1.0])
  parts = {}
  for k, d in enumerate(docs):
    if len(d) < process_count:
      raise ValueError(f'{d.name!r}: {len(d)} documents are too few to give each of '
                       f'{process_count} processes one')
    ds = grain.MapDataset.range(len(d)).shuffle(seed + k).repeat()  # A new order every epoch.
    ds = ds[process_index::process_count]
    ds = ds.map(_ReadTokens(d, tokenizer, seed=seed + k, eval_fraction=eval_fraction))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=4 * read_threads))
    # Each source packs its own rows, so mixing rows mixes tokens by weight.
    parts[d.name] = ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len + 1})
  if len(parts) == 1:
    ds = next(iter(parts.values()))
  else:  # Keyed by source, so a run resumed with other weights keeps each source's position.
    ds = grain.IterDataset.mix(parts, weights=dict(zip(parts, weights)))
  ds = ds.map(_to_row).batch(batch_size, drop_remainder=True)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def held_out_order(n: int, *, seed: int, eval_fraction: float) -> np.ndarray:
  """The indices of the held-out documents among n, in a seeded random order (so the first ones,
  all an eval of a few batches reads, come from across the corpus, not from its first file).
  Hashing is vectorized: a few seconds for 10^8 documents, 8 bytes per held-out one."""
  if not eval_fraction:
    return np.zeros(0, np.int64)
  held = [idx[held_out(idx, seed=seed, eval_fraction=eval_fraction)]
          for idx in (np.arange(a, min(a + _HELD_OUT_CHUNK, n), dtype=np.int64)
                      for a in range(0, n, _HELD_OUT_CHUNK))]
  held = np.concatenate(held + [np.zeros(0, np.int64)])
  with np.errstate(over='ignore'):
    salt = _mix(np.full(held.shape, (seed + 1) % 2**64, np.uint64))
    keys = _mix(held.astype(np.uint64) ^ salt)
  return held[np.argsort(keys, kind='stable')]


def eval_stream(docs: Documents, tokenizer, *, seed: int, eval_fraction: float,
                max_tokens: int = 0) -> tuple[pipeline.TokenStream, int]:
  """A source's held-out documents in `held_out_order`, tokenized as training tokenizes them,
  stopping once the stream has `max_tokens` tokens (0: all of them); and how many documents it
  holds. (`eval_sets` calls it per source of a mixture, with that source's seed.)"""
  encoded, total = [], 0
  for i in held_out_order(len(docs), seed=seed, eval_fraction=eval_fraction):
    if max_tokens and total >= max_tokens:
      break
    text = docs[i]
    if text.strip():
      encoded.append(tokenizer.encode(text, bos=tokenizer.add_bos, eos=True))
      total += len(encoded[-1])
  tokens = np.fromiter((t for ids in encoded for t in ids), np.int32, count=total)
  doc_ids = np.repeat(np.arange(len(encoded), dtype=np.int32), [len(ids) for ids in encoded])
  return pipeline.TokenStream(tokens, doc_ids), len(encoded)


def source_labels(docs: list[Documents]) -> list[str]:
  """Short, metric-safe names of the sources ('web' for data/web.jsonl, 'c4_en' for tfds:c4/en),
  numbered where two would be the same: the suffixes of their per-source eval metrics."""
  labels = []
  for d in docs:
    base = d.name[len('tfds:'):] if d.name.startswith('tfds:') else pathlib.Path(d.name).name
    for suffix in sources.FILE_SUFFIXES:
      base = base.removesuffix(suffix)
    labels.append(re.sub(r'[^A-Za-z0-9]+', '_', base).strip('_') or 'source')
  return [f'{label}_{k}' if labels.count(label) > 1 else label for k, label in enumerate(labels)]


def eval_sets(docs: Documents | list[Documents], tokenizer, *, seed: int, eval_fraction: float,
              seq_len: int, batch_size: int, max_batches: int, process_index: int = 0,
              process_count: int = 1) -> tuple[list[dict] | dict[str, list[dict]], int]:
  """The eval batches (this process's `batch_size` rows of each global batch) and how many
  held-out documents they come from. One source: a list of at most `max_batches` batches (0:
  every held-out document). Several: {source label: its batches}, `max_batches` shared equally
  (at least one each) whatever the mixture weights, so the trainer and eval.perplexity report
  each source's loss beside the pooled one, and every point of a sweep over the weights is
  measured on the same held-out batches."""
  docs = _as_list(docs)
  labels = source_labels(docs) if len(docs) > 1 else ['']
  sets, n_docs = {}, 0
  for k, (d, label) in enumerate(zip(docs, labels)):
    n = max(1, -(-max_batches // len(docs))) if max_batches else 0
    global_batch = batch_size * process_count
    stream, held = eval_stream(d, tokenizer, seed=seed + k, eval_fraction=eval_fraction,
                               max_tokens=n * global_batch * seq_len + 1 if n else 0)
    if not held:
      continue
    rows = max(len(stream.tokens) - 1, 0) // seq_len
    if rows < global_batch:
      raise ValueError(f'data source {d.name!r}: its held-out documents fill {rows} rows of '
                       f'seq_len={seq_len}, fewer than one eval batch of {global_batch}; raise '
                       'data.eval_fraction')
    sets[label] = pipeline.make_eval_batches(
        stream, seq_len=seq_len, batch_size=batch_size, max_batches=n or rows // global_batch,
        process_index=process_index, process_count=process_count)
    n_docs += held
  if len(docs) == 1:
    return sets.get('', []), n_docs
  return sets, n_docs


def tokenizer_sample(docs: Documents | list[Documents], *, seed: int, eval_fraction: float,
                     max_chars: int, weights: list[float] | None = None) -> list[str]:
  """Training documents drawn at random (seeded, without replacement) until they hold
  `max_chars` characters, each source its weight's share: what a new tokenizer is trained on
  without reading the corpus."""
  docs = _as_list(docs)
  weights = weights or (mixture_weights(docs) if len(docs) > 1 else [1.0])
  sample = []
  for k, (d, w) in enumerate(zip(docs, weights)):
    chars = 0
    for i in grain.MapDataset.range(len(d)).shuffle(seed + k):
      if chars >= max_chars * w:
        break
      if eval_fraction and _is_held_out(i, seed + k, eval_fraction):
        continue
      text = d[i]
      if text.strip():
        sample.append(text)
        chars += len(text)
  if not sample:
    names = '+'.join(d.name for d in docs)
    raise ValueError(f'data source {names!r} is empty: it has no non-whitespace text')
  return sample


def open_records(path: str) -> Documents:
  """The records of a JSONL file (or a directory or glob of them) by line, each a parsed JSON
  value (None for a blank line), through the same index as `open_documents`."""
  files = sources.source_files(path)
  bad = [f for f in files if f.suffix != '.jsonl']
  if bad:
    raise ValueError(f'data source {path!r}: {bad[0]} is not a .jsonl file')
  return Documents(path, [_JsonlFile(f, None) for f in files])


class _ReadConversation:
  """Example index -> {'ids', 'mask'} (`chat.encode_conversation`, cut to seq_len + 1 tokens),
  or None (grain skips it) for a held-out (by hash, eval_fraction > 0) or blank one. `example`
  turns a stored item into {'messages': ...} (raising, with `where`, for a malformed one)."""

  def __init__(self, examples, example, tokenizer, *, seq_len: int, seed: int,
               eval_fraction: float):
    self.examples, self.example, self.tokenizer = examples, example, tokenizer
    self.seq_len, self.seed, self.eval_fraction = seq_len, seed, eval_fraction

  def __call__(self, i):
    if self.eval_fraction and _is_held_out(i, self.seed, self.eval_fraction):
      return None
    item = self.examples[i]
    if item is None:
      return None
    where = self.examples.where(i) if hasattr(self.examples, 'where') else f'example {i}'
    from data import chat
    ids, mask = chat.encode_conversation(self.tokenizer, self.example(item, where)['messages'])
    ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
    if len(ids) < 2:
      return None
    return {'ids': np.asarray(ids, np.int32), 'mask': np.asarray(mask, np.int32)}


def _to_sft_row(packed: dict) -> dict:
  """Packed conversations (seq_len + 1 slots) as the batch row of data/pipeline.py: the loss
  covers the tokens the mask marks (assistant turns) within each conversation."""
  ids, seg, pos, mask = (packed['ids'], packed['ids_segment_ids'], packed['ids_positions'],
                         packed['mask'])
  same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
  return {'inputs': ids[:-1], 'targets': ids[1:], 'positions': pos[:-1], 'segment_ids': seg[:-1],
          'loss_mask': (mask[1:] * same).astype(np.float32)}


def make_sft_iterator(parts: list, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                      read_threads: int = 4):
  """Conversations read, encoded and packed as training consumes them: `parts` is a list of
  (examples, eval_fraction, example): random-access items (`open_records`, or a list in memory),
  the hash-held-out share to skip (0 for a list that holds training examples only), and the
  function that makes an item an example (`data.sft_sources.conversation_example` for JSONL
  records); source k shuffles every epoch with seed + k. The sources' examples are mixed in proportion to their
  counts, then grain's first-fit packing puts whole conversations into rows of seq_len + 1
  tokens (a conversation longer than that is cut, as data/chat.py cuts it), padding the rest.
  Endless and checkpointable, like `make_train_iterator`."""
  from grain.experimental import FirstFitPackIterDataset
  streams, sizes = [], []
  for k, (examples, eval_fraction, example) in enumerate(parts):
    if len(examples) < process_count:
      raise ValueError(f'{len(examples)} examples are too few to give each of {process_count} '
                       'processes one')
    ds = grain.MapDataset.range(len(examples)).shuffle(seed + k).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(_ReadConversation(examples, example, tokenizer, seq_len=seq_len, seed=seed + k,
                                  eval_fraction=eval_fraction))
    streams.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                        prefetch_buffer_size=4 * read_threads)))
    sizes.append(len(examples))
  ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(
      streams, weights=[n / sum(sizes) for n in sizes])
  ds = FirstFitPackIterDataset(ds, length_struct={'ids': seq_len + 1, 'mask': seq_len + 1},
                               num_packing_bins=batch_size, shuffle_bins=False)
  ds = ds.map(_to_sft_row).batch(batch_size, drop_remainder=True)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)
