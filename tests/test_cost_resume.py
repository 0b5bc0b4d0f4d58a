"""Cost ledger under real OS processes: SIGKILL and resume, two writers, a budget cap, and two
jax processes (jax.distributed on CPU) that must record once and stop together.

The tests drive CostCallback through the trainer protocol from a small simulated training process
(this file run as a script): fake per-step timings, fake checkpoint files written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
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


def drive_multihost(process_id: int, port: int, model_dir: str) -> int:
    """One of two jax processes (2 CPU devices in all) running the callback with a budget."""
    import jax
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                               process_id=process_id)
    from doa_jax import partitioning
    from doa_jax.cost import CostCallback
    mesh = partitioning.make_mesh()
    # 5.5 s of both devices: at step 5, 5 s spent + 1 s for step 6 does not fit.
    budget = 5.5 * 2 * default_cpu_rate() / 3600
    cb = CostCallback(budget_usd=budget, include_compile=False, include_other=False)
    cb.on_train_start(model_dir=model_dir, start_step=0, mesh=mesh)
    for step in range(1, 100):
        # Hosts measure different wall-clock; only process 0's (1 s/step) is recorded.
        cb.on_steps_end(first_step=step, last_step=step, seconds=1.0 if process_id == 0 else 50.0)
        if cb.should_stop(step=step):
            break
    cb.on_checkpoint(step=step)
    cb.on_train_end(step=step, reason='stopped')
    print(f'STOPPED {process_id} {step} {cb.write}', flush=True)
    return 0


def default_cpu_rate() -> float:
    from doa_jax.cost import default_prices
    return float(default_prices().usd_per_device_hour('cpu'))


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
@pytest.mark.fault_injection
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


def _attempt(ledger, model_dir, start, last, checkpoints=(), end=None):
    """One training attempt through CostCallback with run_id=None (the id MODEL_DIR records):
    steps start+1..last, two per interval; `end=None` is a process killed after step `last`."""
    import numpy as np
    from doa_jax.cost import CostCallback, default_prices
    devices = np.array([types.SimpleNamespace(device_kind=A100) for _ in range(4)], dtype=object)
    cb = CostCallback(ledger, default_prices(), include_compile=False, include_other=False,
                      write=True)
    cb.on_train_start(model_dir=str(model_dir), start_step=start,
                      mesh=types.SimpleNamespace(devices=devices))
    for first in range(start + 1, last + 1, 2):
        top = min(first + 1, last)
        cb.on_steps_end(first_step=first, last_step=top,
                        seconds=sum(fake_seconds(s) for s in range(first, top + 1)))
        if top in checkpoints:
            cb.on_checkpoint(step=top)
    if end is not None:
        cb.on_train_end(step=last, reason=end)
    return cb.run_id


@pytest.mark.fault_injection
def test_moved_run_folder_resumes_its_own_rows_and_marks_redone_steps(tmp_path):
    from doa_jax.cost import Ledger
    from doa_jax.cost.report import collect
    ledger = Ledger(tmp_path / 'study')             # outside the run folders, as in a study
    (tmp_path / 'a').mkdir()
    # Killed after step 40 with checkpoint 30; the folder is moved; the rerun resumes at 30.
    assert _attempt(ledger, tmp_path / 'a', 0, 40, checkpoints=(30,)) == 'a'
    (tmp_path / 'a').rename(tmp_path / 'b')
    assert _attempt(ledger, tmp_path / 'b', 30, 60, checkpoints=(60,), end='done') == 'a'
    assert [r for r, _ in ledger.runs()] == ['a']
    _assert_counted_exactly_once(ledger, 'a', 60)
    s = ledger.stage_summary('a', 'train')
    assert s.attempts == 2 and s.end_reason == 'done' and s.pending_usd == 0
    assert s.redone_usd == pytest.approx(measured_usd(31, 40), rel=1e-12)
    assert ledger.spent_usd() == pytest.approx(measured_usd(1, 60) + measured_usd(31, 40))
    first = ledger._rows("SELECT end_reason, end_step FROM attempts WHERE attempt=1")[0]
    assert first == {'end_reason': 'crashed', 'end_step': 40}
    assert [r['status'] for r in collect(str(tmp_path / 'study'))['rows']] == ['done']
    # A new folder under the moved folder's old name is another run, with its own id.
    (tmp_path / 'a').mkdir()
    new_id = _attempt(ledger, tmp_path / 'a', 0, 4, end='done')
    assert new_id.startswith('a-') and ledger.stage_summary('a', 'train').attempts == 2


def test_run_folder_metered_before_run_ids_keeps_its_rows(tmp_path):
    """A ledger written by older versions names runs by the folder's name: a resumed folder
    without a recorded id adopts that name."""
    from doa_jax.cost import Ledger
    ledger = Ledger(tmp_path / 'study')
    attempt = ledger.begin_attempt('old', 'train', 0)
    ledger.record_steps('old', 'train', attempt, 1, 12, sum(map(fake_seconds, range(1, 13))),
                        A100, 4, 1.875)
    ledger.record_checkpoint('old', 'train', attempt, 12)
    (tmp_path / 'old').mkdir()
    assert _attempt(ledger, tmp_path / 'old', 12, 20, end='done') == 'old'
    _assert_counted_exactly_once(ledger, 'old', 20)
    assert json.loads((tmp_path / 'old' / 'run.json').read_text())['run_id'] == 'old'


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


def test_budget_cap_stops_the_simulated_run_before_it_passes_the_cap(tmp_path):
    from doa_jax.cost import Ledger
    # The cap is steps 1-11's 9.375 s. Each check adds the next two steps at the speed of the
    # last two: at step 8, 6.75 s spent + 1.125 s (steps 7-8) = 7.875 s fits; at step 10,
    # 8.375 s + 1.625 s (steps 9-10) = 10.0 s does not, so the run stops at step 10.
    budget = measured_usd(1, 11)
    assert (measured_usd(1, 8) + measured_usd(7, 8) < budget
            < measured_usd(1, 10) + measured_usd(9, 10))
    _finish(_driver(tmp_path, 'capped', '--steps', '40', '--budget', str(budget)))
    ledger = Ledger(tmp_path / 'study')
    s = ledger.stage_summary('capped', 'train')
    assert s.end_reason == 'stopped' and s.last_step == 10
    assert _latest_checkpoint(tmp_path / 'capped') == 10
    assert ledger.spent_usd('capped') == pytest.approx(measured_usd(1, 10), rel=1e-12)
    assert ledger.spent_usd('capped') <= budget


def test_two_jax_processes_write_once_and_stop_together(tmp_path):
    from doa_jax.cost import Ledger
    with socket.socket() as sock:
        sock.bind(('localhost', 0))
        port = sock.getsockname()[1]
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS='cpu')
    procs = [subprocess.Popen([sys.executable, __file__, 'multihost', str(i), str(port),
                               str(tmp_path / 'run')], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert 'STOPPED 0 5 True' in outs[0] and 'STOPPED 1 5 False' in outs[1], outs
    ledger = Ledger(tmp_path / 'run')
    s = ledger.stage_summary('run', 'train')
    assert s.device_count == 2 and s.attempts == 1 and s.end_reason == 'stopped'
    assert s.step_seconds == 5.0                       # process 0's timings, recorded once
    assert ledger.spent_usd('run') == pytest.approx(5 * 2 * default_cpu_rate() / 3600)


if __name__ == '__main__':
    if sys.argv[1] == 'multihost':
        sys.exit(drive_multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    sys.exit(drive(sys.argv[1:]))
