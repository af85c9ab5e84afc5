"""The engine decodes exactly like the plain model, and its log-probs are the trainer's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import llama, presets
from serving import offline
from serving.engine import MODES, Engine, SamplingParams, key_data, sample_tokens

CFG = presets.resolve('tiny', dtype='float32')
BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
PROMPTS = [[5, 17, 300, 2], list(range(30, 50)), [9], list(range(100, 140)), [44, 45, 46]]


@pytest.fixture(scope='module')
def model():
  return llama.create_model(CFG, seed=1)


@pytest.fixture(scope='module')
def engine(model):
  # 2 slots for 5 prompts: slots are refilled while the other sequence is mid-flight.
  return Engine(model, max_concurrent_decodes=2, max_len=96, max_prefill_length=64)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _logits(model, seq, width=64):
  # Causal: right padding to one width changes no logit before it, and compiles once.
  return _forward(model, jnp.asarray([seq + [0] * (width - len(seq))]))[0, :len(seq)]


def _greedy_without_cache(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(_logits(model, seq)[-1])))
  return seq[len(prompt):]


def _model_logprobs(model, prompt, tokens):
  logp = jax.nn.log_softmax(_logits(model, prompt + tokens), axis=-1)
  return np.asarray(logp[len(prompt) - 1:-1][np.arange(len(tokens)), tokens])


def test_greedy_with_mixed_lengths_and_reused_slots_equals_full_recompute(model, engine):
  lengths = [6, 11, 3, 8, 12]  # Different lengths, so slots free up at different steps.
  got = [offline.generate(engine, [p], max_tokens=n)[0].tokens for p, n in zip(PROMPTS, lengths)]
  batched = offline.generate(engine, PROMPTS, max_tokens=12)
  for prompt, n, alone, together in zip(PROMPTS, lengths, got, batched):
    want = _greedy_without_cache(model, prompt, 12)
    assert alone == want[:n]
    assert together.tokens == want and together.finish_reason == 'length'


def test_greedy_slot_is_unaffected_by_a_sampled_neighbour(model, engine):
  state = engine.init_decode_state()
  for slot, (prompt, sampling) in enumerate([(PROMPTS[0], SamplingParams()),
                                             (PROMPTS[1], SamplingParams(1.0, 0, 1.0, 7))]):
    padded, n = engine.pad_prompt(prompt)
    state = engine.insert(engine.prefill(params=engine.params, padded_tokens=padded,
                                         true_length=n, sampling=sampling), state, slot)
  tokens = []
  for _ in range(8):
    state, step = engine.generate(engine.params, state)
    assert step['valid'].all()
    tokens.append(np.asarray(step['tokens']))
  assert [int(t[0]) for t in tokens] == _greedy_without_cache(model, PROMPTS[0], 8)
  assert int(step['lengths'][0]) == 8


def test_logprobs_of_sampled_tokens_match_the_training_model(model, engine):
  done = offline.generate(engine, PROMPTS[:3], n=2, max_tokens=10,
                          sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3))
  assert len(done) == 6 and len({tuple(c.tokens) for c in done}) > 1
  for c in done:
    want = _model_logprobs(model, PROMPTS[c.prompt_index], c.tokens)
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4)


def test_seeded_sampling_repeats_and_stops_at_eos(engine):
  sampling = SamplingParams(temperature=1.0, seed=11)
  a = offline.generate(engine, PROMPTS[:2], n=2, max_tokens=8, sampling=sampling)
  b = offline.generate(engine, PROMPTS[:2], n=2, max_tokens=8, sampling=sampling)
  assert [c.tokens for c in a] == [c.tokens for c in b]
  eos = a[0].tokens[3]
  cut = offline.generate(engine, PROMPTS[:1], max_tokens=8, sampling=sampling, eos_id=eos)[0]
  assert cut.tokens == a[0].tokens[:a[0].tokens.index(eos) + 1] and cut.finish_reason == 'stop'


def test_new_params_reuse_the_compiled_steps(engine):
  offline.generate(engine, PROMPTS[:2], max_tokens=4)
  steps = (engine._prefill, engine._insert, *engine._generate.values())
  sizes = [f._cache_size() for f in steps]
  other = nnx.state(llama.create_model(CFG, seed=2))
  first = offline.generate(engine, PROMPTS[:2], max_tokens=4)
  second = offline.generate(engine, PROMPTS[:2], params=other, max_tokens=4)
  assert [c.tokens for c in first] != [c.tokens for c in second]  # The new weights were used.
  assert [f._cache_size() for f in steps] == sizes


def test_the_host_picks_the_cheapest_decode_step(engine):
  """Greedy-only while no inserted request samples; the plain draw while none filters by top-k
  or top-p (no vocabulary sort); the filtering step otherwise."""
  before = {m: f._cache_size() for m, f in engine._generate.items()}
  offline.generate(engine, PROMPTS[:2], max_tokens=3)
  assert set(engine._slot_modes.values()) == {'greedy'}
  offline.generate(engine, PROMPTS[:2], max_tokens=3, sampling=SamplingParams(temperature=0.7))
  assert set(engine._slot_modes.values()) == {'sample'}
  offline.generate(engine, PROMPTS[:2], max_tokens=3,
                   sampling=SamplingParams(temperature=0.7, top_k=5))
  assert set(engine._slot_modes.values()) == {'filtered'}
  after = {m: f._cache_size() for m, f in engine._generate.items()}
  # offline.generate runs the multi-step function (generate_many) of each mode.
  many = [(mode, engine.decode_steps, engine.max_len) for mode in MODES]
  assert all(after[m] >= 1 and after[m] >= before[m] for m in many)


def test_plain_sampling_draws_what_the_filtering_path_draws_without_filters():
  """A seeded request gives the same tokens whichever step its neighbours make the engine take."""
  logits = jax.random.normal(jax.random.key(3), (16, 300)) * 3
  keys = jax.random.key_data(jax.random.split(jax.random.key(4), 16))
  args = (logits, keys, jnp.arange(16), jnp.full((16,), 0.9), jnp.zeros((16,), jnp.int32),
          jnp.ones((16,)))
  for a, b in zip(sample_tokens(*args, mode='sample'), sample_tokens(*args, mode='filtered')):
    np.testing.assert_array_equal(a, b)


def test_greedy_takes_the_first_maximum_and_the_logprobs_are_log_softmax():
  # The CPU's argmax is computed as the least index holding the maximum, and the drawn token's
  # log-prob without the vocabulary's log_softmax: ties, negative rows and -inf entries included.
  logits = jnp.round(jax.random.normal(jax.random.key(5), (32, 700)) * 2)  # many ties
  logits = logits.at[3].set(-5.0).at[4, :350].set(-jnp.inf).at[5, 699].set(99.0)
  n = logits.shape[0]
  keys = jax.random.key_data(jax.random.split(jax.random.key(6), n))
  for mode in MODES:
    temperature = jnp.zeros((n,)) if mode == 'greedy' else jnp.full((n,), 0.8)
    tokens, logp = jax.jit(sample_tokens, static_argnames='mode')(
        logits, keys, jnp.arange(n), temperature, jnp.zeros((n,), jnp.int32), jnp.ones((n,)),
        mode=mode)
    if mode == 'greedy':
      np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)[:, 0]
    np.testing.assert_allclose(logp, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode, top_k, probs', [
    ('sample', 0, [0.1, 0.2, 0.7, 0.0]),
    ('filtered', 2, [0.0, 0.2 / 0.9, 0.7 / 0.9, 0.0]),  # top-2 of [0.1, 0.2, 0.7, 0]
])
def test_sampled_tokens_follow_the_distribution(mode, top_k, probs):
  n = 20000
  logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.7, 0.0]] * n))
  keys = jax.random.key_data(jax.random.split(jax.random.key(5), n))
  tokens, _ = sample_tokens(logits, keys, jnp.zeros((n,), jnp.int32), jnp.ones((n,)),
                            jnp.full((n,), top_k), jnp.ones((n,)), mode=mode)
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  np.testing.assert_allclose(freq, probs, atol=0.012)  # ~4 standard errors
  assert freq[3] == 0  # a token of probability 0 is never drawn


def test_a_full_cache_ends_the_sequence(model):
  small = Engine(model, max_concurrent_decodes=1, max_len=24, max_prefill_length=16)
  done = offline.generate(small, [list(range(1, 15))], max_tokens=50)[0]
  assert len(done.tokens) == 24 - 14 and done.finish_reason == 'length'


def test_top_k_one_and_tiny_top_p_are_greedy():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  key = jnp.zeros((4, 2), jnp.uint32)
  ones = jnp.ones((4,), jnp.float32)
  for top_k, top_p in ((1, 1.0), (0, 1e-6)):
    tokens, logp = sample_tokens(logits, key, jnp.arange(4), ones, jnp.full((4,), top_k),
                                 jnp.full((4,), top_p, jnp.float32))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits).max(-1), atol=1e-6)


@pytest.mark.parametrize('kwargs, match', [({'temperature': -1.0}, 'temperature'),
                                           ({'temperature': float('nan')}, 'temperature'),
                                           ({'top_p': 0.0}, 'top_p'), ({'top_k': -2}, 'top_k')])
def test_bad_sampling_params_are_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_bad_prompts_are_errors(engine):
  with pytest.raises(ValueError, match='at most 64'):
    engine.pad_prompt([1] * 65)
  with pytest.raises(ValueError, match='empty'):
    offline.generate(engine, [[]], max_tokens=3)
  with pytest.raises(ValueError, match='max_tokens'):
    offline.generate(engine, [[1]], max_tokens=0)


def test_engine_on_a_mesh_decodes_like_one_device(engine):
  from configs.base import DEFAULT_SHARDING_RULES
  from models.sharding import make_mesh
  mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  sharded = Engine(llama.create_model(CFG, seed=1, mesh=mesh, rules=DEFAULT_SHARDING_RULES),
                   max_concurrent_decodes=2, max_len=96, max_prefill_length=64, mesh=mesh,
                   rules=DEFAULT_SHARDING_RULES)
  k = sharded.init_decode_state()['cache'][0]['k']  # [slots, max_len, kv_heads, head_dim]
  assert k.sharding.shard_shape(k.shape) == (1, 96, 1, CFG.head_dim)  # slots/data, heads/tensor
  want = offline.generate(engine, PROMPTS[:3], max_tokens=6)
  got = offline.generate(sharded, PROMPTS[:3], max_tokens=6)
  assert [c.tokens for c in got] == [c.tokens for c in want]
  np.testing.assert_allclose([c.logprobs for c in got], [c.logprobs for c in want], atol=1e-5)


def test_engine_for_sizes_a_job_and_rejects_what_cannot_fit(model):
  engine = offline.engine_for(model, PROMPTS, 12, max_slots=3)
  assert engine.max_concurrent_decodes == 3 and engine.max_prefill_length == 64
  assert engine.max_len == 64 + 12
  got = offline.generate(engine, PROMPTS, max_tokens=12)
  assert [c.tokens for c in got] == [_greedy_without_cache(model, p, 12) for p in PROMPTS]
  with pytest.raises(ValueError, match='max_seq_len=512'):
    offline.engine_for(model, [[1] * 500], 20)


def test_samples_of_one_prompt_share_its_prefill(engine, monkeypatch):
  """n samples per prompt: one prefill each, and the same draws as sampling them one by one."""
  import dataclasses
  sampling = SamplingParams(temperature=1.0, top_k=40, seed=5)
  calls = []
  prefill = engine.prefill
  monkeypatch.setattr(engine, 'prefill', lambda **kw: calls.append(1) or prefill(**kw))
  shared = offline.generate(engine, PROMPTS[:2], n=3, max_tokens=6, sampling=sampling)
  assert len(calls) == 2
  for c in shared:
    alone = offline.generate(engine, [PROMPTS[c.prompt_index]], max_tokens=6,
                             sampling=dataclasses.replace(
                                 sampling, seed=sampling.seed + c.prompt_index * 3 + c.sample_index))
    assert c.tokens == alone[0].tokens
    np.testing.assert_allclose(c.logprobs, alone[0].logprobs, rtol=1e-5, atol=1e-6)
  assert len({tuple(c.tokens) for c in shared if c.prompt_index == 0}) > 1


def test_after_warmup_no_request_compiles(model):
  """The server's warm-up (Engine.warmup) compiles every shape a request can run: afterwards
  prompts of every bucket, greedy, sampled, top-p and n > 1 (resampled prefixes) make XLA compile
  nothing, so the first requests run at steady-state speed."""
  from serving import jetstream_compat
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: compiles.append(event) if event == BACKEND_COMPILE else None)
  # Shapes no other test compiles: 3 slots, buckets 16 and 32.
  engine = Engine(model, max_concurrent_decodes=3, max_len=80, max_prefill_length=32)
  seconds = jetstream_compat.warm_up(engine)
  assert seconds > 0 and engine._slot_modes == {}  # The scratch slot's mode is forgotten.
  assert len(compiles) >= 2 + 2 + 3  # prefill and insert per bucket, a step per decode mode
  compiles.clear()
  for sampling in (SamplingParams(), SamplingParams(temperature=0.8, seed=1),
                   SamplingParams(temperature=0.8, top_p=0.9)):
    offline.generate(engine, [p[:32] for p in PROMPTS], n=2, max_tokens=5, sampling=sampling)
  assert compiles == []


def test_batched_prefill_gives_each_prompt_what_its_own_prefill_gives(model):
  # 5 prompts over 4 slots, several in one bucket: prefill_batch_of runs them together (padded
  # to a power of two), and each prefix equals the single prefill's; greedy decoding from them
  # equals full recompute, and the sampled first tokens are the seeds' (slot- and batch-free).
  engine = Engine(model, max_concurrent_decodes=4, max_len=96, max_prefill_length=64,
                  prefill_batch=4)
  prompts = [[5, 17, 300, 2], [9, 8, 7], [44, 45, 46, 47, 48], [3] * 20, [10, 11]]
  samplings = [SamplingParams(), SamplingParams(1.0, 0, 1.0, 3), SamplingParams(),
               SamplingParams(0.7, 5, 0.9, 4), SamplingParams(1.0, 0, 1.0, 5)]
  calls = []
  rows = engine._prefill_rows
  engine._prefill_rows = lambda *a: calls.append(a[1].shape) or rows(*a)
  batched = engine.prefill_batch_of(params=engine.params, prompts=prompts, samplings=samplings,
                                    max_tokens=[3, 4, 5, 6, 7], stop_ids=(2,))
  assert calls == [(4, 16)]  # the four 16-token-bucket prompts in one call; [3] * 20 alone
  for prompt, sampling, limit, got in zip(prompts, samplings, [3, 4, 5, 6, 7], batched):
    padded, n = engine.pad_prompt(prompt)
    want = engine.prefill(params=engine.params, padded_tokens=padded, true_length=n,
                          sampling=sampling, max_tokens=limit, stop_ids=(2,))
    assert int(got['token']) == int(want['token']) and got['mode'] == want['mode']
    np.testing.assert_allclose(got['logprob'], want['logprob'], atol=1e-5)
    assert int(got['limit']) == limit and list(got['stop']) == list(want['stop'])
    for a, b in zip(got['cache'], want['cache']):
      assert a['k'].shape == b['k'].shape
      np.testing.assert_allclose(a['k'][:, :n], b['k'][:, :n], atol=1e-5)
  done = offline.generate(engine, prompts, max_tokens=10)
  for prompt, c in zip(prompts, done):
    assert c.tokens == _greedy_without_cache(model, prompt, 10)


def test_insert_many_is_one_insert_per_row_and_one_slot_gets_spare_rows(model):
  # insert_many writes the rows of one batched prefill into their slots in one dispatch; the
  # state equals that of inserting each row alone, in any slot order. A one-slot engine with a
  # spare row (what a GPU gets: a one-row step is slow there) still returns one row, exactly.
  engine = Engine(model, max_concurrent_decodes=5, max_len=96, max_prefill_length=64,
                  prefill_batch=4)
  # One bucket, so two calls: four prompts (a batch of 4), one alone (a plain prefix).
  prompts = [PROMPTS[0], PROMPTS[4], [7, 8, 9], [1, 2], [3]]
  samplings = [SamplingParams(), SamplingParams(1.0, 0, 1.0, 7), SamplingParams(0.5, 3, 1.0, 2),
               SamplingParams(), SamplingParams(1.0, 0, 1.0, 1)]
  rows = engine.prefill_batch_of(params=engine.params, prompts=prompts, samplings=samplings,
                                 max_tokens=[4, 5, 6, 7, 8], stop_ids=(2,))
  slots = [3, 0, 4, 1, 2]
  calls = []
  many = engine._insert_rows
  engine._insert_rows = lambda *a: calls.append(1) or many(*a)
  together = jax.device_get(engine.insert_many(rows, engine.init_decode_state(), slots))
  state = engine.init_decode_state()
  for prefix, slot in zip(rows, slots):
    state = engine.insert(dict(prefix), state, slot)  # A plain dict: the one-prefix path.
  alone = jax.device_get(state)
  assert calls == [1]
  for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='distinct slot'):
    engine.insert_many(rows[:2], engine.init_decode_state(), [1, 1])

  assert engine.rows == 5  # No spare rows on a CPU.
  one = Engine(model, max_concurrent_decodes=1, max_len=96, max_prefill_length=64,
               min_decode_rows=2)
  assert one.init_decode_state()['pos'].shape == (2,)
  padded, n = one.pad_prompt(PROMPTS[1])
  prefix = one.prefill(params=one.params, padded_tokens=padded, true_length=n, max_tokens=9)
  state = one.insert(prefix, one.init_decode_state(), 0)
  state, step = one.generate_many(one.params, state)
  assert step['valid'].shape == (1, one.decode_steps) and step['lengths'].shape == (1,)
  assert np.asarray(step['tokens'])[0].tolist() == _greedy_without_cache(model, PROMPTS[1], 8)


def test_key_data_on_the_host_is_jax_randoms():
  for seed in (0, 1, 7, 2**31 - 1, -1, -5, 2**32 - 1, 2**32, 2**40 + 3, -2**31):
    want = jax.random.key_data(jax.random.key(seed))
    np.testing.assert_array_equal(key_data(seed), want)
    assert key_data(seed).dtype == want.dtype


@pytest.mark.parametrize('early_exit', [True, False])
def test_generate_many_ends_sequences_on_the_device(model, early_exit):
  # decode_steps=4: one dispatch returns up to 4 tokens a slot, nothing valid after a slot's
  # max_tokens, and the loop stops early once every slot has ended (early_exit) or runs its 4
  # steps with the ended slots frozen (as on a GPU): the same outputs.
  engine = Engine(model, max_concurrent_decodes=2, max_len=96, max_prefill_length=64,
                  decode_steps=4, early_exit=early_exit)
  state = engine.init_decode_state()
  for slot, (prompt, limit) in enumerate([(PROMPTS[0], 6), (PROMPTS[1], 2)]):
    padded, n = engine.pad_prompt(prompt)
    state = engine.insert(engine.prefill(params=engine.params, padded_tokens=padded,
                                         true_length=n, max_tokens=limit), state, slot)
  tokens = [[], []]
  for expect_valid in ([[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 0]]):
    state, step = engine.generate_many(engine.params, state)
    step = jax.device_get(step)
    assert step['valid'].astype(int).tolist() == expect_valid
    for slot in range(2):
      tokens[slot] += step['tokens'][slot][step['valid'][slot]].tolist()
  assert tokens[0] == _greedy_without_cache(model, PROMPTS[0], 6)
  assert tokens[1] == _greedy_without_cache(model, PROMPTS[1], 2)
  assert step['lengths'].tolist() == [6, 2]


def test_a_loop_without_early_exit_has_a_known_trip_count_and_decodes_the_same(model):
  # What XLA's GPU runtime needs to queue a dispatch's steps without reading the loop condition
  # on the host after each (serving/engine.py, EARLY_EXIT): a trip count its compiler can see.
  kw = dict(max_concurrent_decodes=2, max_len=64, max_prefill_length=64, decode_steps=4)
  stopping, fixed = Engine(model, early_exit=True, **kw), Engine(model, early_exit=False, **kw)
  hlo = lambda e: e._generate['greedy', 4, 64].lower(e.params, e.init_decode_state()).compile()
  assert '"known_trip_count":' not in hlo(stopping).as_text()
  assert '"known_trip_count":{"n":"4"}' in hlo(fixed).as_text()
  sampling = SamplingParams(temperature=1.0, seed=11)
  eos = offline.generate(stopping, PROMPTS[:1], max_tokens=8, sampling=sampling)[0].tokens[2]
  for kwargs in (dict(max_tokens=7), dict(max_tokens=40),  # the second fills the cache
                 dict(max_tokens=9, sampling=sampling, eos_id=eos)):  # some end at eos
    want = offline.generate(stopping, PROMPTS, **kwargs)
    got = offline.generate(fixed, PROMPTS, **kwargs)
    assert [(c.tokens, c.finish_reason) for c in got] == [
        (c.tokens, c.finish_reason) for c in want]
    np.testing.assert_allclose([x for c in got for x in c.logprobs],
                               [x for c in want for x in c.logprobs], atol=1e-6)
  assert {c.finish_reason for c in want} >= {'stop'}


def test_decode_attends_over_the_filled_part_of_the_cache_only(model):
  # A 384-token cache attends over 128, 256 or 384 positions, whichever holds every live slot's
  # positions: a prompt of 120 tokens decoding 20 crosses from span 128 to 256, exactly as full
  # recompute; once it has ended, a short sequence runs at span 128 again.
  engine = Engine(model, max_concurrent_decodes=2, max_len=384, max_prefill_length=128,
                  decode_steps=4)
  assert engine.attend_buckets == [128, 256, 384]
  spans = []
  steps = engine._steps

  def spy(params, state, n):
    out = steps(params, state, n)
    spans.append(engine.last_span)
    return out
  engine._steps = spy
  long_prompt = [(7 * i) % 500 + 3 for i in range(120)]
  done = offline.generate(engine, [long_prompt, PROMPTS[0]], max_tokens=20)
  assert done[0].tokens == _greedy_without_cache_wide(model, long_prompt, 20)
  assert done[1].tokens == _greedy_without_cache(model, PROMPTS[0], 20)
  assert spans[0] == 128 and spans[-1] == 256 and set(spans) == {128, 256}, spans
  spans.clear()
  again = offline.generate(engine, [PROMPTS[2]], max_tokens=8)
  assert again[0].tokens == _greedy_without_cache(model, PROMPTS[2], 8)
  assert set(spans) == {128}, spans  # The long sequence's slot was released.


def _greedy_without_cache_wide(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(_logits(model, seq, width=256)[-1])))
  return seq[len(prompt):]


def test_int8_weights_serve_exactly_their_own_model_and_close_to_float(model):
  # Weight-only int8 (qwix PTQ): the projections are stored in int8, the engine decodes the
  # quantized model exactly (greedy == its own full recompute, log-probs == its own), and its
  # log-probs of the float model's greedy tokens stay close to the float model's.
  from models.quantize import quantize_weights
  qmodel = quantize_weights(llama.create_model(CFG, seed=1), 'int8')
  leaves = jax.tree.leaves(nnx.state(qmodel))
  assert any(leaf.dtype == jnp.int8 for leaf in leaves)
  int8_bytes = sum(leaf.nbytes for leaf in leaves if leaf.dtype == jnp.int8)
  projections = sum(leaf.size for path, leaf in jax.tree.leaves_with_path(nnx.state(model))
                    if 'kernel' in jax.tree_util.keystr(path))
  assert int8_bytes == projections  # every projection weight, one byte each
  engine = Engine(qmodel, max_concurrent_decodes=2, max_len=96, max_prefill_length=64)
  done = offline.generate(engine, PROMPTS[:3], max_tokens=8)
  for prompt, c in zip(PROMPTS, done):
    assert c.tokens == _greedy_without_cache(qmodel, prompt, 8)
    np.testing.assert_allclose(c.logprobs, _model_logprobs(qmodel, prompt, c.tokens), atol=2e-4)
  # The head of a chunked prefill and of a prefix-cache hit runs through the model's __call__
  # too (qwix's interception): calling the quantized head outside it failed.
  reusing = Engine(qmodel, max_concurrent_decodes=2, max_len=96, max_prefill_length=64,
                   prefill_chunk=16, prefix_cache_tokens=256)
  prompts = [PROMPTS[3], PROMPTS[3] + [7, 8]]  # 40 and 42 tokens: chunks, then a hit on 32
  # (Running the module eagerly can swap its arrays, which empties the prefix cache: first.)
  want = [_greedy_without_cache(qmodel, prompt, 6) for prompt in prompts]
  for prompt, tokens in zip(prompts, want):
    assert offline.generate(reusing, [prompt], max_tokens=6)[0].tokens == tokens
  assert reusing.prefix_cache.hits == 32  # positions reused
  float_tokens = _greedy_without_cache(model, PROMPTS[1], 8)
  drift = np.abs(_model_logprobs(qmodel, PROMPTS[1], float_tokens) -
                 _model_logprobs(model, PROMPTS[1], float_tokens))
  assert drift.max() < 0.05, drift
  with pytest.raises(ValueError, match="quantize='int3'"):
    quantize_weights(model, 'int3')


def test_a_bfloat16_kv_cache_halves_the_cache_and_keeps_the_logprobs(model):
  engine = Engine(model, max_concurrent_decodes=2, max_len=96, max_prefill_length=64,
                  kv_dtype='bfloat16')
  state = engine.init_decode_state()
  assert state['cache'][0]['k'].dtype == jnp.bfloat16
  done = offline.generate(engine, PROMPTS[:2], max_tokens=8)
  for prompt, c in zip(PROMPTS, done):
    np.testing.assert_allclose(c.logprobs, _model_logprobs(model, prompt, c.tokens), atol=0.02)
  with pytest.raises(ValueError, match='kv_dtype'):
    Engine(model, max_concurrent_decodes=1, max_len=96, kv_dtype='int8')


def test_from_workdir_quantizes_when_asked(tmp_path, repo_root):
  from tests.helpers import make_serve_workdir
  wd = make_serve_workdir(str(tmp_path), repo_root)
  engine = Engine.from_workdir(wd, quantize='int8', max_concurrent_decodes=1, max_len=64,
                               max_prefill_length=16)
  assert any(leaf.dtype == jnp.int8 for leaf in jax.tree.leaves(engine.params))
  assert len(offline.generate(engine, [[5, 6, 7]], max_tokens=3)[0].tokens) >= 1


def test_chunked_prefill_equals_one_shot_and_skips_the_padding(model):
  # prefill_chunk=16: a 40-token prompt (bucket 64) prefills in 3 dispatches of 16 (the 4th
  # chunk would be padding only), into the same cache and first token as one shot; greedy
  # decoding from it equals full recompute.
  chunked = Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64,
                   prefill_chunk=16)
  whole = Engine(model, max_concurrent_decodes=2, max_len=128, max_prefill_length=64)
  prompt = list(range(60, 100))
  padded, n = chunked.pad_prompt(prompt)
  starts = []
  part = chunked._prefill_part
  chunked._prefill_part = lambda p, t, start, c, at: starts.append(int(start)) or part(
      p, t, start, c, at)
  sampling = SamplingParams(temperature=1.0, seed=11)
  got = chunked.prefill(params=chunked.params, padded_tokens=padded, true_length=n,
                        sampling=sampling)
  want = whole.prefill(params=whole.params, padded_tokens=padded, true_length=n,
                       sampling=sampling)
  assert starts == [0, 16, 32]
  assert int(got['token']) == int(want['token'])
  np.testing.assert_allclose(got['logprob'], want['logprob'], atol=1e-5)
  for a, b in zip(got['cache'], want['cache']):
    np.testing.assert_allclose(a['k'][:, :n], b['k'][:, :n], atol=1e-5)
    np.testing.assert_allclose(a['v'][:, :n], b['v'][:, :n], atol=1e-5)
  done = offline.generate(chunked, [prompt, PROMPTS[0]], max_tokens=10)
  assert done[0].tokens == _greedy_without_cache(model, prompt, 10)
  assert done[1].tokens == _greedy_without_cache(model, PROMPTS[0], 10)
