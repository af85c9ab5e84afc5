"""Serve a workdir's model: JetStream's orchestrator (and gRPC) with an OpenAI-compatible HTTP API.

  python -m serving.server --workdir=DIR --port=8000 [--host=127.0.0.1] [--api_key=KEY]
      [--grpc_port=9000] [--max_concurrent_decodes=N] [--max_len=N] [--max_queue=64] [--dtype=auto]

Then any OpenAI client works: `openai.OpenAI(base_url='http://127.0.0.1:8000/v1',
api_key=KEY or 'none').completions.create(model=NAME, prompt='...')`, where NAME is the workdir's
directory name unless --model_name says otherwise. Before it serves, the server compiles every
prompt-length bucket and decode step (logging how long; /health answers 503 meanwhile), so the
first request runs at steady-state speed. SIGTERM or Ctrl-C drains the server: it stops accepting
connections, answers /health 503 (so a load balancer or Kubernetes stops routing to it), lets the
requests in flight finish for up to --drain_seconds, then exits.
"""
import asyncio
import logging
import os
import signal

import jax
from absl import app, flags

from configs import entry
from serving.engine import Engine
from serving.http_api import OpenAIServer
from serving.jetstream_compat import Driver, start_grpc, warm_up

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with a checkpoint.', required=True)
_PORT = flags.DEFINE_integer('port', 8000, 'HTTP port.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface for HTTP and gRPC (0.0.0.0: all).')
_API_KEY = flags.DEFINE_string('api_key', '', 'If set, /v1/* requires "Bearer KEY".')
_GRPC_PORT = flags.DEFINE_integer('grpc_port', 0, "JetStream's gRPC Orchestrator port (0: off).")
_SLOTS = flags.DEFINE_integer('max_concurrent_decodes', 0, 'Decode slots (batch size); 0: sized '
                              'for the machine (server_sizing).')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'KV-cache length per slot (prompt + output), capped '
                                'at the model max_seq_len; 0: sized for the machine.')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'Requests waiting beyond the slots before 503.')
_MODEL_NAME = flags.DEFINE_string('model_name', '', 'Model id in the API (default: workdir name).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_DRAIN = flags.DEFINE_float('drain_seconds', 30.0, 'On SIGTERM, how long requests in flight may '
                            'take to finish before the server exits.')
_DTYPE = entry.define_dtype_flag()


async def serve(engine: Engine, *, host: str, port: int, grpc_port: int, model_name: str,
                api_key: str, max_queue: int, drain_seconds: float = 30.0):
  driver = Driver(engine)  # Built inside the loop: its request channels belong to this loop.
  api = OpenAIServer(engine, driver, model_name=model_name, api_key=api_key, max_queue=max_queue)
  api.ready = False  # /health answers 503 until every shape is compiled.
  http = await asyncio.start_server(api.handle, host, port)
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
  print(f'warming up on http://{host}:{port} (/health answers 503 until ready): compiling '
        f'{len(engine.buckets)} prefill buckets and the decode steps', flush=True)
  seconds = await asyncio.to_thread(warm_up, engine)
  grpc_server = start_grpc(driver, host, grpc_port) if grpc_port else None
  api.ready = True
  print(f'serving {model_name!r} on http://{host}:{port}/v1'
        + (f' and gRPC {host}:{grpc_port}' if grpc_port else '')
        + f' (warm-up took {seconds:.1f} s)', flush=True)
  await stop.wait()
  http.close()  # No new connections; the open ones finish their requests.
  api.draining = True  # /health 503: routing to this server stops.
  loop = asyncio.get_running_loop()
  deadline = loop.time() + drain_seconds
  if api.inflight:
    print(f'draining: {len(api.inflight)} requests in flight (up to {drain_seconds:g} s)',
          flush=True)
  while api.inflight and loop.time() < deadline:
    await asyncio.sleep(0.05)
  if api.inflight:
    print(f'stopping with {len(api.inflight)} requests unfinished after {drain_seconds:g} s',
          flush=True)
  # The driver stops while the loop still runs (its threads post to channels on this loop).
  if grpc_server is not None:
    grpc_server.stop()  # Stops the driver too.
  else:
    driver.stop()


def server_sizing(slots: int, max_len: int, model_max_len: int) -> tuple[int, int]:
  """Decode slots and cache length, where the flags leave them 0. Every decode step computes all
  slots and attends over the whole cache, so on a CPU they set the speed: SmolLM2-135M in
  float32 on 2 cores takes 41 ms a step with 1 slot of 256 tokens, 120 ms with 4 x 1024 and
  167 ms with 8 x 1024 (bench.decode_step, bench/RESULTS.md). A CPU gets 4 x 1024, an
  accelerator 8 x 2048; --max_concurrent_decodes=1 --max_len=256 is the fastest for one user."""
  cpu = jax.default_backend() == 'cpu'
  return slots or (4 if cpu else 8), min(max_len or (1024 if cpu else 2048), model_max_len)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.WARNING)
  from models.checkpoint import load_model_config
  slots, max_len = server_sizing(_SLOTS.value, _MAX_LEN.value,
                                 load_model_config(_WORKDIR.value).max_seq_len)
  # The longest prompt: the largest power of two up to half the cache, leaving room to answer.
  max_prefill = 1 << max(4, (max_len // 2).bit_length() - 1)
  engine = Engine.from_workdir(_WORKDIR.value, step=_STEP.value, dtype=_DTYPE.value,
                               max_concurrent_decodes=slots, max_len=max_len,
                               max_prefill_length=max_prefill)
  print(f'{engine.cfg.num_params():,}-parameter model computing in {engine.cfg.dtype} '
        f'(--dtype={_DTYPE.value}) on {jax.default_backend()}; {slots} decode slots of {max_len} '
        f'tokens, prompts up to {max_prefill}', flush=True)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  asyncio.run(serve(engine, host=_HOST.value, port=_PORT.value, grpc_port=_GRPC_PORT.value,
                    model_name=name, api_key=_API_KEY.value, max_queue=_MAX_QUEUE.value,
                    drain_seconds=_DRAIN.value))


if __name__ == '__main__':
  entry.run_main(main)
