"""POST /v1/chat/completions on starlette + uvicorn; requests wait (asynchronously) on the Batcher.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, GET /health (no key
needed). Every error is an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}
whose message says what was wrong, where, and how to fix it.

Limits (ChatServer arguments, `python -m doa_jax.serve` flags):
- max_body_bytes: larger bodies get 413 before they are read (Content-Length) or as soon as the
  count passes the limit (chunked); malformed Content-Length headers get 400 from the HTTP parser.
- read_timeout_s: a request head (after connecting, or after the previous answer on a kept-alive
  connection) and then its body must each arrive within it, else 408 and the connection closes
  (slow-loris clients hold a socket, never a thread, and only that long); a connection that sends
  nothing is closed silently then (idle kept-alive ones after 5 s).
- request_timeout_s: an answer not ready within it gets 504; if its batch had not started, the
  request is dropped from the queue.
- max_queue (the Batcher's): requests waiting for a batch past it get 503 with Retry-After.
- max_connections: uvicorn answers 503 past that many open connections; backlog is the listen
  queue of not yet accepted connections.
- api_key: when set, /v1 and /test routes need `Authorization: Bearer <key>` (else 401).
- max_tokens above the model's decode length is capped, and the answer then says
  finish_reason "length"; a non-integer or < 1 max_tokens gets 400.

With `test_faults=True` (the `--test_faults` flag, never on by default), POST /test/faults with
{"429": n, "500": n, "malformed": n} queues faults that the next chat requests get instead of an
answer, so client retry paths can be tested against the real server.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from doa_jax.serving.batcher import Batcher, BatcherClosedError, QueueFullError

log = logging.getLogger('doa_jax.serving')

DEFAULT_MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An error answer: HTTP status, message (what, where, how to fix), OpenAI param/code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


_ERROR_TYPES = {401: 'authentication_error', 404: 'not_found_error', 429: 'rate_limit_error'}


def _error_body(status: int, message: str, param: str | None = None,
                code: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, 'server_error' if status >= 500 else 'invalid_request_error')
    return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Content parts: [{"type": "text", "text": "..."}].
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get('type') == 'text'
                    and isinstance(part.get('text'), str)):
                raise ValueError(f'messages[{i}].content[{j}] is not a text part; this server '
                                 'reads text only: send {"type": "text", "text": "..."} parts '
                                 'or a plain string content')
            texts.append(part['text'])
        return ''.join(texts)
    raise ValueError(f'messages[{i}] needs a string "content" (got {type(content).__name__}); '
                     'send {"role": "user", "content": "..."}')


def messages_to_prompt(messages: Any) -> str:
    """Chat turns joined as plain text: a seq2seq model has no chat template."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects, '
                         f'got {_describe(messages)}; send e.g. '
                         '"messages": [{"role": "user", "content": "..."}]')
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f'messages[{i}] must be an object {{"role", "content"}}, got '
                             f'{_describe(m)}')
        parts.append(_content_text(m.get('content'), i))
    return '\n\n'.join(parts)


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    if len(text) > 60:
        text = text[:57] + '...'
    return f'{text} ({type(value).__name__})'


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_max_tokens(body: dict, default: int, cap: int | None) -> tuple[int, str | None]:
    """(max_tokens, the field it came from); 400 unless a positive integer."""
    for name in ('max_tokens', 'max_completion_tokens'):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            limit = (f'; this server answers with at most {cap} tokens (larger values are capped '
                     'and the answer says finish_reason "length")' if cap else '')
            raise ApiError(400, f'"{name}" must be an integer >= 1, got {_describe(value)}. Send '
                                f'e.g. "{name}": {min(cap or 32, 32)}, or leave it out for the '
                                f'default {default}{limit}.', param=name,
                           code='invalid_value')
        return value, name
    return default, None


def _check_unsupported(body: dict) -> None:
    """400 for what this greedy, one-choice, non-streaming server cannot give.

    The server decodes greedily, one choice per request: a request for sampling (temperature > 0,
    top_p < 1), several choices (n > 1) or a stream is refused rather than answered with
    something else.
    """
    temperature, top_p, n = body.get('temperature'), body.get('top_p'), body.get('n')
    for name, value in (('temperature', temperature), ('top_p', top_p)):
        if value is not None and not _is_number(value):
            raise ApiError(400, f'"{name}" must be a number, got {_describe(value)}.',
                           param=name, code='invalid_type')
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise ApiError(400, f'"n" must be an integer, got {_describe(n)}; send "n": 1.',
                       param='n', code='invalid_type')
    temperature = 0.0 if temperature is None else float(temperature)
    top_p = 1.0 if top_p is None else float(top_p)
    if temperature > 0 or top_p < 1:
        raise ApiError(400, f'this server decodes greedily; temperature={temperature} / '
                            f'top_p={top_p} asks for sampling. Send temperature 0 (annotate_llm: '
                            '--temperature=0).', param='temperature' if temperature > 0 else 'top_p',
                       code='unsupported_value')
    if n is not None and n != 1:
        raise ApiError(400, f'this server returns one choice per request; n={n} is not supported. '
                            'Send n=1.', param='n', code='unsupported_value')
    stream = body.get('stream')
    if stream not in (None, False):
        raise ApiError(400, f'"stream": {json.dumps(stream)} is not supported: this server answers '
                            'with one JSON body. Send "stream": false or leave it out.',
                       param='stream', code='unsupported_value')


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine."""
    if host in ('localhost', 'localhost.localdomain'):
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving on `host`, or None on a loopback address."""
    if is_loopback(host):
        return None
    if not api_key:
        return (f'serving on {host}, which other machines can reach, with no API key: anyone who '
                'can connect can use the model. Bind 127.0.0.1 (the default), or set an API key '
                '(--api_key or DOA_API_KEY) and put a TLS proxy in front.')
    return (f'serving on {host}, which other machines can reach: the API key travels in plain '
            'HTTP; put a TLS proxy in front, or bind 127.0.0.1.')


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head.

    uvicorn bounds idle kept-alive connections (timeout_keep_alive) but not a request head that
    trickles in byte by byte; this closes such a connection with 408 once `head_timeout_s` has
    passed since it opened or since its previous answer."""

    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # Closed already, or a request head arrived in time.
        if self.conn.trailing_data[0]:  # Part of a head came: say why the connection ends.
            body = json.dumps(_error_body(408, f'no complete request head within '
                                               f'{self.head_timeout_s:g} s (--read_timeout_s); '
                                               'send the whole request at once')).encode()
            self.transport.write(b'HTTP/1.1 408 Request Timeout\r\nContent-Type: '
                                 b'application/json\r\nConnection: close\r\nContent-Length: '
                                 b'%d\r\n\r\n' % len(body) + body)
        self.transport.close()  # A connection that sent nothing is closed silently.


class ChatServer:
    """Owns the listening socket, the uvicorn server (in a thread after `start()`, or in the
    calling thread with `serve_forever()`) and the batcher; `url` is the OpenAI-style base URL.

    The socket is bound in the constructor, so `url` (and a port=0 pick) is known before start."""

    def __init__(self, batcher: Batcher, model_name: str, host: str = '127.0.0.1', port: int = 0,
                 test_faults: bool = False, default_max_tokens: int = 32, *,
                 api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout_s: float = 300.0, read_timeout_s: float = 10.0,
                 max_connections: int = 1024, backlog: int = 2048):
        if max_body_bytes < 1:
            raise ValueError(f'max_body_bytes={max_body_bytes}: must be positive')
        self.batcher, self.model_name = batcher, model_name
        self.test_faults, self.default_max_tokens = test_faults, default_max_tokens
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s, self.read_timeout_s = request_timeout_s, read_timeout_s
        self.max_tokens_cap = getattr(batcher.generate_fn, 'max_decode_length', None)
        self.faults: collections.deque[str] = collections.deque()
        self.chat_requests = 0
        self._lock = threading.Lock()
        warning = bind_warning(host, self.api_key)
        if warning:
            log.warning(warning)

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server((host, port), family=family, backlog=backlog,
                                          dualstack_ipv6=False)
        self.host, self.port = self._sock.getsockname()[:2]

        protocol = type('H11Protocol', (_H11Protocol,), {'head_timeout_s': read_timeout_s})
        config = uvicorn.Config(
                self._app(), lifespan='off', loop='asyncio', http=protocol, ws='none',
                log_config=None, access_log=False, server_header=False,
                limit_concurrency=max_connections, backlog=backlog, timeout_keep_alive=5,
                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f'[{self.host}]' if ':' in self.host else self.host
        return f'http://{host}:{self.port}/v1'

    def start(self, timeout_s: float = 30.0) -> 'ChatServer':
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={'sockets': [self._sock]},
                                        name='chat-server', daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f'the chat server at {self.url} did not start')
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (uvicorn's handlers, main thread only)."""
        try:
            self._uvicorn.run(sockets=[self._sock])
        finally:
            self.batcher.close()

    def close(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(timeout=5)
        self._sock.close()
        self.batcher.close()

    def __enter__(self) -> 'ChatServer':
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.chat_requests += 1
            return self.faults.popleft() if self.faults else None

    # --- the ASGI app --------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get('authorization')
        challenge = {'WWW-Authenticate': 'Bearer'}
        if not auth:
            raise ApiError(401, 'missing API key: this server needs the header "Authorization: '
                                'Bearer <key>" with the key it was started with (--api_key or '
                                'DOA_API_KEY; annotate_llm sends OPENAI_API_KEY).',
                           code='missing_api_key', headers=challenge)
        scheme, _, key = auth.partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(
                key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, 'invalid API key in the Authorization header: send "Authorization: '
                                'Bearer <key>" with the key the server was started with.',
                           code='invalid_api_key', headers=challenge)

    async def _read_json(self, request: Request) -> Any:
        """Content type, size limit, read timeout and JSON parsing of a request body."""
        ctype = request.headers.get('content-type', '')
        media = ctype.split(';')[0].strip().lower()
        if media != 'application/json' and not media.endswith('+json'):
            raise ApiError(415, f'Content-Type {ctype or "(none)"!r} is not supported: send the '
                                'body as JSON with the header "Content-Type: application/json" '
                                "(curl: -H 'Content-Type: application/json').",
                           code='unsupported_media_type')
        too_big = (f'request body is larger than this server accepts (max_body_bytes='
                   f'{self.max_body_bytes}); send a shorter prompt, or start the server with a '
                   'larger --max_body_bytes.')
        length = request.headers.get('content-length')
        try:
            declared = None if length is None else int(length)  # h11 checked the digits.
        except ValueError:
            raise ApiError(400, f'Content-Length {length!r} is not a byte count.',
                           code='bad_content_length') from None
        if declared is not None and declared > self.max_body_bytes:
            raise ApiError(413, too_big + f' Content-Length was {length}.', code='body_too_large')

        async def read() -> bytes:
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > self.max_body_bytes:
                    raise ApiError(413, too_big, code='body_too_large')
                chunks.append(chunk)
            return b''.join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f'the request body did not arrive within read_timeout_s='
                                f'{self.read_timeout_s:g} s (--read_timeout_s); send it at once.',
                           code='request_timeout') from None
        request.state.body_read = True

        def no_constants(name: str):
            raise ValueError(f'{name} is not JSON (use a number or null)')

        try:
            body = json.loads(raw, parse_constant=no_constants)
        except RecursionError:
            raise ApiError(400, 'request body is not JSON this server reads: nested too deeply.',
                           code='invalid_json') from None
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
            raise ApiError(400, f'request body is not JSON: {e}. Send one JSON object such as '
                                '{"model": "...", "messages": [{"role": "user", "content": '
                                '"..."}]}.', code='invalid_json') from None
        if not isinstance(body, dict):
            raise ApiError(400, f'request body must be a JSON object, got {_describe(body)}.',
                           code='invalid_json')
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get('model')
        if model is None:
            return  # Leaving it out asks for the one model served here.
        if not isinstance(model, str):
            raise ApiError(400, f'"model" must be a string, got {_describe(model)}; send '
                                f'"model": "{self.model_name}".', param='model',
                           code='invalid_type')
        if model != self.model_name:
            raise ApiError(404, f'model {model!r} is not served here; this server serves '
                                f'{self.model_name!r} (GET /v1/models lists it). Send "model": '
                                f'"{self.model_name}" (annotate_llm: --model={self.model_name}).',
                           param='model', code='model_not_found')

    async def _chat(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._read_json(request)
        fault = self._next_fault()
        if fault == 'malformed':
            return Response(b'{"choices": [ this is not json', 200,
                            media_type='application/json')
        if fault is not None:
            raise ApiError(int(fault), f'injected {fault}', code='injected_fault',
                           headers={'Retry-After': '0'} if fault == '429' else None)
        self._check_model(body)
        try:
            prompt = messages_to_prompt(body.get('messages'))
        except ValueError as e:
            raise ApiError(400, str(e), param='messages', code='invalid_value') from None
        max_tokens, _ = _parse_max_tokens(body, self.default_max_tokens, self.max_tokens_cap)
        _check_unsupported(body)
        try:
            future = self.batcher.submit_future(prompt, max_tokens)
        except QueueFullError as e:
            raise ApiError(503, f'the server is busy: {e}.', code='queue_full',
                           headers={'Retry-After': '1'}) from None
        except BatcherClosedError as e:
            raise ApiError(503, str(e), code='shutting_down') from None
        try:
            gen = await asyncio.wait_for(asyncio.wrap_future(future), self.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f'no answer within request_timeout_s={self.request_timeout_s:g} s '
                                '(the model is slow or the queue long); retry later, or start '
                                'the server with a larger --request_timeout_s.',
                           code='timeout') from None
        except BatcherClosedError as e:
            raise ApiError(503, str(e), code='shutting_down') from None
        except Exception as e:  # The model failed; tell the client, keep serving.
            raise ApiError(500, f'generation failed: {type(e).__name__}: {e}',
                           code='generation_failed') from None
        finish = gen.finish_reason
        if finish is None:
            limit = min(max_tokens, self.max_tokens_cap or max_tokens)
            finish = 'length' if gen.completion_tokens >= limit else 'stop'
        return JSONResponse({
                'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion',
                'created': int(time.time()), 'model': self.model_name,
                'choices': [{'index': 0, 'finish_reason': finish,
                             'message': {'role': 'assistant', 'content': gen.text}}],
                'usage': {'prompt_tokens': gen.prompt_tokens,
                          'completion_tokens': gen.completion_tokens,
                          'total_tokens': gen.prompt_tokens + gen.completion_tokens}})

    def _model_card(self) -> dict:
        return {'id': self.model_name, 'object': 'model', 'created': 0, 'owned_by': 'doa_jax'}

    async def _models(self, request: Request) -> Response:
        self._check_key(request)
        return JSONResponse({'object': 'list', 'data': [self._model_card()]})

    async def _model(self, request: Request) -> Response:
        self._check_key(request)
        self._check_model({'model': request.path_params['model']})
        return JSONResponse(self._model_card())

    async def _health(self, request: Request) -> Response:
        return JSONResponse({'status': 'ok', 'queued': self.batcher.queued})

    async def _faults(self, request: Request) -> Response:
        if not self.test_faults:
            raise ApiError(404, 'fault injection is off; start with --test_faults')
        self._check_key(request)
        body = await self._read_json(request)
        kinds = []
        for kind, n in body.items():
            ok_kind = kind == 'malformed' or (kind.isdigit() and 400 <= int(kind) <= 599)
            if not ok_kind or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ApiError(400, f'fault {kind!r}: {_describe(n)} is not a fault count; send '
                                    '{"429": 2, "500": 1, "malformed": 1} (an HTTP status 400-599 '
                                    'or "malformed", each with a count >= 0).', param=kind)
            kinds.extend([kind] * n)
        with self._lock:
            self.faults.extend(kinds)
            return JSONResponse({'queued': len(self.faults)})

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        headers: dict[str, str] = {}
        if isinstance(exc, ApiError):
            status, body = exc.status, _error_body(exc.status, exc.message, exc.param, exc.code)
            headers.update(exc.headers)
        elif isinstance(exc, HTTPException) and exc.status_code == 405:
            status = 405
            headers.update(exc.headers or {})
            allow = {k.lower(): v for k, v in headers.items()}.get('allow', 'another method')
            body = _error_body(405, f'{request.method} {request.url.path} is not allowed; use '
                                    f'{allow}.',
                               code='method_not_allowed')
        elif isinstance(exc, HTTPException):
            status = exc.status_code
            body = _error_body(status, f'no route {request.method} {request.url.path}; this '
                                       'server has GET /v1/models and POST /v1/chat/completions.'
                               if status == 404 else str(exc.detail), code='not_found'
                               if status == 404 else None)
        elif isinstance(exc, ClientDisconnect):
            return Response(status_code=400)  # Nobody is left to read it.
        else:
            log.exception('unexpected error serving %s %s', request.method, request.url.path)
            status = 500
            body = _error_body(500, f'internal error: {type(exc).__name__}: {exc}')
        if not getattr(request.state, 'body_read', False) and request.method in ('POST', 'PUT',
                                                                                 'PATCH'):
            headers['Connection'] = 'close'  # Do not read (or keep) an unread body.
        return JSONResponse(body, status, headers=headers)

    def _app(self) -> Starlette:
        routes = []
        for path, endpoint, methods in (('/v1/chat/completions', self._chat, ['POST']),
                                        ('/v1/models', self._models, ['GET']),
                                        ('/v1/models/{model:path}', self._model, ['GET']),
                                        ('/health', self._health, ['GET']),
                                        ('/test/faults', self._faults, ['POST'])):
            routes.append(Route(path, endpoint, methods=methods))
            if not path.endswith('}'):
                routes.append(Route(path + '/', endpoint, methods=methods))
        app = Starlette(routes=routes, exception_handlers={
                HTTPException: self._on_error, ApiError: self._on_error,
                ClientDisconnect: self._on_error, Exception: self._on_error})
        app.router.redirect_slashes = False
        return app
