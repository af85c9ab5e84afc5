"""The one adapter between our engine and JetStream 0.2.2 (google-jetstream, archived upstream).

JetStream's problems with current JAX, and what this module does about each:
- its orchestrator calls `jax.tree_map`, which JAX removed: aliased to `jax.tree.map` before import;
- `engine_api` imports seqio (and so TensorFlow) and tiktoken at module top, for type names and
  its Llama 3 tokenizer only: stand-in modules are installed when the real ones are absent;
- importing the orchestrator sets the root logger to DEBUG with a stdout handler: undone here;
- the gRPC server binds to every interface: `start_grpc` binds to the host it is given;
- a request carries only its prompt and max_tokens, and a sample only its token ids: `Request`
  adds per-request sampling parameters, stop-token ids, cancellation and per-token log-probs,
  and `Driver` hands the sampling parameters to the engine's prefill.
Any exception in a driver thread SIGKILLs the process, so callers validate requests before they
reach the driver. `Driver.stop()` must run inside the event loop that owns the requests' channels.
"""
import dataclasses
import logging
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
  """ResultTokens with a 4th column: each token's log-prob, its float32 bits stored as int32."""

  def convert_to_numpy(self):
    return _Results(np.asarray(self.data), self.tokens_idx, self.valid_idx, self.length_idx,
                    self.samples_per_slot)

  def get_result_at_slot(self, slot):
    _current.logprob = float(self.data[slot, 3:4].view(np.float32)[0])
    return super().get_result_at_slot(slot)


@jax.jit
def _pack(step):
  cols = [step['tokens'], step['valid'].astype(jnp.int32), step['lengths'],
          jax.lax.bitcast_convert_type(step['logprobs'], jnp.int32)]
  return jnp.stack(cols, axis=1)


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
  """Padded prompt tokens travelling to prefill with their request's sampling parameters."""
  tokens: np.ndarray
  sampling: SamplingParams


class JetStreamEngine(engine_api.Engine):
  """Our Engine under JetStream's abstract class: sampling per request, log-probs in results."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length):
    sampling = None
    if isinstance(padded_tokens, _Prompt):
      padded_tokens, sampling = padded_tokens.tokens, padded_tokens.sampling
    # JetStream keeps the last tokens of a gRPC prompt longer than the largest bucket but reports
    # its full length; an error here would kill the process, so the length follows the tokens.
    true_length = min(true_length, len(padded_tokens))
    return self.engine.prefill(params=params, existing_prefix=existing_prefix,
                               padded_tokens=padded_tokens, true_length=true_length,
                               sampling=sampling)

  def insert(self, prefix, decode_state, slot):
    return self.engine.insert(prefix, decode_state, slot)

  def generate(self, params, decode_state):
    state, step = self.engine.generate(params, decode_state)
    return state, _Results(data=_pack(step), tokens_idx=(0, 1), valid_idx=(1, 2),
                           length_idx=(2, 3), samples_per_slot=1)

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
    ids = list(generated_samples[0].token_ids)
    if ids and ids[0] in self.stop_ids:
      self.cancelled = True
      ids = []
    if self.cancelled:
      self.complete[:] = True  # The detokenize thread then closes the channel and frees the slot.
    if ids:
      self.return_channel.add_result((ids, [_current.logprob]))


class Driver(orchestrator.Driver):
  """JetStream's driver, interleaved on one engine, passing our requests' sampling to prefill."""

  def __init__(self, engine: Engine, params=None):
    wrapped = JetStreamEngine(engine)
    params = engine.params if params is None else params
    super().__init__(prefill_engines=[wrapped], generate_engines=[wrapped],
                     prefill_params=[params], generate_params=[params], interleaved_mode=True)

  def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
    if not isinstance(request, Request):
      return super()._process_prefill_content(request, tokenizer, is_bos, max_prefill_length)
    padded, n = self._prefill_engines[0].engine.pad_prompt(request.prefill_content)
    return _Prompt(padded, request.sampling), n


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
