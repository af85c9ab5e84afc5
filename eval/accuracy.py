"""Exact-match accuracy of the final answer on held-out generated problems, and held-out SFT loss.

  python -m eval.accuracy --workdir=runs/sft [--num_problems=100]

Rebuilds the run's held-out problems from its config.json (same source, seed and sizes, so none
was trained on), prompts the model with each question through the chat template, decodes greedily
until the end-of-turn token, and counts an answer correct when the number after the last `#### `
equals the reference exactly. Also reports the masked cross-entropy of the held-out
conversations (assistant tokens only). JSON on stdout and in WORKDIR/eval_accuracy.json.

Works on any workdir with a tokenizer: an SFT/LoRA run, or a pretrained one (pass --task_from=
an SFT workdir, or rely on the default problems, to measure the pretrained model's baseline).
"""
import json
import os

import jax
import numpy as np
from absl import flags
from flax import nnx

from configs import entry
from configs import sft as sft_config
from data import chat, sft_sources
from data.tokenizer import load_tokenizer
from eval.perplexity import load_run_config
from models import checkpoint
from models.losses import token_cross_entropy
from serving import offline


def task_config(workdir: str, task_from: str = ''):
  """The data/eval settings that define the problems: those of task_from, else the workdir's own
  run when it was an SFT run, else the `tiny` SFT preset's."""
  config = load_run_config(task_from or workdir)
  if 'eval' not in config:
    defaults = sft_config.get_config('tiny')
    defaults.seed = config.seed
    return defaults
  return config


def evaluate_accuracy(workdir: str, *, task_from: str = '', num_problems: int = 0,
                      batch_size: int = 32) -> dict:
  config = task_config(workdir, task_from)
  tokenizer = load_tokenizer(workdir)
  model, step = checkpoint.load_model(workdir)
  _, held_out = sft_sources.load_sft_examples(config.data, config.seed)
  problems = [e for e in held_out if e['answer'] is not None]
  problems = problems[:num_problems or config.eval.num_problems]
  eot = chat.end_of_turn_id(tokenizer)

  # One engine for every problem: its slots are refilled as answers finish (serving/offline.py).
  prompts = [chat.apply_chat_template(tokenizer, e['messages'][:-1]) for e in problems]
  n_new = config.eval.max_new_tokens
  outs = offline.generate(offline.engine_for(model, prompts, n_new, max_slots=batch_size),
                          prompts, max_tokens=n_new, eos_id=eot)
  correct, samples = 0, []
  for e, out in zip(problems, outs):
    text = tokenizer.decode([t for t in out.tokens if t != eot])
    correct += sft_sources.final_answer(text) == e['answer']
    if len(samples) < 3:
      samples.append({'question': e['messages'][0]['content'], 'answer': text,
                      'expected': e['answer']})

  @nnx.jit
  def batch_loss(model, batch):
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    return token_cross_entropy(logits, batch['targets'], batch['loss_mask'])

  encoded = [chat.encode_conversation(tokenizer, e['messages']) for e in held_out]
  rows = chat.pack_conversations(encoded, config.data.seq_len, tokenizer.pad_id)
  totals = np.zeros(3)
  for i in range(0, len(rows['inputs']), batch_size):
    totals += np.array(jax.device_get(batch_loss(model, {k: v[i:i + batch_size]
                                                         for k, v in rows.items()})))
  result = {'workdir': workdir, 'step': int(step), 'source': config.data.source,
            'problems': len(problems), 'accuracy': correct / max(len(problems), 1),
            'eval_loss': float(totals[0] / totals[1]), 'samples': samples}
  with open(os.path.join(workdir, 'eval_accuracy.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Run directory to evaluate.', required=True)
  task_from = flags.DEFINE_string('task_from', '', 'Take the problems from this SFT workdir.')
  num_problems = flags.DEFINE_integer('num_problems', 0, 'Problems to score (0 = the config\'s).')
  entry.run_main(lambda argv: print(json.dumps(evaluate_accuracy(
      workdir.value, task_from=task_from.value, num_problems=num_problems.value))))


if __name__ == '__main__':
  main()
