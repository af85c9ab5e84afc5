"""Pretraining: next-token prediction on packed documents.

  python -m trainers.pretrain --config=configs/pretrain.py:small --workdir=runs/small

The loss is the mean cross-entropy of each token given the tokens before it in its own document,
    L = -1/N * sum_{rows, t : mask} log p(x_{t+1} | x_{<=t}),
with documents packed into fixed-length rows and kept apart by segment ids (no attention and no
loss across a document boundary). The corpus is tokenized up front (data/pipeline.py) or, with
data.streaming, read as training reaches it, several sources mixed by token share and each
evaluated on its own (data/streaming.py). Everything else (optimizer, checkpoints, resumption,
metrics) is the shared loop's.
"""
import dataclasses

import jax
import ml_collections
from flax import nnx

from data import pipeline, sources, streaming
from models.losses import token_cross_entropy
from trainers import cli, common, loop
from trainers import workdir as workdir_lib


def next_token_loss(model, batch, rng):
  del rng  # No dropout in pretraining.
  logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  loss_sum, count, correct = token_cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return loss_sum, count, {'accuracy': correct}


@dataclasses.dataclass
class PretrainData:
  tokenizer: object
  train: pipeline.TokenStream
  eval: pipeline.TokenStream


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PretrainData:
  """The in-memory path: the whole corpus read, split and tokenized before step 1."""
  if config.data.mixture_weights:
    raise ValueError(f'data.mixture_weights={config.data.mixture_weights!r} needs '
                     'data.streaming=True (without it, sources joined by "+" are read one after '
                     'the other and mixed in proportion to their sizes)')
  corpus = sources.load_corpus(config.data.source, text_key=config.data.text_key,
                               max_chars=config.data.max_chars)
  print(f'Corpus {corpus.name!r}: {len(corpus.docs)} documents, '
        f'{sum(map(len, corpus.docs)):,} characters'
        + (f', {corpus.n_replaced} undecodable byte sequences replaced' if corpus.n_replaced else ''))
  train_docs, eval_docs = pipeline.split_documents(
      corpus.docs, eval_fraction=config.data.eval_fraction, seed=config.seed)
  tokenizer = common.tokenizer_for(config, workdir, train_docs)
  return PretrainData(tokenizer, pipeline.tokenize_documents(tokenizer, train_docs),
                      pipeline.tokenize_documents(tokenizer, eval_docs))


def streamed_data(config: ml_collections.ConfigDict, workdir: str, per_process: int):
  """data.streaming: the tokenizer, the training iterator and the eval batches, with nothing
  read but a tokenizer's sample (when a new one is trained) and the eval documents."""
  if config.data.max_chars:  # Set by the tiny preset to keep tokenizing up front quick.
    print(f'data.max_chars={config.data.max_chars} bounds what the in-memory path reads and '
          'tokenizes before step 1; a streamed corpus is read as training reaches it, so it is '
          'not applied.')
  docs = streaming.open_sources(config.data.source, text_key=config.data.text_key)
  weights = streaming.mixture_weights(docs, config.data.mixture_weights)
  for d, w in zip(docs, weights):
    print(f'Corpus {d.name!r}: {len(d):,} documents, streamed (read and tokenized as training '
          'reaches them)' + (f', {w:.1%} of the training tokens' if len(docs) > 1 else ''))
  split = dict(seed=config.seed, eval_fraction=config.data.eval_fraction, weights=weights)
  tokenizer = common.tokenizer_for(config, workdir, lambda: streaming.tokenizer_sample(
      docs, **split, max_chars=config.tokenizer.train_chars))
  train_iter = streaming.make_train_iterator(
      docs, tokenizer, seq_len=config.data.seq_len, batch_size=per_process, **split,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count)
  eval_batches, n_eval = None, 0
  if config.train.eval_batches:
    eval_batches, n_eval = streaming.eval_sets(
        docs, tokenizer, seed=config.seed, eval_fraction=config.data.eval_fraction,
        seq_len=config.data.seq_len, batch_size=per_process,
        max_batches=config.train.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    print(f'Held out: {n_eval} documents for the eval batches, drawn from across the corpus'
          + (f'; eval_loss_<source> for {", ".join(eval_batches)}'
             if isinstance(eval_batches, dict) else '') + '.')
  return tokenizer, train_iter, eval_batches or None


@workdir_lib.stage('pretrain')  # One live run per workdir; see trainers/workdir.py.
def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Result:
  per_process = common.per_process_batch(config)
  if config.data.streaming:
    tokenizer, train_iter, eval_batches = streamed_data(config, workdir, per_process)
  else:
    data = prepare_data(config, workdir)
    tokenizer = data.tokenizer
    train_iter = pipeline.make_train_iterator(
        pipeline.PackedRows(data.train, config.data.seq_len), batch_size=per_process,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)
    eval_batches = None
    if len(data.eval.tokens) and config.train.eval_batches:
      eval_batches = pipeline.make_eval_batches(
          data.eval, seq_len=config.data.seq_len, batch_size=per_process,
          max_batches=config.train.eval_batches, process_index=jax.process_index(),
          process_count=jax.process_count())
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  common.write_workdir(config, workdir, tokenizer, model_cfg)
  model = common.initial_model(config, workdir, model_cfg, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  print(f'Model {config.model.preset!r}: {n_params:,} parameters; mesh {dict(mesh.shape)}.')
  return loop.train(config, workdir, model, next_token_loss, train_iter, eval_batches,
                    mesh=mesh, rules=config.sharding_rules,
                    flops_per_token=model_cfg.train_flops_per_token(config.data.seq_len))


if __name__ == '__main__':
  cli.run_stage(run, 'configs/pretrain.py:tiny')
