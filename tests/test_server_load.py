"""The HTTP stack under load and faults (issue 10, items 3 and 5), on its own server with short
deadlines: keep-alive; a request line and headers dribbled byte by byte, a connection that sends
nothing and a body that stalls get 408 without holding anyone up; oversized headers and bodies get
431 and 413 naming the limit; 64 concurrent clients are all answered, exactly, while malformed
requests, a slowloris and clients that vanish mid-stream hit the same server and /health stays 200.
"""
import concurrent.futures
import http.client
import json
import re
import socket
import threading
import time

import openai
import pytest

from data.tokenizer import Tokenizer
from serving import offline
from serving.engine import Engine
from tests.helpers import SERVE_PROMPTS, make_serve_workdir, start_server, stop_server

SLOTS, QUEUE = 4, 70
DEADLINE = 1.0  # --header_timeout and --body_timeout, seconds


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, repo_root):
  return make_serve_workdir(str(tmp_path_factory.mktemp('serve_load')), repo_root)


@pytest.fixture(scope='module')
def server(workdir, repo_root):
  server = start_server(workdir, repo_root, f'--max_concurrent_decodes={SLOTS}', '--max_len=128',
                        f'--max_queue={QUEUE}', '--model_name=tiny',
                        f'--header_timeout={DEADLINE}', f'--body_timeout={DEADLINE}',
                        '--keep_alive_seconds=1', '--max_body_bytes=4096',
                        '--max_header_bytes=2048')
  yield server
  stop_server(server)


@pytest.fixture(scope='module')
def reference(workdir):
  """Greedy token ids of each prompt (up to 8 tokens), from offline generation in this process."""
  engine = Engine.from_workdir(workdir, max_concurrent_decodes=2, max_len=128,
                               max_prefill_length=64)
  tok = engine.tokenizer
  done = offline.generate(engine, [tok.encode_prompt(p) for p in SERVE_PROMPTS], max_tokens=8)
  return {p: c.tokens for p, c in zip(SERVE_PROMPTS, done)}


def _raw(port, data: bytes, timeout=10.0) -> tuple[int, dict, float]:
  """Sends raw bytes; returns (status, JSON body, seconds until the server closed)."""
  start = time.monotonic()
  with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
    s.sendall(data)
    return _response(s, start)


def _response(s, start):
  received = b''
  while chunk := s.recv(65536):
    received += chunk
  head, _, body = received.partition(b'\r\n\r\n')
  return int(head.split()[1]), json.loads(body), time.monotonic() - start


def _get(port, path):
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  conn.request('GET', path)
  resp = conn.getresponse()
  payload = resp.read()
  conn.close()
  return resp.status, payload


def _metric(port, name):
  text = _get(port, '/metrics')[1].decode()
  return sum(float(v) for v in re.findall(rf'^{re.escape(name)} (\S+)$', text, re.M))


def _dribble(port, data: bytes, gap: float):
  """Sends data one byte per `gap` seconds until the server closes; its status, message, time."""
  start = time.monotonic()
  with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
    try:
      for byte in data:
        s.sendall(bytes([byte]))
        time.sleep(gap)
    except (BrokenPipeError, ConnectionResetError):
      pass
    return _response(s, start)


def test_keep_alive_serves_several_requests_on_one_connection_then_closes_when_idle(server):
  port = server['port']
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  socks = []
  for method, path, body in [('GET', '/health', None), ('GET', '/v1/models', None),
                             ('POST', '/v1/completions', json.dumps(
                                 {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2}))]:
    conn.request(method, path, body=body, headers={'Content-Type': 'application/json'})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader('connection', '').lower() != 'close'
    resp.read()
    socks.append(conn.sock)
  assert socks[0] is socks[1] is socks[2]  # http.client reconnects (new socket) after a close
  time.sleep(1.6)  # over --keep_alive_seconds=1: the server closes the idle connection
  assert socks[0].recv(1) == b''
  conn.close()


def test_headers_dribbled_byte_by_byte_get_408_while_others_are_served(server):
  port = server['port']
  slow = concurrent.futures.ThreadPoolExecutor(1).submit(
      _dribble, port, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: '
      b'application/json\r\nX-Padding: ' + b'a' * 200 + b'\r\n\r\n', 0.02)
  time.sleep(0.2)
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none', max_retries=0)
  got = client.completions.create(model='tiny', prompt='x', max_tokens=3, temperature=0)
  assert got.usage.completion_tokens >= 1 and _get(port, '/health')[0] == 200
  assert not slow.done()  # Still dribbling while the other request was answered.
  status, body, seconds = slow.result(30)
  assert status == 408 and 'did not arrive within 1 s' in body['error']['message']
  assert DEADLINE <= seconds < DEADLINE + 2


def test_a_connection_that_sends_nothing_and_a_stalled_body_get_408(server):
  port = server['port']
  start = time.monotonic()
  with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
    status, body, _ = _response(s, start)
  assert status == 408 and 'headers did not arrive' in body['error']['message']
  # The headers promise 100 bytes of body; 10 come.
  status, body, seconds = _raw(port, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\n'
                               b'Content-Length: 100\r\n\r\n{"model": ')
  assert status == 408 and 'body did not arrive within 1 s (10 bytes came)' in \
      body['error']['message'] and seconds >= DEADLINE


@pytest.mark.parametrize('data, status, words', [
    (b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n' + b' ' * 5000,
     413, 'has 5000 bytes; this server takes at most 4096'),
    (b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
     + b'1000\r\n' + b' ' * 4096 + b'\r\n10\r\n' + b' ' * 16 + b'\r\n0\r\n\r\n',
     413, 'over 4096 bytes'),
    (b'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 3000 + b'\r\n\r\n',
     431, 'over 2048 bytes'),
    (b'HELLO\r\n\r\n', 400, 'malformed HTTP request'),
    (b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n', 400,
     'malformed HTTP request'),
    (b'GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n', 404, 'no route /v2/nothing'),
    (b'GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n', 405, 'does not take GET'),
])
def test_oversized_and_malformed_requests_get_4xx_naming_the_problem(server, data, status, words):
  got, body, _ = _raw(server['port'], data + b'')
  assert got == status and words in body['error']['message'], body
  assert _get(server['port'], '/health')[0] == 200


def test_64_concurrent_clients_are_all_answered_amid_faults(server, reference):
  # 64 well-formed requests at once (half streamed), while malformed requests, oversized ones,
  # a slowloris and clients that vanish mid-stream hit the same server and /health is polled.
  port = server['port']
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none', max_retries=0,
                         timeout=120)
  jobs = [(SERVE_PROMPTS[i % len(SERVE_PROMPTS)], 1 + i % 8, i % 2 == 0) for i in range(64)]

  def ask(prompt, n, stream):
    if not stream:
      got = client.completions.create(model='tiny', prompt=prompt, max_tokens=n, temperature=0)
      return got.choices[0].text, got.usage.completion_tokens
    chunks = list(client.completions.create(model='tiny', prompt=prompt, max_tokens=n,
                                            temperature=0, stream=True,
                                            stream_options={'include_usage': True}))
    return ''.join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage \
        .completion_tokens

  def vanish():
    s = socket.create_connection(('127.0.0.1', port), timeout=30)
    body = json.dumps({'model': 'tiny', 'prompt': 'x', 'max_tokens': 100, 'stream': True})
    s.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n'
              f'{body}'.encode())
    received = b''
    while b'data:' not in received:
      received += s.recv(4096)
    s.close()
    return int(received.split()[1])

  bad = [b'{"model": "tiny", "prompt": ', json.dumps({'model': 'tiny', 'prompt': 'x',
                                                        'max_tokens': -1}).encode(),
         json.dumps({'model': 'tiny', 'prompt': 'x', 'temperature': 9}).encode(),
         b'x' * 5000]

  def malformed(body):
    return _raw(port, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: '
                + str(len(body)).encode() + b'\r\n\r\n' + body)[:2]

  health, stop = [], threading.Event()

  def poll():
    while not stop.is_set():
      health.append(_get(port, '/health')[0])
      time.sleep(0.05)

  poller = threading.Thread(target=poll)
  poller.start()
  try:
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
      slowloris = pool.submit(_dribble, port, b'GET /health HTTP/1.1\r\nHost: x\r\n' * 4, 0.05)
      answers = [pool.submit(ask, *job) for job in jobs]
      vanished = [pool.submit(vanish) for _ in range(4)]
      errors = [pool.submit(malformed, body) for body in bad]
      answers = [f.result(300) for f in answers]
      vanished = [f.result(300) for f in vanished]
      errors = [f.result(300) for f in errors]
      slow_status = slowloris.result(300)[0]
  finally:
    stop.set()
    poller.join()
  tok = Tokenizer  # EOS id
  for (prompt, n, _), (text, count) in zip(jobs, answers):
    want = reference[prompt][:n]
    want = want[:want.index(tok.eos_id)] if tok.eos_id in want else want
    assert count == len(want), (prompt, n, count)
  # Streamed and unstreamed greedy answers of one prompt and length agree exactly.
  by_job = {}
  for (prompt, n, _), (text, _) in zip(jobs, answers):
    by_job.setdefault((prompt, n), set()).add(text)
  assert all(len(texts) == 1 for texts in by_job.values()), by_job
  assert vanished == [200] * 4
  assert [status for status, _ in errors] == [400, 400, 400, 413]
  assert [m in body['error']['message'] for (_, body), m in
          zip(errors, ['not valid JSON', 'max_tokens', 'temperature', 'at most 4096'])] == [True] * 4
  assert slow_status == 408
  assert health and set(health) == {200}, health
  deadline = time.time() + 30  # Every slot and queue place is free again.
  while _metric(port, 'lmforge_active_slots') + _metric(port, 'lmforge_queue_depth') and \
      time.time() < deadline:
    time.sleep(0.1)
  assert _metric(port, 'lmforge_active_slots') == _metric(port, 'lmforge_queue_depth') == 0
  assert server['proc'].poll() is None
