"""Crash overhead from hand-made ledger rows (no training, study or subprocess): what a kill adds
to pseudo-labeling (its killed attempt's compiles) and to a study point killed during its own
evaluation (the finished trainer's empty resume) is crash overhead, not work."""

from __future__ import annotations

import math
import time
import types

import numpy as np
import pytest

from doa_jax import pseudo_label as pl
from doa_jax.cost import Ledger, default_prices


COMPILE_S = 0.2


def _mesh(kind: str = 'cpu', n: int = 1):
    devices = np.array([types.SimpleNamespace(device_kind=kind) for _ in range(n)], dtype=object)
    return types.SimpleNamespace(devices=devices.reshape(n, 1))


class _Clock:
    """A fake compile clock: the fake teacher adds the seconds it sleeps to compile, as jax's
    compile events would."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def _label(ledger, out, clock, pool, *, compile_s, kill_after=None):
    """Labels `pool` in chunks of 2; the first batch compiles. `kill_after=k`: the process dies
    (an exception that skips closing the attempt) once chunk k is priced."""
    state = {'compiled': False}

    def label(batch):
        if not state['compiled']:
            time.sleep(compile_s)
            clock.seconds += compile_s
            state['compiled'] = True
        return [{'prediction': t, 'score': 0.0} for t in batch]

    billing = pl.ChunkBilling(ledger, default_prices(), 'pl', mesh=_mesh(), compile_clock=clock)
    billing.__enter__()

    def on_chunk(c):
        if c == kill_after:
            raise SystemExit('killed')   # no end_attempt: as after a SIGKILL

    try:
        pl.pseudo_label_shard(pool, label, str(out), chunk_size=2, batch_size=2,
                              meter_factory=billing.meter, on_chunk=on_chunk)
    except SystemExit:
        return
    billing.end('done')


def test_pseudo_label_rerun_compile_is_crash_overhead(tmp_path):
    pool = [(f'ex{i}', f'input {i}') for i in range(8)]
    killed = Ledger(str(tmp_path / 'killed'))
    clock = _Clock()
    _label(killed, tmp_path / 'killed' / 'out', clock, pool, compile_s=COMPILE_S, kill_after=1)
    clock = _Clock()   # the rerun: a new process, compiling again
    _label(killed, tmp_path / 'killed' / 'out', clock, pool, compile_s=COMPILE_S)
    straight = Ledger(str(tmp_path / 'straight'))
    _label(straight, tmp_path / 'straight' / 'out', _Clock(), pool, compile_s=COMPILE_S)

    for ledger in (killed, straight):   # each chunk billed once, without the compile in it
        chunks = ledger.compute_entries('pl', 'pseudo_label')
        assert [(c['first'], c['last']) for c in chunks] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert all(c['seconds'] < COMPILE_S for c in chunks)
    assert killed.attempt_end_reason('pl', 'pseudo_label', 1) == 'crashed'
    compile_usd = float(default_prices().usd_per_device_hour('cpu')) * COMPILE_S / 3600
    assert compile_usd == pytest.approx(straight.spent_usd('pl') - math.fsum(
            c['usd'] for c in straight.compute_entries('pl', 'pseudo_label')), rel=1e-6)
    assert killed.crash_overhead_usd('pl') == pytest.approx(compile_usd, rel=1e-9)
    assert straight.crash_overhead_usd('pl') == 0.0
    work, crash = pl.work_usd(killed, 'pl')
    # The work: one compile and four chunks, as the uninterrupted run's (chunks take ms here).
    assert work == pytest.approx(straight.spent_usd('pl'), abs=0.5 * compile_usd)
    assert crash == pytest.approx(compile_usd, rel=1e-9)


def _finished_training(ledger: Ledger, run: str = 'student') -> None:
    a = ledger.begin_attempt(run, 'train', 0)
    ledger.record_overhead(run, 'train', a, 'compile', 0, 0, 20.0, 'cpu', 1, 3600, True)
    ledger.record_steps(run, 'train', a, 1, 10, 100.0, 'cpu', 1, 3600)
    ledger.record_overhead(run, 'train', a, 'eval', 0, 10, 5.0, 'cpu', 1, 3600, True)
    ledger.end_attempt(run, 'train', a, 10, 'done')


def test_empty_resume_of_a_finished_run_is_crash_overhead(tmp_path):
    """A study point killed in its own evaluation: the rerun resumes the finished trainer, which
    runs no step; its compile and host time are crash overhead, the work is unchanged."""
    ledger = Ledger(str(tmp_path))
    _finished_training(ledger)
    assert ledger.crash_overhead_usd('student') == 0.0
    work = ledger.spent_usd('student')   # $1 a second
    assert work == pytest.approx(125.0)
    a = ledger.begin_attempt('student', 'train', 10)   # the rerun's empty resume
    ledger.record_overhead('student', 'train', a, 'other', 0, 10, 3.0, 'cpu', 1, 3600, True)
    ledger.record_overhead('student', 'train', a, 'compile', 0, 10, 2.0, 'cpu', 1, 3600, True)
    ledger.end_attempt('student', 'train', a, 10, 'done')
    assert ledger.crash_overhead_usd('student') == pytest.approx(5.0)
    assert ledger.spent_usd('student') - ledger.crash_overhead_usd('student') == \
        pytest.approx(work)


def test_resume_that_trains_or_evaluates_is_work(tmp_path):
    ledger = Ledger(str(tmp_path))
    _finished_training(ledger)
    # More steps (a larger TRAIN_STEPS) are work, their attempt's host time too.
    a = ledger.begin_attempt('student', 'train', 10)
    ledger.record_overhead('student', 'train', a, 'other', 0, 10, 3.0, 'cpu', 1, 3600, True)
    ledger.record_steps('student', 'train', a, 11, 12, 20.0, 'cpu', 1, 3600)
    ledger.end_attempt('student', 'train', a, 12, 'done')
    # An evaluation a cap had skipped, run by a resume with no step, is work, its compile too.
    a = ledger.begin_attempt('student', 'train', 12)
    ledger.record_overhead('student', 'train', a, 'compile', 0, 12, 1.0, 'cpu', 1, 3600, True)
    ledger.record_overhead('student', 'train', a, 'eval', 0, 12, 4.0, 'cpu', 1, 3600, True)
    ledger.end_attempt('student', 'train', a, 12, 'done')
    assert ledger.crash_overhead_usd('student') == 0.0
    # Pseudo-labeling attempts run no steps: a later one's compile is work.
    for _ in range(2):
        a = ledger.begin_attempt('pl', 'pseudo_label', 0)
        ledger.record_overhead('pl', 'pseudo_label', a, 'compile', 1, 0, 2.0, 'cpu', 1, 3600,
                               True)
        ledger.end_attempt('pl', 'pseudo_label', a, 4, 'done')
    assert ledger.crash_overhead_usd('pl') == 0.0


def test_study_prices_pseudo_labels_by_work(tmp_path):
    """The study's chunk prices (what a point's budget buys) carry the work's compile on the first
    chunk, and no compile of a killed attempt, which is reported as crash overhead."""
    from doa_jax.study import runner
    s = types.SimpleNamespace(study_dir=str(tmp_path),
                              teacher=types.SimpleNamespace(model='t5_tiny'))
    teacher = runner._Teacher(s, 8)
    ledger = Ledger(teacher.dir)   # $1 a second
    for chunks in ([(0, 1)], [(2, 3), (4, 5)]):   # killed after chunk 0, then rerun
        a = ledger.begin_attempt('pseudo_labels', 'pseudo_label', 0)
        ledger.record_overhead('pseudo_labels', 'pseudo_label', a, 'compile', 1, chunks[0][0],
                               2.0, 'cpu', 1, 3600, True)
        for first, last in chunks:
            ledger.record_compute('pseudo_labels', 'pseudo_label', first, last, 1.0, 'cpu', 1,
                                  3600)
    ledger.end_attempt('pseudo_labels', 'pseudo_label', a, 6, 'done')
    assert [(c['first'], c['last'], c['usd']) for c in teacher.chunk_costs()] == [
            (0, 1, 3.0), (2, 3, 1.0), (4, 5, 1.0)]
    assert teacher.pseudo_label_crash_overhead() == pytest.approx(2.0)
    assert runner._affordable_prefix(teacher.chunk_costs(), 4.5) == (4, pytest.approx(4.0))
