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
