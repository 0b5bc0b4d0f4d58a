"""SIGKILL mid-run and during the final evaluation, rerun, and end with the same parameters as an
uninterrupted run, each step billed once."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name('train_worker.py')
STEPS = 12


def _spec(model_dir, out, **kw):
    return {'model_dir': str(model_dir), 'out': str(out), 'steps': STEPS, 'dropout': 0.1,
            'log_period': 2, 'checkpoint_period': 4, **kw}


def _start(spec):
    # Later processes read the test run's persistent compilation cache (tests/conftest.py).
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env)


def _run_record(model_dir) -> dict:
    return json.loads((model_dir / 'run.json').read_text())


@pytest.mark.slow
@pytest.mark.fault_injection
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Killed mid-steps, resumed and killed again during its final evaluation, then rerun: the
    rerun trains nothing, evaluates once, and ends with the uninterrupted run's parameters; the
    ledger bills each step once, keeps the redone steps apart and marks the redone evaluation."""
    from doa_jax.cost import Ledger
    from tests import train_worker
    killed_dir = tmp_path / 'killed'
    # Runs of killed_dir evaluate once, at the end (one batch). The first is killed (train_worker's
    # hook) after step 6, its steps recorded, with checkpoint 4 committed and 8 not yet begun.
    final_eval = {'eval_period': STEPS, 'eval_steps': 1}
    proc = _start(_spec(killed_dir, tmp_path / 'unused.npz', kill_after_step=6, **final_eval))
    # Meanwhile the uninterrupted reference trains in this process: only a run that is killed
    # needs a process of its own.
    train_worker.main(_spec(tmp_path / 'straight', tmp_path / 'straight.npz'))
    assert proc.wait(timeout=240) == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (killed_dir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps == [4]
    ledger = Ledger(killed_dir, readonly=True)
    first = ledger.stage_summary('killed', 'train')
    assert first.attempts == 1 and first.end_reason is None and first.last_step == 6

    # The resumed run trains to the end and is killed in its final evaluation (train_worker's
    # hook: after the final checkpoint is committed, before the evaluation decodes).
    resume = _start(_spec(killed_dir, tmp_path / 'resumed.npz', kill_in_final_eval=True,
                          **final_eval))
    assert resume.wait(timeout=240) == -signal.SIGKILL
    assert 'final_evaluation_step' not in _run_record(killed_dir)
    # The rerun (here, in this process) finds the final checkpoint: it trains nothing and only
    # evaluates.
    train_worker.main(_spec(killed_dir, tmp_path / 'rerun.npz', **final_eval))
    resumed = np.load(tmp_path / 'resumed.npz')
    finished = np.load(tmp_path / 'rerun.npz')
    straight = np.load(tmp_path / 'straight.npz')
    assert finished['losses'].size == 0 and finished['evals'].tolist() == [STEPS]
    assert _run_record(killed_dir)['final_evaluation_step'] == STEPS
    names = [k for k in straight.files if k not in ('losses', 'evals')]
    assert len(names) > 10
    for params in (resumed, finished):
        assert set(names) == set(k for k in params.files if k not in ('losses', 'evals'))
        for name in names:
            np.testing.assert_array_equal(params[name], straight[name], err_msg=name)
    # The resumed run only logged the intervals after its checkpoint; they match the tail.
    np.testing.assert_allclose(resumed['losses'], straight['losses'][-len(resumed['losses']):],
                               rtol=0, atol=0)

    # The ledger: steps 1-12 billed once; the first attempt's steps above checkpoint 4 redone;
    # one evaluation, the rerun's, marked as redoing the killed one (which never reached it).
    s = ledger.stage_summary('killed', 'train')
    assert s.attempts == 3 and s.end_reason == 'done' and s.pending_usd == 0
    counted = ledger.counted_step_intervals('killed', 'train')
    assert [x for f, l, _ in counted for x in range(f, l + 1)] == list(range(1, STEPS + 1))
    rows = ledger._rows("SELECT attempt, category, first, last, usd, note FROM entries "
                        "WHERE run_id='killed'")
    attempts = ledger._rows("SELECT attempt, start_step, end_step, end_reason FROM attempts "
                            "WHERE run_id='killed' ORDER BY attempt")
    assert [(a['start_step'], a['end_reason']) for a in attempts] == [
            (0, 'crashed'), (steps[-1], 'crashed'), (STEPS, 'done')]
    assert attempts[1]['end_step'] == STEPS
    assert not [r for r in rows if r['attempt'] == 3 and r['category'] in ('steps', 'compile')]
    evals = [r for r in rows if r['category'] == 'eval']
    assert len(evals) == 1 and evals[0]['attempt'] == 3 and evals[0]['first'] == STEPS
    assert evals[0]['note'].startswith('redone: attempt 2 crashed') and evals[0]['usd'] > 0
    assert s.redone_usd == pytest.approx(math.fsum(      # steps 5-6 of the first attempt
            r['usd'] for r in rows if r['attempt'] == 1 and r['category'] == 'steps' and
            r['first'] > 4), rel=1e-9) and s.redone_usd > 0
    # Spent = the work (each step once, the finishing attempts' overheads) + the crash overhead
    # (redone steps, the crashed attempts' compile and host time).
    crashed = math.fsum(r['usd'] for r in rows if r['attempt'] in (1, 2) and
                        r['category'] in ('compile', 'eval', 'other'))
    assert ledger.crash_overhead_usd('killed') == pytest.approx(s.redone_usd + crashed, rel=1e-9)
    assert ledger.spent_usd('killed') == pytest.approx(s.total_usd, rel=1e-12)
    assert ledger.spent_usd('killed') - ledger.crash_overhead_usd('killed') == pytest.approx(
            s.step_usd + math.fsum(r['usd'] for r in rows if r['attempt'] == 3), rel=1e-9)
    ledger.close()
