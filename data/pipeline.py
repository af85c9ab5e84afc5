"""Documents to packed training batches: the held-out split, tokenization and grain iterators.

Pretraining reads `load_corpus` documents, holds some out with `split_documents`, tokenizes both
parts with `tokenize_documents` and packs them into rows of `seq_len` tokens (concatenate, then
split): rows cross document boundaries, so no token is padding, and every row carries what
attention and the loss need to keep documents apart. A batch is a dict of [B, L] numpy arrays:

  inputs, targets  int32    targets[t] == inputs[t + 1]: the next token of the stream
  positions        int32    offset of each input token within its document (0 at a document start)
  segment_ids      int32    1, 2, 3, ... for the documents of the row in order (0 means padding)
  loss_mask        float32  1 where the target is in the same document as the input, else 0

The training iterator is a grain dataset whose state (`get_state`/`set_state`, or orbax through
`grain.checkpoint.CheckpointSave`) resumes the batch sequence exactly. All of this holds the
corpus in memory; data/streaming.py (`data.streaming=True`) builds the same batches from
documents read as training reaches them, for corpora larger than that.
"""
import dataclasses
import itertools
from collections.abc import Sequence

import grain
import numpy as np

from data.tokenizer import Tokenizer


def split_documents(docs: Sequence[str], *, eval_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """A seeded random `eval_fraction` of the documents (at least one when there are two or more)
  for evaluation, the rest for training; both keep the corpus order."""
  if not 0 <= eval_fraction < 1:
    raise ValueError(f'eval_fraction={eval_fraction} is not in [0, 1)')
  n_eval = round(len(docs) * eval_fraction)
  if eval_fraction > 0 and len(docs) >= 2:
    n_eval = max(n_eval, 1)
  if n_eval >= len(docs):
    raise ValueError(f'eval_fraction={eval_fraction} of {len(docs)} documents leaves none to '
                     'train on')
  held_out = set(np.random.default_rng(seed).permutation(len(docs))[:n_eval].tolist())
  train = [d for i, d in enumerate(docs) if i not in held_out]
  return train, [d for i, d in enumerate(docs) if i in held_out]


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray  # int32 [N]: every document as [bos] + tokens + eos (bos iff add_bos)
  doc_ids: np.ndarray  # int32 [N]: the index of the document each token belongs to


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> TokenStream:
  encoded = tokenizer.encode_batch(docs, bos=tokenizer.add_bos, eos=True)
  return TokenStream(np.fromiter(itertools.chain.from_iterable(encoded), np.int32),
                     np.repeat(np.arange(len(docs), dtype=np.int32), [len(ids) for ids in encoded]))


class PackedRows:
  """Random access to the rows of a packed stream: row i is tokens[i*L : i*L + L + 1], its first
  L tokens the inputs and its last L the targets. A grain data source."""

  def __init__(self, stream: TokenStream, seq_len: int):
    self._tokens, self._doc_ids, self._seq_len = stream.tokens, stream.doc_ids, seq_len
    self._len = (len(stream.tokens) - 1) // seq_len
    if self._len < 1:
      raise ValueError(f'{len(stream.tokens)} tokens are too few for one row of seq_len={seq_len} '
                       f'(it needs {seq_len + 1})')
    # Stream index of each document's first token, to turn stream offsets into positions.
    self._doc_start = np.zeros(stream.doc_ids.max() + 1, np.int64)
    ids, first = np.unique(stream.doc_ids, return_index=True)
    self._doc_start[ids] = first

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start = int(i) * self._seq_len
    window = slice(start, start + self._seq_len + 1)
    tokens, doc_ids = self._tokens[window], self._doc_ids[window]
    inputs_doc = doc_ids[:-1]
    return {
        'inputs': tokens[:-1],
        'targets': tokens[1:],
        'positions': (np.arange(start, start + self._seq_len) -
                      self._doc_start[inputs_doc]).astype(np.int32),
        'segment_ids': np.cumsum(np.r_[1, inputs_doc[1:] != inputs_doc[:-1]], dtype=np.int32),
        'loss_mask': (doc_ids[1:] == inputs_doc).astype(np.float32),
    }


class RowTable:
  """Random access to the rows of a dict of [N, ...] arrays (packed conversations, preference
  pairs): row i is {name: array[i]}. A grain data source, like PackedRows."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[int(i)] for k, v in self._arrays.items()}


def make_train_iterator(rows, *, batch_size: int, seed: int, shuffle: bool = True,
                        process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                        prefetch_buffer_size: int = 0):
  """An endless, checkpointable iterator over batches of `batch_size` rows (per process).

  `rows` is any random-access source of row dicts: `PackedRows` for pretraining, packed
  conversations for SFT. The rows are shuffled as one sequence (reshuffled every epoch; the same
  seed always gives the same order), cut into global batches of batch_size * process_count rows,
  and each process reads its own consecutive batch_size of each: the global batches, and so the
  training, are the same however many processes read them (process p's rows are the ones its
  devices hold in the data-sharded global array).
  """
  if len(rows) < process_count:
    raise ValueError(f'{len(rows)} rows are too few to give each of {process_count} processes one')
  ds = grain.MapDataset.source(rows)
  if shuffle:
    ds = ds.shuffle(seed)
  # repeat() after shuffle() draws a new permutation for every epoch.
  ds = ds.repeat().batch(batch_size, drop_remainder=True)[process_index::process_count]
  # Rows are cut from arrays already in memory: grain's default of 16 reader threads and a
  # 500-batch buffer only adds GIL contention, so read in this thread unless a buffer is asked for.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch_buffer_size else 0,
                                            prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def make_eval_batches(stream: TokenStream, *, seq_len: int, batch_size: int,
                      max_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `max_batches` full global batches of the stream, in order: the same every time;
  this process's batch_size rows of each (as make_train_iterator cuts them)."""
  rows = PackedRows(stream, seq_len)
  if len(rows) < batch_size * process_count:
    raise ValueError(f'the eval stream has {len(rows)} rows of seq_len={seq_len}, fewer than one '
                     f'batch of batch_size={batch_size * process_count}')
  batches = grain.MapDataset.source(rows).batch(batch_size, drop_remainder=True)
  n = min(max_batches, len(batches) // process_count)
  return [batches[i * process_count + process_index] for i in range(n)]
