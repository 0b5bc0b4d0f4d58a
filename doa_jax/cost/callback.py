"""CostCallback: turns the trainer's callback protocol into ledger entries and a budget cap."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from doa_jax import run_identity
from doa_jax.callbacks import TrainerCallback, TrainPlan
from doa_jax.cost.budget import (BudgetExceededError, Estimate, Forecast, check_budget,
                                 check_cap_settings, describe_remaining, estimate_from_flops,
                                 forecast_next_stretch)
from doa_jax.cost.ledger import Ledger
from doa_jax.cost.meter import DeviceInfo, device_info, is_writer_process
from doa_jax.cost.prices import (PriceError, PriceTable, device_cost_usd, format_usd,
                                 load_prices)

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
    ledger rows and its crashed attempt's unfinished steps count as redone.

    Pre-flight: with `planned_steps` (TRAIN_STEPS), the run is refused unless `force` when its
    cost exceeds the remaining budget. First before anything compiles or is recorded, at the
    lowest cost the steps can have: their FLOPs (the trainer's plan) at the device's peak FLOP/s
    (the catalog's, or CPU_PEAK_FLOPS); again right after compiling, which is billed and has no
    price before it ran. Then at a measured speed: the given `seconds_per_step` (e.g. from a
    benchmark table, before the first step) or else the first logging interval (a short
    warm-up, checked right after it).

    At each stop check (`should_stop`, at every interval's end) it looks ahead: the run stops,
    with its checkpoint, when what is spent plus what running on to the next check would add
    (an evaluation due now, the next interval's steps at the last interval's measured seconds
    per step, the host time the last interval added) plus a reserve for the checkpoint save
    that would then end the run (the longest host time measured between two checks) exceeds
    the cap (`budget.forecast_next_stretch`). So the ledger's total stays within the cap
    whenever the measured speeds hold.

    An evaluation is billed too: before each one, the final one included, `skip_eval` skips it
    (and the trainer stops, its checkpoint saved) when what it would cost does not fit what is
    left of the cap: the last evaluation's measured seconds or, for the first, its minimum FLOPs
    (the trainer's plan) at the FLOP/s the training steps reached, at most the device's peak.
    `clock` (time.monotonic) is for tests.
    """

    def __init__(self, ledger: Ledger | str | None = None,
                 prices: PriceTable | str | None = None, run_id: str | None = None,
                 stage: str = 'train', budget_usd: float | None = None,
                 include_compile: bool = True, include_eval: bool = True,
                 include_other: bool = True, budget_scope: str = 'run',
                 device_price_fallback: str | None = None,
                 planned_steps: int | None = None, seconds_per_step: float | None = None,
                 force: bool = False, write: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
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
        self._clock = clock
        self._last_event = clock()
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self._last_interval: tuple[int, float] | None = None   # (steps, seconds), measured
        self._host_total = 0.0      # 'other' seconds so far in this attempt
        self._host_mark = 0.0       # ... at the last stop check (or compile)
        self._host_last = self._host_max = 0.0     # between the last two checks; the longest
        self.plan: TrainPlan | None = None
        self._start_step = 0
        self._eval_seconds: float | None = None      # the last evaluation's, measured
        self._flops_per_second: float | None = None  # the training steps', measured

    # ---- protocol ---------------------------------------------------------------------------
    def on_plan(self, *, plan: TrainPlan) -> None:
        self.plan = plan

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
        self._seq, self._other_seconds, self._start_step = 0, 0.0, start_step
        self._eval_seconds = self._flops_per_second = None
        self._last_interval, self.stop_reason = None, None
        self._host_total = self._host_mark = self._host_last = self._host_max = 0.0
        self._last_event = self._clock()
        self._preflight_pending = self.budget_usd is not None and self.planned_steps is not None
        # Both checks come before the attempt is recorded: a refused run leaves no ledger row.
        if self._preflight_pending:
            self._preflight_flops(start_step)
        if self._preflight_pending and self.seconds_per_step is not None:
            self._preflight(start_step, self.seconds_per_step, 'the given seconds_per_step')
        if self.write:
            self.attempt = self.ledger.begin_attempt(self.run_id, self.stage, start_step)
            log.info('cost: run %s stage %s attempt %d from step %d on %d x %s at %s/device-h; '
                     'ledger %s', self.run_id, self.stage, self.attempt, start_step,
                     self.device.count, self.device.kind, format_usd(self.usd_per_device_hour),
                     self.ledger.path)

    def on_steps_end(self, *, first_step: int, last_step: int, seconds: float) -> None:
        self._require_started('on_steps_end')
        if self.write:
            self.ledger.record_steps(self.run_id, self.stage, self.attempt, first_step,
                                     last_step, seconds, self.device.kind, self.device.count,
                                     self.usd_per_device_hour)
        self._tick(seconds)
        n = last_step - first_step + 1
        self._last_interval = (n, seconds)
        if self.plan is not None and seconds > 0:
            self._flops_per_second = self.plan.flops_per_step * n / seconds
        if self._preflight_pending:
            self._preflight(last_step, seconds / n, f'a measured warm-up of {n} step(s)')

    def on_compile(self, *, seconds: float) -> None:
        self._overhead('compile', 0, seconds, self.include_compile)
        self._host_mark = self._host_total     # start-up before it happens once, not per interval
        if self._preflight_pending and self.include_compile:
            # Compiling is billed and cannot be priced before it ran: a cap it used up is
            # refused now, before the warm-up steps.
            self._preflight_flops(self._start_step,
                                  f'Compiling the train step took {seconds:.3g} s. ')

    def on_eval_end(self, *, step: int, seconds: float) -> None:
        note = ''
        if self.write and self.attempt and self.attempt > 1 and step == self._start_step and \
                self.ledger.attempt_end_reason(self.run_id, self.stage,
                                               self.attempt - 1) == 'crashed':
            # The trainer evaluates at the step it resumed from only when an earlier attempt did
            # not finish that (final) evaluation: this one redoes it. The killed evaluation's
            # time was never recorded, so this row is the evaluation's only bill.
            note = (f'redone: attempt {self.attempt - 1} crashed before it recorded the '
                    f'evaluation at step {step}')
        self._overhead('eval', step, seconds, self.include_eval, note=note)
        self._eval_seconds = seconds

    def on_checkpoint(self, *, step: int) -> None:
        self._require_started('on_checkpoint')
        self._tick(0.0)
        self._flush_other(step)
        if self.write:
            self.ledger.record_checkpoint(self.run_id, self.stage, self.attempt, step)

    def should_stop(self, *, step: int) -> bool:
        """True when running on to the next check, and then saving, could pass the cap."""
        self._measure_host_time()
        if self.budget_usd is None:
            return False
        why = ''
        if self.write:
            forecast = self.forecast(step)
            if forecast is not None and forecast.exceeds:
                why = (f'the BUDGET_USD cap: {forecast.describe()}; the checkpoint at step {step} '
                       'is saved')
                log.warning('cost: run %s stops at step %d, before running on: %s.', self.run_id,
                            step, why)
        if not _agree_with_process_0(bool(why)):
            return False
        self.stopped_at = step
        self.stop_reason = why or 'the BUDGET_USD cap (process 0 says so; see its log)'
        return True

    def forecast(self, step: int) -> Forecast | None:
        """What running on from `step` to the next check costs, with the final save's reserve;
        None when no steps remain (the run ends at this check anyway)."""
        if self.plan is not None:
            end = self.plan.train_steps
            steps = self.plan.interval_end(step) - step
        else:   # driven without a plan: the next interval is as long as the last one
            end = self.planned_steps
            steps = self._last_interval[0] if self._last_interval else 0
            if end is not None:
                steps = min(steps, end - step)
        if end is not None and step >= end:
            return None
        first = []
        if self.plan is not None and self.include_eval and self.plan.eval_due(step):
            usd, source = self._eval_estimate()
            first.append((f'the evaluation due at step {step} ({source})', usd))
        measured_steps, measured_seconds = self._last_interval or (0, 0.0)
        host, reserve = ((self._host_last, self._host_max) if self.include_other
                         else (0.0, 0.0))
        return forecast_next_stretch(
                self.budget_usd, self.spent_usd(), steps=steps, measured_seconds=measured_seconds,
                measured_steps=measured_steps, host_seconds=host, reserve_seconds=reserve,
                device_count=self.device.count,
                usd_per_device_hour=float(self.usd_per_device_hour), first=first)

    def skip_eval(self, *, step: int, final: bool) -> str | None:
        """The cap's reason to skip the evaluation due at `step`, or None: it fits (or is not
        billed: include_eval=False)."""
        if self.budget_usd is None or not self.include_eval:
            return None
        why = ''
        if self.write:
            spent = self.spent_usd()
            usd, source = self._eval_estimate()
            # The checkpoint save that ends the run may still be writing after the evaluation.
            reserve = device_cost_usd(self._host_max, self.device.count,
                                      self.usd_per_device_hour) if self.include_other else 0.0
            if spent >= self.budget_usd or spent + usd + reserve > self.budget_usd:
                save = (f' and {format_usd(reserve)} reserved for the final checkpoint save'
                        if reserve > 0 else '')
                why = (f'the BUDGET_USD cap: it would cost {format_usd(usd)} ({source}){save}, '
                       f'more than {describe_remaining(self.budget_usd, spent)}')
        if not _agree_with_process_0(bool(why)):
            return None
        self.stopped_at = step
        return why or 'the BUDGET_USD cap cannot pay for it (process 0 says so; see its log)'

    def on_train_end(self, *, step: int, reason: str) -> None:
        self._require_started('on_train_end')
        self._tick(0.0)
        self._flush_other(step)
        if self.write:
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, reason)

    # ---- helpers ----------------------------------------------------------------------------
    def _peak_flops(self) -> float | None:
        """The device's peak FLOP/s: the higher of the trainer's (CPU_PEAK_FLOPS on CPU) and the
        price table's catalog, so that a cost at it is a lower bound; None when neither knows."""
        known = [p for p in ((self.plan and self.plan.peak_flops_per_device),
                             self.prices.peak_flops(self.device.kind)) if p]
        return max(known) if known else None

    def _preflight_flops(self, step: int, context: str = '') -> None:
        """The first check, before compiling (and again right after it, `context` saying so):
        the planned steps' FLOPs at the peak FLOP/s."""
        peak = self._peak_flops()
        if self.plan is None or peak is None or self.plan.flops_per_step <= 0:
            if not context:
                log.info('cost: no FLOP count or peak FLOP/s for %s, so the budget is first '
                         'checked after the warm-up steps.', self.device.kind)
            return
        steps = max(0, self.planned_steps - step)
        self._check(estimate_from_flops(self.plan.flops_per_step, steps, self.device.count, peak,
                                        float(self.usd_per_device_hour)),
                    in_flight=bool(context), context=context)

    def _eval_estimate(self) -> tuple[float, str]:
        """Dollars the next evaluation will cost, and where the figure comes from."""
        rate, n = self.usd_per_device_hour, self.device.count
        if self._eval_seconds is not None:
            return (device_cost_usd(self._eval_seconds, n, rate),
                    f'the last evaluation took {self._eval_seconds:.3g} s')
        peak = self._peak_flops()
        flops = self.plan.eval_flops if self.plan is not None else 0.0
        if flops <= 0 or (peak is None and self._flops_per_second is None):
            return 0.0, 'its cost is unknown before the first evaluation'
        speeds = [f for f in (self._flops_per_second, peak and peak * n) if f]
        speed = min(speeds)
        where = ('the training steps\' measured FLOP/s' if speed == self._flops_per_second
                 else 'the devices\' peak FLOP/s')
        return (device_cost_usd(flops / speed, n, rate),
                f'at least {flops:.3g} FLOPs at {speed:.3g} FLOP/s, {where}')

    def _preflight(self, step: int, seconds_per_step: float, source: str) -> None:
        """The measured check: the remaining steps at a measured (or given) speed."""
        self._preflight_pending = False
        self._check(Estimate(seconds_per_step, max(0, self.planned_steps - step),
                             self.device.count, float(self.usd_per_device_hour), source))

    def _check(self, estimate: Estimate, in_flight: bool = True, context: str = '') -> None:
        """Refuse (on every process alike) a run whose remaining steps the budget cannot pay."""
        message = ''
        if self.write:
            try:
                check_budget(estimate, self.budget_usd, self.spent_usd(in_flight), self.force)
            except BudgetExceededError as e:
                message = context + str(e)
        if _agree_with_process_0(bool(message)):
            raise BudgetExceededError(message or 'Refusing to continue: process 0 estimated '
                                      'that the run exceeds its budget (see its log).')
        log.info('cost: pre-flight estimate %s fits the budget %s.', estimate.describe(),
                 format_usd(self.budget_usd))

    def spent_usd(self, in_flight: bool = True) -> float:
        """Ledger total for this run (or the whole ledger) plus in-flight 'other' time."""
        recorded = self.ledger.spent_usd(self.run_id if self.budget_scope == 'run' else None)
        if not in_flight:
            return recorded
        in_flight = 0.0
        if self.device and self.include_other:
            pending = self._other_seconds + max(0.0, self._clock() - self._last_event)
            in_flight = device_cost_usd(pending, self.device.count, self.usd_per_device_hour)
        return recorded + in_flight

    def _tick(self, reported_seconds: float) -> None:
        """Wall-clock since the last hook that the hook did not report is 'other' time."""
        now = self._clock()
        unreported = max(0.0, now - self._last_event - reported_seconds)
        self._other_seconds += unreported
        self._host_total += unreported
        self._last_event = now

    def _measure_host_time(self) -> None:
        """At a stop check: the host time ('other') since the previous check (or compiling)."""
        if self.device is None:
            return
        now = self._host_total + max(0.0, self._clock() - self._last_event)
        self._host_last = max(0.0, now - self._host_mark)
        self._host_max = max(self._host_max, self._host_last)
        self._host_mark = now

    def _flush_other(self, step: int) -> None:
        if self._other_seconds > 0:
            self._overhead('other', step, self._other_seconds, self.include_other, tick=False)
        self._other_seconds = 0.0

    def _overhead(self, category: str, step: int, seconds: float, billable: bool,
                  tick: bool = True, note: str = '') -> None:
        self._require_started(f'on_{category}')
        if tick:
            self._tick(seconds)
        self._seq += 1
        if self.write:
            self.ledger.record_overhead(self.run_id, self.stage, self.attempt, category,
                                        self._seq, step, seconds, self.device.kind,
                                        self.device.count, self.usd_per_device_hour, billable,
                                        note)

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
