"""Serve a workdir's model: JetStream's orchestrator (and gRPC) with an OpenAI-compatible HTTP API
(serving/http_api.py, a Starlette app) on uvicorn.

  python -m serving.server --workdir=DIR --port=8000 [--host=127.0.0.1] [--api_key=KEY]
      [--grpc_port=9000] [--max_concurrent_decodes=N] [--max_len=N] [--max_queue=64] [--dtype=auto]

Then any OpenAI client works: `openai.OpenAI(base_url='http://127.0.0.1:8000/v1',
api_key=KEY or 'none').completions.create(model=NAME, prompt='...')`, where NAME is the workdir's
directory name unless --model_name says otherwise. Before it serves, the server compiles every
prompt-length bucket and decode step (logging how long; /health answers 503 meanwhile), so the
first request runs at steady-state speed.

HTTP/1.1 with keep-alive (idle connections close after --keep_alive_seconds); a request's headers
must arrive within --header_timeout (408) and fit in --max_header_bytes (431), its body within
--body_timeout (408) and --max_body_bytes (413). SIGTERM or Ctrl-C drains the server: /health and
new generation requests answer 503 (so a load balancer or Kubernetes stops routing to it) while the
requests in flight finish, for up to --drain_seconds; then it stops listening and exits.
"""
import asyncio
import contextlib
import json
import logging
import os
import signal

import jax
import uvicorn
from absl import app, flags
from uvicorn.protocols.http.h11_impl import H11Protocol

from configs import entry
from serving.engine import Engine
from serving.http_api import MAX_BODY, OpenAIServer, error_body
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
_HEADER_TIMEOUT = flags.DEFINE_float('header_timeout', 10.0, 'Seconds a request line and its '
                                     'headers may take to arrive (408 after).')
_BODY_TIMEOUT = flags.DEFINE_float('body_timeout', 30.0, 'Seconds a request body may take to '
                                   'arrive once its headers are in (408 after).')
_KEEP_ALIVE = flags.DEFINE_float('keep_alive_seconds', 5.0, 'How long an idle keep-alive '
                                 'connection stays open between requests.')
_MAX_BODY = flags.DEFINE_integer('max_body_bytes', MAX_BODY, 'Largest request body (413 above).')
_MAX_HEADER = flags.DEFINE_integer('max_header_bytes', 16384, 'Largest request line plus headers '
                                   '(431 above).')
_MAX_CONNECTIONS = flags.DEFINE_integer('max_connections', 4096, 'Open connections beyond which '
                                        'uvicorn answers 503.')
_ACCESS_LOG = flags.DEFINE_bool('access_log', False, "uvicorn's access log, one line per request.")
_DECODE_STEPS = flags.DEFINE_integer('decode_steps', 4, 'Decode steps per dispatch to the device '
                                     '(more: fewer host round trips; a new request waits for '
                                     'the running ones to finish theirs before it joins).')
_PREFILL_BATCH = flags.DEFINE_integer('prefill_batch', 8, 'Waiting prompts of one length bucket '
                                      'prefilled in one call, a power of two (a GPU serving many '
                                      'users at once: 64; each size up to it compiles at start).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8', 'int4'], 'Weight-only '
                              'quantization of the projections (models/quantize.py, qwix).')
_KV_DTYPE = flags.DEFINE_enum('kv_dtype', 'auto', ['auto', 'float32', 'bfloat16', 'float16'],
                              "The KV cache's dtype (auto: the compute dtype).")
_DECODE_ATTENTION = flags.DEFINE_enum('decode_attention', 'xla', ['xla', 'pallas'], "The decode "
                                      "step's cache write and attention: XLA's ops, or one Pallas "
                                      '(Triton) kernel a layer, on one GPU (models/'
                                      'decode_attention.py).')
_PREFIX_CACHE = flags.DEFINE_integer('prefix_cache_tokens', 0, 'Automatic prefix caching: keep '
                                     "recent prompts' KV caches, up to this many positions, and "
                                     'prefill only what follows a cached beginning (a shared '
                                     'system prompt, earlier turns); 0: off (serving/'
                                     'prefix_cache.py). Device memory: this many positions of KV.')
_DTYPE = entry.define_dtype_flag()


class _Protocol(H11Protocol):
  """uvicorn's HTTP/1.1 protocol (h11) with two limits it lacks: a request's line and headers
  must arrive within `header_timeout` seconds of the connection opening or of their first byte
  (else 408 and close), and must fit in `max_header_bytes` (else 431 and close). So a client that
  dribbles its headers (slowloris) or never sends any holds a connection for seconds, and never a
  worker: every request runs as a coroutine on the event loop. Malformed requests get uvicorn's
  400 with our JSON body. (uvicorn has a keep-alive timeout between requests but none for
  headers; this relies on its `cycle` and `transport` attributes, pinned by setup.py's range.)"""
  header_timeout = 10.0
  max_header_bytes = 16384

  def connection_made(self, transport):
    super().connection_made(transport)
    self._head = b''  # the bytes of the request line and headers so far
    self._deadline = None
    self._arm()

  def _between_requests(self) -> bool:
    return self.cycle is None or self.cycle.response_complete

  def _arm(self):
    self._deadline = self.loop.call_later(self.header_timeout, self._reject, 408,
                                          f'the request line and headers did not arrive within '
                                          f'{self.header_timeout:g} s')

  def _disarm(self):
    if self._deadline is not None:
      self._deadline.cancel()
      self._deadline = None
    self._head = b''

  def data_received(self, data: bytes):
    if self._between_requests():
      if self._deadline is None:
        self._arm()
      self._head += data
      end = self._head.find(b'\r\n\r\n')
      if end > self.max_header_bytes or (end < 0 and len(self._head) > self.max_header_bytes):
        return self._reject(431, f'the request line and headers are over '
                            f'{self.max_header_bytes} bytes')
    super().data_received(data)
    if not self._between_requests():
      self._disarm()  # The headers are in; the body has the app's own deadline.

  def connection_lost(self, exc):
    self._disarm()
    super().connection_lost(exc)

  def _reject(self, status: int, message: str):
    self._deadline = None
    if self.transport.is_closing() or not self._between_requests():
      return
    body = json.dumps(error_body(status, message)).encode()
    reason = {408: 'Request Timeout', 431: 'Request Header Fields Too Large'}[status]
    self.transport.write(f'HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n'
                         f'content-length: {len(body)}\r\nconnection: close\r\n\r\n'.encode()
                         + body)
    self.transport.close()

  def send_400_response(self, msg: str):
    body = json.dumps(error_body(400, 'malformed HTTP request (its request line, a header or '
                                 f'the body framing: {msg!r})')).encode()
    self.transport.write(b'HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n'
                         + f'content-length: {len(body)}\r\n'.encode()
                         + b'connection: close\r\n\r\n' + body)
    self.transport.close()


class _Uvicorn(uvicorn.Server):
  """uvicorn's server without its signal handlers: serve() below handles SIGTERM by draining
  (uvicorn's would re-raise the signal after its own shutdown, before the driver stops)."""

  @contextlib.contextmanager
  def capture_signals(self):
    yield


async def serve(engine: Engine, *, host: str, port: int, grpc_port: int, model_name: str,
                api_key: str, max_queue: int, drain_seconds: float = 30.0,
                header_timeout: float = 10.0, body_timeout: float = 30.0,
                keep_alive_seconds: float = 5.0, max_body_bytes: int = MAX_BODY,
                max_header_bytes: int = 16384, max_connections: int = 4096,
                access_log: bool = False):
  driver = Driver(engine)  # Built inside the loop: its request channels belong to this loop.
  api = OpenAIServer(engine, driver, model_name=model_name, api_key=api_key, max_queue=max_queue,
                     max_body=max_body_bytes, body_timeout=body_timeout)
  api.ready = False  # /health answers 503 until every shape is compiled.
  protocol = type('Protocol', (_Protocol,), {'header_timeout': header_timeout,
                                             'max_header_bytes': max_header_bytes})
  config = uvicorn.Config(
      api.app, host=host, port=port, http=protocol, lifespan='off', access_log=access_log,
      log_level='info' if access_log else 'warning', timeout_keep_alive=keep_alive_seconds,
      # h11's own limit on an incomplete event sits above ours, so ours answers first (431).
      h11_max_incomplete_event_size=max_header_bytes + 65536,
      limit_concurrency=max_connections, timeout_graceful_shutdown=5)
  http = _Uvicorn(config)
  http_task = asyncio.ensure_future(http.serve())
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
  while not http.started:
    if http_task.done():  # e.g. the port is taken: uvicorn logged why and exits.
      raise SystemExit(f'the HTTP server on {host}:{port} did not start')
    await asyncio.sleep(0.01)
  print(f'warming up on http://{host}:{port} (/health answers 503 until ready): compiling '
        f'{len(engine.buckets)} prefill buckets and the decode steps', flush=True)
  seconds = await asyncio.to_thread(warm_up, engine)
  grpc_server = start_grpc(driver, host, grpc_port) if grpc_port else None
  api.ready = True
  print(f'serving {model_name!r} on http://{host}:{port}/v1'
        + (f' and gRPC {host}:{grpc_port}' if grpc_port else '')
        + f' (warm-up took {seconds:.1f} s)', flush=True)
  await stop.wait()
  # Draining: /health answers 503 (routing to this server stops) and new generation requests
  # get 503; the requests in flight finish, for up to drain_seconds.
  api.draining = True
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
  http.should_exit = True  # uvicorn stops listening, closes idle connections, cancels the rest.
  await http_task
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
                               max_prefill_length=max_prefill, decode_steps=_DECODE_STEPS.value,
                               prefill_batch=_PREFILL_BATCH.value,
                               quantize=_QUANTIZE.value, decode_attention=_DECODE_ATTENTION.value,
                               prefix_cache_tokens=_PREFIX_CACHE.value,
                               kv_dtype=None if _KV_DTYPE.value == 'auto' else _KV_DTYPE.value)
  print(f'{engine.cfg.num_params():,}-parameter model computing in {engine.cfg.dtype} '
        f'(--dtype={_DTYPE.value}) on {jax.default_backend()}; {slots} decode slots of {max_len} '
        f'tokens, prompts up to {max_prefill}'
        + (f'; weights {_QUANTIZE.value}' if _QUANTIZE.value != 'none' else '')
        + f'; KV cache {engine.kv_dtype}'
        + (f'; prefix cache of {_PREFIX_CACHE.value} positions' if _PREFIX_CACHE.value else ''),
        flush=True)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  asyncio.run(serve(engine, host=_HOST.value, port=_PORT.value, grpc_port=_GRPC_PORT.value,
                    model_name=name, api_key=_API_KEY.value, max_queue=_MAX_QUEUE.value,
                    drain_seconds=_DRAIN.value, header_timeout=_HEADER_TIMEOUT.value,
                    body_timeout=_BODY_TIMEOUT.value, keep_alive_seconds=_KEEP_ALIVE.value,
                    max_body_bytes=_MAX_BODY.value, max_header_bytes=_MAX_HEADER.value,
                    max_connections=_MAX_CONNECTIONS.value, access_log=_ACCESS_LOG.value))


if __name__ == '__main__':
  entry.run_main(main)
