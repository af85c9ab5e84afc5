"""Every test runs on CPU with 8 fake devices, so sharded meshes (data=2, fsdp=2, tensor=2) and
single-device runs can be compared in one process."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
# With a pytest-xdist worker per core (make test), XLA's own Eigen threads in every worker only
# fight each other for the same cores: one thread a worker ran test_grpo + test_sft in 251 s
# instead of 338 s, two workers side by side (2 cores, 2026-12-02).
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) >= (os.cpu_count() or 1):
  _flags += ' --xla_cpu_multi_thread_eigen=false'
os.environ['XLA_FLAGS'] = _flags.strip()

# One persistent compilation cache for the whole run, shared by the xdist workers and the
# subprocesses tests start (servers, CLIs): many tests compile the same tiny trainers and engines.
# Only compilations of a second or more are stored (JAX's default): storing every small one made
# test_model slower (77 s against 63 s), storing the long ones faster (48 s with the flag above).
# The process that creates the cache (pytest's main process, which starts the workers with this
# environment) removes it at exit; set JAX_COMPILATION_CACHE_DIR to keep one.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='jax-test-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  # A size limit turns on the cache's file lock, so two workers never read a half-written entry.
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))

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
