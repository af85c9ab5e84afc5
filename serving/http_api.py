"""The OpenAI-compatible HTTP API over JetStream's driver, as a Starlette app on uvicorn (the ASGI
stack vLLM's server uses; serving/server.py runs it).

Starlette routes and uvicorn (h11) speak HTTP/1.1: keep-alive, pipelining, chunked bodies, header
limits and the header deadline (serving/server.py). This module is the API: routes POST
/v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus); server-sent events for streaming. Until `ready` is set (serving/server.py sets it
once the engine has compiled every shape it runs), /health and the /v1 generation routes answer
503, which is what a Kubernetes readiness probe waits on; after SIGTERM (`draining`) they answer
503 too while the requests in flight finish.

Every request is validated here, before it reaches the driver, because an exception in a driver
thread kills the process; every error is OpenAI's JSON error object with a message that names the
problem. A client that disconnects, or a stop string, cancels its request, which frees its decode
slot at the next step. Requests beyond the slots plus `max_queue` get 503. A body over `max_body`
bytes gets 413, and one that does not arrive within `body_timeout` seconds 408.
"""
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import random
import time
import uuid
from collections import deque

import prometheus_client as prom
from prometheus_client import core as prom_core
from jetstream.core.utils.async_multifuture import AsyncMultifuture
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.engine import TOP_LOGPROBS, SamplingParams
from serving.jetstream_compat import Driver, Request

MAX_BODY = 1 << 20


class HttpError(Exception):

  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param


class _ClientGone(Exception):
  pass


def error_body(status: int, message: str, param: str | None = None) -> dict:
  """OpenAI's error object."""
  return {'error': {'message': message, 'type': 'invalid_request_error' if status < 500 else
                    'server_error', 'param': param, 'code': status}}


class Metrics:
  """Prometheus metrics of the server, in their own registry."""

  def __init__(self, requests: dict, prefix_cache=None):
    self.registry = r = prom.CollectorRegistry()
    if prefix_cache is not None:
      r.register(_PrefixCacheMetrics(prefix_cache))
    self.ttft = prom.Histogram('lmforge_time_to_first_token_seconds', 'Arrival to first token.',
                               registry=r)
    self.itl = prom.Histogram('lmforge_inter_token_latency_seconds', 'Between returned tokens.',
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
    self.tokens = prom.Counter('lmforge_output_tokens', 'Generated tokens returned.', registry=r)
    self.requests = prom.Counter('lmforge_requests', 'Finished requests.', ['status'], registry=r)
    self._recent = deque()  # (time, tokens) of the last 10 s, for the tokens/s gauge
    prom.Gauge('lmforge_tokens_per_second', 'Output tokens/s over the last 10 s.',
               registry=r).set_function(self._rate)
    # The driver sets `complete` when it inserts a request into a slot. (HTTP requests only.)
    active = lambda: sum(q.complete is not None for q in list(requests.values()))
    prom.Gauge('lmforge_active_slots', 'Decode slots in use.', registry=r).set_function(active)
    prom.Gauge('lmforge_queue_depth', 'Requests waiting for a decode slot.',
               registry=r).set_function(lambda: len(requests) - active())

  def add_tokens(self, n: int):
    self.tokens.inc(n)
    self._recent.append((time.monotonic(), n))

  def _rate(self) -> float:
    while self._recent and self._recent[0][0] < time.monotonic() - 10:
      self._recent.popleft()
    return sum(n for _, n in self._recent) / 10


class _PrefixCacheMetrics:
  """The engine's prefix-cache counters, read when /metrics is scraped (the prefill thread
  updates them; vLLM reports the same two in tokens)."""

  def __init__(self, cache):
    self.cache = cache

  def collect(self):
    s = self.cache.stats()
    yield prom_core.CounterMetricFamily('lmforge_prefix_cache_queries',
                                        'Prompt tokens looked up in the prefix cache.',
                                        value=s['queries'])
    yield prom_core.CounterMetricFamily('lmforge_prefix_cache_hits',
                                        'Prompt tokens whose KV the prefix cache supplied.',
                                        value=s['hits'])
    yield prom_core.GaugeMetricFamily('lmforge_prefix_cache_tokens',
                                      'KV positions the prefix cache holds.', value=s['tokens'])


class OpenAIServer:
  """The API's state and handlers; `app` is the ASGI application."""

  def __init__(self, engine, driver: Driver, *, model_name: str, api_key: str = '',
               max_queue: int = 64, max_body: int = MAX_BODY, body_timeout: float = 30.0):
    self.engine, self.driver, self.tok = engine, driver, engine.tokenizer
    self.model_name, self.api_key = model_name, api_key
    self.max_body, self.body_timeout = max_body, body_timeout
    self.capacity = engine.max_concurrent_decodes + max_queue
    self.inflight: dict[int, Request] = {}  # id -> request (requests are unhashable)
    self.metrics = Metrics(self.inflight, getattr(engine, 'prefix_cache', None))
    self.created = int(time.time())
    self.ready = True  # False while the server warms up (compiles) the engine.
    self.draining = False  # True after SIGTERM: requests in flight finish, new ones get 503.
    guard = self._guard
    self.app = Starlette(routes=[
        Route('/health', guard(self._health)),
        Route('/metrics', guard(self._metrics)),
        Route('/v1/models', guard(self._models)),
        Route('/v1/completions', guard(self._completions), methods=['POST']),
        Route('/v1/chat/completions', guard(self._chat_completions), methods=['POST']),
    ], exception_handlers={HTTPException: self._http_exception})

  def _guard(self, handler):
    """The handler, with HttpError answered as OpenAI's error JSON and a bug in one request
    answered 500 (and logged) rather than taking the server down."""

    async def endpoint(request):
      try:
        return await handler(request)
      except HttpError as e:
        self.metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(error_body(e.status, e.message, e.param), e.status)
      except Exception:
        logging.exception('request failed')
        self.metrics.requests.labels('500').inc()
        return JSONResponse(error_body(500, 'internal error'), 500)
    return endpoint

  async def _http_exception(self, request, exc: HTTPException):
    """Starlette's own 404 (no route) and 405 (wrong method), as OpenAI's error JSON."""
    message = (f'no route {request.url.path}' if exc.status_code == 404 else
               f'{request.url.path} does not take {request.method}' if exc.status_code == 405
               else str(exc.detail))
    return JSONResponse(error_body(exc.status_code, message), exc.status_code,
                        headers=getattr(exc, 'headers', None))

  async def _health(self, request):
    status = 'draining' if self.draining else 'warming up' if not self.ready else 'ok'
    return JSONResponse({'status': status, 'model': self.model_name},
                        200 if status == 'ok' else 503)

  async def _metrics(self, request):
    return Response(prom.generate_latest(self.metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  def _authorize(self, request):
    if self.api_key and not hmac.compare_digest(
        request.headers.get('authorization', '').encode(), f'Bearer {self.api_key}'.encode()):
      raise HttpError(401, 'missing or wrong API key (send "Authorization: Bearer KEY")')

  async def _models(self, request):
    self._authorize(request)
    return JSONResponse({'object': 'list', 'data': [{
        'id': self.model_name, 'object': 'model', 'created': self.created,
        'owned_by': 'lmforge', 'max_model_len': self.engine.max_len}]})

  async def _completions(self, request):
    return await self._generation(request, chat=False)

  async def _chat_completions(self, request):
    return await self._generation(request, chat=True)

  async def _generation(self, request, chat: bool):
    self._authorize(request)
    if self.draining:
      raise HttpError(503, 'the server is shutting down; send the request to another replica')
    if not self.ready:
      raise HttpError(503, 'the server is warming up (compiling the engine); retry when '
                      'GET /health answers 200')
    ids, args = self._validate(_parse_json(await self._read_body(request)), chat)
    return _Completion(self, ids, args, chat)

  async def _read_body(self, request) -> bytes:
    length = request.headers.get('content-length')
    if length is not None and not length.isdigit():
      raise HttpError(400, f'bad Content-Length {length!r}')
    if length is not None and int(length) > self.max_body:
      raise HttpError(413, f'the request body has {length} bytes; this server takes at most '
                      f'{self.max_body}')
    chunks, size = [], 0

    async def read():
      nonlocal size
      async for chunk in request.stream():
        size += len(chunk)
        if size > self.max_body:
          raise HttpError(413, f'the request body is over {self.max_body} bytes')
        chunks.append(chunk)
    try:
      await asyncio.wait_for(read(), self.body_timeout)
    except asyncio.TimeoutError as e:
      raise HttpError(408, f'the request body did not arrive within {self.body_timeout:g} s '
                      f'({size} bytes came)') from e
    return b''.join(chunks)

  async def _run(self, ids, args, chat, receive, send):
    """One validated completion request: its n choices through the driver, streamed or not."""
    n = args['n']
    if len(self.inflight) + n > self.capacity:
      self.metrics.requests.labels('503').inc()
      return await _send_json(send, 503, error_body(
          503, f'the server is at capacity ({len(self.inflight)} requests in flight'
          f'{f", this one asks for {n}" if n > 1 else ""}); retry later'))
    # Choice i samples with seed + i: n samples of one seed differ, and a rerun repeats them.
    requests = [Request(max_tokens=args['max_tokens'], return_channel=AsyncMultifuture(),
                        prefill_content=ids, is_client_side_tokenization=True,
                        sampling=dataclasses.replace(args['sampling'],
                                                     seed=(args['sampling'].seed + i) % (1 << 31)),
                        stop_ids=args['stop_ids']) for i in range(n)]
    for request in requests:
      self.inflight[id(request)] = request
    gone = asyncio.ensure_future(_disconnected(receive))
    stream = _Stream(self, send, chat, args) if args['stream'] else None
    try:
      if stream:
        await stream.start()
      choices = await asyncio.gather(*(self._choice(i, r, args, stream, gone)
                                       for i, r in enumerate(requests)))
      completion_tokens = sum(len(tokens) for _, tokens, _, _ in choices)
      if stream:
        await stream.done(_usage(len(ids), completion_tokens))
      else:
        body = self._body(chat, choices, len(ids), args)
        if args['echo'] or args['top_logprobs']:
          for choice, (text, tokens, logprobs, _) in zip(body['choices'], choices):
            await self._add_scores(choice, chat, ids, tokens, logprobs, text, args)
        await _send_json(send, 200, body)
      self.metrics.requests.labels('200').inc()
    except _ClientGone:
      self.metrics.requests.labels('disconnected').inc()
    except Exception:
      logging.exception('request failed')
      self.metrics.requests.labels('500').inc()
      if stream is None or not stream.started:
        await _send_json(send, 500, error_body(500, 'internal error'))
      # else: the 200 is sent; ending the stream without [DONE] tells the client it failed.
    finally:
      for request in requests:
        request.cancelled = True  # No-op after a normal end; frees the slot otherwise.
        del self.inflight[id(request)]
      gone.cancel()

  async def _choice(self, index: int, request, args, stream, gone):
    """One of the n completions: (text, tokens, logprobs, finish_reason), streamed as it comes."""
    channel = request.return_channel
    arrived = last = time.monotonic()
    tokens, logprobs, finish = [], [], 'length'
    if args['max_tokens'] == 0:  # echo only: nothing to generate
      channel.close()
    else:
      self.driver.place_request_on_prefill_queue(request)
    while True:
      try:
        ids_, lps = await _next(channel, gone)
      except StopAsyncIteration:
        break
      now = time.monotonic()
      (self.metrics.itl if tokens else self.metrics.ttft).observe(now - (last if tokens
                                                                          else arrived))
      last = now
      tokens += ids_
      logprobs += lps
      self.metrics.add_tokens(len(ids_))
      text, hit = _cut(self.tok.decode(tokens), args['stop'])
      if hit:
        request.cancelled, finish = True, 'stop'
        break
      if stream:
        await stream.send(index, text, tokens, logprobs, final=False)
    if finish != 'stop' and len(tokens) < args['max_tokens']:
      finish = 'stop'  # The channel closed early: EOS or a stop token.
    text, _ = _cut(self.tok.decode(tokens), args['stop'])
    if stream:
      await stream.send(index, text, tokens, logprobs, final=True, finish=finish)
    return text, tokens, logprobs, finish

  def _validate(self, body: dict, chat: bool):
    model = body.get('model')
    if model != self.model_name:
      raise HttpError(404, f'the model {model!r} does not exist; this server serves '
                      f'{self.model_name!r}', 'model')
    stop_ids = frozenset()
    if chat:
      ids, stop_ids = self._chat_prompt(body.get('messages'))
    else:
      ids = self._text_prompt(body.get('prompt'))
    if body.get('best_of', 1) not in (1, None):
      raise HttpError(400, f'best_of={body["best_of"]!r} is not supported (only 1)', 'best_of')
    n = body.get('n', 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= self.engine.max_concurrent_decodes:
      raise HttpError(400, f'n must be an integer in 1..{self.engine.max_concurrent_decodes} (the '
                      f'decode slots), got {n!r}', 'n')
    echo = body.get('echo', False)
    if echo not in (True, False, None) or (chat and echo):
      raise HttpError(400, f'echo={echo!r}: ' + ('chat completions have no echo' if chat else
                                                  'expected true or false'), 'echo')
    echo = bool(echo)
    room = self.engine.max_len - len(ids)
    max_tokens = body.get('max_completion_tokens', body.get('max_tokens'))
    if max_tokens is None:
      max_tokens = min(room, 256) if chat else 16
    # max_tokens=0 with echo scores the prompt alone (lm-evaluation-harness's log-likelihood).
    if not _is_int(max_tokens) or max_tokens < (0 if echo else 1):
      raise HttpError(400, f'max_tokens must be a {"non-negative" if echo else "positive"} '
                      f'integer, got {max_tokens!r}', 'max_tokens')
    if max_tokens > room:
      raise HttpError(400, f'this model\'s maximum context length is {self.engine.max_len} '
                      f'tokens; the prompt has {len(ids)} and max_tokens is {max_tokens}',
                      'max_tokens')
    temperature = _number(body, 'temperature', 1.0, 0.0, 2.0)
    top_p = _number(body, 'top_p', 1.0, 0.0, 1.0)
    if top_p == 0:
      raise HttpError(400, 'top_p must be in (0, 1], got 0', 'top_p')
    top_k, seed = body.get('top_k', 0), body.get('seed')
    if not _is_int(top_k) or top_k < 0:
      raise HttpError(400, f'top_k must be an integer >= 0, got {top_k!r}', 'top_k')
    if seed is not None and not _is_int(seed):
      raise HttpError(400, f'seed must be an integer, got {seed!r}', 'seed')
    seed = random.getrandbits(31) if seed is None else seed % (1 << 31)
    stop = body.get('stop') or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > 4 or
        not all(isinstance(s, str) and s for s in stop)):
      raise HttpError(400, 'stop must be a non-empty string or a list of up to 4 of them', 'stop')
    stream = body.get('stream', False)
    if not isinstance(stream, bool):
      raise HttpError(400, f'stream must be true or false, got {stream!r}', 'stream')
    logprobs = body.get('logprobs')
    if logprobs not in (None, False, True) and not (_is_int(logprobs) and 0 <= logprobs <= 5):
      raise HttpError(400, f'logprobs must be {"a boolean" if chat else "null or 0..5"}, got '
                      f'{logprobs!r}', 'logprobs')
    # Alternatives per token: completions' integer logprobs, chat's top_logprobs.
    top = body.get('top_logprobs') if chat else (logprobs if _is_int(logprobs) else 0)
    if top is None:
      top = 0
    if not _is_int(top) or not 0 <= top <= TOP_LOGPROBS or (chat and top and logprobs is not True):
      raise HttpError(400, f'top_logprobs must be an integer in 0..{TOP_LOGPROBS}, with logprobs '
                      f'true, got {top!r}', 'top_logprobs')
    options = body.get('stream_options')
    if options is not None and (not stream or not isinstance(options, dict) or
                                set(options) - {'include_usage'} or
                                options.get('include_usage', False) not in (True, False)):
      raise HttpError(400, 'stream_options must be {"include_usage": true|false}, with stream true',
                      'stream_options')
    if stream and (echo or top):
      raise HttpError(400, 'echo and top_logprobs are served without streaming: set stream '
                      'false', 'echo' if echo else 'top_logprobs')
    return ids, {'n': n, 'max_tokens': max_tokens, 'stop': stop, 'stop_ids': stop_ids, 'stream': stream,
                 'logprobs': logprobs is True or _is_int(logprobs), 'top_logprobs': top,
                 'echo': echo, 'include_usage': bool(options and options.get('include_usage')),
                 'sampling': SamplingParams(temperature, top_k, top_p, seed)}

  def _text_prompt(self, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
      ids = self.tok.encode_prompt(prompt)  # BOS as the checkpoint's tokenizer says.
    elif (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
      ids = list(prompt)  # Token ids are taken exactly as given.
      if not all(0 <= t < self.engine.cfg.vocab_size for t in ids):
        raise HttpError(400, f'prompt token ids must be in [0, {self.engine.cfg.vocab_size})',
                        'prompt')
    else:
      raise HttpError(400, 'prompt must be a non-empty string, a list of one string, or a list of '
                      'token ids', 'prompt')
    return self._fits(ids, 'prompt')

  def _chat_prompt(self, messages):
    if (not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and m.get('role') in ('system', 'user', 'assistant') and
        isinstance(m.get('content'), str) for m in messages)):
      raise HttpError(400, 'messages must be a non-empty list of {"role": "system"|"user"|'
                      '"assistant", "content": string}', 'messages')
    try:
      from data.chat import apply_chat_template, end_of_turn_id
      ids = apply_chat_template(self.tok, messages, add_generation_prompt=True)
      stop_ids = frozenset([end_of_turn_id(self.tok)])
    except (ImportError, KeyError, AttributeError) as e:
      raise HttpError(501, f'this model has no chat template ({e}); use /v1/completions') from e
    return self._fits(ids, 'messages'), stop_ids

  def _fits(self, ids, param):
    if len(ids) > self.engine.max_prefill_length:
      raise HttpError(400, f'the prompt has {len(ids)} tokens; this server takes at most '
                      f'{self.engine.max_prefill_length}', param)
    return ids

  async def _add_scores(self, choice, chat, ids, tokens, logprobs, text, args):
    """echo (the prompt's text, tokens and log-probs before the completion's) and top_logprobs,
    from one forward pass over prompt + completion (Engine.prompt_logprobs: the untempered
    model, as the completion's own log-probs are)."""
    logp, top_ids, top_logp = await asyncio.to_thread(self.engine.prompt_logprobs, ids + tokens)
    k = args['top_logprobs']
    pairs = lambda i: [(self.tok.decode([int(t)]), float(v))
                       for t, v in zip(top_ids[i, :k], top_logp[i, :k])]
    if chat:  # top_logprobs only (no echo in chat): a list, so equal-looking tokens all appear
      for i, entry in enumerate(choice['logprobs']['content']):
        entry['top_logprobs'] = [{'token': t, 'logprob': v, 'bytes': list(t.encode())}
                                 for t, v in pairs(len(ids) - 1 + i)]
      return

    def top(i):  # Completions' dict: of tokens that decode alike, the likeliest is kept.
      out = {}
      for t, v in pairs(i):
        out.setdefault(t, v)
      return out
    completion_top = [top(len(ids) - 1 + i) for i in range(len(tokens))]
    if not args['echo']:
      if choice['logprobs'] is not None:
        choice['logprobs']['top_logprobs'] = completion_top
      return
    all_tokens = ids + tokens
    all_logprobs = [None] + [float(v) for v in logp[:len(ids) - 1]] + list(logprobs)
    choice['text'] = self.tok.decode(ids) + text
    if args['logprobs']:
      lp = _logprobs(self.tok, False, all_tokens, all_logprobs)
      if k:
        lp['top_logprobs'] = [None] + [top(i) for i in range(len(ids) - 1)] + completion_top
      choice['logprobs'] = lp

  def _body(self, chat, choices, n_prompt, args):
    out = []
    for index, (text, tokens, logprobs, finish) in enumerate(choices):
      lp = _logprobs(self.tok, chat, tokens, logprobs) if args['logprobs'] else None
      out.append({'index': index, 'message': {'role': 'assistant', 'content': text},
                  'logprobs': lp, 'finish_reason': finish} if chat else
                 {'index': index, 'text': text, 'logprobs': lp, 'finish_reason': finish})
    return {'id': f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}',
            'object': 'chat.completion' if chat else 'text_completion',
            'created': int(time.time()), 'model': self.model_name, 'choices': out,
            'usage': _usage(n_prompt, sum(len(c[1]) for c in choices))}


class _Completion(Response):
  """The response to a validated completion request: runs it when Starlette sends the response,
  so admission (the capacity check), the request's slots and their release all happen in one
  coroutine whatever the client does."""

  def __init__(self, server: OpenAIServer, ids, args, chat: bool):
    self.server, self.ids, self.args, self.chat = server, ids, args, chat
    self.background = None

  async def __call__(self, scope, receive, send):
    await self.server._run(self.ids, self.args, self.chat, receive, send)


class _Stream:
  """Server-sent events of one completion; text is held back while it may still change (an
  incomplete UTF-8 sequence, or the start of a stop string)."""

  def __init__(self, server: OpenAIServer, send, chat: bool, args):
    self.server, self.send_asgi, self.chat, self.args = server, send, chat, args
    self.id = f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}'
    self.sent_text, self.sent_tokens = [''] * args['n'], [0] * args['n']  # per choice
    self.holdback = max(map(len, args['stop']), default=1) - 1
    self.started = False

  async def start(self):
    await self.send_asgi({'type': 'http.response.start', 'status': 200, 'headers': [
        (b'content-type', b'text/event-stream; charset=utf-8'), (b'cache-control', b'no-cache')]})
    self.started = True
    if self.chat:
      for index in range(self.args['n']):
        await self._event(index, {'role': 'assistant', 'content': ''}, None, None)

  async def send(self, index, text, tokens, logprobs, final, finish=None):
    ready = text if final else text[:len(text) - self.holdback].rstrip('\ufffd')
    sent_text, sent_tokens = self.sent_text[index], self.sent_tokens[index]
    if len(ready) <= len(sent_text) and not final:
      return
    delta = ready[len(sent_text):]
    lp = None
    if self.args['logprobs']:
      lp = _logprobs(self.server.tok, self.chat, tokens[sent_tokens:], logprobs[sent_tokens:])
    self.sent_text[index], self.sent_tokens[index] = ready, len(tokens)
    await self._event(index, {'content': delta} if self.chat else delta, lp, finish)

  async def _event(self, index, delta, logprobs, finish):
    choice = ({'index': index, 'delta': delta, 'logprobs': logprobs, 'finish_reason': finish}
              if self.chat else
              {'index': index, 'text': delta, 'logprobs': logprobs, 'finish_reason': finish})
    await self._data({'id': self.id, 'object': 'chat.completion.chunk' if self.chat else
                      'text_completion', 'created': int(time.time()),
                      'model': self.server.model_name, 'choices': [choice]})

  async def _data(self, chunk, more=True):
    payload = chunk if isinstance(chunk, str) else json.dumps(chunk)
    await self.send_asgi({'type': 'http.response.body', 'body': f'data: {payload}\n\n'.encode(),
                          'more_body': more})

  async def done(self, usage: dict):
    if self.args['include_usage']:  # OpenAI's last chunk: no choices, the request's usage.
      await self._data({'id': self.id, 'object': 'chat.completion.chunk' if self.chat else
                        'text_completion', 'created': int(time.time()),
                        'model': self.server.model_name, 'choices': [], 'usage': usage})
    await self._data('[DONE]', more=False)


def _usage(n_prompt: int, n_completion: int) -> dict:
  return {'prompt_tokens': n_prompt, 'completion_tokens': n_completion,
          'total_tokens': n_prompt + n_completion}


def _logprobs(tok, chat, tokens, logprobs):
  pieces = [tok.decode([t]) for t in tokens]
  if chat:
    return {'content': [{'token': p, 'logprob': lp, 'bytes': list(p.encode()), 'top_logprobs': []}
                        for p, lp in zip(pieces, logprobs)]}
  offsets = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
  return {'tokens': pieces, 'token_logprobs': logprobs, 'top_logprobs': None,
          'text_offset': offsets}


async def _disconnected(receive):
  """Returns once the client has closed its connection (the request's body is already read)."""
  while (await receive())['type'] != 'http.disconnect':
    pass


async def _next(channel, gone):
  """The channel's next item, or _ClientGone once the client has closed its connection."""
  item = asyncio.ensure_future(channel.__anext__())
  await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
  if item.done():
    return item.result()
  item.cancel()
  raise _ClientGone()


def _cut(text: str, stop) -> tuple[str, bool]:
  cuts = [text.index(s) for s in stop if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _number(body, key, default, lo, hi) -> float:
  x = body.get(key)
  if x is None:
    return default
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not (
      lo <= x <= hi):
    raise HttpError(400, f'{key} must be a number in [{lo}, {hi}], got {x!r}', key)
  return float(x)


def _parse_json(body: bytes) -> dict:
  try:
    parsed = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise HttpError(400, f'the request body is not valid JSON: {e}') from e
  if not isinstance(parsed, dict):
    raise HttpError(400, 'the request body must be a JSON object')
  return parsed


async def _send_json(send, status: int, obj):
  await JSONResponse(obj, status)({'type': 'http'}, None, send)
