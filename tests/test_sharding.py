"""The same run on one device and on a data=2 x fsdp=2 x tensor=2 mesh of 8 fake CPU devices."""
import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.helpers import read_metrics, tiny_config
from trainers import pretrain


def test_sharded_training_matches_single_device(tmp_path):
  steps = dict(**{'train.steps': 6, 'train.log_every': 1, 'train.eval_every': 0,
                  'train.checkpoint_every': 100})
  single = pretrain.run(tiny_config(**steps), str(tmp_path / 'single'))
  sharded = pretrain.run(tiny_config(**steps, **{'mesh.data': 2, 'mesh.fsdp': 2,
                                                 'mesh.tensor': 2}), str(tmp_path / 'sharded'))
  a = [m['loss'] for m in read_metrics(tmp_path / 'single')]
  b = [m['loss'] for m in read_metrics(tmp_path / 'sharded')]
  assert len(a) == len(b) == 6
  np.testing.assert_allclose(b, a, rtol=1e-5)
  assert a[-1] < a[0]

  # The parameters really are laid out as the rules say.
  m = sharded.model
  kernel = m.layers[0].attn.wq.kernel[...]
  assert kernel.sharding.spec == P('fsdp', 'tensor')
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
  assert m.layers[0].mlp.down.kernel[...].sharding.spec == P('tensor', 'fsdp')
  assert m.embed.embedding[...].sharding.spec == P('tensor', 'fsdp')
  assert len(m.embed.embedding[...].sharding.device_set) == 8
  # and the single-device run's on one device.
  assert single.model.layers[0].attn.wq.kernel[...].sharding.device_set == {jax.devices()[0]}
  for x, y in zip(jax.tree.leaves(nnx.state(single.model)), jax.tree.leaves(nnx.state(m))):
    # Adam normalises tiny gradients, so near-zero ones may differ by ~lr * 1e-2.
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=5e-5)
