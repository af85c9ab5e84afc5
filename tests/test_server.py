"""The OpenAI-compatible server in a subprocess: the official client, streaming, concurrency, bad
input answered with 4xx, a full queue with 503, disconnects freeing slots, and JetStream's gRPC.

Greedy answers are checked against offline generation on the same checkpoint in this process.
"""
import concurrent.futures
import http.client
import json
import re
import signal
import socket
import time

import jax.numpy as jnp
import numpy as np
import openai
import pytest

from data.tokenizer import Tokenizer, load_tokenizer
from models import checkpoint
from serving import offline
from serving.engine import Engine
from tests.helpers import SERVE_PROMPTS, make_serve_workdir, start_server, stop_server

KEY = 'secret'
PROMPTS = SERVE_PROMPTS


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, repo_root):
  return make_serve_workdir(str(tmp_path_factory.mktemp('serve')), repo_root)


@pytest.fixture(scope='module')
def server(workdir, repo_root):
  server = start_server(workdir, repo_root, f'--api_key={KEY}', '--max_concurrent_decodes=2',
                        '--max_len=128', '--max_queue=2', '--model_name=tiny',
                        '--prefix_cache_tokens=1024')
  yield server
  stop_server(server)


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'http://127.0.0.1:{server["port"]}/v1', api_key=KEY,
                       max_retries=0, timeout=60)


@pytest.fixture(scope='module')
def reference(workdir):
  """Greedy continuations of PROMPTS (as the server encodes them) from the same checkpoint."""
  engine = Engine.from_workdir(workdir, max_concurrent_decodes=2, max_len=128,
                               max_prefill_length=64)
  tok = engine.tokenizer
  done = offline.generate(engine, [tok.encode_prompt(p) for p in PROMPTS], max_tokens=12)
  return {p: (c.text, c.tokens) for p, c in zip(PROMPTS, done)}


def _request(port, method, path, body=None, key=KEY):
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
  headers = {'Authorization': f'Bearer {key}'} if key else {}
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  conn.request(method, path, body=data, headers=headers)
  resp = conn.getresponse()
  payload = resp.read()
  conn.close()
  return resp.status, payload


def _metric(port, name):
  text = _request(port, 'GET', '/metrics')[1].decode()
  return sum(float(v) for v in re.findall(rf'^{re.escape(name)} (\S+)$', text, re.M))


def _expected_len(tokens, eos, n):
  return tokens.index(eos) if eos in tokens[:n] else n  # EOS itself is not returned


def test_openai_client_greedy_streaming_and_not(client, reference, workdir):
  assert [m.id for m in client.models.list()] == ['tiny']
  for prompt in PROMPTS[:2]:
    want_text, want_tokens = reference[prompt]
    got = client.completions.create(model='tiny', prompt=prompt, max_tokens=12, temperature=0)
    n = _expected_len(want_tokens, Tokenizer.eos_id, 12)
    assert got.usage.completion_tokens == n
    assert got.choices[0].text == want_text
    assert got.choices[0].finish_reason == ('length' if n == 12 else 'stop')
    streamed = client.completions.create(model='tiny', prompt=prompt, max_tokens=12,
                                         temperature=0, stream=True)
    assert ''.join(c.choices[0].text for c in streamed) == got.choices[0].text
  chat = client.chat.completions.create(model='tiny', max_tokens=5, temperature=0.7, seed=1,
                                        messages=[{'role': 'user', 'content': 'hi'}])
  assert chat.choices[0].message.role == 'assistant' and chat.usage.completion_tokens <= 5
  pieces = client.chat.completions.create(model='tiny', max_tokens=5, temperature=0.7, seed=1,
                                          messages=[{'role': 'user', 'content': 'hi'}], stream=True)
  streamed = ''.join(c.choices[0].delta.content or '' for c in pieces)
  assert streamed == chat.choices[0].message.content
  # stream_options.include_usage: a last chunk without choices carries the usage.
  chunks = list(client.chat.completions.create(
      model='tiny', max_tokens=5, temperature=0.7, seed=1, stream=True,
      stream_options={'include_usage': True}, messages=[{'role': 'user', 'content': 'hi'}]))
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
      chat.usage.completion_tokens and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
  assert all(c.usage is None for c in chunks[:-1])


def test_logprobs_are_returned_per_token(client):
  got = client.completions.create(model='tiny', prompt='x', max_tokens=6, temperature=1.0,
                                  seed=5, logprobs=0)
  lp = got.choices[0].logprobs
  assert len(lp.token_logprobs) == got.usage.completion_tokens
  assert all(x <= 0 for x in lp.token_logprobs)


def test_echo_scores_the_prompt_as_lm_evaluation_harness_asks(client, workdir):
  # local-completions' log-likelihood request: token ids, echo, logprobs=1, max_tokens 0 or 1.
  from models.losses import token_logprobs
  model, _ = checkpoint.load_model(workdir, dtype='float32')
  tok = load_tokenizer(workdir)
  ids = tok.encode_prompt('In the beginning God created')
  scored = client.completions.create(model='tiny', prompt=ids, max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
  lp = scored.choices[0].logprobs
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  assert len(lp.token_logprobs) == len(ids) and scored.usage.completion_tokens == 0
  want, _ = token_logprobs(model, jnp.asarray([ids[:-1]]), jnp.asarray([ids[1:]]))
  np.testing.assert_allclose(lp.token_logprobs[1:], np.asarray(want[0]), atol=2e-4)
  for logp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
    assert len(top) == 1 and max(top.values()) >= logp - 1e-6  # the likeliest token's
  assert scored.choices[0].text == tok.decode(ids)
  # With a completion: the prompt's entries, then exactly the non-echo request's.
  plain = client.completions.create(model='tiny', prompt=ids, max_tokens=3, temperature=0,
                                    logprobs=2)
  echoed = client.completions.create(model='tiny', prompt=ids, max_tokens=3, temperature=0,
                                     logprobs=2, echo=True)
  e, p = echoed.choices[0].logprobs, plain.choices[0].logprobs
  assert echoed.choices[0].text == tok.decode(ids) + plain.choices[0].text
  n = plain.usage.completion_tokens
  # (to float rounding: the server's prefix cache prefills the repeated prompt's last tokens
  # alone, a matmul of another shape)
  assert len(e.tokens) == len(ids) + n
  np.testing.assert_allclose(e.token_logprobs[len(ids):], p.token_logprobs, atol=1e-5)
  for top, logp in zip(p.top_logprobs, p.token_logprobs):  # greedy: the sampled token is the top
    assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(logp, abs=2e-4)
  chat = client.chat.completions.create(model='tiny', max_tokens=3, temperature=0, logprobs=True,
                                        top_logprobs=3, messages=[{'role': 'user', 'content': 'hi'}])
  for entry in chat.choices[0].logprobs.content:
    assert len(entry.top_logprobs) == 3
    assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=2e-4)
  with pytest.raises(openai.BadRequestError, match='stream'):
    client.completions.create(model='tiny', prompt='x', max_tokens=2, echo=True, stream=True)
  with pytest.raises(openai.BadRequestError, match='max_tokens'):
    client.completions.create(model='tiny', prompt='x', max_tokens=0)


def test_n_choices_sample_with_consecutive_seeds_streamed_or_not(client):
  ask = lambda **kw: client.completions.create(model='tiny', prompt='And God said', max_tokens=8,
                                               temperature=1.0, **kw)
  both = ask(n=2, seed=7)
  assert [c.index for c in both.choices] == [0, 1]
  # Choice i draws with seed + i, so it is the single request of that seed.
  assert [c.text for c in both.choices] == [ask(seed=7).choices[0].text,
                                            ask(seed=8).choices[0].text]
  assert both.usage.completion_tokens == sum(
      len(c) for c in (ask(seed=7, logprobs=0).choices[0].logprobs.tokens,
                       ask(seed=8, logprobs=0).choices[0].logprobs.tokens))
  texts = ['', '']
  for chunk in ask(n=2, seed=7, stream=True):
    for c in chunk.choices:
      texts[c.index] += c.text
  assert texts == [c.text for c in both.choices]


def test_concurrent_requests_complete_with_the_right_lengths(client, reference):
  lengths = [12, 3, 9, 1, 7, 12]  # 6 requests over 2 slots (+2 queued: some retry on 503)

  def ask(prompt, n):
    for _ in range(100):
      try:
        return client.completions.create(model='tiny', prompt=prompt, max_tokens=n, temperature=0)
      except openai.InternalServerError:  # 503 at capacity: retry, as a client should
        time.sleep(0.2)
    raise AssertionError('never admitted')

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(ask, PROMPTS, lengths))
  for prompt, n, got in zip(PROMPTS, lengths, results):
    assert got.usage.completion_tokens == _expected_len(reference[prompt][1], Tokenizer.eos_id, n)


def test_a_shared_beginning_comes_from_the_prefix_cache_and_answers_the_same(server, client,
                                                                             workdir):
  # The server runs with --prefix_cache_tokens: prompts sharing a 40-token beginning reuse its
  # two whole blocks (the metrics count them) and answer what an engine without the cache does.
  port = server['port']
  before = _metric(port, 'lmforge_prefix_cache_hits_total')
  queried = _metric(port, 'lmforge_prefix_cache_queries_total')
  engine = Engine.from_workdir(workdir, max_concurrent_decodes=2, max_len=128,
                               max_prefill_length=64)
  shared = list(range(10, 50))
  for tail in ([60], [61, 62], [60]):
    got = client.completions.create(model='tiny', prompt=shared + tail, max_tokens=6,
                                    temperature=0)
    want = offline.generate(engine, [shared + tail], max_tokens=6)
    assert got.choices[0].text == want[0].text
  assert _metric(port, 'lmforge_prefix_cache_hits_total') - before >= 2 * 32
  assert _metric(port, 'lmforge_prefix_cache_queries_total') - queried >= 3 * 41
  assert _metric(port, 'lmforge_prefix_cache_tokens') > 0


@pytest.mark.parametrize('body, status, words', [
    (b'{"model": "tiny", "prompt": ', 400, 'not valid JSON'),
    ({'model': 'gpt-9', 'prompt': 'x'}, 404, 'does not exist'),
    ({'model': 'tiny', 'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens'),
    ({'model': 'tiny', 'prompt': 'x', 'max_tokens': -3}, 400, 'max_tokens'),
    ({'model': 'tiny', 'prompt': 'x', 'temperature': -1}, 400, 'temperature'),
    ({'model': 'tiny', 'prompt': 'x', 'temperature': 'hot'}, 400, 'temperature'),
    ({'model': 'tiny', 'prompt': 'x', 'top_p': 1.5}, 400, 'top_p'),
    ({'model': 'tiny', 'prompt': 'x', 'top_p': 0}, 400, 'top_p'),
    ({'model': 'tiny', 'prompt': [1] * 65}, 400, 'at most 64'),
    ({'model': 'tiny', 'prompt': [1] * 60, 'max_tokens': 100}, 400, 'maximum context length'),
    ({'model': 'tiny', 'prompt': ''}, 400, 'prompt'),
    ({'model': 'tiny', 'prompt': 'x', 'n': 3}, 400, 'n must be an integer in 1..2'),
    ({'model': 'tiny', 'prompt': 'x', 'stream_options': {'include_usage': True}}, 400,
     'stream_options'),
    ({'model': 'tiny', 'messages': 'hi'}, 400, 'messages'),
])
def test_bad_input_gets_4xx_and_the_server_keeps_answering(server, body, status, words):
  port = server['port']
  path = '/v1/chat/completions' if isinstance(body, dict) and 'messages' in body else \
      '/v1/completions'
  got, payload = _request(port, 'POST', path, body)
  assert got == status and words in json.loads(payload)['error']['message']
  assert _request(port, 'POST', '/v1/completions',
                  {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2})[0] == 200


def test_health_is_503_until_the_engine_is_compiled(server):
  # A readiness probe sees 503 while the server compiles, then 200, and the log says how long the
  # warm-up took and what the server runs (auto sizing and dtype on a CPU).
  assert (503, 'warming up') in server['health'] and server['health'][-1] == (200, 'ok')
  assert server['health'].index((503, 'warming up')) < len(server['health']) - 1
  text = ''.join(server['log'])
  assert re.search(r'warm-up took \d+\.\d s', text), text
  assert 'computing in float32 (--dtype=auto) on cpu; 2 decode slots of 128 tokens' in text, text


def test_api_key_is_required(server):
  assert _request(server['port'], 'GET', '/v1/models', key=None)[0] == 401
  assert _request(server['port'], 'GET', '/v1/models', key='wrong')[0] == 401


def _open_stream(port, max_tokens):
  s = socket.create_connection(('127.0.0.1', port), timeout=60)
  body = json.dumps({'model': 'tiny', 'prompt': 'x', 'max_tokens': max_tokens, 'stream': True,
                     'temperature': 0})
  s.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n'
            f'Content-Length: {len(body)}\r\n\r\n{body}'.encode())
  return s


def test_a_full_queue_answers_503(server):
  socks = [_open_stream(server['port'], 110) for _ in range(7)]  # capacity: 2 slots + 2 queued
  statuses = [int(s.recv(64).split()[1]) for s in socks]
  for s in socks:
    s.close()
  assert statuses.count(200) == 4 and statuses.count(503) == 3


def test_a_disconnected_client_frees_its_slot(server, client):
  # Through uvicorn: two streams closed after their first event end, free their slots, and the
  # server serves the next request. (The tiny model decodes 110 tokens in about 15 ms here, so
  # whether a stream is cut before its end depends on scheduling; the cut itself is tested
  # deterministically by the next test.)
  port = server['port']
  socks = [_open_stream(port, 110) for _ in range(2)]
  for s in socks:
    received = b''
    while b'data:' not in received:  # Both slots are decoding.
      received += s.recv(4096)
    s.close()
  deadline = time.time() + 30
  while _metric(port, 'lmforge_active_slots') + _metric(port, 'lmforge_queue_depth') and \
      time.time() < deadline:
    time.sleep(0.2)
  assert _metric(port, 'lmforge_active_slots') == 0
  got = client.completions.create(model='tiny', prompt='x', max_tokens=3, temperature=0)
  assert got.choices[0].finish_reason in ('length', 'stop')


def test_a_disconnect_cancels_the_request_at_once():
  # The API over a driver that streams a token every 5 ms for up to 100 s unless its request is
  # cancelled: when the ASGI server reports the client gone after the second event, the handler
  # returns, cancels the request (the engine frees its slot at the next step) and counts it.
  import asyncio
  import threading
  import types
  from serving.http_api import OpenAIServer
  produced, placed, threads = [0], [], []

  def produce(request):
    while not request.cancelled and produced[0] < 20000:
      request.return_channel.add_result(([7], [-1.0]))
      produced[0] += 1
      time.sleep(0.005)
    request.return_channel.close()

  def place(request):
    placed.append(request)
    threads.append(threading.Thread(target=produce, args=(request,), daemon=True))
    threads[-1].start()

  driver = types.SimpleNamespace(place_request_on_prefill_queue=place)
  engine = types.SimpleNamespace(
      tokenizer=types.SimpleNamespace(decode=lambda ids: 'a' * len(ids)), max_len=1 << 20,
      max_concurrent_decodes=2, max_prefill_length=64, cfg=types.SimpleNamespace(vocab_size=100))
  api = OpenAIServer(engine, driver, model_name='fake')
  ids, args = api._validate({'model': 'fake', 'prompt': [5, 6, 7], 'max_tokens': 20000,
                             'stream': True}, chat=False)

  async def run():
    events, second = [], asyncio.Event()

    async def send(message):
      events.append(message)
      if message['type'] == 'http.response.body' and len(events) >= 3:
        second.set()

    async def receive():
      await second.wait()
      return {'type': 'http.disconnect'}
    await asyncio.wait_for(api._run(ids, args, False, receive, send), 30)
    at_return = produced[0]
    await asyncio.to_thread(threads[0].join, 30)  # The producer sees `cancelled` and ends.
    return at_return

  at_return = asyncio.run(run())
  assert placed and placed[0].cancelled and not api.inflight
  assert produced[0] < 20000 and produced[0] - at_return <= 1, produced[0]
  assert api.metrics.registry.get_sample_value('lmforge_requests_total',
                                               {'status': 'disconnected'}) == 1


def test_jetstream_grpc_decode(server):
  import grpc
  from serving import jetstream_compat  # noqa: F401  (JetStream needs its shims first)
  from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
  with grpc.insecure_channel(f'127.0.0.1:{server["grpc_port"]}') as channel:
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    # The second prompt is longer than the largest bucket: JetStream keeps its last tokens.
    for ids in ([5, 6, 7], list(range(3, 103))):
      request = jetstream_pb2.DecodeRequest(
          token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids), max_tokens=4)
      tokens = [t for r in stub.Decode(request, timeout=60) for s in r.stream_content.samples
                for t in s.token_ids]
      assert 1 <= len(tokens) <= 4
  assert server['proc'].poll() is None


def test_cpu_sizing_when_the_flags_leave_it_to_the_server():
  from serving.server import server_sizing
  assert server_sizing(0, 0, 8192) == (4, 1024)  # A CPU: 4 slots of 1024 tokens.
  assert server_sizing(0, 0, 512) == (4, 512)  # Never beyond the model's max_seq_len.
  assert server_sizing(2, 4096, 512) == (2, 512)


def test_sigterm_drains_the_requests_in_flight_then_exits(server):
  # Last of the module's server tests: it stops the shared server.
  port, proc = server['port'], server['proc']
  stream = _open_stream(port, 100)
  received = b''
  while b'data:' not in received:
    received += stream.recv(4096)
  proc.send_signal(signal.SIGTERM)
  deadline = time.time() + 60
  while b'data: [DONE]' not in received and time.time() < deadline:
    chunk = stream.recv(4096)
    if not chunk:
      break
    received += chunk
  stream.close()
  compact = received.replace(b' ', b'')
  assert b'data:[DONE]' in compact, received[-400:]
  assert b'"finish_reason":"length"' in compact or b'"finish_reason":"stop"' in compact
  assert proc.wait(30) == 0
  rest = proc.stdout.read()
  assert 'draining: 1 requests in flight' in rest and 'unfinished' not in rest, rest
