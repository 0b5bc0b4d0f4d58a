"""The cost meter as a t5x action: `python -m t5x.train` prices its device-hours into doa_jax's
cost ledger and stops at a budget.

t5x calls an action's `run(train_state, metrics_by_task)` after each stretch of training steps
(`actions={'TRAIN': [...]}` on its `train`) and stops training, with a checkpoint, when one
returns True. `CostAction` has that shape without importing t5x, so gin binds it from
gin_configs/t5x/runs/*.gin:

    train_script.train.actions = {'TRAIN': [@t5x_action.CostAction()]}
    train_script.train.concurrent_metrics = False   # t5x runs TRAIN actions only then

What it records, per call, in the same ledger the doa_jax trainer writes (MODEL_DIR/
cost_ledger.sqlite unless `ledger` says otherwise): the steps of the stretch, priced at the
seconds t5x measured for them (`timing/seconds`) x every device of the job x $/device-hour, and
the wall-clock between calls that t5x did not report (start-up, compilation, checkpoints, evals)
as 'other' time. The run stops before the next stretch when the ledger's total plus what that
stretch would add (its steps at the last stretch's speed, the host time between calls as in the
last stretch) plus a reserve for the checkpoint t5x saves on stopping (the longest host time
between two calls after the first) would pass `budget_usd`, the arithmetic CostCallback uses
(`budget.forecast_next_stretch`); near `planned_steps` only the steps left are ahead. With
`planned_steps` (TRAIN_STEPS, t5x's absolute step) or `relative_steps` (TRAIN_STEPS_RELATIVE,
which wins as in t5x) the cost of the remaining steps, at the first stretch's speed, is checked
against the budget first, as doa_jax's CostCallback does. t5x runs actions on process 0 only and broadcasts the
decision. Time after the last call (the final checkpoint and eval) goes unrecorded: t5x calls no
action after them, so the reserve keeps it within the cap without appearing in the ledger.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from doa_jax.cost.budget import (FORCE_HINT, BudgetExceededError, Estimate, Forecast,
                                 check_budget, check_cap_settings, forecast_next_stretch)
from doa_jax.cost.ledger import Ledger
from doa_jax.cost.meter import DeviceInfo, device_info, is_writer_process
from doa_jax.cost.prices import PriceError, PriceTable, format_usd, load_prices

log = logging.getLogger(__name__)

TRAIN_METRICS = 'train'     # the key t5x gives the train loop's metrics in `metrics_by_task`


def _host_int(value: Any) -> int:
    """An integer from a (possibly multi-host, replicated) jax array, a numpy value or an int."""
    if hasattr(value, 'addressable_data'):
        value = value.addressable_data(0)
    return int(np.asarray(value))


def _number(value: Any) -> float:
    """A metric's value: t5x hands over clu `Scalar`s (the number in `.value`)."""
    return float(np.asarray(getattr(value, 'value', value)))


class CostAction:
    """A t5x `trainer.BaseAction` (same `run` signature and meaning) that meters the run's cost.

    `model_dir`: t5x's MODEL_DIR; the ledger goes there unless `ledger` (a path) is given, and
    the run is named after it unless `run_id` is. `budget_usd`: stop before the ledger's total
    for this run (`budget_scope='run'`) or for the whole ledger ('study') could pass it by the
    next stretch of steps and the final checkpoint save. `prices`: a price YAML (default: the
    package's). `devices`: what is paid for (default: every device of the job, as t5x's mesh
    spans them all). `clock` is for tests.
    """

    def __init__(self, model_dir: str, budget_usd: float | None = None, *,
                 ledger: str | os.PathLike | None = None, prices: PriceTable | str | None = None,
                 run_id: str | None = None, stage: str = 'train',
                 planned_steps: int | None = None, relative_steps: int | None = None,
                 budget_scope: str = 'run',
                 include_other: bool = True, device_price_fallback: str | None = None,
                 force: bool = False, devices: DeviceInfo | None = None,
                 clock: Callable[[], float] = time.monotonic):
        check_cap_settings(budget_usd, budget_scope, 'CostAction.')
        where = os.fspath(ledger if ledger is not None else model_dir)
        if '://' in where:
            raise ValueError(f'CostAction: the cost ledger needs a local or POSIX file system, '
                             f'and {where!r} is a bucket. Bind CostAction.ledger to a local '
                             f"path, e.g. --gin.t5x_action.CostAction.ledger=\"'/tmp/ledger'\".")
        self.ledger = Ledger(where)
        self.run_id = run_id or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
        self.stage, self.budget_usd, self.budget_scope = stage, budget_usd, budget_scope
        self.planned_steps, self.relative_steps = planned_steps, relative_steps
        self.include_other, self.force = include_other, force
        self.device = devices or device_info()
        table = prices if isinstance(prices, PriceTable) else load_prices(prices)
        try:   # before any training: an unpriced run is worse than none
            self.usd_per_device_hour = table.usd_per_device_hour(self.device.kind,
                                                                 device_price_fallback)
        except PriceError as e:
            raise PriceError(f'CostAction cannot price this run ({self.device.count} x '
                             f'{self.device.kind!r}). {e}') from None
        self._clock = clock
        self._last_time = clock()     # gin builds the action as t5x.train starts
        self._last_step: int | None = None
        self.attempt: int | None = None
        self._seq = 0
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self._host_last = self._host_max = 0.0     # 'other' of the last call; the longest

    def run(self, train_state: Any, metrics_by_task: Mapping[str, Mapping[str, Any]]) -> bool:
        """Records the stretch of steps that just ran; True asks t5x to stop (budget reached)."""
        if TRAIN_METRICS not in metrics_by_task:
            raise ValueError(f"CostAction prices t5x's train loop, so bind it under 'TRAIN' "
                             f"(actions={{'TRAIN': [@t5x_action.CostAction()]}}); it got the "
                             f'metrics of {sorted(metrics_by_task)} instead.')
        metrics = metrics_by_task[TRAIN_METRICS]
        step = _host_int(train_state.step)
        seconds = _number(metrics['timing/seconds'])
        first = step - self._steps_run(step, metrics, seconds) + 1
        now = self._clock()
        other = max(0.0, now - self._last_time - seconds)
        self._last_time, self._last_step = now, step
        if not is_writer_process():
            return False
        preflight = self.attempt is None
        if preflight:
            if self.relative_steps:       # t5x: the run ends relative_steps after its start
                self.planned_steps = first - 1 + self.relative_steps
            self.attempt = self.ledger.begin_attempt(self.run_id, self.stage, first - 1)
            log.info('cost: t5x run %s attempt %d from step %d on %d x %s at %s/device-h; '
                     'ledger %s', self.run_id, self.attempt, first - 1, self.device.count,
                     self.device.kind, format_usd(self.usd_per_device_hour), self.ledger.path)
        self.ledger.record_steps(self.run_id, self.stage, self.attempt, first, step, seconds,
                                 self.device.kind, self.device.count, self.usd_per_device_hour)
        if other > 0:
            self._seq += 1
            self.ledger.record_overhead(self.run_id, self.stage, self.attempt, 'other',
                                        self._seq, step, other, self.device.kind,
                                        self.device.count, self.usd_per_device_hour,
                                        self.include_other)
        if not preflight:       # the first call's other time is start-up and compiling: once
            self._host_last = other if self.include_other else 0.0
            self._host_max = max(self._host_max, self._host_last)
        forecast = self.forecast(step, step - first + 1, seconds)
        if forecast is not None and forecast.exceeds:
            self.stop_reason = f'the BUDGET_USD cap: {forecast.describe()}'
            log.warning('cost: run %s stops at step %d, before the next stretch: %s.',
                        self.run_id, step, self.stop_reason)
            self.stopped_at = step
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, 'stopped')
            return True
        if preflight:
            self._preflight(step, seconds / (step - first + 1))
        if self.planned_steps is not None and step >= self.planned_steps:
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, 'done')
        return False

    def forecast(self, step: int, steps: int, seconds: float) -> Forecast | None:
        """What a next stretch as long as the last (`steps` in `seconds`) and the final save would
        cost; None without a cap, or when t5x stops at `step` anyway (planned_steps)."""
        if self.budget_usd is None:
            return None
        ahead = steps if self.planned_steps is None else min(steps, self.planned_steps - step)
        if ahead <= 0:
            return None
        return forecast_next_stretch(
                self.budget_usd, self.spent_usd(), steps=ahead, measured_seconds=seconds,
                measured_steps=steps, host_seconds=self._host_last,
                reserve_seconds=self._host_max, device_count=self.device.count,
                usd_per_device_hour=float(self.usd_per_device_hour))

    def spent_usd(self) -> float:
        """The ledger's billable dollars for this run (the whole ledger's: budget_scope='study')."""
        return self.ledger.spent_usd(self.run_id if self.budget_scope == 'run' else None)

    def _steps_run(self, step: int, metrics: Mapping[str, Any], seconds: float) -> int:
        """Steps since the previous call; on the first, t5x's steps/second x seconds."""
        if self._last_step is not None:
            return step - self._last_step
        if 'timing/steps_per_second' not in metrics:
            raise ValueError("CostAction needs t5x's train metrics timing/seconds and "
                             f'timing/steps_per_second; got {sorted(metrics)}.')
        return max(1, round(_number(metrics['timing/steps_per_second']) * seconds))

    def _preflight(self, step: int, seconds_per_step: float) -> None:
        """Refuses a run whose remaining steps, at the first stretch's speed, exceed the budget."""
        if self.budget_usd is None or self.planned_steps is None:
            return
        estimate = Estimate(seconds_per_step, max(0, self.planned_steps - step),
                            self.device.count, float(self.usd_per_device_hour),
                            'the first stretch of t5x steps')
        try:
            check_budget(estimate, self.budget_usd, self.spent_usd(), self.force)
        except BudgetExceededError as e:
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, 'stopped')
            raise BudgetExceededError(str(e).replace(
                    FORCE_HINT, 'pass --gin.t5x_action.CostAction.force=True')) from None
        log.info('cost: pre-flight estimate %s fits the budget %s.', estimate.describe(),
                 format_usd(self.budget_usd))
