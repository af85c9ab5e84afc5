"""Batched offline generation over the engine: many prompts, n samples each, every slot kept busy.

Eval and the RL trainers call `generate` with the current in-memory parameters; the engine's
functions take parameters as arguments, so a new policy of the same shapes reuses the compiled
prefill, insert and generate steps. A slot is refilled as soon as its sequence ends (EOS, a stop
string, max_tokens, or a full cache), so a long sample never holds the others back.
"""
import collections
import dataclasses

import jax

from serving.engine import MIN_BUCKET, Engine, SamplingParams


@dataclasses.dataclass
class Completion:
  prompt_index: int
  sample_index: int
  tokens: list[int]  # generated ids, EOS included when the sequence ended on it
  logprobs: list[float]  # log p(token | prefix) under the untempered model, one per token
  text: str | None  # decoded `tokens` (cut before a stop string), when the engine has a tokenizer
  finish_reason: str  # 'stop' (EOS or a stop string) or 'length' (max_tokens or a full cache)


PREFIX_SHARED = 64  # Shared leading tokens from which engine_for turns the prefix cache on.


def engine_for(model, prompts: list[list[int]], max_tokens: int, *, tokenizer=None,
               max_slots: int = 32, prefix_cache: bool | None = None) -> Engine:
  """An engine sized for one batch job: up to max_slots slots and a cache that holds the longest
  prompt's bucket plus max_tokens. Callers that generate repeatedly (RL) keep theirs.

  prefix_cache: reuse the KV cache of prompts' shared beginnings (serving/prefix_cache.py), with
  room for a few prompts of the longest bucket; None (the default) turns it on when every prompt
  begins with the same PREFIX_SHARED tokens or more, as a fixed few-shot preamble does (GSM8K's
  8 shots: about 600 tokens before each question)."""
  if not prompts:
    raise ValueError('no prompts to generate from')
  longest = max(len(p) for p in prompts)
  if longest + max_tokens > model.cfg.max_seq_len:
    raise ValueError(f'prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model '
                     f'max_seq_len={model.cfg.max_seq_len}')
  bucket = max(MIN_BUCKET, 1 << max(longest - 1, 0).bit_length())
  if prefix_cache is None:
    prefix_cache = len(prompts) > 1 and shared_prefix(prompts) >= PREFIX_SHARED
  return Engine(model, max_concurrent_decodes=min(len(prompts), max_slots),
                max_len=min(bucket + max_tokens, model.cfg.max_seq_len),
                max_prefill_length=bucket, tokenizer=tokenizer,
                prefix_cache_tokens=4 * bucket if prefix_cache else 0)


def shared_prefix(prompts: list[list[int]]) -> int:
  """How many leading tokens every prompt has in common."""
  first, n = prompts[0], min(len(p) for p in prompts)
  for p in prompts[1:]:
    n = next((k for k in range(n) if p[k] != first[k]), n)
  return n


def generate(engine: Engine, prompts: list[list[int]], *, params=None, n: int = 1,
             max_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
             stop: tuple[str, ...] = (), eos_id: int | None = None,
             progress=None) -> list[Completion]:
  """Continues each prompt n times; returns Completions ordered by (prompt, sample).

  Sample j of prompt i draws with seed `sampling.seed + i * n + j`, so samples differ and a
  rerun with the same seed reproduces them. `params` defaults to the engine's own. `progress`
  (a trainers.metrics.Progress, or anything with update(n)) is told of each finished completion.
  """
  if max_tokens <= 0:
    raise ValueError(f'max_tokens must be > 0, got {max_tokens}')
  if stop and engine.tokenizer is None:
    raise ValueError('stop strings need an engine with a tokenizer')
  params = engine.params if params is None else params
  if eos_id is None and engine.tokenizer is not None:
    eos_id = engine.tokenizer.eos_id
  for p in prompts:  # Validates every prompt before any work.
    engine.pad_prompt(p)
  todo = collections.deque((i, j) for i in range(len(prompts)) for j in range(n))
  state = engine.init_decode_state()
  live: dict[int, tuple[int, int]] = {}  # slot -> (prompt, sample)
  out: dict[tuple[int, int], Completion] = {}
  prefixes = {}  # prompt -> its prefix, while samples of it remain to start
  while todo or live:
    starts = []  # (slot, prompt, sample) to insert now
    for slot in range(engine.max_concurrent_decodes):
      if slot not in live and todo:
        starts.append((slot, *todo.popleft()))
    seeded = {(i, j): dataclasses.replace(sampling, seed=sampling.seed + i * n + j)
              for _, i, j in starts}
    # One prefill per prompt, the prompts of the free slots together; a prompt's other samples
    # only redraw the first token.
    new = [i for _, i, j in starts if j == 0]
    if new:
      done = engine.prefill_batch_of(
          params=params, prompts=[prompts[i] for i in new],
          samplings=[seeded[i, 0] for i in new], max_tokens=max_tokens,
          stop_ids=() if eos_id is None else (eos_id,))
      prefixes.update(zip(new, done))
    inserts = []
    for slot, i, j in starts:
      prefix = prefixes[i] if j == 0 else engine.resample(prefixes[i], seeded[i, j])
      if j == n - 1:
        del prefixes[i]
      inserts.append((prefix, slot))
      live[slot] = (i, j)
      out[i, j] = Completion(i, j, [], [], None, 'length')
    # The rows of one batched prefill go in with one dispatch.
    state = engine.insert_many([p for p, _ in inserts], state, [s for _, s in inserts])
    # decode_steps steps per dispatch; EOS and max_tokens end a sequence on the device, so the
    # host reads each slot's tokens up to its first invalid step (or a stop string).
    state, step = engine.generate_many(params, state)
    step = jax.device_get(step)
    running = len(live)
    for slot, (i, j) in list(live.items()):
      c = out[i, j]
      for k in range(step['valid'].shape[1]):
        if not step['valid'][slot, k]:  # ended on the device: a full cache (else seen below)
          del live[slot]
          break
        c.tokens.append(int(step['tokens'][slot, k]))
        c.logprobs.append(float(step['logprobs'][slot, k]))
        if _finished(engine, c, max_tokens, stop, eos_id):
          del live[slot]
          break
    if progress is not None and running > len(live):
      progress.update(running - len(live))
  for c in out.values():
    if engine.tokenizer is not None:
      c.text = _cut_at_stop(engine.tokenizer.decode(c.tokens), stop)
  return [out[key] for key in sorted(out)]


def _finished(engine, c: Completion, max_tokens, stop, eos_id) -> bool:
  if eos_id is not None and c.tokens[-1] == eos_id:
    c.finish_reason = 'stop'
    return True
  # A stop string ends within the last few tokens: decode only a short tail.
  if stop and any(s in engine.tokenizer.decode(c.tokens[-8 - max(map(len, stop)):]) for s in stop):
    c.finish_reason = 'stop'
    return True
  return len(c.tokens) >= max_tokens


def _cut_at_stop(text: str, stop) -> str:
  cuts = [text.index(s) for s in stop if s in text]
  return text[:min(cuts)] if cuts else text

