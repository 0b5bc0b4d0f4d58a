"""The cost ledger: one durable SQLite file (WAL mode) per run or study directory.

Why SQLite: every write is one short transaction, so a SIGKILL loses at most the entry being written
and never leaves a half-written one; several processes on one host can write the same study ledger
(writers queue on SQLite's lock); and UNIQUE keys make re-recording the same interval a no-op.
Keep the ledger on a local or POSIX-locking file system (not a bucket mount): WAL needs shared
memory.

Resume model. Each `on_train_start` opens a new *attempt* with its start step S. Steps an attempt
ran above a later attempt's start were redone by that later attempt, so they are *redone* money:
spent (it counts towards a budget) but not counted again as the run's step cost. Derived at query
time from the raw intervals, this is idempotent and needs no rewriting after a crash. Steps above
the last checkpoint of a run that has not ended yet are *pending*: they may still be redone.
A new attempt closes an earlier one that never ended as 'crashed'. *Crash overhead*
(`crash_overhead_usd`) is the redone steps plus the compile, evaluation and host time of the
attempts that crashed or failed; what is spent less it is what the work cost (a study prices its
points by that, and reports the overhead beside it).

Run ids. A run directory records its id (`doa_jax.run_identity`), so a moved or renamed directory
keeps writing under the id its earlier attempts used; ledgers written before ids were recorded
name runs by their directory's base name, which such a directory adopts as its id.

LLM rows are one per paid request (keyed by the response-cache key), so the ledger is the money
paid: an answer served from the cache is not billed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
from typing import Iterator

from doa_jax.cost.prices import device_cost_usd, format_usd, to_decimal

LEDGER_FILENAME = 'cost_ledger.sqlite'

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts(
    run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL,
    start_step INTEGER NOT NULL, started_at REAL NOT NULL, host TEXT NOT NULL,
    end_step INTEGER, end_reason TEXT, ended_at REAL,
    PRIMARY KEY(run_id, stage, attempt));
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL,
    category TEXT NOT NULL, seq INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    device_kind TEXT, device_count INTEGER NOT NULL, seconds REAL NOT NULL,
    quantity REAL NOT NULL, unit TEXT NOT NULL, rate_usd TEXT NOT NULL, usd REAL NOT NULL,
    billable INTEGER NOT NULL, note TEXT, created_at REAL NOT NULL, host TEXT NOT NULL,
    UNIQUE(run_id, stage, attempt, category, seq, first, last));
CREATE TABLE IF NOT EXISTS checkpoints(
    run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL, step INTEGER NOT NULL,
    saved_at REAL NOT NULL, PRIMARY KEY(run_id, stage, attempt, step));
"""


# An attempt `a` that ran no step and no evaluation although an earlier attempt of its run had
# finished the steps it starts from (a run with steps: pseudo-labeling's attempts have none).
_EMPTY_RESUME = (
    "NOT EXISTS (SELECT 1 FROM entries s WHERE s.run_id=a.run_id AND s.stage=a.stage AND "
    "s.attempt=a.attempt AND s.category IN ('steps', 'eval')) AND "
    "EXISTS (SELECT 1 FROM attempts b JOIN entries s ON s.run_id=b.run_id AND s.stage=b.stage "
    "AND s.category='steps' WHERE b.run_id=a.run_id AND b.stage=a.stage AND "
    "b.attempt<a.attempt AND b.end_reason='done' AND b.end_step>=a.start_step)")


class LedgerError(RuntimeError):
    """The ledger refused an entry that would double-count money, or the file is unusable."""


@dataclasses.dataclass
class StageSummary:
    """Money and device-hours of one (run_id, stage), derived from the raw ledger rows."""

    run_id: str
    stage: str
    device_kind: str = ''
    device_count: int = 0
    attempts: int = 0
    first_step: int | None = None
    last_step: int | None = None
    step_seconds: float = 0.0          # wall-clock of counted steps (each step once)
    step_device_hours: float = 0.0
    step_usd: float = 0.0
    pending_usd: float = 0.0           # part of step_usd above the last checkpoint, may be redone
    redone_seconds: float = 0.0        # steps run again after a restart: spent, not counted twice
    redone_device_hours: float = 0.0
    redone_usd: float = 0.0
    compile_seconds: float = 0.0
    compile_usd: float = 0.0           # 0 unless compile time is billable for this run
    eval_seconds: float = 0.0
    eval_usd: float = 0.0              # 0 unless eval time is billable for this run
    other_seconds: float = 0.0         # checkpoint saves, input start-up, host work
    other_usd: float = 0.0
    compute_device_hours: float = 0.0  # range-keyed compute (inference, pseudo-labelling)
    compute_usd: float = 0.0
    labels: int = 0
    labels_usd: float = 0.0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    llm_usd: float = 0.0
    end_reason: str | None = None

    @property
    def device_hours(self) -> float:
        """Billed device-hours: counted steps, redone steps, compute, and billable overheads."""
        return self.step_device_hours + self.redone_device_hours + self.compute_device_hours + \
            self._billable_overhead_hours

    _billable_overhead_hours: float = 0.0

    @property
    def total_usd(self) -> float:
        return math.fsum([self.step_usd, self.redone_usd, self.compile_usd, self.eval_usd,
                          self.other_usd, self.compute_usd, self.labels_usd, self.llm_usd])

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if not f.name.startswith('_')}
        d['device_hours'] = self.device_hours
        d['total_usd'] = self.total_usd
        return d


def ledger_path(path: str | os.PathLike) -> str:
    """A directory means `<dir>/cost_ledger.sqlite`; anything else is the file itself."""
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(('.sqlite', '.db')):
        return os.path.join(path, LEDGER_FILENAME)
    return path


class Ledger:
    """Durable, multi-process-safe cost ledger. Connects lazily: only writers create the file."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 120.0,
                 readonly: bool = False):
        self.path = ledger_path(path)
        self._timeout_s = timeout_s
        self.readonly = readonly
        self._con: sqlite3.Connection | None = None
        self._lock = threading.RLock()    # one connection, shared by the trainer's threads
        self._pid: int | None = None
        self.host = f'{socket.gethostname()}:{os.getpid()}'

    # ---- connection -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._con is not None and self._pid == os.getpid():
            return self._con
        if self.readonly:
            return self._connect_readonly()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None,
                                  check_same_thread=False)
            deadline = time.monotonic() + self._timeout_s
            while True:   # switching to WAL needs a lock that the busy handler may not wait for
                try:
                    con.execute('PRAGMA journal_mode=WAL')
                    break
                except sqlite3.OperationalError as e:
                    if _unwritable(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            con.execute('PRAGMA synchronous=FULL')   # fsync each commit: survive power loss too
            con.execute(f'PRAGMA busy_timeout={int(self._timeout_s * 1000)}')
            with _transaction(con):
                for statement in _SCHEMA.split(';'):
                    if statement.strip():
                        con.execute(statement)
        except sqlite3.Error as e:
            if _unwritable(e):
                raise LedgerError(self._unwritable_message(e)) from e
            raise LedgerError(f'cannot open the cost ledger {self.path!r}: {e}. It must be on a '
                              f'writable local/POSIX file system (not a bucket mount).') from e
        self._con, self._pid = con, os.getpid()
        return con

    def _unwritable_message(self, e: sqlite3.Error) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        return (f'cannot write the cost ledger {self.path!r} ({e}). Make it writable by the user '
                f'running this job (e.g. chmod u+w {self.path} {self.path}-wal {self.path}-shm '
                f'{folder}, or chown them), or run with a directory you can write (MODEL_DIR, '
                f'STUDY_DIR, or the ledger= path of the cost meter); keep it on a local/POSIX '
                f'file system, not a bucket mount.')

    def _connect_readonly(self) -> sqlite3.Connection:
        if not os.path.isfile(self.path):
            raise LedgerError(f'no cost ledger at {self.path!r}; a run writes it on its first '
                              f'logging interval (or pass the directory that holds it).')
        try:
            con = sqlite3.connect(f'file:{urllib.parse.quote(self.path)}?mode=ro', uri=True,
                                  timeout=self._timeout_s, isolation_level=None,
                                  check_same_thread=False)
            con.execute('SELECT COUNT(*) FROM entries').fetchone()
        except sqlite3.Error as e:
            raise LedgerError(f'cannot read the cost ledger {self.path!r}: {e}') from e
        self._con, self._pid = con, os.getpid()
        return con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise LedgerError(f'the ledger {self.path!r} was opened read-only; open it with '
                              f'Ledger(path) to record costs.')
        with self._lock:
            con = self._connect()
            try:
                with _transaction(con):
                    yield con
            except sqlite3.OperationalError as e:
                if _unwritable(e):   # e.g. the file became read-only after it was opened
                    raise LedgerError(self._unwritable_message(e)) from e
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot (WAL readers never block writers) for nested reads."""
        with self._lock:
            con = self._connect()
            if con.in_transaction:
                yield con
                return
            con.execute('BEGIN')
            try:
                yield con
            finally:
                con.execute('COMMIT')

    # ---- training attempts ----------------------------------------------------------------
    def begin_attempt(self, run_id: str, stage: str, start_step: int) -> int:
        """Open a new attempt (a process start or restart from checkpoint `start_step`).

        An earlier attempt that never ended died without saying so: it is closed as 'crashed'
        at the last step it recorded, and its steps above `start_step` count as redone."""
        with self._write() as con:
            (n,) = con.execute('SELECT COALESCE(MAX(attempt), 0) FROM attempts '
                               'WHERE run_id=? AND stage=?', (run_id, stage)).fetchone()
            con.execute(
                    "UPDATE attempts SET end_reason='crashed', ended_at=?, end_step=COALESCE("
                    "(SELECT MAX(e.last) FROM entries e WHERE e.run_id=attempts.run_id AND "
                    "e.stage=attempts.stage AND e.attempt=attempts.attempt AND "
                    "e.category='steps'), start_step) "
                    'WHERE run_id=? AND stage=? AND end_reason IS NULL',
                    (time.time(), run_id, stage))
            con.execute('INSERT INTO attempts(run_id, stage, attempt, start_step, started_at, host)'
                        ' VALUES (?,?,?,?,?,?)',
                        (run_id, stage, n + 1, int(start_step), time.time(), self.host))
        return n + 1

    def end_attempt(self, run_id: str, stage: str, attempt: int, step: int, reason: str) -> None:
        with self._write() as con:
            con.execute('UPDATE attempts SET end_step=?, end_reason=?, ended_at=? '
                        'WHERE run_id=? AND stage=? AND attempt=?',
                        (int(step), reason, time.time(), run_id, stage, attempt))

    def record_checkpoint(self, run_id: str, stage: str, attempt: int, step: int) -> None:
        with self._write() as con:
            con.execute('INSERT OR IGNORE INTO checkpoints VALUES (?,?,?,?,?)',
                        (run_id, stage, attempt, int(step), time.time()))

    def record_steps(self, run_id: str, stage: str, attempt: int, first_step: int,
                     last_step: int, seconds: float, device_kind: str, device_count: int,
                     usd_per_device_hour, billable: bool = True) -> bool:
        """Steps [first_step, last_step] took `seconds` on the devices. False: already recorded."""
        if last_step < first_step:
            raise LedgerError(f'step interval [{first_step}, {last_step}] of run {run_id!r} '
                              f'stage {stage!r} is empty; the trainer must pass first <= last.')
        return self._insert(run_id, stage, attempt, 'steps', 0, first_step, last_step,
                            device_kind, device_count, seconds, last_step - first_step + 1,
                            'steps', usd_per_device_hour, billable)

    def record_overhead(self, run_id: str, stage: str, attempt: int, category: str, seq: int,
                        step: int, seconds: float, device_kind: str, device_count: int,
                        usd_per_device_hour, billable: bool, note: str = '') -> bool:
        """Compile, eval or other time: always recorded, counted in $ only when `billable`.
        `note` says why it ran (e.g. an evaluation redone after a crashed attempt)."""
        if category not in ('compile', 'eval', 'other'):
            raise LedgerError(f'overhead category must be compile, eval or other, got '
                              f'{category!r}.')
        return self._insert(run_id, stage, attempt, category, seq, step, step, device_kind,
                            device_count, seconds, seconds, 'seconds', usd_per_device_hour,
                            billable, note)

    # ---- range-keyed costs (inference, labels, LLM) ----------------------------------------
    def record_compute(self, run_id: str, stage: str, first: int, last: int, seconds: float,
                       device_kind: str, device_count: int, usd_per_device_hour,
                       note: str = '', seq: int = 0) -> bool:
        """Compute on examples [first, last] (e.g. one pseudo-label shard); idempotent per range.

        Ranges of one `seq` never overlap; another `seq` numbers the examples another way (a
        pseudo-label directory relabeled with another chunk layout: its generation)."""
        return self._insert(run_id, stage, 0, 'compute', seq, first, last, device_kind,
                            device_count, seconds, last - first + 1, 'examples',
                            usd_per_device_hour, True, note)

    def record_labels(self, run_id: str, stage: str, task: str, first: int, last: int,
                      usd_per_label) -> bool:
        """Gold labels for examples [first, last] of `task`; idempotent per range."""
        n = last - first + 1
        usd = float(to_decimal(usd_per_label) * n)
        return self._insert(run_id, stage, 0, 'labels', 0, first, last, None, 0, 0.0, n,
                            'labels', usd_per_label, True, task, usd=usd)

    def record_llm(self, run_id: str, stage: str, model: str, first: int, last: int,
                   input_tokens: int, output_tokens: int, usd: float) -> bool:
        """LLM annotation of examples [first, last]; `usd` from `prices.llm_cost_usd`."""
        return self._insert(run_id, stage, 0, 'llm', 0, first, last, None, 0, 0.0,
                            input_tokens + output_tokens, f'tokens:{input_tokens}:{output_tokens}',
                            0, True, model, usd=usd)

    def record_llm_request(self, run_id: str, stage: str, model: str, index: int, key: str,
                           input_tokens: int, output_tokens: int, usd: float,
                           reused: bool = False) -> bool:
        """One LLM request for example `index`, keyed by its cache key.

        A paid request (`reused=False`) is always a new row: paying twice for one key (a crash
        between paying and caching) is money spent twice. A `reused` answer (paid by another run,
        charged to this one at its price) is recorded once per key and run; False: it already was.
        """
        note = json.dumps({'model': model, 'key': key, 'reused': bool(reused)})
        with self._write() as con:
            if reused and con.execute(
                    "SELECT 1 FROM entries WHERE run_id=? AND stage=? AND category='llm' AND "
                    'note LIKE ?', (run_id, stage, f'%"key": "{key}"%')).fetchone():
                return False
            (seq,) = con.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM entries WHERE run_id=? AND stage=? AND "
                    "attempt=0 AND category='llm' AND first=? AND last=?",
                    (run_id, stage, int(index), int(index))).fetchone()
            con.execute('INSERT INTO entries(run_id, stage, attempt, category, seq, first, last, '
                        'device_kind, device_count, seconds, quantity, unit, rate_usd, usd, '
                        'billable, note, created_at, host) VALUES '
                        '(?,?,0,?,?,?,?,NULL,0,0.0,?,?,?,?,1,?,?,?)',
                        (run_id, stage, 'llm', seq, int(index), int(index),
                         float(input_tokens + output_tokens),
                         f'tokens:{int(input_tokens)}:{int(output_tokens)}', '0', float(usd),
                         note, time.time(), self.host))
        return True

    def llm_billed(self, run_id: str, stage: str) -> tuple[set[str], set[int]]:
        """(cache keys, example indices) this run's LLM rows already bill: keys of per-request
        rows, and the examples of per-example rows that older versions wrote (no key)."""
        if not os.path.exists(self.path):
            return set(), set()
        keys, indices = set(), set()
        for r in self._rows("SELECT first, note FROM entries WHERE run_id=? AND stage=? AND "
                            "category='llm'", (run_id, stage)):
            try:
                note = json.loads(r['note'] or '')
            except ValueError:
                note = None
            if isinstance(note, dict) and 'key' in note:
                keys.add(note['key'])
            else:
                indices.add(int(r['first']))
        return keys, indices

    def has_run(self, run_id: str) -> bool:
        """Whether any row (entry or attempt) carries `run_id`."""
        if not os.path.exists(self.path):
            return False
        with self._read() as con:
            return con.execute('SELECT 1 FROM entries WHERE run_id=? UNION ALL SELECT 1 FROM '
                               'attempts WHERE run_id=? LIMIT 1',
                               (run_id, run_id)).fetchone() is not None

    def _insert(self, run_id, stage, attempt, category, seq, first, last, device_kind,
                device_count, seconds, quantity, unit, rate, billable, note='', usd=None) -> bool:
        if last < first:
            raise LedgerError(f'{category} range [{first}, {last}] of run {run_id!r} stage '
                              f'{stage!r} is empty; pass first <= last (inclusive).')
        if usd is None:
            usd = device_cost_usd(seconds, device_count, rate)
        row = (run_id, stage, attempt, category, seq, int(first), int(last), device_kind,
               int(device_count), float(seconds), float(quantity), unit, str(to_decimal(rate)),
               float(usd), int(bool(billable)), note, time.time(), self.host)
        with self._write() as con:
            same = con.execute(
                'SELECT first, last, seconds, usd FROM entries WHERE run_id=? AND stage=? AND '
                'attempt=? AND category=? AND seq=? AND first<=? AND last>=?',
                (run_id, stage, attempt, category, seq, int(last), int(first))).fetchall()
            for f, l, s, u in same:
                if (f, l) == (int(first), int(last)):
                    return False          # the same interval again: idempotent no-op
                raise LedgerError(
                    f'{category} range [{first}, {last}] of run {run_id!r} stage {stage!r} '
                    f'overlaps the recorded range [{f}, {l}] ({format_usd(u)}); recording it would '
                    f'count money twice. Record disjoint ranges, or the identical range again.')
            con.execute('INSERT INTO entries(run_id, stage, attempt, category, seq, first, last, '
                        'device_kind, device_count, seconds, quantity, unit, rate_usd, usd, '
                        'billable, note, created_at, host) VALUES '
                        '(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)', row)
        return True

    # ---- queries --------------------------------------------------------------------------
    def spent_usd(self, run_id: str | None = None) -> float:
        """Billable dollars spent so far (redone steps included: they were paid for)."""
        if not os.path.exists(self.path):
            return 0.0
        with self._read() as con:
            if run_id is None:
                rows = con.execute('SELECT usd FROM entries WHERE billable=1').fetchall()
            else:
                rows = con.execute('SELECT usd FROM entries WHERE billable=1 AND run_id=?',
                                   (run_id,)).fetchall()
        return math.fsum(r[0] for r in rows)

    def crash_overhead_usd(self, run_id: str | None = None) -> float:
        """Billable dollars that crashes added to `spent_usd`: the steps a later attempt redid,
        the compile, evaluation and host time of every attempt that crashed or failed (its
        redone work needed them again), and the compile and host time of an *empty resume*: an
        attempt that ran no step and no evaluation of a run whose steps an earlier attempt had
        finished ('done' at or above its start), e.g. a study rerun after a kill during the
        point's own evaluation, which resumes the finished trainer for its parameters (an
        attempt that evaluates, e.g. what a budget cap had skipped, is work). `spent_usd - crash_overhead_usd` is what the work
        cost: an uninterrupted run's bill, up to timing noise. Time in flight at a SIGKILL is in
        neither: the ledger never heard of it."""
        if not os.path.exists(self.path):
            return 0.0
        with self._read():
            runs = sorted({(r, s) for r, s in self.runs() if run_id is None or r == run_id})
            usd = [self._stage_summary(r, s).redone_usd for r, s in runs]
            where, args = ('', ()) if run_id is None else (' AND e.run_id=?', (run_id,))
            usd += [r['usd'] for r in self._rows(
                    'SELECT e.usd FROM entries e JOIN attempts a ON e.run_id=a.run_id AND '
                    'e.stage=a.stage AND e.attempt=a.attempt WHERE e.billable=1 AND '
                    "e.category IN ('compile', 'eval', 'other') AND "
                    f"(a.end_reason IN ('crashed', 'error') OR ({_EMPTY_RESUME})){where}",
                    args)]
        return math.fsum(usd)

    def work_usd(self, run_id: str | None = None) -> tuple[float, float]:
        """(what the work cost, what crashes added): `spent_usd - crash_overhead_usd` and
        `crash_overhead_usd`, read together."""
        if not os.path.exists(self.path):
            return 0.0, 0.0
        with self._read():
            crash = self.crash_overhead_usd(run_id)
            return self.spent_usd(run_id) - crash, crash

    def attempt_end_reason(self, run_id: str, stage: str, attempt: int) -> str | None:
        """How attempt `attempt` ended ('done', 'stopped', 'error', 'crashed'), None if it has not
        (or does not exist)."""
        if not os.path.exists(self.path):
            return None
        rows = self._rows('SELECT end_reason FROM attempts WHERE run_id=? AND stage=? AND '
                          'attempt=?', (run_id, stage, int(attempt)))
        return rows[0]['end_reason'] if rows else None

    def counted_step_intervals(self, run_id: str, stage: str) -> list[tuple[int, int, float]]:
        """(first, last, seconds) of the step work that counts, each step once, in step order."""
        out = []
        with self._read():
            entries = list(self._step_entries(run_id, stage))
        for e, kept_n, _ in entries:
            if kept_n:
                out.append((e['first'], e['first'] + kept_n - 1,
                            e['seconds'] * kept_n / (e['last'] - e['first'] + 1)))
        return sorted(out)

    def compute_entries(self, run_id: str, stage: str) -> list[dict]:
        """Range-keyed compute rows of a run/stage (first, last, seconds, usd), by first index."""
        if not os.path.exists(self.path):
            return []
        return self._rows('SELECT first, last, seconds, usd FROM entries WHERE run_id=? AND '
                          "stage=? AND category='compute' ORDER BY first", (run_id, stage))

    def _rows(self, sql: str, args=()) -> list[dict]:
        with self._read() as con:
            cur = con.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def _step_entries(self, run_id: str, stage: str):
        attempts = self._rows('SELECT attempt, start_step FROM attempts WHERE run_id=? AND '
                              'stage=? ORDER BY attempt', (run_id, stage))
        # Steps of attempt a above the smallest start of any later attempt were redone.
        cutoff, later_min = {}, math.inf
        for a in reversed(attempts):
            cutoff[a['attempt']] = later_min
            later_min = min(later_min, a['start_step'])
        for e in self._rows("SELECT * FROM entries WHERE run_id=? AND stage=? AND "
                            "category='steps' ORDER BY attempt, first", (run_id, stage)):
            n = e['last'] - e['first'] + 1
            c = cutoff.get(e['attempt'], math.inf)
            kept_n = n if c == math.inf else int(max(0, min(n, c - e['first'] + 1)))
            yield e, kept_n, n

    def runs(self) -> list[tuple[str, str]]:
        if not os.path.exists(self.path):
            return []
        rows = self._rows('SELECT run_id, stage FROM entries UNION SELECT run_id, stage FROM '
                          'attempts ORDER BY 1, 2')
        return [(r['run_id'], r['stage']) for r in rows]

    def summary(self) -> list[StageSummary]:
        """One StageSummary per (run_id, stage), in name order, from one snapshot."""
        if not os.path.exists(self.path):
            return []
        with self._read():
            return [self.stage_summary(r, s) for r, s in self.runs()]

    def stage_summary(self, run_id: str, stage: str) -> StageSummary:
        """Counted, redone, pending and overhead money of one run/stage, from one snapshot."""
        with self._read():
            return self._stage_summary(run_id, stage)

    def _stage_summary(self, run_id: str, stage: str) -> StageSummary:
        s = StageSummary(run_id, stage)
        attempts = self._rows('SELECT * FROM attempts WHERE run_id=? AND stage=? '
                              'ORDER BY attempt', (run_id, stage))
        s.attempts = len(attempts)
        pending_above = math.inf
        if attempts:
            last = attempts[-1]
            s.end_reason = last['end_reason']
            if last['end_reason'] not in ('done', 'stopped'):
                ck = self._rows('SELECT MAX(step) AS s FROM checkpoints WHERE run_id=? AND '
                                'stage=? AND attempt=?', (run_id, stage, last['attempt']))[0]['s']
                pending_above = max(last['start_step'], ck if ck is not None else -math.inf)
                last_attempt = last['attempt']
        step_usd, pending, redone, hours, redone_hours = [], [], [], [], []
        for e, kept_n, n in self._step_entries(run_id, stage):
            s.device_kind, s.device_count = e['device_kind'] or '', e['device_count']
            if not e['billable']:
                continue
            frac = kept_n / n
            step_usd.append(e['usd'] * frac)
            s.step_seconds += e['seconds'] * frac
            hours.append(e['seconds'] * e['device_count'] * frac / 3600)
            redone.append(e['usd'] * (1 - frac))
            s.redone_seconds += e['seconds'] * (1 - frac)
            redone_hours.append(e['seconds'] * e['device_count'] * (1 - frac) / 3600)
            if kept_n:
                s.first_step = e['first'] if s.first_step is None else min(s.first_step,
                                                                           e['first'])
                top = e['first'] + kept_n - 1
                s.last_step = top if s.last_step is None else max(s.last_step, top)
                if pending_above != math.inf and e['attempt'] == last_attempt:
                    above = max(0, top - max(pending_above, e['first'] - 1))
                    pending.append(e['usd'] * above / n)
        s.step_usd, s.pending_usd, s.redone_usd = math.fsum(step_usd), math.fsum(pending), \
            math.fsum(redone)
        s.step_device_hours, s.redone_device_hours = math.fsum(hours), math.fsum(redone_hours)
        overhead_hours = []
        for e in self._rows("SELECT * FROM entries WHERE run_id=? AND stage=? AND "
                            "category!='steps'", (run_id, stage)):
            cat, usd = e['category'], (e['usd'] if e['billable'] else 0.0)
            if cat in ('compile', 'eval', 'other'):
                setattr(s, f'{cat}_seconds', getattr(s, f'{cat}_seconds') + e['seconds'])
                setattr(s, f'{cat}_usd', getattr(s, f'{cat}_usd') + usd)
                if e['billable']:
                    overhead_hours.append(e['seconds'] * e['device_count'] / 3600)
            elif cat == 'compute':
                s.compute_device_hours += e['seconds'] * e['device_count'] / 3600
                s.compute_usd += usd
                s.device_kind, s.device_count = e['device_kind'] or '', e['device_count']
            elif cat == 'labels':
                s.labels += int(e['quantity'])
                s.labels_usd += usd
            elif cat == 'llm':
                _, i, o = e['unit'].split(':')
                s.llm_input_tokens += int(i)
                s.llm_output_tokens += int(o)
                s.llm_usd += usd
        s._billable_overhead_hours = math.fsum(overhead_hours)
        return s


def _unwritable(e: sqlite3.Error) -> bool:
    """SQLITE_READONLY (a read-only file, its -wal/-shm, or its directory) or SQLITE_CANTOPEN."""
    code = getattr(e, 'sqlite_errorcode', None)
    if code is not None:
        return (code & 0xff) in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)
    return 'readonly' in str(e) or 'unable to open' in str(e)


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front: concurrent writers queue, never deadlock."""
    con.execute('BEGIN IMMEDIATE')
    try:
        yield
    except BaseException:
        con.execute('ROLLBACK')
        raise
    con.execute('COMMIT')
