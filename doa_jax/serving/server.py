"""POST /v1/chat/completions on a ThreadingHTTPServer; handler threads wait on the Batcher.

With `test_faults=True` (the `--test_faults` flag, never on by default), POST /test/faults with
{"429": n, "500": n, "malformed": n} queues faults that the next chat requests get instead of an
answer, so client retry paths can be tested against the real server."""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time
import uuid
from typing import Any

from doa_jax.serving.batcher import Batcher


def messages_to_prompt(messages: Any) -> str:
    """Chat turns joined as plain text: a seq2seq model has no chat template."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get('content'), str):
            raise ValueError(f'messages[{i}] needs a string "content"')
        parts.append(m['content'])
    return '\n\n'.join(parts)


class ChatServer:
    """Owns the HTTP server, its thread and the batcher; `url` is the OpenAI-style base URL."""

    def __init__(self, batcher: Batcher, model_name: str, host: str = '127.0.0.1', port: int = 0,
                 test_faults: bool = False, default_max_tokens: int = 32):
        self.batcher, self.model_name = batcher, model_name
        self.test_faults, self.default_max_tokens = test_faults, default_max_tokens
        self.faults: collections.deque[str] = collections.deque()
        self.chat_requests = 0
        self._lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f'http://{host}:{port}/v1'

    def start(self) -> 'ChatServer':
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.chat_requests += 1
            return self.faults.popleft() if self.faults else None

    def _handler_class(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # Quiet: one line per request is noise here.
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
                self._send(status, json.dumps(obj).encode(), headers)

            def _error(self, status: int, message: str) -> None:
                self._json(status, {'error': {'message': message, 'type': 'invalid_request_error'}})

            def do_GET(self):
                if self.path.rstrip('/') == '/v1/models':
                    return self._json(200, {'object': 'list', 'data': [
                            {'id': server.model_name, 'object': 'model'}]})
                self._error(404, f'no route GET {self.path}; use POST /v1/chat/completions')

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))))
                except (ValueError, json.JSONDecodeError) as e:
                    return self._error(400, f'request body is not JSON: {e}')
                if self.path == '/test/faults':
                    if not server.test_faults:
                        return self._error(404, 'fault injection is off; start with --test_faults')
                    with server._lock:
                        for kind, n in body.items():
                            server.faults.extend([str(kind)] * int(n))
                    return self._json(200, {'queued': len(server.faults)})
                if self.path.rstrip('/') != '/v1/chat/completions':
                    return self._error(404, f'no route POST {self.path}; use /v1/chat/completions')
                fault = server._next_fault()
                if fault == 'malformed':
                    return self._send(200, b'{"choices": [ this is not json')
                if fault is not None:
                    return self._json(int(fault), {'error': {'message': f'injected {fault}'}},
                                      {'Retry-After': '0'} if fault == '429' else None)
                try:
                    prompt = messages_to_prompt(body.get('messages'))
                    max_tokens = int(body.get('max_tokens') or server.default_max_tokens)
                    unsupported = _unsupported_sampling(body)
                except (ValueError, TypeError, AttributeError) as e:
                    return self._error(400, str(e))
                if unsupported:
                    return self._error(400, unsupported)
                try:
                    text, n_in, n_out = server.batcher.submit(prompt, max_tokens)
                except Exception as e:  # The model failed; tell the client, keep serving.
                    return self._error(500, f'generation failed: {type(e).__name__}: {e}')
                self._json(200, {
                    'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion',
                    'created': int(time.time()), 'model': server.model_name,
                    'choices': [{'index': 0, 'finish_reason': 'stop' if n_out < max_tokens
                                 else 'length',
                                 'message': {'role': 'assistant', 'content': text}}],
                    'usage': {'prompt_tokens': n_in, 'completion_tokens': n_out,
                              'total_tokens': n_in + n_out}})

        return Handler


def _unsupported_sampling(body: dict) -> str | None:
    """Why a request asks for what this greedy server cannot give, or None.

    The server decodes greedily, one choice per request: a request for sampling (temperature > 0,
    top_p < 1) or several choices (n > 1) is refused rather than answered with something else.
    """
    temperature = float(body.get('temperature') or 0.0)
    top_p = float(body.get('top_p') if body.get('top_p') is not None else 1.0)
    n = int(body.get('n') or 1)
    if temperature > 0 or top_p < 1:
        return (f'this server decodes greedily; temperature={temperature} / top_p={top_p} asks '
                'for sampling. Send temperature 0 (annotate_llm: --temperature=0).')
    if n != 1:
        return f'this server returns one choice per request; n={n} is not supported. Send n=1.'
    return None
