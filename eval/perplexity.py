"""Held-out loss and perplexity of a workdir's newest checkpoint.

  python -m eval.perplexity --workdir=runs/small [--max_batches=0]

Rebuilds the run's held-out split from its config.json (same source, seed and eval_fraction, so
the documents are the ones the trainer never saw; a `data.streaming` run's hashed split, read
only as far as --max_batches needs), tokenizes it with the run's tokenizer, and reports
perplexity = exp(mean next-token cross-entropy) as JSON on stdout and in
WORKDIR/eval_perplexity.json.
"""
import json
import os

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from configs import entry
from data import pipeline, sources, streaming
from data.tokenizer import load_tokenizer
from models import checkpoint
from models.losses import token_cross_entropy


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a run directory')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_perplexity(workdir: str, *, max_batches: int = 0, batch_size: int = 0,
                        dtype: str = 'auto') -> dict:
  config = load_run_config(workdir)
  tokenizer = load_tokenizer(workdir)
  batch_size = batch_size or config.train.batch_size
  if config.data.get('streaming'):
    # The held-out documents as the streamed run drew them; only as many as max_batches needs,
    # by source for a mixture (as the trainer's eval_loss_<source>).
    docs = streaming.open_sources(config.data.source, text_key=config.data.text_key)
    sets, n_docs = streaming.eval_sets(
        docs, tokenizer, seed=config.seed, eval_fraction=config.data.eval_fraction,
        seq_len=config.data.seq_len, batch_size=batch_size, max_batches=max_batches)
  else:
    corpus = sources.load_corpus(config.data.source, text_key=config.data.text_key,
                                 max_chars=config.data.max_chars)
    _, eval_docs = pipeline.split_documents(
        corpus.docs, eval_fraction=config.data.eval_fraction, seed=config.seed)
    stream, n_docs = pipeline.tokenize_documents(tokenizer, eval_docs), len(eval_docs)
    if n_docs:
      rows = (len(stream.tokens) - 1) // config.data.seq_len
      sets = pipeline.make_eval_batches(
          stream, seq_len=config.data.seq_len, batch_size=batch_size,
          max_batches=max_batches or max(rows // batch_size, 1))
  if not n_docs:
    raise ValueError(f'{workdir}: the run held out no documents (data.eval_fraction='
                     f'{config.data.eval_fraction})')
  model, step = checkpoint.load_model(workdir, dtype=dtype)

  @nnx.jit
  def batch_loss(model, batch):
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    return token_cross_entropy(logits, batch['targets'], batch['loss_mask'])

  def measure(batches, suffix=''):
    totals = np.zeros(3)
    for batch in batches:
      totals += np.array(jax.device_get(batch_loss(model, batch)))
    loss = float(totals[0] / totals[1])
    return totals, {f'eval_loss{suffix}': loss, f'perplexity{suffix}': float(np.exp(loss)),
                    f'accuracy{suffix}': float(totals[2] / totals[1]),
                    f'tokens{suffix}': int(totals[1])}

  each, totals = {}, np.zeros(3)
  for name, batches in (sets.items() if isinstance(sets, dict) else [('', sets)]):
    mine, metrics = measure(batches, f'_{name}' if name else '')
    totals += mine
    if name:
      each.update(metrics)
  loss = float(totals[0] / totals[1])
  result = {'workdir': workdir, 'step': int(step), 'dtype': model.cfg.dtype, 'eval_loss': loss,
            'perplexity': float(np.exp(loss)), 'accuracy': float(totals[2] / totals[1]),
            'tokens': int(totals[1]), 'documents': n_docs, **each}
  with open(os.path.join(workdir, 'eval_perplexity.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Run directory to evaluate.', required=True)
  max_batches = flags.DEFINE_integer('max_batches', 0, 'Batches to evaluate (0 = all held out).')
  dtype = entry.define_dtype_flag()
  entry.run_main(lambda argv: print(json.dumps(evaluate_perplexity(
      workdir.value, max_batches=max_batches.value, dtype=dtype.value))))


if __name__ == '__main__':
  main()
