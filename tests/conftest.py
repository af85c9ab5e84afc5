"""Every test runs on CPU with 8 fake devices, so sharded meshes (data=2, fsdp=2, tensor=2) and
single-device runs can be compared in one process."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def repo_root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def tiny_sft_workdir(tmp_path_factory):
  """A tiny pretrained model fine-tuned for 100 SFT steps: where the preference stages start."""
  from configs import sft as sft_config
  from tests.helpers import tiny_config
  from trainers import pretrain, sft
  root = tmp_path_factory.mktemp('tiny_sft')
  pre, run = str(root / 'pre'), str(root / 'sft')
  pretrain.run(tiny_config(), pre)
  sft.run(tiny_config(sft_config, **{'init_from': pre, 'train.steps': 100}), run)
  return run


@pytest.fixture(scope='session')
def tiny_reward_run(tiny_sft_workdir, tmp_path_factory):
  """A tiny reward model trained from tiny_sft_workdir: (workdir, config, loop.Result). Shared by
  the reward-model tests (which check it) and PPO (which optimises against it)."""
  from configs import reward as reward_config
  from tests.helpers import tiny_config
  from trainers import reward
  run = str(tmp_path_factory.mktemp('tiny_rm') / 'rm')
  config = tiny_config(reward_config, init_from=tiny_sft_workdir)
  return run, config, reward.run(config, run)
