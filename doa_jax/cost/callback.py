"""CostCallback: turns the trainer's callback protocol into ledger entries and a budget cap."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from doa_jax import run_identity
from doa_jax.callbacks import TrainerCallback
from doa_jax.cost.budget import BudgetExceededError, Estimate, check_budget, check_cap_settings
from doa_jax.cost.ledger import Ledger
from doa_jax.cost.meter import DeviceInfo, device_info, is_writer_process
from doa_jax.cost.prices import PriceError, PriceTable, device_cost_usd, load_prices

log = logging.getLogger(__name__)


class CostCallback(TrainerCallback):
    """Records device-seconds x price for one run/stage and stops the run at `budget_usd`.

    Only process 0 writes (the mesh's device count covers all hosts); every process takes the
    same should_stop decision because process 0's answer is broadcast. `budget_scope='run'` caps
    this run's spending; 'study' (alias 'ledger') caps everything in the ledger.
    Redone steps after a restart count towards the cap: that money was spent.
    Wall-clock the trainer reports in no hook (checkpoint saves, input start-up, host work between
    intervals) is recorded as 'other' overhead at each checkpoint and at the end of the run.

    Defaults suit a gin binding: `ledger=None` uses MODEL_DIR's ledger, `prices` may be a YAML
    path, `run_id=None` is the run id recorded in MODEL_DIR (`run_identity.folder_run_id`: the
    directory's name when it was first metered), so a moved or renamed MODEL_DIR resumes its own
    ledger rows and its crashed attempt's unfinished steps count as redone. Pre-flight: with
    `planned_steps` (TRAIN_STEPS), the run is refused unless `force` when its estimated cost
    exceeds the remaining budget; the speed is `seconds_per_step` (e.g. from a benchmark table,
    checked before the first step) or else measured on the first logging interval (a short
    warm-up, checked right after it).
    """

    def __init__(self, ledger: Ledger | str | None = None,
                 prices: PriceTable | str | None = None, run_id: str | None = None,
                 stage: str = 'train', budget_usd: float | None = None,
                 include_compile: bool = True, include_eval: bool = True,
                 include_other: bool = True, budget_scope: str = 'run',
                 device_price_fallback: str | None = None,
                 planned_steps: int | None = None, seconds_per_step: float | None = None,
                 force: bool = False, write: bool | None = None):
        check_cap_settings(budget_usd, budget_scope)
        self.ledger = Ledger(ledger) if isinstance(ledger, (str, os.PathLike)) else ledger
        self.prices = prices if isinstance(prices, PriceTable) else load_prices(prices)
        self.run_id, self.stage = run_id, stage
        self.planned_steps, self.seconds_per_step, self.force = planned_steps, seconds_per_step, \
            force
        self._preflight_pending = False
        self.budget_usd, self.budget_scope = budget_usd, budget_scope
        self.include_compile, self.include_eval = include_compile, include_eval
        self.include_other = include_other
        self._other_seconds = 0.0
        self.device_price_fallback = device_price_fallback
        self._write_override = write
        self.write = False
        self.device: DeviceInfo | None = None
        self.usd_per_device_hour = None
        self.attempt: int | None = None
        self._seq = 0
        self._last_event = time.monotonic()
        self.stopped_at: int | None = None

    # ---- protocol ---------------------------------------------------------------------------
    def on_train_start(self, *, model_dir: str, start_step: int, mesh: Any) -> None:
        if self.ledger is None:
            self.ledger = Ledger(model_dir)
        self.write = is_writer_process() if self._write_override is None else \
            self._write_override
        if self.run_id is None and self.write:
            # Rows of a directory metered before run ids were recorded carry its name: a resumed
            # one (start_step > 0), or any whose ledger lives inside it, adopts that name.
            inside = os.path.dirname(os.path.abspath(self.ledger.path)) == \
                os.path.abspath(model_dir)
            self.run_id = run_identity.folder_run_id(model_dir, self.ledger,
                                                     adopt_name=start_step > 0 or inside)
        elif self.run_id is None:
            self.run_id = run_identity.run_id_or_name(model_dir)
        self.device = device_info(mesh)
        # Fails before any training if the device has no price: better than an unpriced run.
        try:
            self.usd_per_device_hour = self.prices.usd_per_device_hour(
                self.device.kind, self.device_price_fallback)
        except PriceError as e:
            raise PriceError(f'CostCallback cannot price this run ({self.device.count} x '
                             f'{self.device.kind!r}), so it stops before step 0. {e}') from None
        self._seq, self._other_seconds = 0, 0.0
        if self.write:
            self.attempt = self.ledger.begin_attempt(self.run_id, self.stage, start_step)
            log.info('cost: run %s stage %s attempt %d from step %d on %d x %s at $%s/device-h; '
                     'ledger %s', self.run_id, self.stage, self.attempt, start_step,
                     self.device.count, self.device.kind, self.usd_per_device_hour,
                     self.ledger.path)
        self._last_event = time.monotonic()
        self._preflight_pending = self.budget_usd is not None and self.planned_steps is not None
        if self._preflight_pending and self.seconds_per_step is not None:
            self._preflight(start_step, self.seconds_per_step, 'the given seconds_per_step')

    def on_steps_end(self, *, first_step: int, last_step: int, seconds: float) -> None:
        self._require_started('on_steps_end')
        if self.write:
            self.ledger.record_steps(self.run_id, self.stage, self.attempt, first_step,
                                     last_step, seconds, self.device.kind, self.device.count,
                                     self.usd_per_device_hour)
        self._tick(seconds)
        if self._preflight_pending:
            n = last_step - first_step + 1
            self._preflight(last_step, seconds / n, f'a measured warm-up of {n} step(s)')

    def on_compile(self, *, seconds: float) -> None:
        self._overhead('compile', 0, seconds, self.include_compile)

    def on_eval_end(self, *, step: int, seconds: float) -> None:
        self._overhead('eval', step, seconds, self.include_eval)

    def on_checkpoint(self, *, step: int) -> None:
        self._require_started('on_checkpoint')
        self._tick(0.0)
        self._flush_other(step)
        if self.write:
            self.ledger.record_checkpoint(self.run_id, self.stage, self.attempt, step)

    def should_stop(self, *, step: int) -> bool:
        if self.budget_usd is None:
            return False
        stop = False
        if self.write:
            spent = self.spent_usd()
            stop = spent >= self.budget_usd
            if stop:
                log.warning('cost: run %s spent $%.4f of its $%.4f budget at step %d; stopping.',
                            self.run_id, spent, self.budget_usd, step)
        stop = _agree_with_process_0(stop)
        if stop:
            self.stopped_at = step
        return stop

    def on_train_end(self, *, step: int, reason: str) -> None:
        self._require_started('on_train_end')
        self._tick(0.0)
        self._flush_other(step)
        if self.write:
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, reason)

    # ---- helpers ----------------------------------------------------------------------------
    def _preflight(self, step: int, seconds_per_step: float, source: str) -> None:
        """Refuse (on every process alike) a run whose remaining steps the budget cannot pay."""
        self._preflight_pending = False
        estimate = Estimate(seconds_per_step, max(0, self.planned_steps - step),
                            self.device.count, float(self.usd_per_device_hour), source)
        message = ''
        if self.write:
            try:
                check_budget(estimate, self.budget_usd, self.spent_usd(), self.force)
            except BudgetExceededError as e:
                message = str(e)
        if _agree_with_process_0(bool(message)):
            raise BudgetExceededError(message or 'Refusing to continue: process 0 estimated '
                                      'that the run exceeds its budget (see its log).')
        log.info('cost: pre-flight estimate %s fits the budget $%.2f.', estimate.describe(),
                 self.budget_usd)

    def spent_usd(self) -> float:
        """Ledger total for this run (or the whole ledger) plus in-flight 'other' time."""
        recorded = self.ledger.spent_usd(self.run_id if self.budget_scope == 'run' else None)
        in_flight = 0.0
        if self.device and self.include_other:
            pending = self._other_seconds + max(0.0, time.monotonic() - self._last_event)
            in_flight = device_cost_usd(pending, self.device.count, self.usd_per_device_hour)
        return recorded + in_flight

    def _tick(self, reported_seconds: float) -> None:
        """Wall-clock since the last hook that the hook did not report is 'other' time."""
        now = time.monotonic()
        self._other_seconds += max(0.0, now - self._last_event - reported_seconds)
        self._last_event = now

    def _flush_other(self, step: int) -> None:
        if self._other_seconds > 0:
            self._overhead('other', step, self._other_seconds, self.include_other, tick=False)
        self._other_seconds = 0.0

    def _overhead(self, category: str, step: int, seconds: float, billable: bool,
                  tick: bool = True) -> None:
        self._require_started(f'on_{category}')
        if tick:
            self._tick(seconds)
        self._seq += 1
        if self.write:
            self.ledger.record_overhead(self.run_id, self.stage, self.attempt, category,
                                        self._seq, step, seconds, self.device.kind,
                                        self.device.count, self.usd_per_device_hour, billable)

    def _require_started(self, hook: str) -> None:
        if self.device is None:
            raise RuntimeError(f'CostCallback.{hook} called before on_train_start; the trainer '
                               f'must call on_train_start(model_dir=, start_step=, mesh=) first.')


def _agree_with_process_0(flag: bool) -> bool:
    """Every host must stop together, or the others hang in the next collective."""
    import jax
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))
