"""The pretraining (or SFT) input pipeline on a data set of a given size: the in-memory path
against `data.streaming` (data/streaming.py), each in its own child process.

  python -m bench.data_pipeline                  # a 200 MB JSONL corpus; about 1 minute on 2 cores
  python -m bench.data_pipeline --mb=1000 --sides=streaming
  python -m bench.data_pipeline --task=sft       # conversations: user and assistant halves of
                                                 # the same texts' paragraphs, rows of 512

The corpus is the built-in Shakespeare and King James texts repeated (each copy's documents
numbered, so no two are equal) into one JSONL file of --mb megabytes, and both sides tokenize
with one BPE tokenizer trained beforehand (so neither pays for that). Per side it prints:
- ready: seconds from nothing to the first batch (the in-memory path reads, splits and tokenizes
  the whole corpus first, with sentencepiece's threads; streaming indexes the file's lines, draws
  its held-out documents and tokenizes what the first batch needs);
- rows/s: packed rows of --seq tokens per second over --batches batches after the first, with
  nothing else running (a trainer's step is what it must keep ahead of: `small` on this CPU
  trains about 14 rows of 256 a second);
- peak RSS: the child's maximum resident memory (ru_maxrss), imports included.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SIDES = ('memory', 'streaming')


def write_corpus(path: str, mb: int, task: str = 'pretrain') -> int:
  from data import sources
  base = sources.load_corpus('shakespeare').docs + sources.load_corpus('kjv').docs
  if task == 'sft':  # One conversation per paragraph: its first half asked, its second answered.
    base = [p for doc in base for p in doc.split('\n\n') if len(p) > 80]
  written, copy, n = 0, 0, 0
  with open(path, 'w') as f:
    while written < mb << 20:
      for doc in base:
        if task == 'sft':
          half = len(doc) // 2
          record = {'messages': [{'role': 'user', 'content': f'{copy}.{n} {doc[:half]}'},
                                 {'role': 'assistant', 'content': doc[half:]}]}
        else:
          record = {'text': f'{copy}.{n}\n{doc}'}
        line = json.dumps(record) + '\n'
        f.write(line)
        written += len(line)
        n += 1
        if written >= mb << 20:
          break
      copy += 1
  return n


def sft_child(args, tokenizer):
  from configs import sft
  from data import chat, pipeline, sft_sources, streaming
  data = sft.get_config('tiny').data
  data.source, data.seq_len, data.streaming = args.corpus, args.seq, args.side == 'streaming'
  if args.side == 'memory':
    train, _ = sft_sources.load_sft_examples(data, 0)
    rows = chat.pack_conversations(
        [chat.encode_conversation(tokenizer, e['messages']) for e in train], args.seq,
        tokenizer.pad_id)
    return pipeline.make_train_iterator(pipeline.RowTable(rows), batch_size=args.batch, seed=0)
  parts, _ = sft_sources.streamed_examples(data, 0)  # As the trainer: its eval rows read too.
  return streaming.make_sft_iterator(parts, tokenizer, seq_len=args.seq, batch_size=args.batch,
                                     seed=0)


def child(args) -> dict:
  import jax  # Imported first in both sides, so RSS compares like with like.
  from data import pipeline, sources, streaming
  from data.tokenizer import load_tokenizer
  del jax
  tokenizer = load_tokenizer(args.tokenizer)
  start = time.perf_counter()
  if args.task == 'sft':
    it = sft_child(args, tokenizer)
  elif args.side == 'memory':
    corpus = sources.load_corpus(args.corpus)
    train, _ = pipeline.split_documents(corpus.docs, eval_fraction=0.02, seed=0)
    it = pipeline.make_train_iterator(
        pipeline.PackedRows(pipeline.tokenize_documents(tokenizer, train), args.seq),
        batch_size=args.batch, seed=0)
  else:
    docs = streaming.open_documents(args.corpus)
    streaming.eval_stream(docs, tokenizer, seed=0, eval_fraction=0.02,
                          max_tokens=8 * args.batch * args.seq + 1)
    it = streaming.make_train_iterator(docs, tokenizer, seq_len=args.seq, batch_size=args.batch,
                                       seed=0, eval_fraction=0.02)
  next(it)
  ready = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  rows_per_s = args.batches * args.batch / (time.perf_counter() - start)
  return {'side': args.side, 'ready_s': ready, 'rows_per_s': rows_per_s,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mb', type=int, default=200, help='corpus size in megabytes')
  p.add_argument('--sides', default=','.join(SIDES))
  p.add_argument('--task', default='pretrain', choices=('pretrain', 'sft'))
  p.add_argument('--seq', type=int, default=0, help='row length (default 256, SFT 512)')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--batches', type=int, default=200, help='timed batches after the first')
  p.add_argument('--side', help=argparse.SUPPRESS)
  p.add_argument('--corpus', help=argparse.SUPPRESS)
  p.add_argument('--tokenizer', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.seq = args.seq or (512 if args.task == 'sft' else 256)
  if args.side:
    print(json.dumps(child(args)))
    return
  from data import sources
  from data.tokenizer import save_tokenizer, train_tokenizer
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, 'corpus.jsonl')
    n = write_corpus(corpus, args.mb, args.task)
    save_tokenizer(train_tokenizer(sources.load_corpus('shakespeare').docs, vocab_size=8000),
                   tmp)
    print(f'corpus: {n:,} {"conversations" if args.task == "sft" else "documents"}, '
          f'{os.path.getsize(corpus) / 2**20:,.0f} MB of JSONL; rows of {args.seq} tokens, '
          f'batches of {args.batch}, {os.cpu_count()} CPUs')
    results = []
    for side in args.sides.split(','):
      out = subprocess.run([sys.executable, '-m', 'bench.data_pipeline', f'--side={side}',
                            f'--task={args.task}',
                            f'--corpus={corpus}', f'--tokenizer={tmp}', f'--seq={args.seq}',
                            f'--batch={args.batch}', f'--batches={args.batches}'],
                           capture_output=True, text=True, check=True)
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f'{"side":<10} {"ready (s)":>10} {"rows/s":>10} {"peak RSS (MB)":>14}')
  for r in results:
    print(f'{r["side"]:<10} {r["ready_s"]:>10.1f} {r["rows_per_s"]:>10,.0f} '
          f'{r["peak_rss_mb"]:>14,.0f}')
  if len(results) == 2:
    a, b = results
    print(f'{b["side"]} / {a["side"]}: ready {b["ready_s"] / a["ready_s"]:.3f}x the time, '
          f'rows/s {b["rows_per_s"] / a["rows_per_s"]:.2f}x, '
          f'peak RSS {b["peak_rss_mb"] / a["peak_rss_mb"]:.2f}x')


if __name__ == '__main__':
  main()
