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

WORKER = pathlib.Path(__file__).with_name('train_worker.py')
STEPS = 30


def _spec(model_dir, out, **kw):
    return {'model_dir': str(model_dir), 'out': str(out), 'steps': STEPS, 'dropout': 0.1,
            'log_period': 5, 'checkpoint_period': 10, **kw}


def _start(spec, cache_dir):
    # A shared persistent compilation cache lets later processes skip XLA compilation.
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed_dir = tmp_path / 'killed'
    cache = tmp_path / 'jax_cache'
    # The uninterrupted reference runs alongside (the killed run mostly sleeps between intervals).
    straight = _start(_spec(tmp_path / 'straight', tmp_path / 'straight.npz'), cache)
    proc = _start(_spec(killed_dir, tmp_path / 'unused.npz', sleep=1.0), cache)
    ckpt = killed_dir / 'checkpoints' / '10'
    deadline = time.time() + 180
    while not ckpt.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.is_dir(), 'the run never wrote checkpoint 10'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (killed_dir / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps and steps[-1] < STEPS, f'killed too late: checkpoints {steps}'

    resume = _start(_spec(killed_dir, tmp_path / 'resumed.npz'), cache)
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
