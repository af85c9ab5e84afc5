"""Writes a workdir's model as a Hugging Face checkpoint directory that transformers loads.

  python -m launch.export_checkpoint --workdir=runs/smollm2_sft --format=hf --out=exports/smollm2

Any workdir works: an imported checkpoint, a pretrained or fine-tuned one (LoRA adapters are
merged into the weights a trainer saves). The directory gets config.json (LlamaForCausalLM, or
Qwen2ForCausalLM for a model with q/k/v biases), float32 safetensors in shards of at most
`max_shard_bytes` (with model.safetensors.index.json when there are several) and the tokenizer:
an imported checkpoint's tokenizer.json and chat template as they came, or our sentencepiece
tokenizer.model for a model we trained from scratch. launch/hf_weights.py holds the name mapping.
"""
import json
import os

from absl import flags
from safetensors.numpy import save_file

from configs import entry
from data.hf_tokenizer import HFTokenizer
from data.tokenizer import Tokenizer, load_tokenizer
from launch import hf_weights, staging
from models import checkpoint

FORMATS = ('hf',)


def _write_shards(tensors, out: str, max_shard_bytes: int) -> None:
  """Saves (name, array) pairs in shards of at most max_shard_bytes, each written as soon as it
  is full, so the host holds one shard at a time. Files are named once their count is known."""
  written, current, size, total = [], {}, 0, 0

  def flush():
    path = os.path.join(out, f'.shard{len(written)}.tmp')
    save_file(current, path, metadata={'format': 'pt'})
    written.append((path, list(current)))

  for name, array in tensors:
    if current and size + array.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
    current[name] = array
    size, total = size + array.nbytes, total + array.nbytes
  flush()
  if len(written) == 1:
    os.rename(written[0][0], os.path.join(out, 'model.safetensors'))
    return
  weight_map = {}
  for i, (path, names) in enumerate(written):
    file = f'model-{i + 1:05d}-of-{len(written):05d}.safetensors'
    os.rename(path, os.path.join(out, file))
    weight_map.update({name: file for name in names})
  with open(os.path.join(out, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)


def _write_tokenizer(tokenizer, out: str) -> None:
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.save(os.path.join(out, HFTokenizer.FILENAME))
    return
  # Our sentencepiece model: transformers reads it as a Llama tokenizer with our special ids,
  # adding BOS as our trainers and engine do (every document and prompt starts with it).
  tokenizer.save(os.path.join(out, Tokenizer.FILENAME))
  config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True, 'add_eos_token': False,
            'add_prefix_space': False, 'legacy': False, 'bos_token': '<s>', 'eos_token': '</s>',
            'unk_token': '<unk>', 'pad_token': '<pad>'}
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def export_hf(workdir: str, out: str, *, step: int | None = None,
              max_shard_bytes: int = 4 << 30) -> str:
  """Writes the workdir's newest (or given) checkpoint under `out`; returns `out`."""
  tokenizer = load_tokenizer(workdir)
  model, _ = checkpoint.load_model(workdir, step=step)
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} is not empty; export into a new directory')
  # Into OUT.incomplete, renamed at the end: an interrupted export never looks complete.
  with staging.staged_directory(out) as temp:
    config = hf_weights.config_to_hf(model.cfg, tokenizer.bos_id, tokenizer.eos_id)
    with open(os.path.join(temp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    _write_shards(hf_weights.hf_tensors(model), temp, max_shard_bytes)
    _write_tokenizer(tokenizer, temp)
  return out


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Workdir to export.', required=True)
  fmt = flags.DEFINE_enum('format', 'hf', FORMATS, 'Output format.')
  out = flags.DEFINE_string('out', None, 'Output directory (new or empty).',
                            required=True)
  step = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')

  def _main(argv):
    del argv  # --format has one value so far: 'hf'.
    print(f'Wrote {export_hf(workdir.value, out.value, step=step.value)}')

  entry.run_main(_main)


if __name__ == '__main__':
  main()
