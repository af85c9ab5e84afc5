"""Automatic prefix caching: a prompt that begins like an earlier one prefills only the rest, and
decodes exactly what a full prefill would."""
import jax
import numpy as np
import pytest

from models import llama, presets
from serving import offline
from serving.engine import Engine, SamplingParams
from serving.prefix_cache import PrefixCache

CFG = presets.resolve('tiny', dtype='float32')
SYSTEM = list(range(100, 140))  # A 40-token "system prompt": two whole blocks of 16 and 8 more.
BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


@pytest.fixture(scope='module')
def model():
  return llama.create_model(CFG, seed=1)


@pytest.fixture(scope='module')
def plain(model):
  return Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64)


def _cached(model, **kwargs):
  engine = Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64,
                  prefix_cache_tokens=kwargs.pop('tokens', 512), **kwargs)
  runs = []  # (start, width, cache length) of each chunk a prefill runs after a hit
  part = engine._prefill_part
  engine._prefill_part = lambda p, t, s, c, at: runs.append(
      (int(s), t.shape[1], c[0]['k'].shape[1])) or part(p, t, s, c, at)
  return engine, runs


def _same(a, b):
  assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_a_shared_beginning_is_prefilled_once_and_decodes_the_same(model, plain):
  engine, runs = _cached(model)
  prompts = [SYSTEM + [5, 6, 7], SYSTEM + [8, 9], SYSTEM + [8, 9], SYSTEM[:20], [7] * 5]
  for i, prompt in enumerate(prompts):
    runs.clear()
    _same(offline.generate(engine, [prompt], max_tokens=8)[0],
          offline.generate(plain, [prompt], max_tokens=8)[0])
    # The first prompt and the unrelated last one run whole; the others reuse the system
    # prompt's whole blocks (32 tokens; 16 of the 20-token prompt, keeping its last token to run)
    # and run one 16-token chunk into a cache of their own bucket.
    assert runs == [[], [(32, 16, 64)], [(32, 16, 64)], [(16, 16, 32)], []][i]
  stats = engine.prefix_cache.stats()
  assert stats['hits'] == 32 + 32 + 16 and stats['queries'] == sum(map(len, prompts))
  # Every later prompt's whole blocks are held by the first's entry already: none is added.
  assert stats['entries'] == 1 and stats['tokens'] == 64


def test_samples_drawn_after_a_hit_are_the_seeds(model, plain):
  engine, runs = _cached(model)
  sampling = SamplingParams(temperature=1.0, top_k=20, seed=5)
  offline.generate(engine, [SYSTEM + [1]], max_tokens=2)
  got = offline.generate(engine, [SYSTEM + [2, 3]], n=3, max_tokens=6, sampling=sampling)
  want = offline.generate(plain, [SYSTEM + [2, 3]], n=3, max_tokens=6, sampling=sampling)
  assert runs == [(32, 16, 64)]  # n samples of the prompt share its one prefill
  for a, b in zip(got, want):
    _same(a, b)


def test_long_rests_run_in_chunks_from_the_cached_prefix(model):
  # prefill_chunk=16, 64-token bucket: after a hit on 32 tokens, a 60-token prompt runs 28 more
  # in two chunks (the second moved back to end at the bucket), against four chunks whole.
  engine, runs = _cached(model, prefill_chunk=16)
  whole = Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64,
                 prefill_chunk=16)
  offline.generate(engine, [SYSTEM + [1, 2]], max_tokens=2)
  runs.clear()
  prompt = SYSTEM + list(range(300, 320))
  _same(offline.generate(engine, [prompt], max_tokens=8)[0],
        offline.generate(whole, [prompt], max_tokens=8)[0])
  assert runs == [(32, 16, 64), (48, 16, 64)]


def test_new_parameters_empty_the_cache(model):
  engine, runs = _cached(model)
  offline.generate(engine, [SYSTEM + [1]], max_tokens=2)
  params = jax.tree.map(lambda a: a * 1.01, engine.params)
  runs.clear()
  got = offline.generate(engine, [SYSTEM + [2]], params=params, max_tokens=8)[0]
  assert runs == [] and engine.prefix_cache.stats()['hits'] == 0  # nothing reused across weights
  fresh = Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64)
  _same(got, offline.generate(fresh, [SYSTEM + [2]], params=params, max_tokens=8)[0])
  # The same arrays again hit what the new weights stored.
  offline.generate(engine, [SYSTEM + [3]], params=params, max_tokens=2)
  assert runs == [(32, 16, 64)]


def test_batched_prefill_mixes_hits_and_misses(model, plain):
  engine, runs = _cached(model)
  offline.generate(engine, [SYSTEM + [1]], max_tokens=2)
  runs.clear()
  prompts = [SYSTEM + [4, 4], [9, 8, 7], SYSTEM + [5], [3, 3, 3, 3], list(range(20, 50))]
  got = offline.generate(engine, prompts, max_tokens=6)
  assert runs == [(32, 16, 64), (32, 16, 64)]  # the two hits alone; the rest batched
  for a, b in zip(got, offline.generate(plain, prompts, max_tokens=6)):
    _same(a, b)
  # The batched misses were kept too: the 30-token prompt's first block now hits.
  runs.clear()
  offline.generate(engine, [list(range(20, 50)) + [1]], max_tokens=2)
  assert runs == [(16, 16, 32)]


def test_prompts_of_one_batch_that_begin_alike_share_one_prefill(model, plain):
  # An eval's few-shot preamble: every prompt of the batch misses the empty cache, so the first
  # goes alone and the others reuse it; the two unrelated prompts stay in the batched path.
  engine, runs = _cached(model)
  solo = []
  prefill = engine.prefill
  engine.prefill = lambda **kw: solo.append(kw['true_length']) or prefill(**kw)
  prompts = [SYSTEM + [k, k + 1] for k in range(4)] + [list(range(200, 230)),
                                                       list(range(300, 330))]
  got = offline.generate(engine, prompts, max_tokens=6)
  assert solo == [42] and runs == [(32, 16, 64)] * 3
  assert engine.prefix_cache.stats()['hits'] == 3 * 32
  for a, b in zip(got, offline.generate(plain, prompts, max_tokens=6)):
    _same(a, b)


def test_engine_for_turns_the_cache_on_for_a_shared_preamble(model):
  preamble = list(range(100, 180))  # 80 tokens, like a fixed few-shot preamble
  assert offline.shared_prefix([preamble + [1], preamble + [2, 3], preamble]) == 80
  assert offline.shared_prefix([[1, 2], [1, 3]]) == 1
  shared = offline.engine_for(model, [preamble + [k] for k in range(3)], 8)
  assert shared.prefix_cache is not None and shared.prefix_cache.capacity == 4 * 128
  assert offline.engine_for(model, [[k] * 90 for k in range(3)], 8).prefix_cache is None
  assert offline.engine_for(model, [preamble + [1]], 8).prefix_cache is None  # one prompt
  assert offline.engine_for(model, [[1] * 90] * 2, 8, prefix_cache=False).prefix_cache is None
  got = offline.generate(shared, [preamble + [k] for k in range(3)], max_tokens=4)
  assert shared.prefix_cache.stats()['hits'] == 2 * 80 and all(len(c.tokens) == 4 for c in got)


def test_after_warmup_hits_compile_nothing(model):
  from serving import jetstream_compat
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: compiles.append(event) if event == BACKEND_COMPILE else None)
  engine = Engine(model, max_concurrent_decodes=3, max_len=80, max_prefill_length=32,
                  prefix_cache_tokens=256)
  jetstream_compat.warm_up(engine)
  assert engine.prefix_cache.stats()['entries'] == 0  # warm-up prompts are not kept
  compiles.clear()
  for prompt in ([1] * 30, [1] * 20, [1] * 31, [2] * 17 + [3], [1] * 16 + [5] * 14):
    offline.generate(engine, [prompt, prompt[:-1]], max_tokens=4)
  assert engine.prefix_cache.stats()['hits'] > 0 and compiles == []


def test_capacity_evicts_the_least_recently_used_and_a_continued_prompt_replaces_its_start():
  cache = PrefixCache(capacity=96)
  a, b, c = list(range(40)), list(range(50, 90)), list(range(200, 240))
  cache.store(a, 'A', 32)
  cache.store(b, 'B', 32)
  assert cache.lookup(a + [0], limit=41) == (32, 'A')  # A is now the most recently used
  cache.store(c, 'C', 64)  # 128 > 96: B goes
  assert cache.lookup(b, limit=40) == (0, None)
  assert cache.lookup(c, limit=39) == (32, 'C') and cache.stats()['evictions'] == 1
  # A conversation's next turn holds all of A's blocks and more: A is dropped at once.
  cache.store(a + list(range(400, 410)), 'A2', 64)
  assert cache.stats()['entries'] == 1  # (and C went for room)
  assert cache.lookup(a + list(range(400, 411)), limit=50) == (48, 'A2')
  # Only whole blocks are matched, never the prompt's last token, never past a difference.
  assert cache.lookup(a[:33], limit=32) == (32, 'A2')
  assert cache.lookup(a[:20] + [999] * 20, limit=40) == (16, 'A2')
  assert cache.lookup([999] + a, limit=41) == (0, None)
  cache.store(list(range(10)), 'short', 16)  # no whole block: nothing to keep
  cache.store(list(range(500, 700)), 'huge', 256)  # beyond capacity: not kept
  assert cache.stats()['entries'] == 1
  with pytest.raises(ValueError, match='capacity'):
    PrefixCache(capacity=8)


def test_bad_capacity_is_an_error(model):
  with pytest.raises(ValueError, match='prefix cache capacity'):
    Engine(model, max_concurrent_decodes=2, max_len=128, prefix_cache_tokens=-5)
