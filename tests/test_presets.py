"""Large presets are checked with jax.eval_shape: no memory is allocated."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs.base import DEFAULT_SHARDING_RULES
from models import llama, presets, sharding

# Published parameter counts (Meta's model cards / the Hugging Face checkpoints).
PUBLISHED = {'llama3_8b': 8.03e9, 'llama3_70b': 70.55e9, '1b': 1.236e9, 'smollm2_135m': 134.5e6,
             '374m': 374e6}


def _abstract_state(name):
  cfg = presets.PRESETS[name]
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: llama.Llama(cfg, rules=DEFAULT_SHARDING_RULES,
                                               rngs=nnx.Rngs(0)))
  return cfg, nnx.state(model)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
  cfg, state = _abstract_state(name)
  n = sum(x.size for x in jax.tree.leaves(state))
  assert n == cfg.num_params()
  assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, n


def test_training_flops_and_datasheet_peaks():
  cfg = presets.PRESETS['374m']
  # DESIGN.md's figure for the GPU benchmark shape: 2.651 GFLOP per token at seq 2048.
  assert cfg.train_flops_per_token(2048) == pytest.approx(2.651e9, rel=1e-3)
  # Llama 3 8B at 8k: 6 x 7.50B matmul parameters (the 525M-parameter input table left out)
  # plus attention.
  big = presets.PRESETS['llama3_8b']
  assert big.train_flops_per_token(8192) == pytest.approx(
      6 * (big.num_params() - 128256 * 4096) + 12 * 32 * 4096 * 8192)
  assert presets.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert presets.peak_flops('TPU v5 lite') == 197e12  # Not TPU v5p's 459.
  assert presets.peak_flops('TPU v5p') == 459e12
  assert presets.peak_flops('cpu') is None and presets.peak_flops('TPU v9') is None


def test_bytes_per_device_on_a_mesh():
  """llama3_70b in fp32 on a (data=1, fsdp=4, tensor=2) mesh: every matrix is split 8 ways."""
  cfg, state = _abstract_state('llama3_70b')
  mesh = sharding.make_mesh(1, 4, 2)
  shardings = sharding.named_shardings(nnx.get_partition_spec(state), mesh,
                                       DEFAULT_SHARDING_RULES)
  total = per_device = 0
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    nbytes = x.size * x.dtype.itemsize
    total += nbytes
    per_device += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
  assert total == 4 * cfg.num_params()
  # Only the norm scales are replicated, so each device holds just over 1/8 of the bytes.
  assert total / 8 <= per_device < total / 8 * 1.001
  print(f'llama3_70b fp32: {total / 2**30:.1f} GiB total, {per_device / 2**30:.2f} GiB per device')


def test_auto_dtype_is_chosen_per_use_on_cpu(capsys):
  # bench/cpu_dtype.py: on a CPU bfloat16 trains faster, float32 decodes faster.
  assert jax.default_backend() == 'cpu'
  assert presets.resolve_dtype('auto', 'train') == 'bfloat16'
  assert presets.resolve_dtype('auto', 'inference') == 'float32'
  assert presets.resolve_dtype('float32', 'train') == 'float32'
  with pytest.raises(ValueError, match="dtype='fp8'"):
    presets.resolve_dtype('fp8')
  with pytest.raises(ValueError, match='resolve_dtype'):
    presets.resolve('tiny', dtype='auto')  # A model never runs in an unresolved 'auto'.


def test_auto_dtype_trains_in_bf16_and_readers_infer_in_fp32(tmp_path, capsys):
  from configs import pretrain
  from models import checkpoint
  from trainers import common
  config = pretrain.get_config('tiny')
  assert config.model.dtype == 'auto'  # The default.
  cfg = common.model_config(config, vocab_size=512)
  assert cfg.dtype == 'bfloat16'
  assert "Compute dtype bfloat16 (model.dtype='auto', cpu backend)" in capsys.readouterr().out
  checkpoint.save_model_config(str(tmp_path), cfg)
  # A reader gets the run's own dtype unless it asks for 'auto' (the evals' and server's default).
  assert checkpoint.load_model_config(str(tmp_path)).dtype == 'bfloat16'
  assert checkpoint.load_model_config(str(tmp_path), dtype='auto').dtype == 'float32'
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match="dtype='float16'"):
    common.model_config(config, vocab_size=512)
