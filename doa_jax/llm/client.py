"""An OpenAI-compatible Chat Completions client with retries (exponential backoff with full
jitter, honoring Retry-After) on 429, 5xx, timeouts and malformed responses.

httpx rather than the `openai` package: we need the raw `usage` fields and our own retry policy
(the budget has to see every paid attempt), and any compatible server (vLLM, doa_jax.serve) works.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any, Callable, Mapping

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class LLMRequestError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted)."""


class EndpointUnreachableError(LLMRequestError):
    """Too many connection failures in a row: the endpoint is down, so the whole run stops."""


class MalformedResponseError(ValueError):
    """The server answered 200 with a body that is not a Chat Completions response."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def parse_completion(body: Any) -> Completion:
    """The text and token usage of a Chat Completions response body."""
    try:
        text = body['choices'][0]['message']['content']
        usage = body['usage']
        prompt, completion = int(usage['prompt_tokens']), int(usage['completion_tokens'])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise MalformedResponseError(f'not a Chat Completions response ({type(e).__name__}: '
                                     f'{e}): {str(body)[:200]!r}') from e
    if not isinstance(text, str) or prompt < 0 or completion < 0:
        raise MalformedResponseError(f'bad content or usage in response: {str(body)[:200]!r}')
    return Completion(text, prompt, completion)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get('retry-after')
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # An HTTP date; fall back to our own backoff.


class ChatClient:
    """POSTs to {base_url}/chat/completions; thread-safe (one pooled httpx.Client).

    After `max_connection_failures` connection failures (refused, reset, timed out) in a row,
    counted over all threads, every call raises EndpointUnreachableError at once: a dead server
    stops the run in seconds instead of retrying each queued request with backoff. Any HTTP
    answer resets the count. 0 never stops."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 6, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 max_connection_failures: int = 5):
        self.url = base_url.rstrip('/') + '/chat/completions'
        self.model = model
        self.max_retries = max_retries
        self.max_connection_failures = max_connection_failures
        self._failures_in_a_row = 0
        self._unreachable: str | None = None
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        headers = {'Authorization': f'Bearer {api_key}'} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)
        self._lock = threading.Lock()
        self.retries: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        with self._lock:
            self.retries[kind] = self.retries.get(kind, 0) + 1

    def complete(self, messages: list[dict], params: Mapping[str, Any]) -> Completion:
        payload = {'model': self.model, 'messages': messages, **params}
        last = ''
        for attempt in range(self.max_retries + 1):
            if self._unreachable is not None:
                raise EndpointUnreachableError(self._unreachable)
            wait = None
            try:
                r = self._http.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last, kind = f'{type(e).__name__}: {e}', 'timeout'
                self._connection_failed(last)
            else:
                with self._lock:
                    self._failures_in_a_row = 0
                if r.status_code == 200:
                    try:
                        return parse_completion(r.json())
                    except (ValueError, MalformedResponseError) as e:
                        last, kind = f'malformed response: {e}', 'malformed'
                elif r.status_code in RETRY_STATUS:
                    last, kind = f'HTTP {r.status_code}: {r.text[:200]}', str(r.status_code)
                    wait = _retry_after_s(r)
                else:
                    raise LLMRequestError(
                        f'{self.url} answered HTTP {r.status_code} for model {self.model!r}: '
                        f'{r.text[:300]}. Check --base_url, --model and the API key '
                        f'(OPENAI_API_KEY).')
            if attempt == self.max_retries:
                break
            self._count(kind)
            if wait is None:  # Full jitter: uniform in [0, min(cap, base * 2^attempt)].
                wait = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))
            self._sleep(min(wait, self.backoff_max_s))
        raise LLMRequestError(f'{self.url}: gave up after {self.max_retries + 1} attempts; last '
                              f'error: {last}. Raise --max_retries or check the server.')

    def _connection_failed(self, error: str) -> None:
        with self._lock:
            self._failures_in_a_row += 1
            n = self._failures_in_a_row
            if self.max_connection_failures and n >= self.max_connection_failures and \
                    self._unreachable is None:
                self._unreachable = (
                        f'{self.url}: {n} connection failures in a row (last: {error}); the '
                        f'endpoint is down or unreachable, so the run stops instead of retrying '
                        f'every example. Check --base_url and that the server is up, then rerun: '
                        f'answers already paid for are cached and in the ledger, so none is paid '
                        f'twice (--max_connection_failures sets how many failures stop a run).')
            message = self._unreachable
        if message is not None:
            raise EndpointUnreachableError(message)

    def close(self) -> None:
        self._http.close()
