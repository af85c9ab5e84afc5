"""The one adapter between our engine and JetStream 0.2.2 (google-jetstream, archived upstream).

JetStream's problems with current JAX, and what this module does about each:
- its orchestrator calls `jax.tree_map`, which JAX removed: aliased to `jax.tree.map` before import;
- `engine_api` imports seqio (and so TensorFlow) and tiktoken at module top, for type names and
  its Llama 3 tokenizer only: stand-in modules are installed when the real ones are absent;
- importing the orchestrator sets the root logger to DEBUG with a stdout handler: undone here;
- the gRPC server binds to every interface: `start_grpc` binds to the host it is given;
- a request carries only its prompt and max_tokens, and a sample only its token ids: `Request`
  adds per-request sampling parameters, stop-token ids, cancellation and per-token log-probs,
  and `Driver` hands the sampling parameters, max_tokens and stop ids to the engine's prefill;
- one generate call is one decode step upstream: ours runs the engine's `decode_steps` steps
  (generate_many) and returns them in JetStream's speculative-decoding result layout (several
  tokens per slot per call), which its detokenizer already reads up to the first invalid token.
Any exception in a driver thread SIGKILLs the process, so callers validate requests before they
reach the driver. `Driver.stop()` must run inside the event loop that owns the requests' channels.
"""
import dataclasses
import logging
import queue
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np

if not hasattr(jax, 'tree_map'):
  jax.tree_map = jax.tree.map


def _stand_in(name: str, **attrs):
  """Installs an empty module `name` (and its parents) unless the real one imports."""
  try:
    __import__(name)
  except ImportError:
    parts = name.split('.')
    for i in range(1, len(parts) + 1):
      sys.modules.setdefault('.'.join(parts[:i]), types.ModuleType('.'.join(parts[:i])))
    for i in range(1, len(parts)):
      setattr(sys.modules['.'.join(parts[:i])], parts[i], sys.modules['.'.join(parts[:i + 1])])
    vars(sys.modules[name]).update(attrs)


# Imported at module top by JetStream for type names and its Llama 3 tokenizer only.
_vocabulary = type('Vocabulary', (), {})
_stand_in('seqio.vocabularies', Vocabulary=_vocabulary, SentencePieceVocabulary=_vocabulary)
_stand_in('tiktoken.load', load_tiktoken_bpe=None)

_root = logging.getLogger()
_level, _handlers = _root.level, list(_root.handlers)
from flax import struct  # noqa: E402
from jetstream.core import orchestrator, server_lib  # noqa: E402
from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2  # noqa: E402
_root.setLevel(_level)
for _h in [h for h in _root.handlers if h not in _handlers]:
  _root.removeHandler(_h)

from serving.engine import Engine, SamplingParams  # noqa: E402

# The detokenize thread reads one step's results slot by slot and then hands them to that slot's
# request; this is how the request finds its token's log-prob (one detokenize thread per engine).
_current = threading.local()


@struct.dataclass
class _Results(engine_api.ResultTokens):
  """ResultTokens of `generate_many`'s N steps, as JetStream's speculative layout: per slot N
  token columns, N validity columns, the length, then N log-prob columns (float32 bits stored as
  int32). JetStream's detokenizer returns a slot's tokens up to its first invalid or stop one."""

  def convert_to_numpy(self):
    return _Results(np.asarray(self.data), self.tokens_idx, self.valid_idx, self.length_idx,
                    self.samples_per_slot)

  def get_result_at_slot(self, slot):
    n = self.tokens_idx[1]
    _current.logprobs = self.data[slot, 2 * n + 1:3 * n + 1].view(np.float32).tolist()
    return super().get_result_at_slot(slot)


@jax.jit
def _pack(step):
  lengths = step['lengths'][:, None]
  logprobs = jax.lax.bitcast_convert_type(step['logprobs'], jnp.int32)
  return jnp.concatenate([step['tokens'], step['valid'].astype(jnp.int32), lengths, logprobs],
                         axis=1)


class TokenizerAdapter(tokenizer_api.Tokenizer):
  """Our tokenizer behind JetStream's interface (for gRPC text requests); EOS stops a sample."""

  def __init__(self, tokenizer, max_prefill_length: int):
    self.tok, self.max_prefill_length = tokenizer, max_prefill_length

  def encode(self, s, **kwargs):
    return token_utils.pad_tokens(np.asarray(self.tok.encode(s), np.int32), self.bos_id,
                                  self.pad_id, is_bos=kwargs.get('is_bos', self.tok.add_bos),
                                  max_prefill_length=self.max_prefill_length,
                                  jax_padding=kwargs.get('jax_padding', True))

  def decode(self, token_ids, **kwargs):
    return self.tok.decode(token_ids)

  pad_id = property(lambda self: self.tok.pad_id)
  eos_id = property(lambda self: self.tok.eos_id)
  bos_id = property(lambda self: self.tok.bos_id)
  stop_tokens = property(lambda self: {self.tok.eos_id})  # Not pad: a model may emit id 0.


@dataclasses.dataclass(frozen=True)
class _Prompt:
  """Padded prompt tokens travelling to prefill with their request's sampling parameters and the
  limits that end it on the device (max_tokens, stop token ids)."""
  tokens: np.ndarray
  sampling: SamplingParams
  max_tokens: int | None
  stop_ids: tuple = ()


class JetStreamEngine(engine_api.Engine):
  """Our Engine under JetStream's abstract class: sampling per request, log-probs in results."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self.waiting = lambda: False  # Driver: whether requests wait to join the running ones.

  def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length):
    sampling, limits = None, {}
    if isinstance(padded_tokens, _Prompt):
      prompt = padded_tokens
      padded_tokens, sampling = prompt.tokens, prompt.sampling
      limits = {'max_tokens': prompt.max_tokens, 'stop_ids': prompt.stop_ids}
    # JetStream keeps the last tokens of a gRPC prompt longer than the largest bucket but reports
    # its full length; an error here would kill the process, so the length follows the tokens.
    true_length = min(true_length, len(padded_tokens))
    return self.engine.prefill(params=params, existing_prefix=existing_prefix,
                               padded_tokens=padded_tokens, true_length=true_length,
                               sampling=sampling, **limits)

  def insert(self, prefix, decode_state, slot):
    return self.engine.insert(prefix, decode_state, slot)

  def generate(self, params, decode_state):
    # One step while requests wait to join (they are inserted between calls, so a long call
    # would hold back their first token), decode_steps steps otherwise.
    n = 1 if self.waiting() else self.engine.decode_steps
    state, step = self.engine.generate_many(params, decode_state, n)
    return state, _Results(data=_pack(step), tokens_idx=(0, n), valid_idx=(n, 2 * n),
                           length_idx=(2 * n, 2 * n + 1), samples_per_slot=1)

  def load_params(self, *args, **kwargs):
    return self.engine.load_params(*args, **kwargs)

  def init_decode_state(self, *args, **kwargs):
    return self.engine.init_decode_state()

  def get_prefix_destination_sharding(self):
    return self.engine.get_prefix_destination_sharding()

  def get_tokenizer(self):
    return tokenizer_pb2.TokenizerParameters(path='lmforge')

  def build_tokenizer(self, metadata):
    return TokenizerAdapter(self.engine.tokenizer, self.engine.max_prefill_length)

  max_concurrent_decodes = property(lambda self: self.engine.max_concurrent_decodes)
  samples_per_slot = property(lambda self: 1)
  max_prefill_length = property(lambda self: self.engine.max_prefill_length)
  mesh = property(lambda self: self.engine.mesh)
  colocated_cpus = property(lambda self: None)


@dataclasses.dataclass
class Request(orchestrator.ActiveRequest):
  """A request from our HTTP API: exact prompt ids (BOS included by the caller), sampling.

  Its channel receives (token ids, log-probs) per step. Setting `cancelled` (client gone, stop
  string seen) ends it at its next step, which frees its slot.
  """
  sampling: SamplingParams = SamplingParams()
  stop_ids: frozenset = frozenset()
  cancelled: bool = False

  def enqueue_samples(self, generated_samples):
    ids = list(generated_samples[0].token_ids)  # JetStream cut them at EOS or the slot's end
    logprobs = _current.logprobs[:len(ids)]
    stop = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
    if stop is not None:  # e.g. a chat template's end-of-turn: not returned, ends the request
      ids, logprobs = ids[:stop], logprobs[:stop]
      self.cancelled = True
    if self.cancelled:
      self.complete[:] = True  # The detokenize thread then closes the channel and frees the slot.
    if ids:
      self.return_channel.add_result((ids, logprobs))


class Driver(orchestrator.Driver):
  """JetStream's driver, interleaved on one engine, passing our requests' sampling to prefill."""

  def __init__(self, engine: Engine, params=None):
    wrapped = JetStreamEngine(engine)
    params = engine.params if params is None else params
    super().__init__(prefill_engines=[wrapped], generate_engines=[wrapped],
                     prefill_params=[params], generate_params=[params], interleaved_mode=True)
    wrapped.waiting = lambda: not (self._prefill_backlog.empty() and
                                   self._transfer_backlogs[0].empty() and
                                   self._generate_backlogs[0].empty())

  def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
    engine = self._prefill_engines[0].engine
    if not isinstance(request, Request):  # gRPC: JetStream's own tokenization, EOS ends it
      padded, n = super()._process_prefill_content(request, tokenizer, is_bos,
                                                   max_prefill_length)
      limit = request.max_tokens if request.max_tokens and request.max_tokens > 0 else None
      return _Prompt(padded, SamplingParams(), limit, (tokenizer.eos_id,)), n
    padded, n = engine.pad_prompt(request.prefill_content)
    eos = () if engine.tokenizer is None else (engine.tokenizer.eos_id,)
    return _Prompt(padded, request.sampling, request.max_tokens,
                   eos + tuple(request.stop_ids)), n

  def _prefill_thread(self, idx: int):
    """JetStream's prefill thread, batched: the requests waiting in the prefill backlog (up to
    the engine's prefill_batch) are prefilled together (Engine.prefill_batch_of: one call per
    length bucket), then each goes on to a decode slot as upstream. Upstream prefills one
    request per call, so the 64th of 64 simultaneous requests waited for 63 prefills."""
    engine = self._prefill_engines[idx].engine
    params = self._prefill_params[idx]
    tokenizer = self._prefill_engines[idx].build_tokenizer(None)
    while self.live:
      batch = [self._prefill_backlog.get(block=True)]
      while batch[-1] is not None and len(batch) < engine.prefill_batch:
        try:
          batch.append(self._prefill_backlog.get(block=False))
        except queue.Empty:
          break
      requests = [r for r in batch if r is not None]
      if requests:
        prompts = [self._process_prefill_content(r, tokenizer, not r.history_path,
                                                 engine.max_prefill_length) for r in requests]
        # (JetStream keeps the last tokens of a gRPC prompt over the largest bucket and reports
        # its full length: the length follows the tokens.)
        prefixes = engine.prefill_batch_of(
            params=params, prompts=[p.tokens[:min(n, len(p.tokens))] for p, n in prompts],
            samplings=[p.sampling for p, _ in prompts],
            max_tokens=[p.max_tokens for p, _ in prompts],
            stop_ids=[p.stop_ids for p, _ in prompts])
        for request, prefix in zip(requests, prefixes):
          request.prefill_result = prefix
          self._transfer_backlogs[idx].put(request, block=True)
      if batch[-1] is None:
        break


def warm_up(engine: Engine) -> float:
  """Engine.warmup, with the result packing of JetStreamEngine.generate compiled as well."""
  return engine.warmup(after_step=_pack)


def start_grpc(driver: Driver, host: str, port: int, threads: int = 16):
  """JetStream's gRPC Orchestrator service over `driver`, bound to host:port."""
  import grpc
  server_lib._HOST = host  # JetStreamServer binds f'{_HOST}:{port}' ('[::]' upstream).
  server = server_lib.JetStreamServer(driver, threads, port, grpc.insecure_server_credentials())
  server.start()
  return server
