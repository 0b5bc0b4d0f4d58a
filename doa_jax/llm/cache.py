"""A durable disk cache of LLM responses so a killed run never pays for an answer twice.

SQLite with synchronous=FULL: a response is on disk before the caller uses it, and a SIGKILL loses
at most the request in flight (which was never recorded as spent)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Any, Mapping


def cache_key(model: str, messages: list[dict], params: Mapping[str, Any], attempt: int) -> str:
    """Keyed by model, prompt and sampling parameters; `attempt` separates re-asks of one prompt."""
    blob = json.dumps({'model': model, 'messages': messages, 'params': dict(params),
                       'attempt': attempt}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """key -> response record ({'text', 'prompt_tokens', 'completion_tokens'}); thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._con = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
            self._con.execute('PRAGMA journal_mode=WAL')
            self._con.execute('PRAGMA synchronous=FULL')
            self._con.execute('CREATE TABLE IF NOT EXISTS responses('
                              'key TEXT PRIMARY KEY, value TEXT NOT NULL)')
            self._con.commit()
        except sqlite3.DatabaseError as e:
            raise RuntimeError(f'LLM response cache {self.path!r} is unusable ({e}); pass another '
                               f'--cache_path or delete the file (its answers will be paid '
                               f'for again).') from e

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._con.execute('SELECT value FROM responses WHERE key=?', (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            self._con.execute('INSERT OR REPLACE INTO responses(key, value) VALUES (?, ?)',
                              (key, json.dumps(dict(value), ensure_ascii=False)))
            self._con.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._con.execute('SELECT COUNT(*) FROM responses').fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._con.close()
