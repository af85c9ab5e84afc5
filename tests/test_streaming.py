"""data/streaming.py: documents read by index without loading the corpus, the hashed held-out split,
and the packed training stream (every training document once an epoch, nothing held out, exact
resumption, disjoint processes, nothing read ahead of need). The trainer's use of it is in
tests/test_pretrain.py."""
import json

import numpy as np
import pytest

from data import sources, streaming

EOS = 1


class NumberTokenizer:
  """Each whitespace-separated number is its token; EOS ends every document."""
  add_bos = False

  def encode(self, text, bos=False, eos=False):
    return [int(w) for w in text.split()] + ([EOS] if eos else [])


def number_docs(n, seed=0, first=0):
  """Document i holds tokens that name it: 1000 * (i + 1) + 0, 1, 2, ... (3 to 40 of them);
  `first` numbers them from there instead of 0."""
  lengths = np.random.default_rng(seed).integers(3, 40, size=n)
  return [' '.join(str(1000 * (i + 1) + j) for j in range(k))
          for i, k in enumerate(lengths, start=first)]


class CountingList(list):
  reads = 0

  def __getitem__(self, i):
    CountingList.reads += 1
    return super().__getitem__(i)


def stream_of(batches):
  """The token stream the rows were cut from: each row's inputs and its last target."""
  return [t for b in batches for inputs, targets in zip(b['inputs'], b['targets'])
          for t in list(inputs) + [targets[-1]]]


def documents_in(stream):
  """The stream cut at EOS into documents, named by their first token (the first piece may be
  the tail of a document and the last one unfinished: both dropped)."""
  cuts = [i for i, t in enumerate(stream) if t == EOS]
  pieces = [stream[a + 1:b] for a, b in zip(cuts, cuts[1:])]
  return [(p[0] // 1000 - 1, p) for p in pieces]


def batches_of(docs, n, **kw):
  kw = {'seq_len': 16, 'batch_size': 2, 'seed': 0, 'eval_fraction': 0.2, **kw}
  it = streaming.make_train_iterator(docs, NumberTokenizer(), **kw)
  return [next(it) for _ in range(n)]


# Documents.


def test_documents_are_load_corpus_documents_read_one_at_a_time(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  kjv = sources.load_corpus('kjv').docs
  (tmp_path / 'a.txt').write_text('\n\n'.join(kjv[:40]))  # Cut at blank lines, as split_text.
  lines = [json.dumps({'text': d}) for d in kjv[40:60]]
  (tmp_path / 'b.jsonl').write_text('\n'.join(lines[:5] + ['', '  '] + lines[5:]))  # No last \n.
  writer = ArrayRecordWriter(str(tmp_path / 'c.array_record'), 'group_size:1')
  for d in kjv[60:65]:
    writer.write(json.dumps({'text': d}).encode())
  writer.close()
  (tmp_path / 'd.txt').write_text('')

  docs = streaming.open_documents(str(tmp_path))
  read = [docs[i] for i in range(len(docs))]
  assert [d for d in read if d.strip()] == sources.load_corpus(str(tmp_path)).docs
  assert read.count('') == 2  # The blank lines, which training skips.
  assert len(sources.load_corpus(str(tmp_path / 'a.txt')).docs) > 40 // 2
  with pytest.raises(IndexError):
    docs[len(docs)]


def test_bad_records_are_errors_naming_file_and_line(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{not json\n')
  docs = streaming.open_documents(str(path))
  assert docs[1] == 'also fine'
  with pytest.raises(ValueError, match=r'x.jsonl, line 3: not valid JSON'):
    docs[2]
  with pytest.raises(ValueError, match=r"x.jsonl, line 1: no string field 'body'"):
    streaming.open_documents(str(path), text_key='body')  # At once, not at some later step.
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(ValueError, match='is empty'):
    streaming.open_documents(str(empty))
  with pytest.raises(FileNotFoundError, match='neither a built-in source'):
    streaming.open_documents(str(tmp_path / 'missing.jsonl'))


def test_held_out_is_a_seeded_hash_of_the_index():
  idx = np.arange(200_000)
  a = streaming.held_out(idx, seed=0, eval_fraction=0.05)
  assert abs(a.mean() - 0.05) < 0.003
  np.testing.assert_array_equal(a[1234:1300], streaming.held_out(idx[1234:1300], seed=0,
                                                                 eval_fraction=0.05))
  b = streaming.held_out(idx, seed=1, eval_fraction=0.05)
  assert (a & b).mean() < 0.005  # Another seed, another (nearly independent) split.
  assert not streaming.held_out(idx, seed=0, eval_fraction=0.0).any()
  one = [streaming._is_held_out(i, 0, 0.05) for i in range(0, 200_000, 97)]  # The readers' form.
  assert one == a[::97].tolist()
  assert [streaming._is_held_out(i, -3, 0.5) for i in range(100)] == streaming.held_out(
      np.arange(100), seed=-3, eval_fraction=0.5).tolist()
  with pytest.raises(ValueError, match=r'eval_fraction=1.0 is not in \[0, 1\)'):
    streaming.held_out(idx, seed=0, eval_fraction=1.0)


# The training stream.


def test_rows_are_packed_documents_with_their_masks():
  docs = streaming.Documents('numbers', [number_docs(50)])
  for b in batches_of(docs, 20):
    assert b['inputs'].shape == b['targets'].shape == (2, 16)
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    seg = b['segment_ids']
    starts = np.c_[np.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]]
    assert (b['positions'][starts] == 0).all()  # Each piece of a document starts at 0 ...
    np.testing.assert_array_equal(b['positions'][~starts],  # ... and counts up.
                                  (b['positions'] + 1)[:, :-1][~starts[:, 1:]])
    # The loss skips exactly the prediction of a next document's first token from an EOS.
    np.testing.assert_array_equal(b['loss_mask'] == 0, b['inputs'] == EOS)


def test_an_epoch_reads_every_training_document_once_and_none_held_out():
  texts = number_docs(60)
  docs = streaming.Documents('numbers', [texts])
  train = set(np.flatnonzero(~streaming.held_out(np.arange(60), seed=0, eval_fraction=0.2)))
  assert 30 < len(train) < 60
  read = documents_in(stream_of(batches_of(docs, 120)))  # About three epochs.
  for i, tokens in read:
    assert tokens == NumberTokenizer().encode(texts[i])  # Whole and unchanged.
  order = [i for i, _ in read]
  first = order[:len(train) - 1]  # The first piece is the tail of the first document: dropped.
  assert len(set(first)) == len(first) and set(first) <= train
  assert set(order) == train
  second = order[len(train) - 1:2 * len(train) - 1]
  assert set(second) == train and second != first  # Every epoch in a new order.


def test_processes_read_disjoint_documents():
  docs = streaming.Documents('numbers', [number_docs(80)])
  read = [[i for i, _ in documents_in(stream_of(batches_of(docs, 60, process_index=p,
                                                           process_count=2)))] for p in (0, 1)]
  train = set(np.flatnonzero(~streaming.held_out(np.arange(80), seed=0, eval_fraction=0.2)))
  assert set(read[0]) | set(read[1]) == train
  # Each epoch's order is cut between the two processes: in the first epoch (about 30 documents
  # between them) none is read by both.
  assert len(read[0]) > 40 and len(read[1]) > 40
  assert not set(read[0][:12]) & set(read[1][:12])


@pytest.mark.parametrize('read_threads', [1, 4])
def test_the_iterator_resumes_exactly(read_threads):
  docs = streaming.Documents('numbers', [number_docs(50)])
  kw = dict(seq_len=16, batch_size=2, seed=3, eval_fraction=0.1, read_threads=read_threads)
  it = streaming.make_train_iterator(docs, NumberTokenizer(), **kw)
  for _ in range(13):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(30)]
  again = streaming.make_train_iterator(docs, NumberTokenizer(), **kw)
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(30)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_nothing_is_read_before_it_is_needed():
  CountingList.reads = 0
  docs = streaming.Documents('numbers', [CountingList(number_docs(5000))])
  assert CountingList.reads == 0
  batches_of(docs, 3, read_threads=2)
  assert 0 < CountingList.reads < 60  # Three batches and grain's read-ahead, of 5,000.


def test_eval_stream_holds_the_held_out_documents_in_a_seeded_order():
  texts = number_docs(3000)
  docs = streaming.Documents('numbers', [texts])
  held = np.flatnonzero(streaming.held_out(np.arange(3000), seed=0, eval_fraction=0.1))
  order = streaming.held_out_order(3000, seed=0, eval_fraction=0.1)
  assert sorted(order.tolist()) == held.tolist()
  np.testing.assert_array_equal(order, streaming.held_out_order(3000, seed=0, eval_fraction=0.1))
  # The first few come from across the corpus, not from its beginning.
  assert order[:20].max() > 1500 and order[:20].min() < 1500
  stream, n = streaming.eval_stream(docs, NumberTokenizer(), seed=0, eval_fraction=0.1)
  assert n == len(held)
  want = [t for i in order for t in NumberTokenizer().encode(texts[i], eos=True)]
  assert stream.tokens.tolist() == want
  assert stream.doc_ids.max() == n - 1
  short, _ = streaming.eval_stream(docs, NumberTokenizer(), seed=0, eval_fraction=0.1,
                                   max_tokens=50)
  assert 50 <= len(short.tokens) < 50 + 41 and short.tokens.tolist() == want[:len(short.tokens)]
  empty, none = streaming.eval_stream(docs, NumberTokenizer(), seed=0, eval_fraction=0.0)
  assert none == 0 and len(empty.tokens) == 0


def test_tokenizer_sample_draws_training_documents_up_to_the_budget():
  texts = number_docs(400)
  docs = streaming.Documents('numbers', [texts])
  sample = streaming.tokenizer_sample(docs, seed=0, eval_fraction=0.1, max_chars=5000)
  assert 5000 <= sum(map(len, sample)) < 5000 + 400
  held = {texts[i] for i in np.flatnonzero(streaming.held_out(np.arange(400), seed=0,
                                                              eval_fraction=0.1))}
  assert not held & set(sample)
  assert sample != texts[:len(sample)]  # Drawn at random, not the corpus' first files.


def test_worker_processes_read_a_jsonl_corpus_and_resume(tmp_path):
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; trainers parse them in app.run
  texts = number_docs(60)
  path = tmp_path / 'numbers.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  docs = streaming.open_documents(str(path))  # Memory-mapped, reopened in each worker.
  make = lambda: streaming.make_train_iterator(docs, NumberTokenizer(), seq_len=16, batch_size=2,
                                               seed=0, eval_fraction=0.2, worker_count=2)
  it = make()
  first = [next(it) for _ in range(8)]
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  for worker in (0, 1):  # Each packs its own documents; their batches alternate.
    read = documents_in(stream_of((first + want)[worker::2]))
    assert len(read) >= 5
    for i, tokens in read:
      assert tokens == NumberTokenizer().encode(texts[i])
      assert not streaming.held_out([i], seed=0, eval_fraction=0.2)[0]
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(want, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


# Mixtures.


def test_sources_mix_by_weight_each_with_its_own_held_out_split():
  a, b = number_docs(300), number_docs(100, seed=1, first=10_000)
  docs = [streaming.Documents('a', [a]), streaming.Documents('b', [b])]
  kw = dict(seq_len=16, batch_size=2, seed=0, eval_fraction=0.2)
  it = streaming.make_train_iterator(docs, NumberTokenizer(), weights=[0.8, 0.2], **kw)
  batches = [next(it) for _ in range(150)]
  inputs = np.concatenate([x['inputs'] for x in batches])
  targets = np.concatenate([x['targets'] for x in batches])
  is_b = (inputs >= 10_000_000).any(axis=1)
  is_a = ((inputs > EOS) & (inputs < 10_000_000)).any(axis=1)
  # Each source packs its own rows (none holds both), and the rows, so the tokens, are mixed
  # 80/20 (by documents it would be 75/25 here: the sources' documents are alike).
  assert not (is_a & is_b).any()
  assert abs(is_b.mean() - 0.2) < 0.04
  # Each source's rows read as one stream: its documents whole and unchanged, none held out.
  read_a = documents_in(stream_of([{'inputs': inputs[~is_b], 'targets': targets[~is_b]}]))
  read_b = documents_in(stream_of([{'inputs': inputs[is_b], 'targets': targets[is_b]}]))
  held_b = streaming.held_out(np.arange(100), seed=1, eval_fraction=0.2)  # Source 1: seed + 1.
  assert len(read_b) > 10 and not held_b[[i - 10_000 for i, _ in read_b]].any()
  for i, tokens in read_a + read_b:
    assert tokens == NumberTokenizer().encode((a + [''] * 9700 + b)[i])

  state = it.get_state()
  want = [next(it) for _ in range(10)]
  again = streaming.make_train_iterator(docs, NumberTokenizer(), weights=[0.8, 0.2], **kw)
  again.set_state(state)
  for x, y in zip(want, [next(again) for _ in range(10)]):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])

  # Source b's eval (as eval_sets reads it, with b's seed): b's held-out documents only.
  stream, n = streaming.eval_stream(docs[1], NumberTokenizer(), seed=1, eval_fraction=0.2)
  assert n == held_b.sum() and (stream.tokens[stream.tokens != EOS] >= 10_000_000).all()


def test_mixture_weights_and_sources_are_checked(tmp_path):
  docs = [streaming.Documents('a', [['x'] * 30]), streaming.Documents('b', [['y'] * 10])]
  assert streaming.mixture_weights(docs) == [0.75, 0.25]  # By size: 30 bytes against 10.
  assert streaming.mixture_weights(docs, '3,1') == [0.75, 0.25]
  assert streaming.mixture_weights(docs, '3:1') == [0.75, 0.25]  # As a sweep grid lists it.
  with pytest.raises(ValueError, match=r"gives 3 weights for 2 sources \(a, b\)"):
    streaming.mixture_weights(docs, '1,1,1')
  with pytest.raises(ValueError, match='every weight must be positive'):
    streaming.mixture_weights(docs, '1,0')
  with pytest.raises(ValueError, match='not a comma-separated list of numbers'):
    streaming.mixture_weights(docs, '0.5;0.5')
  with pytest.raises(ValueError, match='must be distinct'):
    streaming.open_sources('kjv+kjv')
  (tmp_path / 'a.jsonl').write_text('{"text": "from a"}\n')
  (tmp_path / 'b+c.jsonl').write_text('{"text": "from b+c"}\n')
  both = f'{tmp_path / "a.jsonl"}+{tmp_path / "b+c.jsonl"}'
  assert [d[0] for d in streaming.open_sources(both)] == ['from a', 'from b+c']
  assert sources.load_corpus(both).docs == ['from a', 'from b+c']  # In memory: one after the other.


def test_eval_sets_give_each_source_the_same_batches_whatever_the_weights():
  a, b = number_docs(600), number_docs(600, seed=1, first=10_000)
  docs = [streaming.Documents('data/web.jsonl', [a]), streaming.Documents('tfds:c4/en', [b])]
  assert streaming.source_labels(docs) == ['web', 'c4_en']
  assert streaming.source_labels([docs[0], docs[0]]) == ['web_0', 'web_1']
  kw = dict(seed=0, eval_fraction=0.2, seq_len=16, batch_size=2)
  sets, n = streaming.eval_sets(docs, NumberTokenizer(), max_batches=5, **kw)
  assert list(sets) == ['web', 'c4_en'] and [len(v) for v in sets.values()] == [3, 3]
  assert (sets['web'][0]['inputs'][sets['web'][0]['inputs'] != EOS] < 10_000_000).all()
  assert (sets['c4_en'][0]['inputs'][sets['c4_en'][0]['inputs'] != EOS] >= 10_000_000).all()
  one, _ = streaming.eval_sets(docs[0], NumberTokenizer(), max_batches=3, **kw)
  assert isinstance(one, list) and len(one) == 3
  tiny = streaming.Documents('few', [['7001 7002'] * 4])  # Held out (seed 1): one, 3 tokens.
  with pytest.raises(ValueError, match=r"'few': its held-out documents fill \d+ rows of "
                                       r'seq_len=16, fewer than one eval batch of 2'):
    streaming.eval_sets([docs[0], tiny], NumberTokenizer(), max_batches=2, seed=0,
                        eval_fraction=0.5, seq_len=16, batch_size=2)


def test_only_pretraining_and_sft_have_the_streaming_keys():
  """The other stages read their data into memory: the keys are not in their configs, so setting
  them there is the CLI's unknown-key error instead of a silent no-op."""
  from configs import dpo, grpo, lora, pretrain, reward, sft
  assert 'streaming' in pretrain.get_config('tiny').data
  assert 'mixture_weights' in pretrain.get_config('tiny').data
  assert 'streaming' in sft.get_config('tiny').data and 'streaming' in lora.get_config('tiny').data
  assert 'mixture_weights' not in sft.get_config('tiny').data
  for module in (dpo, reward, grpo):
    c = module.get_config('tiny')
    assert 'streaming' not in c.data and 'mixture_weights' not in c.data, module.__name__


# Conversations (SFT with data.streaming).


@pytest.fixture(scope='module')
def chat_tokenizer():
  from data.tokenizer import train_tokenizer
  words = ' '.join(f'question answer step {i} equals' for i in range(200))
  return train_tokenizer([words] * 20, vocab_size=300)


def conversations_file(path, n=60):
  """Line i: a user turn naming i and an assistant answer of 1 to 12 words (line 7: 40 words,
  longer than a row); every third line also has a system turn."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for i in range(n):
      words = 40 if i == 7 else int(rng.integers(1, 13))
      messages = ([{'role': 'system', 'content': 'step'}] if i % 3 == 0 else []) + [
          {'role': 'user', 'content': f'question {i}'},
          {'role': 'assistant', 'content': ' '.join(['answer'] * words) + f' {i}'}]
      f.write(json.dumps({'messages': messages}) + '\n')
  return path


def test_conversations_are_packed_whole_with_their_assistant_mask(tmp_path, chat_tokenizer):
  from data import chat, sft_sources
  records = streaming.open_records(str(conversations_file(tmp_path / 'chat.jsonl')))
  encoded = [chat.encode_conversation(chat_tokenizer, records[i]['messages'])
             for i in range(len(records))]
  kw = dict(seq_len=48, batch_size=2, seed=0)
  make = lambda: streaming.make_sft_iterator(
      [(records, 0.2, sft_sources.conversation_example)], chat_tokenizer, **kw)
  it = make()
  batches = [next(it) for _ in range(40)]
  held = set(np.flatnonzero(streaming.held_out(np.arange(60), seed=0, eval_fraction=0.2)))
  seen = set()
  for b in batches:
    for row in range(2):
      seg = b['segment_ids'][row]
      for s in set(seg[seg > 0].tolist()):
        at = np.flatnonzero(seg == s)
        inputs = b['inputs'][row][at].tolist()
        assert b['positions'][row][at].tolist() == list(range(len(at)))  # From its start ...
        match = [i for i, (ids, _) in enumerate(encoded) if ids[:len(inputs)] == inputs]
        assert len(match) == 1, inputs  # ... a whole conversation (or a long one's first 49).
        i = match[0]
        ids, mask = encoded[i]
        packed = min(len(ids), 49)  # A conversation longer than a row is cut to seq_len + 1.
        assert len(at) in (packed, packed - 1)  # -1: it ends the row, its last token a target.
        # The loss: the assistant tokens' mask, never across into the next conversation.
        want = [mask[j + 1] if j + 1 < packed else 0 for j in range(len(at))]
        assert b['loss_mask'][row][at].tolist() == want
        seen.add(i)
      assert (b['loss_mask'][row][seg == 0] == 0).all()
  assert not seen & held and len(seen) > 30 and 7 in seen | held
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  again = make()
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(5)]):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_streamed_sft_holds_out_by_hash_and_names_bad_lines(tmp_path, chat_tokenizer):
  from configs import sft
  from data import sft_sources
  path = conversations_file(tmp_path / 'chat.jsonl')
  c = sft.get_config('tiny')
  c.data.source, c.data.streaming = str(path), True
  held = sft_sources.held_out_examples(c.data, 0)
  records = streaming.open_records(str(path))
  ids = np.flatnonzero(streaming.held_out(np.arange(60), seed=0, eval_fraction=c.data.eval_fraction))
  assert sorted(e['messages'][-2]['content'] for e in held) == sorted(
      records[i]['messages'][-2]['content'] for i in ids)
  c.data.streaming = False  # In memory: load_sft_examples's own split.
  assert len(sft_sources.held_out_examples(c.data, 0)) == round(60 * c.data.eval_fraction)

  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  it = streaming.make_sft_iterator([(streaming.open_records(str(bad)), 0.0,
                                     sft_sources.conversation_example)], chat_tokenizer,
                                   seq_len=16, batch_size=1, seed=0, read_threads=1)
  with pytest.raises(ValueError, match=r'bad.jsonl:1: no assistant turn to train on'):
    next(it)
