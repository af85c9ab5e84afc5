"""Serve a workdir's model: JetStream's orchestrator (and gRPC) with an OpenAI-compatible HTTP API.

  python -m serving.server --workdir=DIR --port=8000 [--host=127.0.0.1] [--api_key=KEY]
      [--grpc_port=9000] [--max_concurrent_decodes=8] [--max_len=2048] [--max_queue=64]

Then any OpenAI client works: `openai.OpenAI(base_url='http://127.0.0.1:8000/v1',
api_key=KEY or 'none').completions.create(model=NAME, prompt='...')`, where NAME is the workdir's
directory name unless --model_name says otherwise. The first request of each prompt-length
bucket compiles (seconds on CPU). SIGTERM or Ctrl-C stops the server.
"""
import asyncio
import logging
import os
import signal

from absl import app, flags

from configs import entry
from serving.engine import Engine
from serving.http_api import OpenAIServer
from serving.jetstream_compat import Driver, start_grpc

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with a checkpoint.', required=True)
_PORT = flags.DEFINE_integer('port', 8000, 'HTTP port.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Interface for HTTP and gRPC (0.0.0.0: all).')
_API_KEY = flags.DEFINE_string('api_key', '', 'If set, /v1/* requires "Bearer KEY".')
_GRPC_PORT = flags.DEFINE_integer('grpc_port', 0, "JetStream's gRPC Orchestrator port (0: off).")
_SLOTS = flags.DEFINE_integer('max_concurrent_decodes', 8, 'Decode slots (batch size).')
_MAX_LEN = flags.DEFINE_integer('max_len', 2048, 'KV-cache length per slot (prompt + output); '
                                'capped at the model max_seq_len.')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'Requests waiting beyond the slots before 503.')
_MODEL_NAME = flags.DEFINE_string('model_name', '', 'Model id in the API (default: workdir name).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_DTYPE = flags.DEFINE_string('dtype', None, 'Compute dtype override (e.g. float32 on CPU).')


async def serve(engine: Engine, *, host: str, port: int, grpc_port: int, model_name: str,
                api_key: str, max_queue: int):
  driver = Driver(engine)  # Built inside the loop: its request channels belong to this loop.
  grpc_server = start_grpc(driver, host, grpc_port) if grpc_port else None
  api = OpenAIServer(engine, driver, model_name=model_name, api_key=api_key, max_queue=max_queue)
  http = await asyncio.start_server(api.handle, host, port)
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
  print(f'serving {model_name!r} on http://{host}:{port}/v1'
        + (f' and gRPC {host}:{grpc_port}' if grpc_port else ''), flush=True)
  await stop.wait()
  http.close()
  # The driver stops while the loop still runs (its threads post to channels on this loop).
  if grpc_server is not None:
    grpc_server.stop()  # Stops the driver too.
  else:
    driver.stop()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.WARNING)
  from models.checkpoint import load_model_config
  max_len = min(_MAX_LEN.value, load_model_config(_WORKDIR.value).max_seq_len)
  # The longest prompt: the largest power of two up to half the cache, leaving room to answer.
  max_prefill = 1 << max(4, (max_len // 2).bit_length() - 1)
  engine = Engine.from_workdir(_WORKDIR.value, step=_STEP.value, dtype=_DTYPE.value,
                               max_concurrent_decodes=_SLOTS.value, max_len=max_len,
                               max_prefill_length=max_prefill)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  asyncio.run(serve(engine, host=_HOST.value, port=_PORT.value, grpc_port=_GRPC_PORT.value,
                    model_name=name, api_key=_API_KEY.value, max_queue=_MAX_QUEUE.value))


if __name__ == '__main__':
  entry.run_main(main)
