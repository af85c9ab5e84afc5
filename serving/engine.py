"""The KV-cache inference engine that serving, eval and the RL rollouts share.

It follows JetStream's Engine API (prefill a prompt into a prefix, insert the prefix into one of
`max_concurrent_decodes` decode slots, generate one token for every slot at once), so the same
object runs under JetStream's orchestrator (serving/jetstream_compat.py wraps it) and under our
own offline loop (serving/offline.py). It does not import JetStream itself, so trainers and the
GPU benchmark use it without JetStream's dependencies. Both of those run `generate_many`:
`decode_steps` steps inside one compiled loop, with each sequence ending on the device (at its
max_tokens or a stop id such as EOS) and the loop ending once no slot is live (on a GPU it runs
its steps whatever happens: EARLY_EXIT), so the host syncs once per chunk rather than once per
token (tpu-inference and sglang-jax do the same).

The decode state holds, per slot, its KV cache, its position, the token sampled but not yet
returned, and its own sampling parameters (temperature, top-k, top-p, random key), so one step
serves greedy and sampled requests side by side. Prompts are padded to power-of-two buckets:
prefill and insert compile once per bucket, generate compiles once.

Log-probabilities: every returned token comes with log p(token | prefix) under the *untempered*
model distribution, log_softmax(logits) before temperature, top-k or top-p. That is the number
the trainer computes for the same sequence, which is what RL needs (log pi_theta of the sampled
token); when sampling at a temperature other than 1, or with top-k/top-p, it is not the log-prob
of the distribution the token was actually drawn from.
"""
import collections
import collections.abc
import contextlib
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.decode_attention import check_shapes
from models.llama import Llama, init_cache
from models.sharding import logical_to_mesh
from serving.prefix_cache import PrefixCache

MIN_BUCKET = 16
DECODE_STEPS = 8  # decode steps per dispatch (generate_many), the engine's default
MAX_STOP_IDS = 4  # stop token ids per sequence that end it on the device
PREFILL_BATCH = 8  # prompts of one bucket prefilled in one call (prefill_batch_of)
ATTEND_BUCKET = 128  # the shortest cache span a decode step attends over (then powers of two)
PREFILL_CHUNK = 512  # prompts of longer buckets prefill in chunks of this many tokens
TOP_LOGPROBS = 5  # Alternatives per position that prompt_logprobs returns (OpenAI's limit).
# Rows of the decode state at least, by platform (the spare ones stay empty). With one row XLA's
# GPU compiler rewrites each weight matmul of a step into a multiply and a reduce over a
# materialised product (dot strength reduction of a vector times a small matrix): on an H200 a
# 374m step then took 1.5 ms of kernels, against 0.55 ms for the GEMM kernels of a 64-row step
# (bench/RESULTS.md). On a CPU one row is faster (small: 0.98 against 1.46 ms a token).
MIN_DECODE_ROWS = {'gpu': 2}
DECODE_ATTENTION = ('xla', 'pallas')  # Engine(decode_attention=): the decode step's attention
# Whether generate_many's loop stops once no slot is live, by platform. XLA's GPU runtime reads a
# while loop's condition on the host after every iteration (a device-to-host copy and a wait for
# the stream: about 0.2 ms of a 1.2 ms step at one request on an H200, 0.5 of 2.0 ms at 64,
# bench/RESULTS.md); a loop of a fixed trip count it queues without waiting. So on a GPU the
# loop runs all its steps, ended slots riding along frozen as they already do beside live ones,
# at the cost of up to `steps - 1` idle steps when the last sequence ends mid-dispatch. CPUs and
# TPUs evaluate the condition where the loop runs, and stop early.
EARLY_EXIT = {'gpu': False}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling: greedy when temperature == 0; top_k=0 and top_p=1 disable those."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f'temperature must be a finite number >= 0, got {self.temperature}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')

  @property
  def mode(self) -> str:
    """The cheapest decode path that serves it (one of MODES)."""
    if self.temperature == 0:
      return 'greedy'
    return 'filtered' if self.top_k > 0 or self.top_p < 1 else 'sample'


# Decode paths, cheapest first: argmax; a draw from softmax(logits / T); a draw after top-k /
# top-p filtering, which sorts the vocabulary of every row (on a CPU that sort took 86 of the
# 94 ms of sampling 64 rows over 8,000 tokens, against 8 ms for the plain draw).
MODES = ('greedy', 'sample', 'filtered')
# A request of each of MODES, in order (what warm-up compiles for).
_ONE_OF_EACH_MODE = (SamplingParams(), SamplingParams(temperature=1.0),
                     SamplingParams(temperature=1.0, top_k=2))


def sample_tokens(logits, key_data, positions, temperature, top_k, top_p, mode='filtered'):
  """One token per row of logits [B, V] with the row's own sampling parameters.

  Returns (tokens [B], log-probs [B]) with log-probs under the untempered distribution. Random
  draws use fold_in(row key, position of the new token), so a seeded request gives the same
  tokens whichever slot or batch it lands in. mode (static, one of MODES) is the most general
  path the rows need: 'greedy' only takes the argmax, 'sample' ignores top_k / top_p. The engine
  compiles each and picks on the host, since a `lax.cond` on a device predicate made the GPU
  wait for the host every step (1.6 ms of a 3.5 ms step at 374m, bench/RESULTS.md).
  """
  top = jnp.max(logits, axis=-1, keepdims=True)
  greedy = _argmax(logits, top)

  def filtered(scaled):
    vocab = logits.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    # Top-p over the top-k renormalised: keep token i iff the mass before it is < top_p. A row
    # with top_p = 1 keeps all of its top k (the cumulative sum can round to 1 before the tail),
    # so such a row draws exactly what the 'sample' path draws.
    keep = in_top_k & (((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None])
                       | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(keep.sum(axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(scaled < threshold, -jnp.inf, scaled)

  def sampled():
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    masked = filtered(scaled) if mode == 'filtered' else scaled
    keys = jax.vmap(lambda d, p: jax.random.fold_in(jax.random.wrap_key_data(d), p))(
        key_data, positions)
    # Inverse-CDF draw: one uniform per row against the cumulative probabilities. Gumbel-max
    # (jax.random.categorical) draws one random number per vocabulary entry, which took 5x as
    # long on a CPU for 64 rows of 8,000 tokens (15 ms against 3). u > 0, so a token of zero
    # probability is never drawn.
    cdf = jnp.cumsum(jax.nn.softmax(masked, axis=-1), axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, minval=jnp.finfo(jnp.float32).tiny))(keys)
    drawn = jnp.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(-1), logits.shape[-1] - 1)
    return jnp.where(temperature > 0, drawn, greedy)

  tokens = greedy if mode == 'greedy' else sampled()
  # log_softmax's arithmetic for the drawn token alone (the same values, bit for bit), without
  # writing out log-probs for the whole vocabulary.
  shifted = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top[:, 0]
  logp = shifted - jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  return tokens.astype(jnp.int32), logp


def _argmax(logits, top):
  """argmax over the last axis, given its maxima `top` [..., 1]. On a CPU, as the least index
  holding the maximum: XLA's CPU argmax (a reduction of value-index pairs) took 1.14 ms for 64
  rows of 8,000 logits, against 0.54 ms for this and 0.05 ms for the plain max."""
  if jax.default_backend() != 'cpu':
    return jnp.argmax(logits, axis=-1)
  vocab = logits.shape[-1]
  index = jnp.arange(vocab, dtype=jnp.float32)  # exact: vocabularies are below 2^24
  first = jnp.min(jnp.where(logits == top, index, vocab - 1), axis=-1)
  return first.astype(jnp.int32)


def prefill_buckets(max_prefill_length: int) -> list[int]:
  """Padded prompt lengths: powers of two from MIN_BUCKET up to max_prefill_length."""
  if max_prefill_length < MIN_BUCKET or max_prefill_length & (max_prefill_length - 1):
    raise ValueError(f'max_prefill_length must be a power of two >= {MIN_BUCKET}, '
                     f'got {max_prefill_length}')
  return [2 ** i for i in range(int(math.log2(MIN_BUCKET)), int(math.log2(max_prefill_length)) + 1)]


class Engine:
  """Continuous-batching decode over a fixed number of slots (JetStream's Engine API)."""

  def __init__(self, model: Llama, *, max_concurrent_decodes: int = 8, max_len: int | None = None,
               max_prefill_length: int | None = None, mesh=None, rules=None, tokenizer=None,
               decode_steps: int = DECODE_STEPS, prefill_batch: int = PREFILL_BATCH,
               kv_dtype: str | None = None, prefill_chunk: int = PREFILL_CHUNK,
               min_decode_rows: int | None = None, decode_attention: str = 'xla',
               early_exit: bool | None = None, prefix_cache_tokens: int = 0):
    self.cfg = model.cfg
    if prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
      raise ValueError(f'prefill_chunk must be a power of two >= {MIN_BUCKET}, got '
                       f'{prefill_chunk}')
    # Prompts of a longer bucket prefill in chunks of this many tokens, one dispatch each.
    self.prefill_chunk = prefill_chunk
    # The KV cache's dtype (default: the compute dtype); reads are cast to the compute dtype.
    self.kv_dtype = jnp.dtype(kv_dtype or self.cfg.dtype)
    if self.kv_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f'kv_dtype={kv_dtype!r}: expected float32, bfloat16 or float16')
    if prefill_batch < 1 or prefill_batch & (prefill_batch - 1):
      raise ValueError(f'prefill_batch must be a power of two >= 1, got {prefill_batch}')
    # prefill_batch compiles per (batch of 1, 2, 4, ... prefill_batch prompts, bucket).
    self.prefill_batch = prefill_batch
    if decode_steps < 1:
      raise ValueError(f'decode_steps must be >= 1, got {decode_steps}')
    self.decode_steps = decode_steps
    self.max_len = max_len or self.cfg.max_seq_len
    if self.max_len > self.cfg.max_seq_len:
      raise ValueError(f'max_len={self.max_len} exceeds the model max_seq_len='
                       f'{self.cfg.max_seq_len}')
    self._max_prefill_length = max_prefill_length or min(self.max_len // 2, 1024)
    self.buckets = prefill_buckets(self._max_prefill_length)
    if self._max_prefill_length > self.max_len:
      raise ValueError(f'max_prefill_length={self._max_prefill_length} exceeds max_len='
                       f'{self.max_len}')
    self.slots = max_concurrent_decodes
    self._mesh, self.rules, self.tokenizer = mesh, rules, tokenizer
    # The decode step's cache write and attention: XLA's ops, or one Pallas kernel a layer
    # (models/decode_attention.py: Triton on GPUs, its interpreter on a CPU).
    if decode_attention not in DECODE_ATTENTION:
      raise ValueError(f'decode_attention={decode_attention!r}: expected one of '
                       f'{DECODE_ATTENTION}')
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    if decode_attention == 'pallas':
      if mesh is not None and mesh.devices.size > 1:
        raise ValueError("decode_attention='pallas' runs on one device; this mesh has "
                         f'{mesh.devices.size}')
      if platform == 'tpu':
        raise ValueError("decode_attention='pallas' is a Triton kernel (GPU); on a TPU use 'xla'")
      check_shapes(self.cfg.head_dim, self.max_len)
    self.decode_attention = decode_attention
    # Whether generate_many's loop ends as soon as no slot is live (default: EARLY_EXIT of the
    # platform). Without it the loop runs its `steps` whatever happens, which XLA's GPU runtime
    # needs to queue the steps without a host round trip each.
    self.early_exit = EARLY_EXIT.get(platform, True) if early_exit is None else early_exit
    # The decode state's rows: the slots, and spare empty ones up to min_decode_rows (default:
    # MIN_DECODE_ROWS of the platform). Outputs cover the slots only.
    self.rows = max(self.slots, min_decode_rows or MIN_DECODE_ROWS.get(platform, 1))
    self.graphdef, self.params = nnx.split(model)
    # The graph definition is static; parameters are arguments, so new weights of the same
    # shapes (an RL step) reuse the compiled functions.
    self._prefill = jax.jit(functools.partial(_prefill, self.graphdef))
    self._prefill_rows = jax.jit(functools.partial(_prefill_rows, self.graphdef))
    self._prefill_part = jax.jit(functools.partial(_prefill_part, self.graphdef),
                                 donate_argnums=3)
    self._insert = jax.jit(_insert, donate_argnums=1)
    self._insert_row = jax.jit(_insert_row, donate_argnums=5)
    self._insert_rows = jax.jit(_insert_rows, donate_argnums=5)
    # The first token's draw, apart from the prefill so that its mode (MODES) is the rows' own:
    # inside it, every prefill sorted the vocabulary for top-k / top-p, which took 12 of the 31
    # ms of a CPU prefill of 8 greedy prompts (`small`). One compile per mode and batch size.
    self._first_token = {mode: jax.jit(functools.partial(_first_token, mode=mode))
                         for mode in MODES}
    self._draw_rows = {mode: jax.jit(functools.partial(_draw_rows, mode=mode)) for mode in MODES}
    self._score = jax.jit(functools.partial(_score, self.graphdef))
    # Lengths prompt_logprobs pads to: powers of two up to the whole cache.
    self.score_buckets = [b for b in prefill_buckets(1 << (self.max_len - 1).bit_length())
                          if b // 2 < self.max_len]
    # One compiled step per decode path (MODES): all slots greedy (the common serving and eval
    # case), some sampling, some with top-k / top-p (the vocabulary sort). The host knows which
    # from the requests it inserted.
    # generate_many runs decode_steps of them in one dispatch (generate: one). Each attends over
    # the cache's first L positions, L the smallest of attend_buckets that holds every live
    # slot's positions (the host's bound, below): the step reads the filled part of the cache,
    # not all max_len positions (on a CPU at 64 slots of 512 a step took 3.4x as long as at 128).
    self.attend_buckets = sorted({min(b, self.max_len) for b in prefill_buckets(
        1 << max(ATTEND_BUCKET, self.max_len - 1).bit_length()) if b >= ATTEND_BUCKET}
        | {self.max_len})
    self._generate = {(mode, steps, span): jax.jit(functools.partial(
        _generate, self.graphdef, self.max_len, self.slots, mode, steps, span, decode_attention,
        self.early_exit),
        donate_argnums=1)
        for mode in MODES for steps in {1, decode_steps} for span in self.attend_buckets}
    # Host-side bound on each live slot's cache position: slot -> [bound, dispatch count at
    # insert]. Set at insert (the prompt length), raised by the steps of each dispatch, dropped
    # once a dispatch issued after the insert shows the slot ended (read when that output is
    # ready, never waited for).
    self._bounds: dict[int, list[int]] = {}
    self._dispatches = 0
    self._pending = collections.deque()  # (dispatch index, its `valid` output)
    self._slot_modes = {}  # slot -> decode mode of the request it holds.
    self._init_state = jax.jit(self._empty_state, out_shardings=self._state_shardings())
    # Automatic prefix caching (serving/prefix_cache.py): recent prompts' KV caches, up to this
    # many positions, reused by prompts that begin the same way; 0 = off.
    self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
    self._fit = jax.jit(_fit_cache, static_argnums=1)
    self._row_cache = jax.jit(lambda cache, row: [
        {m: jax.lax.dynamic_slice_in_dim(layer[m], row, 1) for m in layer} for layer in cache])

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, mesh=None, rules=None,
                   dtype: str | None = 'auto', quantize: str | None = None,
                   **kwargs) -> 'Engine':
    """The engine over a workdir's newest (or given) checkpoint and its tokenizer, computing in
    `dtype` ('auto': models.presets.resolve_dtype for inference; None: as the run trained), with
    weight-only quantization when `quantize` says ('int8', 'int4': models/quantize.py)."""
    from data.tokenizer import load_tokenizer
    from models.checkpoint import load_model
    model, _ = load_model(workdir, step=step, mesh=mesh, rules=rules, dtype=dtype)
    if quantize not in (None, '', 'none'):
      from models.quantize import quantize_weights
      model = quantize_weights(model, quantize)
    return cls(model, mesh=mesh, rules=rules, tokenizer=load_tokenizer(workdir), **kwargs)

  # ---- JetStream's Engine API ----

  def load_params(self, workdir: str | None = None, step: int | None = None):
    """This engine's parameters, or those of a workdir checkpoint of the same architecture."""
    if workdir is None:
      return self.params
    from models.checkpoint import load_model
    model, _ = load_model(workdir, step=step, mesh=self._mesh, rules=self.rules,
                          dtype=self.cfg.dtype)
    if model.cfg != self.cfg:
      raise ValueError(f'{workdir} holds a different model ({model.cfg}) than this engine')
    return nnx.state(model)

  def prefill(self, *, params, padded_tokens, true_length: int, existing_prefix=None,
              sampling: SamplingParams | None = None, max_tokens: int | None = None,
              stop_ids=(), lookup: bool = True):
    """Runs the prompt, samples its first new token; returns the prefix for `insert`.

    max_tokens (default: until the cache is full) and stop_ids (up to MAX_STOP_IDS token ids,
    EOS among them as the caller says) end the sequence on the device: its slot returns at most
    max_tokens tokens and nothing after the first stop id (which it returns). With a prefix
    cache (prefix_cache_tokens), a cached beginning of the prompt is reused unless `lookup` is
    False (prefill_batch_of has looked already), and the prompt's cache is kept for later ones."""
    if existing_prefix is not None:
      raise NotImplementedError(
          "JetStream's explicit existing_prefix is not supported; Engine(prefix_cache_tokens=N) "
          'reuses the caches of earlier prompts that begin like this one')
    padded_tokens = np.asarray(padded_tokens, np.int32)
    if padded_tokens.shape[0] not in self.buckets:
      raise ValueError(f'padded prompt length {padded_tokens.shape[0]} is not one of the '
                       f'buckets {self.buckets}; use pad_prompt')
    if not 0 < true_length <= padded_tokens.shape[0]:
      raise ValueError(f'true_length={true_length} outside (0, {padded_tokens.shape[0]}]')
    sampling = sampling or SamplingParams()
    with self._mesh_context():
      prefix = (self._cached_prefill(params, padded_tokens, true_length, sampling) if lookup
                else None)
      if prefix is None and padded_tokens.shape[0] > self.prefill_chunk:
        prefix = self._chunked_prefill(params, padded_tokens, true_length, sampling)
      elif prefix is None:
        logits, cache = self._prefill(params, padded_tokens, np.int32(true_length))
        prefix = self._draw_first(cache, logits, true_length, sampling)
    return self._finish(prefix, padded_tokens, true_length, sampling, max_tokens, stop_ids)

  def _finish(self, prefix, padded_tokens, true_length: int, sampling, max_tokens, stop_ids):
    """A prompt's prefix for insert (its limits and decode mode added), its cache kept in the
    prefix cache."""
    cache = prefix['cache']
    size = cache[0]['k'].shape[1]
    self._keep(padded_tokens[:true_length], size, lambda: self._fit(cache, size))
    return dict(prefix, **self._limits(max_tokens, stop_ids), mode=sampling.mode,
                length=int(true_length))

  def _chunked_prefill(self, params, padded_tokens, true_length: int, sampling):
    """Chunked prefill: the prompt's chunks of prefill_chunk tokens run one dispatch each into
    the bucket's cache, each attending over the chunks before it, up to the chunk holding the
    last prompt token (the padding after it is never run). The activations of one chunk, not
    the whole prompt, are alive at a time, and a server's decode steps run between chunks."""
    c = self.prefill_chunk
    cache = init_cache(self.cfg, 1, padded_tokens.shape[0])
    for start in range(0, true_length, c):
      last, cache = self._prefill_part(params, padded_tokens[start:start + c][None],
                                       np.int32(start), cache,
                                       np.int32(min(true_length - 1 - start, c - 1)))
    return self._draw_first(cache, last, true_length, sampling)

  def _draw_first(self, cache, logits, true_length: int, sampling):
    """The prefix of a prefilled prompt: its first token drawn from the last logits. The draw
    is resample's (the cache is not an argument), so it compiles once for every bucket and
    warm-up has compiled it."""
    drawn = self._first_token[sampling.mode]({'logits': logits, 'pos': np.int32(true_length)},
                                             *_sampling_args(sampling))
    return dict(drawn, cache=cache)

  def _reuse_plan(self, start: int, true_length: int, bucket: int):
    """How a prompt of `true_length` tokens (its bucket `bucket`) whose first `start` positions
    are cached prefills the rest: (the chunks' starts, their width), or None when that runs no
    fewer positions than prefilling it whole. The width is the smallest bucket that holds the
    rest, at most prefill_chunk (then the rest runs in chunks of that width); a chunk that would
    pass the end of the bucket starts earlier instead, recomputing a few cached positions."""
    rest = true_length - start
    width = min(self.prefill_chunk, next(b for b in self.buckets if b >= rest))
    starts, at = [], start
    while at < true_length:
      starts.append(min(at, bucket - width))
      at += width
    whole = bucket if bucket <= self.prefill_chunk else (
        -(-true_length // self.prefill_chunk) * self.prefill_chunk)
    return (starts, width) if len(starts) * width < whole else None

  def _cached_prefill(self, params, padded_tokens, true_length: int, sampling):
    """Prefill through the prefix cache: the longest cached prefix of the prompt (at most all
    but its last token) is copied into the prompt's cache and only the rest runs, in chunks like
    _chunked_prefill's. None when the cache is off, holds nothing useful, or would save nothing."""
    cache = self.prefix_cache
    if cache is None:
      return None
    cache.sync(params)
    bucket = padded_tokens.shape[0]
    found, entry = cache.lookup(padded_tokens[:true_length], limit=true_length - 1)
    plan = self._reuse_plan(found, true_length, bucket) if found else None
    if plan is None:
      return None
    starts, width = plan
    cache.hit(starts[0])
    kv = self._fit(entry, bucket)  # a new cache: the entry stays intact
    for start in starts:
      last, kv = self._prefill_part(params, padded_tokens[start:start + width][None],
                                    np.int32(start), kv,
                                    np.int32(min(true_length - 1 - start, width - 1)))
    return self._draw_first(kv, last, true_length, sampling)

  def _keep(self, tokens, size: int, copy):
    """Puts `copy()`, a copy of a prompt's cache (a bucket's [1, size, ...] per layer), in the
    prefix cache, if there is one. A copy: the prefix itself goes to insert, and JetStream's
    orchestrator deletes a prefix's arrays once it is inserted; the copy is one dispatch, and
    none when every whole block of the prompt is cached already."""
    cache = self.prefix_cache
    if cache is not None and size <= cache.capacity and not cache.holds(tokens):
      with self._mesh_context():
        cache.store(tokens, copy(), size)

  def _limits(self, max_tokens, stop_ids) -> dict:
    if max_tokens is not None and max_tokens < 1:
      raise ValueError(f'max_tokens must be >= 1, got {max_tokens}')
    stop_ids = sorted(set(int(t) for t in stop_ids))
    if len(stop_ids) > MAX_STOP_IDS:
      raise ValueError(f'at most {MAX_STOP_IDS} stop token ids, got {len(stop_ids)}')
    stop = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop[:len(stop_ids)] = stop_ids
    return {'limit': np.int32(self.max_len if max_tokens is None else max_tokens),
            'stop': stop}

  def prefill_batch_of(self, *, params, prompts, samplings=None, max_tokens=None,
                       stop_ids=()) -> list[dict]:
    """`prefill` of several prompts, as few calls as their buckets allow: the prompts (token
    lists) of one bucket run together, up to `prefill_batch` in one call (padded to a power of
    two). Returns one prefix per prompt, in order, each what `prefill` of that prompt alone
    returns (the same first token: draws depend on the seed and position only).
    samplings: one SamplingParams per prompt (default greedy); max_tokens: an int or a list, one
    per prompt; stop_ids: token ids for all, or a list of them, one per prompt."""
    n = len(prompts)
    samplings = list(samplings or [SamplingParams()] * n)
    limits = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * n
    stops = (list(stop_ids) if isinstance(stop_ids, list) and stop_ids and
             not isinstance(stop_ids[0], int) else [stop_ids] * n)
    if not len(samplings) == len(limits) == len(stops) == n:
      raise ValueError(f'{n} prompts, {len(samplings)} samplings, {len(limits)} max_tokens and '
                       f'{len(stops)} stop id sets')
    padded = [self.pad_prompt(p) for p in prompts]
    out = [None] * n
    by_bucket = {}
    # With a prefix cache, prompts with a cached beginning go alone through the hit path and the
    # rest are batched. Prompts of this call that begin alike (an eval's few-shot preamble) would
    # all miss together, so the first of each first block goes alone, ahead, for the others to
    # reuse; a first block is led once, so prompts that share too little to gain stay batched.
    first = collections.Counter(self._first_block(t, l) for t, l in padded)
    led = set()
    for i, (tokens, length) in enumerate(padded):
      if self.prefix_cache is None:
        by_bucket.setdefault(len(tokens), []).append(i)
        continue
      key = self._first_block(tokens, length)
      first[key] -= 1
      with self._mesh_context():
        hit = self._cached_prefill(params, tokens, length, samplings[i])
      if hit is not None:
        out[i] = self._finish(hit, tokens, length, samplings[i], limits[i], stops[i])
      elif key is not None and first[key] > 0 and key not in led:
        led.add(key)
        out[i] = self.prefill(params=params, padded_tokens=tokens, true_length=length,
                              sampling=samplings[i], max_tokens=limits[i], stop_ids=stops[i],
                              lookup=False)
      else:
        by_bucket.setdefault(len(tokens), []).append(i)
    for rows in by_bucket.values():
      for start in range(0, len(rows), self.prefill_batch):
        group = rows[start:start + self.prefill_batch]
        if len(group) == 1 or len(padded[group[0]][0]) > self.prefill_chunk:  # one at a time
          for i in group:
            out[i] = self.prefill(params=params, padded_tokens=padded[i][0],
                                  true_length=padded[i][1], sampling=samplings[i],
                                  max_tokens=limits[i], stop_ids=stops[i], lookup=False)
          continue
        size = 1 << (len(group) - 1).bit_length()
        full = group + [group[0]] * (size - len(group))  # padding rows: copies, dropped below
        args = [_sampling_args(samplings[i]) for i in full]
        lengths = np.asarray([padded[i][1] for i in full], np.int32)
        mode = max((samplings[i].mode for i in group), key=MODES.index)
        with self._mesh_context():  # Host arrays: one transfer each, no per-prompt dispatch.
          batched = self._prefill_rows(params, np.stack([padded[i][0] for i in full]), lengths)
          batched.update(self._draw_rows[mode](batched['logits'], lengths, *(
              np.stack([a[k] for a in args]) for k in range(4))))
        for row, i in enumerate(group):
          out[i] = BatchRow(batched, row, dict(self._limits(limits[i], stops[i]),
                                               mode=samplings[i].mode, length=padded[i][1]))
          self._keep(padded[i][0][:padded[i][1]], len(padded[i][0]),  # its row: a copy
                     lambda row=row: self._row_cache(batched['cache'], np.int32(row)))
    return out

  def _first_block(self, tokens, length: int):
    """A prompt's first prefix-cache block, as a key; None when the prompt is too short for the
    cache to supply any of it (a hit leaves at least the last token to prefill)."""
    block = self.prefix_cache.block if self.prefix_cache is not None else 0
    return tokens[:block].tobytes() if block and length > block else None

  def resample(self, prefix, sampling: SamplingParams):
    """The same prompt's prefix with its first token drawn anew under `sampling`: n samples of
    one prompt share one prefill (RL rollouts draw several per prompt)."""
    # Only the last logits and position go through the draw: one compile for every bucket, and
    # the KV cache is shared with the prefill's prefix rather than copied.
    small = {k: prefix[k] for k in ('logits', 'pos')}
    with self._mesh_context():
      drawn = self._first_token[sampling.mode](small, *_sampling_args(sampling))
    # The limits are the prompt's; mode is a host-side flag.
    host = dict(limit=prefix['limit'], stop=prefix['stop'], mode=sampling.mode,
                length=prefix.get('length'))
    if isinstance(prefix, BatchRow):  # The cache stays in the batch until insert.
      return BatchRow(prefix.batched, prefix.row, host, drawn={
          k: v for k, v in drawn.items() if k not in ('logits', 'pos')})
    return dict(drawn, cache=prefix['cache'], **host)

  def _claim(self, prefix, slot: int):
    """The host's record of what an insert puts in the slot: its decode mode and position bound."""
    self._slot_modes[slot] = prefix.get('mode', 'filtered')
    length = prefix.get('length')
    self._bounds[slot] = [self.max_len if length is None else length, self._dispatches]

  def insert(self, prefix, decode_state, slot: int):
    self._claim(prefix, slot)
    with self._mesh_context():
      if isinstance(prefix, BatchRow):  # Its row straight from the batch: one dispatch.
        return self._insert_row(prefix.batched, np.int32(prefix.row), prefix.drawn,
                                prefix['limit'], prefix['stop'], decode_state, np.int32(slot))
      prefix = {k: v for k, v in prefix.items() if k not in ('mode', 'length')}
      return self._insert(prefix, decode_state, np.int32(slot))

  def insert_many(self, prefixes, decode_state, slots):
    """insert(prefixes[i], state, slots[i]) for every i, with one dispatch per batched prefill
    the prefixes are rows of (prefill_batch_of's; any other prefix: one insert each): 64 prompts
    prefilled together cost one insert, not 64. Offline generation and the benchmarks use it."""
    prefixes, slots = list(prefixes), [int(s) for s in slots]
    if len(prefixes) != len(slots) or len(set(slots)) != len(slots):
      raise ValueError(f'{len(prefixes)} prefixes for slots {slots}: need one distinct slot each')
    batches = collections.defaultdict(list)
    for prefix, slot in zip(prefixes, slots):
      if isinstance(prefix, BatchRow) and prefix.drawn is None:
        batches[id(prefix.batched)].append((prefix, slot))
      else:
        decode_state = self.insert(prefix, decode_state, slot)
    for group in batches.values():
      if len(group) == 1:
        decode_state = self.insert(group[0][0], decode_state, group[0][1])
        continue
      batched = group[0][0].batched
      size = batched['pos'].shape[0]
      limit = np.zeros((size,), np.int32)
      stop = np.full((size, MAX_STOP_IDS), -1, np.int32)
      for prefix, slot in group:
        self._claim(prefix, slot)
        limit[prefix.row], stop[prefix.row] = prefix['limit'], prefix['stop']
      # Padded to the batch's rows by repeating the first pair (the same value written twice),
      # so each batch size compiles once.
      pad = lambda xs: np.asarray(xs + [xs[0]] * (size - len(xs)), np.int32)
      with self._mesh_context():
        decode_state = self._insert_rows(batched, limit, stop, pad([p.row for p, _ in group]),
                                         pad([s for _, s in group]), decode_state)
    return decode_state

  def generate(self, params, decode_state):
    """One step for every slot: returns (new state, {'tokens', 'logprobs', 'valid', 'lengths'}).

    Each step returns the token sampled by the previous step (or by prefill) together with its
    log-prob, and samples the next one; `lengths` counts the tokens a slot has returned so far
    and `valid` is False for a slot that holds no live sequence: empty, ended (it returned a
    stop id or its max_tokens) or with a full cache.
    """
    state, out = self._steps(params, decode_state, 1)
    return state, {k: v[:, 0] if k != 'lengths' else v for k, v in out.items()}

  def generate_many(self, params, decode_state, steps: int | None = None):
    """`steps` (1 or, by default, `decode_steps`) steps in one dispatch, stopping early on the
    device once no slot is live: (new state, {'tokens', 'logprobs', 'valid': [slots, steps],
    'lengths': [slots]}).
    Step j of slot i is what the j-th of as many `generate` calls would have returned; a slot
    whose sequence ends mid-way returns nothing valid after its end, so the host refills it at
    the next call."""
    steps = self.decode_steps if steps is None else steps
    if steps not in (1, self.decode_steps):
      raise ValueError(f'steps must be 1 or decode_steps={self.decode_steps}, got {steps}')
    return self._steps(params, decode_state, steps)

  def _steps(self, params, decode_state, steps):
    self._release_ended()
    # Positions this dispatch reaches: below each live slot's bound + steps.
    reach = max((b for b, _ in self._bounds.values()), default=0) + steps
    span = self.last_span = next((b for b in self.attend_buckets if b >= reach), self.max_len)
    with self._mesh_context():
      mode = max(self._slot_modes.values(), key=MODES.index, default='greedy')
      state, out = self._generate[mode, steps, span](params, decode_state)
    for bound in self._bounds.values():
      bound[0] = min(bound[0] + steps, self.max_len)
    self._pending.append((self._dispatches, out['valid']))
    self._dispatches += 1
    return state, out

  def _release_ended(self):
    """Drops the bounds of slots that a finished dispatch showed ended (not live at its end)."""
    while self._pending and (len(self._pending) > 4 or self._pending[0][1].is_ready()):
      index, valid = self._pending.popleft()
      ended = ~np.asarray(valid)[:, -1]
      for slot, (_, inserted) in list(self._bounds.items()):
        if inserted <= index and ended[slot]:
          del self._bounds[slot]

  def init_decode_state(self, *args, **kwargs):
    with self._mesh_context():
      return self._init_state()

  def warmup(self, params=None, after_step=None) -> float:
    """Compiles everything a request runs, so that none waits for XLA (a server's first request
    otherwise waited 74 s on a CPU): prefill and insert for every bucket, the first-token draw
    of a resampled prefix, and the decode step of each of MODES, on a scratch decode state
    (transiently a second KV cache); the steps are generate_many's, of 1 and of decode_steps
    steps, which is what the server and offline generation run. `after_step(step)` is called on
    each step's output (the JetStream wrapper compiles its result packing there). Returns the
    seconds it took."""
    start = time.perf_counter()
    params = self.params if params is None else params
    state, prefix, entries = self.init_decode_state(), None, {}
    # Warm-up prompts are not kept (nor hit: each batch size must reach its batched prefill); the
    # prefix cache's own functions are compiled at the end.
    prefix_cache, self.prefix_cache = self.prefix_cache, None
    # Each bucket's insert into a new state, after an insert and after a step: XLA compiles
    # insert anew for each kind of state it receives.
    for _ in range(2):
      for bucket in self.buckets:
        prefix = self.prefill(params=params, padded_tokens=np.zeros((bucket,), np.int32),
                              true_length=1)
        entries[bucket] = prefix['cache']
        state = self.insert(prefix, self.insert(prefix, state, 0), 0)
        state, step = self.generate_many(params, state)
    rows = None
    for bucket in self.buckets:  # The batched prefills offline generation runs.
      size = 2
      while size <= min(self.prefill_batch, self.slots):
        rows = self.prefill_batch_of(params=params, prompts=[[1] * bucket] * size)
        if bucket == self.buckets[0]:  # The first-token draws of each mode (per batch size).
          batched = rows[0].batched
          with self._mesh_context():
            for mode in MODES:
              self._draw_rows[mode](batched['logits'], batched['pos'], batched['key'],
                                    batched['temperature'], batched['top_k'], batched['top_p'])
        state = self.insert_many(rows, self.insert(rows[0], state, 0), range(size))
        state = self.insert(self.resample(rows[0], SamplingParams()), state, 0)
        if prefix_cache is not None:  # what storing a batch's row runs
          with self._mesh_context():
            self._row_cache(rows[0].batched['cache'], np.int32(0))
        size *= 2
    for sampling in _ONE_OF_EACH_MODE:
      for steps in sorted({1, self.decode_steps}):
        for source in (prefix, rows[0] if rows else prefix):  # a prefix, a batch's row
          state = self.insert(self.resample(source, sampling), state, 0)
        state, step = self.generate_many(params, state, steps)
        jax.block_until_ready(after_step(step) if after_step else step)
    with self._mesh_context():  # a prompt prefilled alone, its first token drawn in each mode
      for sampling in _ONE_OF_EACH_MODE:
        self._draw_first(None, prefix['logits'], 1, sampling)
    # Every decode step at every attention span (above, only the shortest ran).
    with self._mesh_context():
      for (mode, steps, span), fn in self._generate.items():
        state, step = fn(params, state)
        jax.block_until_ready(after_step(step) if after_step else step)
    self.prefix_cache = prefix_cache
    if prefix_cache is not None:
      # A hit's copy of an entry of each bucket into a cache of each bucket, and its chunks of
      # every width shorter than the bucket (what _reuse_plan can choose).
      with self._mesh_context():
        for bucket in self.buckets:
          for entry in entries.values():
            kv = self._fit(entry, bucket)
          for width in self.buckets:
            if width < bucket and width <= self.prefill_chunk:
              _, kv = self._prefill_part(params, np.zeros((1, width), np.int32),
                                         np.int32(0), kv, np.int32(0))
        jax.block_until_ready(kv)
      prefix_cache.reset()
    self._bounds.clear()
    self._pending.clear()
    self._slot_modes.clear()  # The scratch state's slots.
    return time.perf_counter() - start

  def prompt_logprobs(self, tokens, params=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The untempered model's log-prob of each token given the ones before it, for tokens[1:]
    (the first token has none), and at each of those positions the TOP_LOGPROBS likeliest tokens
    and their log-probs: ([n-1], [n-1, k] ids, [n-1, k]). One forward pass, padded to a
    power-of-two bucket: what echo and top_logprobs report. Not part of warmup (it would add a
    forward pass of every length up to max_len to the server's start): the first call of each
    bucket compiles."""
    n = len(tokens)
    if not 1 <= n <= self.max_len:
      raise ValueError(f'{n} tokens to score; this engine takes 1 to {self.max_len}')
    bucket = next(b for b in self.score_buckets if b >= n)
    padded = np.zeros((bucket,), np.int32)
    padded[:n] = tokens
    logp, top_ids, top_logp = jax.device_get(
        self._score(self.params if params is None else params, padded))
    return logp[:n - 1], top_ids[:n - 1], top_logp[:n - 1]

  def get_prefix_destination_sharding(self):
    return None  # Prefill and generate share devices: the prefix stays where it is.

  @property
  def max_concurrent_decodes(self) -> int:
    return self.slots

  @property
  def samples_per_slot(self) -> int:
    return 1

  @property
  def max_prefill_length(self) -> int:
    return self._max_prefill_length

  @property
  def mesh(self):
    return self._mesh

  @property
  def colocated_cpus(self):
    return None

  # ---- helpers ----

  def pad_prompt(self, tokens) -> tuple[np.ndarray, int]:
    """Right-pads a prompt to its bucket: (padded int32 array, true length)."""
    n = len(tokens)
    if n == 0:
      raise ValueError('the prompt is empty')
    if n > self._max_prefill_length:
      raise ValueError(f'the prompt has {n} tokens; this engine takes at most '
                       f'{self._max_prefill_length}')
    bucket = next(b for b in self.buckets if b >= n)
    padded = np.zeros((bucket,), np.int32)
    padded[:n] = tokens
    return padded, n

  def _mesh_context(self):
    return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

  def _state_shardings(self):
    if self._mesh is None:
      # Committed to the device like every state an insert or a step returns: an uncommitted
      # fresh state made XLA compile insert_many again for the first batch a request inserted.
      return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shard = lambda names: jax.sharding.NamedSharding(self._mesh, logical_to_mesh(names, self.rules))
    per_slot = shard(('batch',))
    state = jax.tree.map(lambda _: per_slot, jax.eval_shape(self._empty_state))
    state['key'] = shard(('batch', None))
    state['stop'] = shard(('batch', None))
    kv = shard(('batch', None, 'kv_heads', None))
    state['cache'] = [{'k': kv, 'v': kv} for _ in range(self.cfg.n_layers)]
    return state

  def _empty_state(self):
    s = self.rows
    return {
        'cache': init_cache(self.cfg, s, self.max_len, self.kv_dtype),
        'tokens': jnp.zeros((s,), jnp.int32),  # sampled, returned by the next generate step
        'logprobs': jnp.zeros((s,), jnp.float32),
        'pos': jnp.zeros((s,), jnp.int32),  # where `tokens` goes in the cache
        'returned': jnp.zeros((s,), jnp.int32),  # tokens this slot has returned so far
        'key': jnp.zeros((s, 2), jnp.uint32),
        'temperature': jnp.zeros((s,), jnp.float32),
        'top_k': jnp.zeros((s,), jnp.int32),
        'top_p': jnp.ones((s,), jnp.float32),
        'limit': jnp.zeros((s,), jnp.int32),  # tokens the slot may return in all
        'stop': jnp.full((s, MAX_STOP_IDS), -1, jnp.int32),  # token ids that end it (-1: none)
        'done': jnp.ones((s,), bool),  # no live sequence: empty or ended
    }


def _sampling_args(sampling: SamplingParams):
  """(key data, temperature, top_k, top_p) as host values: a jitted call takes them in one
  transfer each, where device scalars cost a dispatch apiece (on an H200, 64 prompts' worth of
  them took longer than their batched prefill)."""
  return (key_data(sampling.seed), np.float32(sampling.temperature), np.int32(sampling.top_k),
          np.float32(sampling.top_p))


@functools.lru_cache(maxsize=4096)
def _key_data_of(seed: int, impl: str, x64: bool) -> np.ndarray:
  if impl == 'threefry2x32':
    # jax.random.key(seed) of threefry: the seed's high and low 32 bits, the seed taken as a
    # 32-bit integer unless x64 is on (tests/test_engine.py checks this against jax.random).
    seed = int(seed) if x64 else int(np.int64(seed) & 0xFFFFFFFF)
    data = np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
  else:
    data = np.array(jax.random.key_data(jax.random.key(seed)))
  data.flags.writeable = False  # Cached: shared by every caller.
  return data


def key_data(seed: int) -> np.ndarray:
  """jax.random.key_data(jax.random.key(seed)) computed on the host (cached for other PRNGs)."""
  return _key_data_of(int(seed), str(jax.config.jax_default_prng_impl),
                      bool(jax.config.jax_enable_x64))


def _prefill(graphdef, params, tokens, true_length):
  """One prompt [bucket] -> (the logits [V] of its last position, its cache)."""
  model = nnx.merge(graphdef, params)
  cache = init_cache(model.cfg, 1, tokens.shape[0])
  logits, cache = model(tokens[None], cache=cache,
                        logits_at=jnp.reshape(true_length - 1, (1, 1)))
  return logits[0, 0], cache


def _fit_cache(cache, length: int):
  """A copy of a prompt's cache with `length` positions (cut, or padded with zeros): a new
  buffer, never the argument itself, since the prefill that fills it donates it."""
  def fit(a):
    keep = min(a.shape[1], length)
    out = jnp.zeros((a.shape[0], length) + a.shape[2:], a.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, a[:, :keep], 0, axis=1)
  return jax.tree.map(fit, cache)


def _prefill_part(graphdef, params, tokens, start, cache, at):
  """One chunk [1, C] of a prompt at positions start.. into its cache: (the logits [V] of the
  chunk's position `at`, cache). The callers read the last chunk's: one row of the head each."""
  positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache=cache,
                                              logits_at=jnp.reshape(at, (1, 1)))
  return logits[0, 0], cache


def _prefill_rows(graphdef, params, tokens, lengths):
  """_prefill of B right-padded prompts [B, bucket] at once: one batched prefix, less its first
  tokens (_draw_rows)."""
  model = nnx.merge(graphdef, params)
  cache = init_cache(model.cfg, tokens.shape[0], tokens.shape[1])
  logits, cache = model(tokens, cache=cache, logits_at=(lengths - 1)[:, None])
  return {'cache': cache, 'logits': logits[:, 0], 'pos': lengths}


def _draw_rows(logits, lengths, keys, temperature, top_k, top_p, mode):
  """The first tokens of a batched prefix's rows, and their sampling settings (insert's fields)."""
  token, logp = sample_tokens(logits, keys, lengths, temperature, top_k, top_p, mode)
  return {'token': token, 'logprob': logp, 'key': keys, 'temperature': temperature,
          'top_k': top_k, 'top_p': top_p}


class BatchRow(collections.abc.Mapping):
  """One prompt's prefix as a row of a batched prefill's output, not split out of it: insert
  copies the row from the batch into a slot in one dispatch. Splitting 64 rows out (48 cache
  arrays each at 374m) cost more host time than the prefill itself. Reading a key gives what
  prefill of that prompt alone returns (the cache as [1, bucket, ...] arrays), sliced on demand.
  `drawn`: the first-token fields that resample drew anew for this row (else the batch's)."""

  def __init__(self, batched: dict, row: int, host: dict, drawn: dict | None = None):
    self.batched, self.row, self.host, self.drawn = batched, row, host, drawn

  def __getitem__(self, key):
    if key in self.host:
      return self.host[key]
    if self.drawn is not None and key in self.drawn:
      return self.drawn[key]
    if key == 'cache':
      return [{m: layer[m][self.row:self.row + 1] for m in layer} for layer in self.batched[key]]
    return self.batched[key][self.row]

  def __iter__(self):
    return iter(dict.fromkeys([*self.batched, *self.host]))

  def __len__(self):
    return len(set(self.batched) | set(self.host))


def _batch_row(batched, row, drawn):
  """A BatchRow's device fields as a prefix dict, inside a jitted function."""
  prefix = {k: (jax.lax.dynamic_index_in_dim(v, row, keepdims=False) if k != 'cache' else
                [{m: jax.lax.dynamic_slice_in_dim(layer[m], row, 1) for m in layer} for layer in v])
            for k, v in batched.items()}
  return dict(prefix, **(drawn or {}))


def _insert_row(batched, row, drawn, limit, stop, state, slot):
  return _insert(dict(_batch_row(batched, row, drawn), limit=limit, stop=stop), state, slot)


def _insert_rows(batched, limit, stop, rows, slots, state):
  """_insert of batched[rows[i]] into slots[i] for every i (limit and stop given per batch row).
  Each slot takes its source row by a gather and keeps its own values where it takes none (a
  select): bandwidth-bound, where a scatter into the cache ran at a small fraction of it on an
  H200 (21 ms for 64 rows at 374m)."""
  n = state['pos'].shape[0]
  source = jnp.zeros((n,), jnp.int32).at[slots].set(rows)  # slot -> its row (any if none)
  taken = jnp.zeros((n,), bool).at[slots].set(True)
  bucket = batched['cache'][0]['k'].shape[1]

  def put(old, new):
    mask = taken.reshape((n,) + (1,) * (old.ndim - 1))
    return jnp.where(mask, new[source].astype(old.dtype), old)

  cache = [{m: jax.lax.dynamic_update_slice_in_dim(
      layer[m], put(layer[m][:, :bucket], new[m]), 0, axis=1) for m in ('k', 'v')}
      for layer, new in zip(state['cache'], batched['cache'])]
  fields = dict(batched, limit=limit, stop=stop)
  out = {name: put(state[name], fields[field]) for name, field in _INSERTED.items()}
  out.update({name: jnp.where(taken, value, state[name]) for name, value in _RESET.items()})
  return dict(out, cache=cache)


def _score(graphdef, params, tokens):
  """Log-probs of tokens[1:] and the TOP_LOGPROBS likeliest next tokens at every position."""
  logits = nnx.merge(graphdef, params)(tokens[None])[0, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  return jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0], top_ids, top_logp


def _first_token(prefix, key, temperature, top_k, top_p, mode='filtered'):
  """Draws the prefix's first new token from its last-position logits with these settings."""
  drawn = _draw_rows(prefix['logits'][None], prefix['pos'][None],
                     *(a[None] for a in (key, temperature, top_k, top_p)), mode=mode)
  return {**prefix, **{k: v[0] for k, v in drawn.items()}}


# What an insert sets in a slot besides its cache: decode-state field <- prefix field, and the
# fields it resets (_insert and _insert_rows).
_INSERTED = {'tokens': 'token', 'logprobs': 'logprob', 'pos': 'pos', 'key': 'key',
             'temperature': 'temperature', 'top_k': 'top_k', 'top_p': 'top_p', 'limit': 'limit',
             'stop': 'stop'}
_RESET = {'returned': 0, 'done': False}


def _insert(prefix, state, slot):
  # The prefix fills cache[slot, :bucket]; whatever the slot held beyond it is invisible (a query
  # sees indices <= its position) and is overwritten before the slot's position gets there.
  at = (slot, 0, 0, 0)
  cache = [{n: jax.lax.dynamic_update_slice(layer[n], new[n].astype(layer[n].dtype), at)
            for n in ('k', 'v')} for layer, new in zip(state['cache'], prefix['cache'])]
  out = {name: state[name].at[slot].set(prefix[field]) for name, field in _INSERTED.items()}
  out.update({name: state[name].at[slot].set(value) for name, value in _RESET.items()})
  return dict(out, cache=cache)


def _generate(graphdef, max_len, slots_out, mode, steps, span, kernel, early_exit, params, state):
  """`steps` decode steps for every slot, in a loop that ends early once no slot is live if
  `early_exit`, else runs them all (a fixed trip count).

  A step returns each live slot's pending token (sampled by the step before, or by prefill) and
  samples the next; a slot ends after returning one of its stop ids or its `limit`-th token, and
  stops advancing at a full cache. Ended and empty slots ride along (the batch is computed
  whole), frozen and reported invalid. Attention reads the cache's first `span` positions, which
  the host chose to hold every live slot's positions up to the last of these steps. The outputs
  cover the first `slots_out` rows (the state may hold spare rows: Engine.rows)."""
  model = nnx.merge(graphdef, params)
  slots = state['pos'].shape[0]
  live = lambda s: ~s['done'] & (s['pos'] < max_len)

  def step(carry):
    i, s, out = carry
    active, pos, emitted = live(s), s['pos'], s['tokens']
    logits, cache = model(emitted[:, None], pos[:, None], cache=s['cache'],
                          attend_len=None if span >= max_len else span, decode_kernel=kernel)
    nxt, logp = sample_tokens(logits[:, 0], s['key'], pos + 1, s['temperature'], s['top_k'],
                              s['top_p'], mode)
    returned = s['returned'] + active
    ended = (emitted[:, None] == s['stop']).any(-1) | (returned >= s['limit'])
    out = {'tokens': out['tokens'].at[:, i].set(emitted),
           'logprobs': out['logprobs'].at[:, i].set(s['logprobs']),
           'valid': out['valid'].at[:, i].set(active)}
    # A full slot stops advancing (its writes past the cache are dropped) and reports invalid.
    s = dict(s, cache=cache, tokens=jnp.where(active, nxt, emitted),
             logprobs=jnp.where(active, logp, s['logprobs']),
             pos=jnp.where(active, jnp.minimum(pos + 1, max_len), pos), returned=returned,
             done=s['done'] | (active & ended))
    return i + 1, s, out

  out = {'tokens': jnp.zeros((slots, steps), jnp.int32),
         'logprobs': jnp.zeros((slots, steps), jnp.float32),
         'valid': jnp.zeros((slots, steps), bool)}
  carry = (jnp.int32(0), state, out)
  if steps == 1:  # JetStream's one step: no loop around it.
    carry = step(carry)
  elif early_exit:
    carry = jax.lax.while_loop(lambda c: (c[0] < steps) & live(c[1]).any(), step, carry)
  else:
    carry = jax.lax.fori_loop(0, steps, lambda _, c: step(c), carry)
  _, state, out = carry
  return state, {k: v[:slots_out] for k, v in dict(out, lengths=state['returned']).items()}
