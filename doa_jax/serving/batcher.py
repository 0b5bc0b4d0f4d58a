"""Collect requests for a few milliseconds and decode them as one batch."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

# prompts, max_tokens per prompt -> (text, prompt_tokens, completion_tokens) per prompt.
GenerateFn = Callable[[Sequence[str], Sequence[int]], list[tuple[str, int, int]]]


@dataclasses.dataclass
class _Request:
    prompt: str
    max_tokens: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: tuple[str, int, int] | None = None
    error: BaseException | None = None


class Batcher:
    """One worker thread; `submit` blocks the calling (HTTP handler) thread until its answer."""

    def __init__(self, generate_fn: GenerateFn, max_batch: int = 16, wait_ms: float = 5.0):
        self.generate_fn, self.max_batch, self.wait_s = generate_fn, max_batch, wait_ms / 1000
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
        self._thread.start()

    def submit(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        req = _Request(prompt, max_tokens)
        self._queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    req = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if req is None:
                    self._queue.put(None)
                    break
                batch.append(req)
            self.batch_sizes.append(len(batch))
            try:
                results = self.generate_fn([r.prompt for r in batch], [r.max_tokens for r in batch])
                for r, res in zip(batch, results, strict=True):
                    r.result = res
            except BaseException as e:  # Every waiter gets the error, the loop keeps serving.
                for r in batch:
                    r.error = e
            for r in batch:
                r.done.set()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
