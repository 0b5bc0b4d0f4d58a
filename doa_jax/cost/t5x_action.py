"""The cost meter as a t5x action: `python -m t5x.train` prices its device-hours into doa_jax's
cost ledger and stops at a budget.

t5x calls an action's `run(train_state, metrics_by_task)` after each stretch of training steps
(mode TRAIN) and after each evaluation (TRAIN_EVAL: teacher-forced; INFER_EVAL: decoding), and
stops training when the last call returns True. `CostAction` has that shape without importing
t5x, so gin binds it from gin_configs/t5x/runs/*.gin, one instance under all three modes:

    train_script.train.actions = @t5x_action.cost_actions()
    t5x_action.cost_actions.action = @t5x_action.CostAction()
    train_script.train.concurrent_metrics = False   # t5x runs TRAIN actions only then

What it records, per call, in the same ledger the doa_jax trainer writes (MODEL_DIR/
cost_ledger.sqlite unless `ledger` says otherwise): the steps of the stretch, priced at the
seconds t5x measured for them (`timing/seconds`) x every device of the job x $/device-hour, the
wall-clock between calls that t5x did not report (start-up, compilation, checkpoints) as 'other'
time, and at an evaluation's call the time since the previous call as 'eval' (the checkpoint
saved before it included).

The cap (`budget_usd`), with CostCallback's arithmetic (`doa_jax.cost.budget`):

- At construction, which gin does as t5x's `train` starts, before anything compiles: with the
  model's config, BATCH_SIZE and the feature lengths, the steps still to run at their lowest
  possible cost (their FLOPs at the device's peak FLOP/s, `budget.estimate_from_flops`) are
  checked against the budget (`budget.check_budget`), and a run that cannot fit is refused.
  The steps still to run are a lower bound too: TRAIN_STEPS_RELATIVE, or TRAIN_STEPS minus the
  highest step the run can start from (the latest `checkpoint_<step>` in MODEL_DIR, or the step
  in INITIAL_CHECKPOINT_PATH's name); with an initial checkpoint whose name has no step, the
  check waits for the first stretch.
- After the first stretch: the remaining steps at its measured speed.
- At every call: the run stops when what is spent plus what running on to the next point where
  it could stop would cost exceeds the cap (`budget.forecast_next_stretch`): the next stretch of
  steps at the last one's speed, the host time between calls, a reserve for the checkpoint t5x
  saves on stopping, and the evaluation that reaching that point commits t5x to (the last
  evaluation's measured seconds; the first one's cost is unknown). t5x has no hook before an
  evaluation and runs the evaluation of an epoch's end whatever a TRAIN action says, and the
  final evaluation whenever the last epoch has begun; so the action stops at the call before:
  mid-epoch, or at the evaluation call that ends the previous epoch (`eval_period`,
  `checkpoint_period`, `stats_period` give it t5x's schedule). A stop decided at an epoch's end
  is repeated at the evaluation calls after it, since t5x takes its stop flag from the last call.

t5x runs actions on process 0 only and broadcasts the decision. Time after the last call (the
final checkpoint save) goes unrecorded: the reserve keeps it within the cap.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from doa_jax.cost.budget import (FORCE_HINT, BudgetExceededError, Estimate, Forecast,
                                 check_budget, check_cap_settings, estimate_from_flops,
                                 forecast_next_stretch)
from doa_jax.cost.ledger import Ledger
from doa_jax.cost.meter import DeviceInfo, device_info, is_writer_process
from doa_jax.cost.prices import PriceError, PriceTable, device_cost_usd, format_usd, load_prices

log = logging.getLogger(__name__)

TRAIN_METRICS = 'train'     # the key t5x gives the train loop's metrics in `metrics_by_task`
ACTION_MODES = ('TRAIN', 'TRAIN_EVAL', 'INFER_EVAL')


def _host_int(value: Any) -> int:
    """An integer from a (possibly multi-host, replicated) jax array, a numpy value or an int."""
    if hasattr(value, 'addressable_data'):
        value = value.addressable_data(0)
    return int(np.asarray(value))


def _number(value: Any) -> float:
    """A metric's value: t5x hands over clu `Scalar`s (the number in `.value`)."""
    return float(np.asarray(getattr(value, 'value', value)))


def checkpoint_step(path: str | None) -> int | None:
    """The step of a t5x checkpoint (`.../checkpoint_1000000`), or of the latest one in a
    local MODEL_DIR (t5x resumes from it); None when neither names one
    (`doa_jax.checkpoints.t5x.t5x_step`, which reads only the name of a remote path)."""
    if not path:
        return None
    from doa_jax.checkpoints.t5x import t5x_step
    return t5x_step(os.path.normpath(path))


def cost_actions(action: 'CostAction',
                 others: Mapping[str, Sequence[Any]] | None = None) -> dict[str, list[Any]]:
    """t5x's `actions` mapping with one CostAction under TRAIN, TRAIN_EVAL and INFER_EVAL (it must
    see every call: t5x takes its stop flag from the last one), after any `others` of a mode."""
    return {mode: [*(others or {}).get(mode, ()), action] for mode in ACTION_MODES}


class CostAction:
    """A t5x `trainer.BaseAction` (same `run` signature and meaning) that meters the run's cost.

    `model_dir`: t5x's MODEL_DIR; the ledger goes there unless `ledger` (a path) is given, and
    the run is named after it unless `run_id` is. `budget_usd`: the cap, for this run
    (`budget_scope='run'`) or for the whole ledger ('study'). `planned_steps` / `relative_steps`:
    t5x's TRAIN_STEPS / TRAIN_STEPS_RELATIVE. `model_config` (t5x's `network.T5Config` or
    doa_jax's), `batch_size`, `feature_lengths` and `initial_checkpoint` let it refuse a run before
    compiling; `eval_period`, `checkpoint_period` and `stats_period` (t5x's) tell it when t5x
    evaluates. `peak_flops`: the device's peak FLOP/s (default: the price table's catalog).
    `prices`: a price YAML (default: the package's). `devices`: what is paid for (default: every
    device of the job, as t5x's mesh spans them all). `clock` is for tests.
    """

    def __init__(self, model_dir: str, budget_usd: float | None = None, *,
                 ledger: str | os.PathLike | None = None, prices: PriceTable | str | None = None,
                 run_id: str | None = None, stage: str = 'train',
                 planned_steps: int | None = None, relative_steps: int | None = None,
                 model_config: Any = None, batch_size: int | None = None,
                 feature_lengths: Mapping[str, int] | None = None,
                 initial_checkpoint: str | None = None, peak_flops: float | None = None,
                 eval_period: int | None = None, checkpoint_period: int | None = None,
                 stats_period: int | None = None,
                 budget_scope: str = 'run', include_eval: bool = True,
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
        self.model_dir = os.fspath(model_dir)
        self.run_id = run_id or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
        self.stage, self.budget_usd, self.budget_scope = stage, budget_usd, budget_scope
        self.planned_steps, self.relative_steps = planned_steps, relative_steps
        self.eval_period, self.checkpoint_period = eval_period or 0, checkpoint_period or 0
        self.stats_period = stats_period or 0
        self.include_eval, self.include_other, self.force = include_eval, include_other, force
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
        self._start: int | None = None
        self.attempt: int | None = None
        self._seq = 0
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self._measured: tuple[int, float] | None = None     # the last stretch: (steps, seconds)
        self._host_last = self._host_max = 0.0     # 'other' of the last call; the longest
        self._eval_step: int | None = None
        self._eval_seconds: float | None = None    # the last evaluation's (its calls' sum)
        self.lower_bound: Estimate | None = None
        if budget_usd is not None:
            self._refuse_before_compiling(model_config, batch_size, feature_lengths,
                                          initial_checkpoint, peak_flops or
                                          table.peak_flops(self.device.kind))

    # ---- t5x's call -------------------------------------------------------------------------
    def run(self, train_state: Any, metrics_by_task: Mapping[str, Mapping[str, Any]]) -> bool:
        """Records what ran since the last call; True asks t5x to stop (the budget)."""
        step = _host_int(train_state.step)
        if TRAIN_METRICS in metrics_by_task:
            return self._after_steps(step, metrics_by_task[TRAIN_METRICS])
        return self._after_eval(step)

    def _after_steps(self, step: int, metrics: Mapping[str, Any]) -> bool:
        seconds = _number(metrics['timing/seconds'])
        first = step - self._steps_run(step, metrics, seconds) + 1
        now = self._clock()
        other = max(0.0, now - self._last_time - seconds)
        self._last_time, self._last_step = now, step
        if not is_writer_process():
            return False
        preflight = self._start is None
        self._begin(first - 1)
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
        self._measured = (step - first + 1, seconds)
        if self._decide(step, evaluated=False):
            return True
        if preflight:
            self._preflight(step, seconds / (step - first + 1))
        if self.planned_steps is not None and step >= self.planned_steps:
            self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, 'done')
        return False

    def _after_eval(self, step: int) -> bool:
        """A TRAIN_EVAL or INFER_EVAL call: the evaluation at `step` (and the checkpoint saved
        before it) took the time since the last call."""
        now = self._clock()
        seconds, self._last_time = max(0.0, now - self._last_time), now
        if self._last_step is None:      # run_eval_before_training: no step has run yet
            self._last_step = step
        if not is_writer_process():
            return False
        self._begin(step)
        self._seq += 1
        self.ledger.record_overhead(self.run_id, self.stage, self.attempt, 'eval', self._seq,
                                    step, seconds, self.device.kind, self.device.count,
                                    self.usd_per_device_hour, self.include_eval)
        if self._eval_step != step:
            self._eval_step, self._eval_seconds = step, 0.0
        self._eval_seconds += seconds
        return self._decide(step, evaluated=True)

    def _begin(self, start: int) -> None:
        if self._start is not None:
            return
        self._start = start
        if self.relative_steps:       # t5x: the run ends relative_steps after its start
            self.planned_steps = start + self.relative_steps
        self.attempt = self.ledger.begin_attempt(self.run_id, self.stage, start)
        log.info('cost: t5x run %s attempt %d from step %d on %d x %s at %s/device-h; ledger %s',
                 self.run_id, self.attempt, start, self.device.count, self.device.kind,
                 format_usd(self.usd_per_device_hour), self.ledger.path)

    def _decide(self, step: int, evaluated: bool) -> bool:
        """The stop decision at this call; once taken, repeated at every later call."""
        if self.stopped_at is not None:
            return True
        forecast = self.forecast(step, evaluated)
        if forecast is None or not forecast.exceeds:
            return False
        self.stop_reason = f'the BUDGET_USD cap: {forecast.describe()}'
        log.warning('cost: run %s stops at step %d, before running on: %s.', self.run_id, step,
                    self.stop_reason)
        self.stopped_at = step
        self.ledger.end_attempt(self.run_id, self.stage, self.attempt, step, 'stopped')
        return True

    # ---- t5x's schedule ---------------------------------------------------------------------
    def _epoch(self) -> int:
        """t5x's "epoch": the steps between two points where it may save and evaluate."""
        periods = [p for p in (self.eval_period, self.checkpoint_period) if p]
        return min(periods) if periods else 2 ** 62

    def _epoch_end(self, step: int) -> int:
        """The end of the epoch that the step after `step` falls in (t5x counts epochs from the
        step it started at)."""
        n = self._epoch()
        end = self._start + ((step - self._start) // n + 1) * n
        return end if self.planned_steps is None else min(end, self.planned_steps)

    def _evaluates_at(self, step: int) -> bool:
        """Whether t5x evaluates after a TRAIN call at `step` even if the call says stop: at an
        evaluation epoch's end, and anywhere in the last epoch (its evaluation always runs)."""
        if not self.eval_period or self.planned_steps is None:
            return False
        if self._epoch_end(step - 1) == self.planned_steps:
            return True
        return step == self._epoch_end(step - 1) and (step - self._start) % self.eval_period == 0

    def _evaluates_now(self, step: int) -> bool:
        """Whether the TRAIN call at `step` ends an epoch that t5x evaluates at."""
        return (self._evaluates_at(step) and step == self._epoch_end(step - 1) and
                ((step - self._start) % self.eval_period == 0 or step == self.planned_steps))

    def forecast(self, step: int, evaluated: bool = False) -> Forecast | None:
        """What running on from the call at `step` to the next call where the run could stop
        costs, with the final save's reserve and any evaluation that commits t5x to; None
        without a cap, or when the run ends at `step` anyway. `evaluated`: the call follows an
        evaluation (the next steps start now); else it follows steps, and an evaluation t5x runs
        after them is due first."""
        if self.budget_usd is None or self._measured is None and not evaluated:
            return None
        if self.planned_steps is not None and step >= self.planned_steps:
            return None
        measured_steps, measured_seconds = self._measured or (0, 0.0)
        first = []
        if not evaluated and self._evaluates_now(step):
            first.append(self._eval_cost(f'the evaluation t5x runs now, at step {step}'))
        stretch = self.stats_period or measured_steps
        after = min(step + stretch, self._epoch_end(step)) if stretch else step
        if after > step and self._evaluates_at(after):
            # Once the run reached `after`, t5x evaluates: at that epoch's end, or in the last
            # epoch at the end of the run or at a stop before it.
            what = (f'the evaluation t5x runs at step {after}' if self._evaluates_now(after) else
                    f'the final evaluation (t5x runs it at step {after} if the run stops there)')
            first.append(self._eval_cost(what))
        host, reserve = self._host_last, self._host_max
        return forecast_next_stretch(
                self.budget_usd, self.spent_usd(), steps=after - step,
                measured_seconds=measured_seconds, measured_steps=measured_steps,
                host_seconds=host, reserve_seconds=reserve, device_count=self.device.count,
                usd_per_device_hour=float(self.usd_per_device_hour), first=first)

    def _eval_cost(self, what: str) -> tuple[str, float]:
        if not self.include_eval or self._eval_seconds is None:
            return (f'{what} (its cost is unknown before the first evaluation)', 0.0)
        return (f'{what} (the last one took {self._eval_seconds:.3g} s)',
                device_cost_usd(self._eval_seconds, self.device.count, self.usd_per_device_hour))

    # ---- the checks -------------------------------------------------------------------------
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

    def _steps_ahead(self, initial_checkpoint: str | None) -> tuple[int, str] | None:
        """The fewest steps this run can still train, and why; None when t5x's start is
        unknown before it restores (an initial checkpoint whose name has no step)."""
        if self.relative_steps:
            return self.relative_steps, f'TRAIN_STEPS_RELATIVE={self.relative_steps}'
        if self.planned_steps is None:
            return None
        starts = {'MODEL_DIR': checkpoint_step(self.model_dir)}
        if initial_checkpoint is not None and starts['MODEL_DIR'] is None:
            starts['INITIAL_CHECKPOINT_PATH'] = checkpoint_step(initial_checkpoint)
            if starts['INITIAL_CHECKPOINT_PATH'] is None:
                return None
        where, start = max(((w, s) for w, s in starts.items() if s is not None),
                           key=lambda ws: ws[1], default=('from scratch', 0))
        source = where if where == 'from scratch' else f"{where}'s checkpoint_{start}"
        return (max(0, self.planned_steps - start),
                f'TRAIN_STEPS={self.planned_steps} from step {start} ({source})')

    def _refuse_before_compiling(self, model_config: Any, batch_size: int | None,
                                 feature_lengths: Mapping[str, int] | None,
                                 initial_checkpoint: str | None, peak: float | None) -> None:
        """Refuses, before t5x compiles, a run whose steps cost more than the budget even at the
        device's peak FLOP/s (process 0 decides, every process raises)."""
        from doa_jax.cost.callback import _agree_with_process_0
        from doa_jax.flops import train_flops_per_sequence
        lacking = sorted({'inputs', 'targets'} - set(feature_lengths or {'inputs', 'targets'}))
        if lacking:
            raise ValueError(f'CostAction.feature_lengths {dict(feature_lengths)} lacks '
                             f'{", ".join(map(repr, lacking))}: it prices the run from the '
                             "encoder and decoder lengths; bind TASK_FEATURE_LENGTHS = "
                             "{'inputs': N, 'targets': M} (gin_configs/t5x/runs/finetune.gin).")
        ahead = self._steps_ahead(initial_checkpoint)
        missing = [name for name, value in (('model_config', model_config),
                                            ('batch_size', batch_size),
                                            ('feature_lengths', feature_lengths),
                                            ('peak FLOP/s', peak)) if not value]
        if missing or ahead is None:
            log.info('cost: no lower bound before compiling (%s unknown); the budget is first '
                     'checked after the first stretch of steps.',
                     ', '.join(missing) or "the start step: INITIAL_CHECKPOINT_PATH's name has "
                     'none')
            return
        steps, which = ahead
        flops = batch_size * train_flops_per_sequence(model_config, feature_lengths['inputs'],
                                                      feature_lengths['targets'])
        self.lower_bound = estimate_from_flops(flops, steps, self.device.count, peak,
                                               float(self.usd_per_device_hour))
        message = ''
        if is_writer_process():
            try:
                check_budget(self.lower_bound, self.budget_usd, self.spent_usd(), self.force)
            except BudgetExceededError as e:
                message = (f'CostAction, before t5x compiles ({which}, batch {batch_size}, '
                           f'lengths {dict(feature_lengths)}): ' +
                           str(e).replace(FORCE_HINT, 'pass --gin.t5x_action.CostAction.'
                                          'force=True'))
        if _agree_with_process_0(bool(message)):
            raise BudgetExceededError(message or 'CostAction: process 0 refused the run before '
                                      'compiling (see its log).')
        log.info('cost: lowest possible cost %s fits the budget %s.',
                 self.lower_bound.describe(), format_usd(self.budget_usd))

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
