"""LoRA and QLoRA (models/lora.py, trainers/sft.py): exact at initialisation, only adapters train
and are checkpointed, merging is exact, NF4 stays within its error bound, QLoRA learns."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from configs import lora as lora_config, qlora as qlora_config
from models import checkpoint, lora
from models.llama import create_model
from models.presets import resolve
from tests.helpers import read_metrics, tiny_config
from trainers import pretrain, sft

# NF4's 16 levels (Dettmers et al., 2023, appendix E) lie in [-1, 1], asymmetric around 0; the
# widest gap is between -1.0 and -0.6961928. Dividing by the tile's absmax and rounding to the
# nearest level therefore errs by at most half that gap times the absmax: 0.1519 x absmax.
NF4_MAX_HALF_GAP = (1.0 - 0.6961928009986877) / 2


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pre'))
  pretrain.run(tiny_config(**{'train.steps': 10}), workdir)
  return workdir


def _sft_config(preset_module, pretrained, **overrides):
  return tiny_config(preset_module, **{'init_from': pretrained, 'data.num_examples': 400,
                                       'train.steps': 20, 'train.log_every': 5,
                                       'train.eval_batches': 1, **overrides})


def test_lora_at_init_is_the_base_model():
  cfg = resolve('tiny', dtype='float32')
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  base_logits = create_model(cfg, seed=0)(tokens)
  spec = lora.LoraSpec(base='', rank=4, alpha=8.0, target=lora_config.get_config().lora.target)
  model = lora.apply_lora(create_model(cfg, seed=0), spec, seed=1)
  assert jnp.array_equal(model(tokens), base_logits)
  # Every attention and MLP projection of every layer has an adapter, nothing else does.
  paths = {p[:-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert len(paths) == 7 * cfg.n_layers


@pytest.fixture(scope='module')
def lora_run(pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lora'))
  return workdir, sft.run(_sft_config(lora_config, pretrained), workdir)


def test_lora_trains_only_adapters_and_merges_exactly(pretrained, lora_run):
  workdir, result = lora_run
  base, _ = checkpoint.load_model(pretrained, dtype='float32')
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a kind of Param.
  base_params = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  trained_params = dict(nnx.to_flat_state(nnx.state(result.model, frozen)))
  assert base_params.keys() == trained_params.keys()
  for path, var in base_params.items():
    assert np.array_equal(var[...], trained_params[path][...]), path  # Bit-identical base.
  adapters = nnx.state(result.model, nnx.LoRAParam)
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(adapters))  # B moved off 0.

  # The checkpoint holds the adapters only; load_model merges them into a plain Llama.
  step_dir = os.path.join(workdir, 'checkpoints', '20')
  assert _dir_bytes(os.path.join(step_dir, 'params')) < _dir_bytes(
      os.path.join(pretrained, 'checkpoints', '10', 'params')) / 3
  merged, step = checkpoint.load_model(workdir, dtype='float32')
  assert step == 20 and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
  np.testing.assert_allclose(merged(tokens), result.model(tokens), atol=1e-5, rtol=1e-5)


def test_resumed_lora_run_reproduces_the_uninterrupted_one(pretrained, lora_run, tmp_path):
  # The adapters come back from the checkpoint and the frozen base again from init_from.
  workdir = str(tmp_path / 'resumed')
  first = sft.run(_sft_config(lora_config, pretrained, **{'train.stop_after': 10}), workdir)
  assert not first.completed and first.step == 10
  resumed = sft.run(_sft_config(lora_config, pretrained), workdir)
  assert resumed.completed
  expected = jax.tree.leaves(nnx.state(lora_run[1].model, nnx.LoRAParam))
  for a, b in zip(jax.tree.leaves(nnx.state(resumed.model, nnx.LoRAParam)), expected):
    assert np.array_equal(a, b)


def test_nf4_round_trip_error_is_within_its_bound():
  w = jax.random.normal(jax.random.key(0), (1024, 256), jnp.float32)
  tile = 64
  # As QLoRA stores a kernel [d_in, d_out]: one scale per output column and tile of input rows.
  q = qwix.quantize(w, 'nf4', channelwise_axes=(1,), tiled_axes={0: tile})
  err = jnp.abs(qwix.dequantize(q) - w)
  absmax = jnp.abs(w.reshape(-1, tile, 256)).max(axis=1, keepdims=True)
  bound = (NF4_MAX_HALF_GAP * absmax).repeat(tile, axis=1).reshape(w.shape)
  assert bool((err <= bound * (1 + 1e-6)).all())
  # On average far tighter: the levels are quantiles of N(0, 1), dense where the weights are.
  assert float(jnp.sqrt(jnp.mean(err ** 2))) < 0.1


def test_qlora_lowers_the_loss_with_a_frozen_nf4_base(pretrained, tmp_path):
  workdir = str(tmp_path / 'qlora')
  result = sft.run(_sft_config(qlora_config, pretrained, **{'train.steps': 30}), workdir)
  kernel = result.model.layers[0].mlp.up.kernel
  assert kernel.array.qtype == 'nf4'  # The base really is stored in 4 bits.
  losses = [r['loss'] for r in read_metrics(workdir)]
  assert losses[-1] < 0.5 * losses[0], losses
  merged, _ = checkpoint.load_model(workdir, dtype='float32')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
  np.testing.assert_allclose(merged(tokens), result.model(tokens), atol=1e-4, rtol=0)
