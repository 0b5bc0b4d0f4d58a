"""Cost ledger under real OS processes: SIGKILL and resume, two writers, a budget cap.

The tests drive CostCallback through the trainer protocol from a small simulated training process
(this file run as a script): fake per-step timings, fake checkpoint files written atomically.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import pytest

A100 = 'NVIDIA A100-SXM4-40GB'
RATE_PER_SECOND = 4 * 1.875 / 3600        # four A100s


def fake_seconds(step: int) -> float:
    """Deterministic, varying step times; binary fractions so sums are exact."""
    return 0.5 + (step % 7) * 0.125


def measured_usd(first: int, last: int) -> float:
    return sum(fake_seconds(s) for s in range(first, last + 1)) * RATE_PER_SECOND


# ---- the simulated training process -----------------------------------------------------------
def _latest_checkpoint(model_dir: pathlib.Path) -> int:
    steps = [int(p.name.split('_')[1]) for p in model_dir.glob('checkpoint_*')
             if not p.name.endswith('.tmp')]
    return max(steps, default=0)


def _save_checkpoint(model_dir: pathlib.Path, step: int) -> None:
    tmp = model_dir / f'checkpoint_{step}.tmp'
    with open(tmp, 'w') as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_dir / f'checkpoint_{step}')
    fd = os.open(model_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def drive(argv: list[str]) -> int:
    import numpy as np
    from doa_jax.cost import CostCallback, Ledger, default_prices

    p = argparse.ArgumentParser()
    for name in ('--ledger', '--model_dir', '--run_id'):
        p.add_argument(name, required=True)
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--log_every', type=int, default=2)
    p.add_argument('--ckpt_every', type=int, default=6)
    p.add_argument('--sleep', type=float, default=0.0)
    p.add_argument('--budget', type=float, default=None)
    p.add_argument('--hang_at', type=int, default=None, help='block at this step until killed')
    a = p.parse_args(argv)
    model_dir = pathlib.Path(a.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    devices = np.array([types.SimpleNamespace(device_kind=A100) for _ in range(4)], dtype=object)
    mesh = types.SimpleNamespace(devices=devices.reshape(2, 2))
    cb = CostCallback(Ledger(a.ledger), default_prices(), a.run_id, 'train',
                      budget_usd=a.budget, include_compile=False,
                      include_other=False)     # fake step times: real-time gaps mean nothing
    step = _latest_checkpoint(model_dir)
    cb.on_train_start(model_dir=str(model_dir), start_step=step, mesh=mesh)
    cb.on_compile(seconds=10.0)
    first = step + 1
    progress = model_dir / 'progress'
    while step < a.steps:
        step += 1
        progress.write_text(str(step))
        time.sleep(600 if step == a.hang_at else a.sleep)
        if step % a.log_every == 0 or step == a.steps:
            cb.on_steps_end(first_step=first, last_step=step,
                            seconds=sum(fake_seconds(s) for s in range(first, step + 1)))
            first = step + 1
            if cb.should_stop(step=step):
                _save_checkpoint(model_dir, step)
                cb.on_checkpoint(step=step)
                cb.on_train_end(step=step, reason='stopped')
                return 0
        if step % a.ckpt_every == 0 or step == a.steps:
            _save_checkpoint(model_dir, step)
            cb.on_checkpoint(step=step)
    cb.on_train_end(step=step, reason='done')
    return 0


def _driver(tmp: pathlib.Path, run_id: str, *extra: str) -> subprocess.Popen:
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS='cpu')
    return subprocess.Popen([sys.executable, __file__, '--ledger', str(tmp / 'study'),
                             '--model_dir', str(tmp / run_id), '--run_id', run_id, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out


def _assert_counted_exactly_once(ledger, run_id: str, steps: int) -> None:
    counted = ledger.counted_step_intervals(run_id, 'train')
    covered = [s for f, l, _ in counted for s in range(f, l + 1)]
    assert covered == list(range(1, steps + 1)), counted      # each step once, none missing
    s = ledger.stage_summary(run_id, 'train')
    assert s.step_usd == pytest.approx(measured_usd(1, steps), rel=1e-12)
    assert s.step_seconds == sum(fake_seconds(x) for x in range(1, steps + 1))


# ---- tests ------------------------------------------------------------------------------------
def test_sigkilled_and_resumed_run_counts_every_step_once(tmp_path):
    from doa_jax.cost import Ledger
    # Killed in step 15: steps 1-14 recorded, checkpoint 12 saved, steps 13-14 not covered.
    proc = _driver(tmp_path, 'run', '--steps', '40', '--hang_at', '15')
    progress = tmp_path / 'run' / 'progress'
    deadline = time.monotonic() + 60
    while not (progress.exists() and progress.read_text() == '15'):
        assert proc.poll() is None and time.monotonic() < deadline, 'driver ended before the kill'
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resume_from = _latest_checkpoint(tmp_path / 'run')
    assert resume_from == 12
    ledger = Ledger(tmp_path / 'study')
    before = ledger.stage_summary('run', 'train')
    assert before.end_reason is None and before.last_step == 14
    assert before.pending_usd == pytest.approx(measured_usd(13, 14), rel=1e-12)

    _finish(_driver(tmp_path, 'run', '--steps', '40'))             # restart from the checkpoint
    _assert_counted_exactly_once(ledger, 'run', 40)
    s = ledger.stage_summary('run', 'train')
    assert s.attempts == 2 and s.end_reason == 'done' and s.pending_usd == 0
    # The killed attempt's steps above the checkpoint were paid for: kept as redone, not lost.
    assert s.redone_usd == pytest.approx(measured_usd(13, 14), rel=1e-12)
    assert ledger.spent_usd('run') == pytest.approx(s.step_usd + s.redone_usd, rel=1e-12)
    assert s.compile_seconds == 20.0 and s.compile_usd == 0.0      # recorded, excluded by config


def test_two_processes_writing_one_study_ledger_give_consistent_totals(tmp_path):
    from doa_jax.cost import Ledger
    from doa_jax.cost.report import collect
    procs = [_driver(tmp_path, f'run{i}', '--steps', '150', '--log_every', '1',
                     '--ckpt_every', '10') for i in range(2)]
    for p in procs:
        _finish(p)
    ledger = Ledger(tmp_path / 'study')
    for i in range(2):
        _assert_counted_exactly_once(ledger, f'run{i}', 150)
    assert ledger.spent_usd() == pytest.approx(2 * measured_usd(1, 150), rel=1e-12)
    report = collect(str(tmp_path / 'study'))
    assert report['totals']['total_usd'] == pytest.approx(ledger.spent_usd(), rel=1e-12)
    hosts = {r[0] for r in ledger._connect().execute('SELECT DISTINCT host FROM entries')}
    assert len(hosts) == 2                                          # really two writers


def test_budget_cap_stops_the_simulated_run_with_its_checkpoint(tmp_path):
    from doa_jax.cost import Ledger
    budget = measured_usd(1, 11)              # crossed inside the interval [11, 12]
    _finish(_driver(tmp_path, 'capped', '--steps', '40', '--budget', str(budget)))
    ledger = Ledger(tmp_path / 'study')
    s = ledger.stage_summary('capped', 'train')
    assert s.end_reason == 'stopped' and s.last_step == 12
    assert _latest_checkpoint(tmp_path / 'capped') == 12
    assert budget <= ledger.spent_usd('capped') < budget + measured_usd(11, 12)


if __name__ == '__main__':
    sys.exit(drive(sys.argv[1:]))
