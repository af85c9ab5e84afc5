"""Supervised fine-tuning on conversations: full parameters, LoRA or QLoRA.

  python -m trainers.sft --config=configs/sft.py:tiny --workdir=runs/sft --config.init_from=runs/pre
  python -m trainers.sft --config=configs/lora.py:tiny ...    (adapters only)
  python -m trainers.sft --config=configs/qlora.py:tiny ...   (adapters over an NF4 base)

Conversations are rendered with the chat template (data/chat.py) and packed several to a row,
kept apart by segment ids: all of them before step 1, or with data.streaming a JSONL set's lines
as training reaches them (data/streaming.py). The loss is the cross-entropy of the assistant tokens only,
    L = -1/N * sum_{t : assistant token} log p(x_{t+1} | x_{<=t}),
where "assistant token" means the content and end-of-turn token of every assistant turn (the
loss mask). With lora.rank > 0 the base is frozen (quantized to NF4 for QLoRA) and only the
adapters are trained and checkpointed (models/lora.py); `models.checkpoint.load_model` merges them
back into a plain model for eval, serving and later stages. Everything else (optimizer,
resumption, metrics) is the shared loop's.
"""
import dataclasses

import jax
import ml_collections
import numpy as np

from data import chat, pipeline, sft_sources, streaming
from models.losses import token_cross_entropy
from trainers import cli, common, loop
from trainers import lora as adapters
from trainers import workdir as workdir_lib


@dataclasses.dataclass
class SFTData:
  tokenizer: object
  train_rows: dict  # [N, seq_len] arrays (data/chat.py pack_conversations)
  eval_rows: dict | None
  n_train: int  # Conversations.
  n_eval: int


def prepare_data(config: ml_collections.ConfigDict, tokenizer) -> SFTData:
  train, held_out = sft_sources.load_sft_examples(config.data, config.seed)
  encode = lambda examples: [chat.encode_conversation(tokenizer, e['messages']) for e in examples]
  train_rows = chat.pack_conversations(encode(train), config.data.seq_len, tokenizer.pad_id)
  eval_rows = (chat.pack_conversations(encode(held_out), config.data.seq_len, tokenizer.pad_id)
               if held_out else None)
  print(f'SFT data {config.data.source!r}: {len(train)} training conversations in '
        f'{len(train_rows["inputs"])} rows, {len(held_out)} held out.')
  return SFTData(tokenizer, train_rows, eval_rows, len(train), len(held_out))


def streamed_data(config: ml_collections.ConfigDict, tokenizer, per_process: int):
  """data.streaming: the training iterator over conversations read as it reaches them, and the
  held-out rows (the held-out conversations are read, the training ones are not)."""
  parts, held_out = sft_sources.streamed_examples(config.data, config.seed)
  train_iter = streaming.make_sft_iterator(
      parts, tokenizer, seq_len=config.data.seq_len,
      batch_size=per_process, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)
  print(f'SFT data {config.data.source!r}: {sum(len(e) for e, _, _ in parts):,} examples, '
        f'streamed; {len(held_out)} held out.')
  if not held_out:
    return train_iter, None
  encoded = [chat.encode_conversation(tokenizer, e['messages']) for e in held_out]
  return train_iter, chat.pack_conversations(encoded, config.data.seq_len, tokenizer.pad_id)


def eval_batches(rows: dict, *, batch_size: int, max_batches: int) -> list[dict]:
  """The first max_batches batches of rows, the last one padded with empty rows (loss mask 0)."""
  n = min(len(rows['inputs']), batch_size * max_batches)
  n_batches = -(-n // batch_size)
  padded = {k: np.zeros((n_batches * batch_size,) + v.shape[1:], v.dtype) for k, v in rows.items()}
  for k, v in rows.items():
    padded[k][:n] = v[:n]
  return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in padded.items()}
          for i in range(n_batches)]


def sft_loss(model, batch, rng):
  del rng
  logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  loss_sum, count, correct = token_cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return loss_sum, count, {'accuracy': correct}


@workdir_lib.stage('sft')  # One live run per workdir; see trainers/workdir.py.
def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Result:
  if not config.init_from:
    raise ValueError('SFT starts from a pretrained model: set --config.init_from=WORKDIR')
  adapters.spec(config)  # A bad lora block fails before anything is read or written.
  tokenizer = common.tokenizer_for(config, workdir)
  model_cfg = common.model_config(config, tokenizer.vocab_size)
  mesh = common.mesh_from_config(config)
  per_process = common.per_process_batch(config)
  if config.data.streaming:
    train_iter, eval_rows = streamed_data(config, tokenizer, per_process)
  else:
    data = prepare_data(config, tokenizer)
    eval_rows = data.eval_rows
    rows = pipeline.RowTable(data.train_rows)
    train_iter = pipeline.make_train_iterator(
        rows, batch_size=per_process, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=config.data.worker_count)
  held_out = None
  if eval_rows is not None and config.train.eval_batches:
    held_out = eval_batches(eval_rows, batch_size=per_process,
                            max_batches=config.train.eval_batches)

  # With adapters (trainers/lora.py) the frozen base is loaded on every start, resumed ones
  # included: an adapter run's checkpoints hold only the adapters.
  model, spec = adapters.prepare_model(config, workdir, tokenizer, model_cfg, mesh)
  trainable = adapters.trainable(spec)
  print(adapters.describe(model, trainable, model_cfg, spec))
  # Model FLOPs for full fine-tuning; with adapters the frozen base needs no weight gradients,
  # so 6N would overstate the work and MFU is not reported.
  flops = 0.0 if spec else model_cfg.train_flops_per_token(config.data.seq_len)
  return loop.train(config, workdir, model, adapters.wrap_loss(sft_loss, spec), train_iter,
                    held_out, mesh=mesh, rules=config.sharding_rules, trainable=trainable,
                    flops_per_token=flops)


if __name__ == '__main__':
  cli.run_stage(run, 'configs/sft.py:tiny')
