"""SIGKILL mid-run, resume, and end with the same parameters as an uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

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


@pytest.mark.slow
@pytest.mark.fault_injection
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed_dir = tmp_path / 'killed'
    # The uninterrupted reference runs alongside (the killed run mostly sleeps between intervals).
    straight = _start(_spec(tmp_path / 'straight', tmp_path / 'straight.npz'))
    proc = _start(_spec(killed_dir, tmp_path / 'unused.npz', sleep=1.0))
    ckpt = killed_dir / 'checkpoints' / '4'
    deadline = time.time() + 180
    while not ckpt.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.is_dir(), 'the run never wrote checkpoint 4'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (killed_dir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps and steps[-1] < STEPS, f'killed too late: checkpoints {steps}'

    resume = _start(_spec(killed_dir, tmp_path / 'resumed.npz'))
    assert resume.wait(timeout=240) == 0
    assert straight.wait(timeout=240) == 0
    resumed = np.load(tmp_path / 'resumed.npz')
    straight = np.load(tmp_path / 'straight.npz')
    names = [k for k in straight.files if k != 'losses']
    assert len(names) > 10 and set(names) == set(k for k in resumed.files if k != 'losses')
    for name in names:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
    # The resumed run only logged the intervals after its checkpoint; they match the tail.
    np.testing.assert_allclose(resumed['losses'], straight['losses'][-len(resumed['losses']):],
                               rtol=0, atol=0)
