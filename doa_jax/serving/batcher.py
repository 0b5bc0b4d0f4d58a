"""Collect requests for a few milliseconds and decode them as one batch.

One worker thread runs the model; callers wait on a `concurrent.futures.Future` (`submit_future`,
which the async HTTP server awaits without holding a thread) or block (`submit`). The queue of
requests not yet in a batch is bounded: past `max_queue` waiting requests, `submit_future` raises
`QueueFullError` at once (the server answers 503 with Retry-After) instead of queueing work nobody
will wait for. A request cancelled before its batch starts (its HTTP request timed out) is dropped,
not decoded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, NamedTuple, Sequence


class Generation(NamedTuple):
    """One answer. finish_reason: 'stop' (the model ended it) or 'length' (a token limit cut it);
    None lets the server infer it from the token counts."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


# prompts, max_tokens per prompt -> one (text, prompt_tokens, completion_tokens[, finish_reason])
# per prompt; plain 3-tuples are accepted.
GenerateFn = Callable[[Sequence[str], Sequence[int]], Sequence[tuple]]


class QueueFullError(RuntimeError):
    """`max_queue` requests already wait for a batch."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed; it takes no more requests."""


@dataclasses.dataclass
class _Request:
    prompt: str
    max_tokens: int
    future: concurrent.futures.Future


class Batcher:
    """Decodes up to `max_batch` queued requests per `generate_fn` call, waiting up to `wait_ms`
    after the first for more to arrive. `batch_sizes` records every batch (tests, monitoring)."""

    def __init__(self, generate_fn: GenerateFn, max_batch: int = 16, wait_ms: float = 5.0,
                 max_queue: int | None = 1024):
        if max_batch < 1:
            raise ValueError(f'max_batch={max_batch}: a batch holds at least 1 request')
        if max_queue is not None and max_queue < 1:
            raise ValueError(f'max_queue={max_queue}: pass a positive bound, or None for none')
        self.generate_fn, self.max_batch, self.wait_s = generate_fn, max_batch, wait_ms / 1000
        self.max_queue = max_queue
        self.batch_sizes: list[int] = []
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the batch being decoded)."""
        return len(self._pending)

    def submit_future(self, prompt: str, max_tokens: int) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its Generation (or the model's exception).
        Raises QueueFullError when `max_queue` requests wait, BatcherClosedError after close()."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise BatcherClosedError('the server is shutting down; send the request elsewhere '
                                         'or after it restarts')
            if self.max_queue is not None and len(self._pending) >= self.max_queue:
                raise QueueFullError(f'{len(self._pending)} requests already wait for the model '
                                     f'(max_queue={self.max_queue}); retry after a moment')
            self._pending.append(_Request(prompt, max_tokens, fut))
            self._cond.notify()
        return fut

    def submit(self, prompt: str, max_tokens: int,
               timeout: float | None = None) -> Generation:
        """Blocking form of `submit_future`; raises the model's exception if it failed."""
        return self.submit_future(prompt, max_tokens).result(timeout)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._pending))
            taken = [self._pending.popleft() for _ in range(n)]
        # A request whose caller gave up (timeout) before its batch started is not decoded.
        return [r for r in taken if r.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self.generate_fn([r.prompt for r in batch],
                                           [r.max_tokens for r in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f'generate_fn returned {len(results)} results for '
                                       f'{len(batch)} prompts')
            except BaseException as e:  # Every waiter gets the error, the loop keeps serving.
                for r in batch:
                    r.future.set_exception(e)
                continue
            for r, res in zip(batch, results):
                r.future.set_result(Generation(*res))

    def close(self) -> None:
        """Stop taking requests; those still queued fail with BatcherClosedError."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for r in dropped:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(BatcherClosedError('the server shut down before this '
                                                          'request was decoded'))
        self._thread.join(timeout=5)
