"""The cost callback inside the real trainer: a budget cap stops a tiny run with its checkpoint
intact, and the resumed run counts every step once."""

from __future__ import annotations

import jax
import numpy as np

from doa_jax import trainer
from doa_jax.checkpoints import RunCheckpointer
from doa_jax.cost import CostCallback, Ledger, default_prices
from doa_jax.models import get_config
import tasks.toy  # noqa: F401  (registers doa_toy)

CPU_RATE = float(default_prices().usd_per_device_hour('cpu'))


def _train(model_dir, steps: int, callback: CostCallback) -> trainer.TrainResult:
    return trainer.train(
        model_dir=str(model_dir), model_config=get_config('t5_1_1_tiny', dtype=np.float32),
        mixture_or_task_name='doa_toy', task_feature_lengths={'inputs': 32, 'targets': 4},
        train_steps=steps, batch_size=4, log_period=2, checkpoint_period=1000, eval_period=0,
        show_progress=False, callbacks=[callback])


def test_budget_cap_stops_a_real_run_with_its_checkpoint_intact(tmp_path):
    model_dir = tmp_path / 'run'
    # Compile and other time excluded: the cap is reached by step time alone.
    budget = 20e-3 * CPU_RATE / 3600                    # ~20 ms of one CPU device
    cb = CostCallback(budget_usd=budget, include_compile=False, include_other=False)
    result = _train(model_dir, 400, cb)
    assert result.reason == 'stopped' and 0 < result.step < 400 and cb.stopped_at == result.step
    ledger = Ledger(model_dir)
    s = ledger.stage_summary('run', 'train')
    assert s.end_reason == 'stopped' and s.last_step == result.step
    assert s.device_kind == jax.devices()[0].device_kind
    assert s.compile_seconds > 0 and s.other_seconds > 0      # recorded, though not billed
    assert s.compile_usd == 0 and s.other_usd == 0
    assert ledger.spent_usd('run') >= budget
    last = ledger.counted_step_intervals('run', 'train')[-1]
    assert ledger.spent_usd('run') - last[2] * CPU_RATE / 3600 < budget   # stopped at once

    ckpt = RunCheckpointer(str(model_dir))
    assert ckpt.latest_step() == result.step
    ckpt.close()
    # The checkpoint is intact: a resumed run restores it and its ledger counts each step once.
    resumed = _train(model_dir, result.step + 4, CostCallback())
    assert resumed.reason == 'done' and resumed.step == result.step + 4
    counted = [x for f, l, _ in ledger.counted_step_intervals('run', 'train')
               for x in range(f, l + 1)]
    assert counted == list(range(1, result.step + 5))
    s = ledger.stage_summary('run', 'train')
    assert s.attempts == 2 and s.redone_usd == 0 and s.end_reason == 'done'
    assert s.other_usd > 0 and s.compile_usd > 0             # billed by default

