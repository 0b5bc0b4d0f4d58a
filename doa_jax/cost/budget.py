"""Budget caps: a pre-flight estimate that refuses runs the remaining budget cannot pay for."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Mapping, Sequence

from doa_jax.cost.prices import device_cost_usd, format_usd

FORCE_HINT = ('pass --gin.CostCallback.force=True (a --force flag where the entry point has one; '
              'Python: force=True)')


class BudgetExceededError(RuntimeError):
    """The estimated cost of a run exceeds what is left of its budget."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    seconds_per_step: float
    steps: int
    device_count: int
    usd_per_device_hour: float
    source: str          # 'warm-up (N steps)' or 'benchmark ...': where the speed came from
    lower_bound: bool = False   # the speed is the fastest possible (FLOPs at the peak FLOP/s)

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps

    @property
    def usd(self) -> float:
        return device_cost_usd(self.seconds, self.device_count, self.usd_per_device_hour)

    def describe(self) -> str:
        return (f'{format_usd(self.usd)} = '
                f'{self.seconds_per_step:.4g} s/step x {self.steps} steps x '
                f'{self.device_count} device(s) x {format_usd(self.usd_per_device_hour)}'
                f'/device-hour (speed from {self.source})')


def estimate_from_flops(flops_per_step: float, steps: int, device_count: int,
                        peak_flops_per_device: float, usd_per_device_hour: float) -> Estimate:
    """The cheapest `steps` training steps can possibly be: their FLOPs at the devices' peak
    FLOP/s. Known before anything compiles; a run whose lower bound the budget cannot pay is
    refused before it spends anything."""
    if flops_per_step <= 0 or peak_flops_per_device <= 0 or device_count <= 0:
        raise ValueError(f'flops_per_step ({flops_per_step}), peak_flops_per_device '
                         f'({peak_flops_per_device}) and device_count ({device_count}) must be '
                         'positive.')
    sps = flops_per_step / (peak_flops_per_device * device_count)
    return Estimate(sps, steps, device_count, float(usd_per_device_hour),
                    f'{flops_per_step:.4g} FLOPs/step at the peak {peak_flops_per_device:.4g} '
                    'FLOP/s per device', lower_bound=True)


def seconds_per_step_from_warmup(step_seconds: Sequence[float], skip_first: int = 1) -> float:
    """Median of measured step times, skipping the first (compilation) ones."""
    timed = list(step_seconds)[skip_first:]
    if not timed:
        raise ValueError(f'need more than {skip_first} warm-up step time(s) to estimate speed, '
                         f'got {len(step_seconds)}; run a longer warm-up.')
    return statistics.median(timed)


def estimate_from_warmup(step_seconds: Sequence[float], steps: int, device_count: int,
                         usd_per_device_hour: float, skip_first: int = 1) -> Estimate:
    """Cost of `steps` steps at the median speed of a short measured warm-up."""
    sps = seconds_per_step_from_warmup(step_seconds, skip_first)
    return Estimate(sps, steps, device_count, float(usd_per_device_hour),
                    f'warm-up ({len(step_seconds) - skip_first} timed steps)')


def estimate_from_benchmark(entry: Mapping, steps: int, batch_size: int, device_count: int,
                            usd_per_device_hour: float) -> Estimate:
    """Cost from a benchmark table row: `seconds_per_step`, or `timing/seqs_per_second` (global)."""
    if 'seconds_per_step' in entry:
        sps = float(entry['seconds_per_step'])
    elif 'timing/seqs_per_second' in entry:
        sps = batch_size / float(entry['timing/seqs_per_second'])
    else:
        raise ValueError(f'benchmark entry has neither seconds_per_step nor '
                         f'timing/seqs_per_second (keys: {sorted(entry)}); rerun '
                         f'`python -m doa_jax.benchmark` for this model and batch size.')
    name = entry.get('name', entry.get('model', 'table entry'))
    return Estimate(sps, steps, device_count, float(usd_per_device_hour), f'benchmark {name}')


BUDGET_SCOPES = ('run', 'study', 'ledger')


def check_cap_settings(budget_usd: float | None, budget_scope: str, owner: str = '') -> None:
    """The checks every cost meter (CostCallback, t5x's CostAction) makes of its cap settings;
    `owner` ('CostAction.') prefixes the setting names in the messages."""
    if budget_scope not in BUDGET_SCOPES:
        raise ValueError(f"{owner}budget_scope must be 'run' (this run's spending) or 'study' (the "
                         f"whole ledger's), got {budget_scope!r}.")
    if budget_usd is not None and budget_usd <= 0:
        raise ValueError(f'{owner}budget_usd must be positive (or None for no cap), got '
                         f'{budget_usd}; set BUDGET_USD to the dollars this run may spend.')


def describe_remaining(budget_usd: float, spent_usd: float) -> str:
    """'the remaining budget $0.0000100 (BUDGET_USD $0.0000200 - already spent $0.0000100)';
    once the spending reached the cap, 'the remaining budget, none (...)', never a negative $."""
    remaining = budget_usd - spent_usd
    if remaining <= 0:
        return (f'the remaining budget, none (BUDGET_USD {format_usd(budget_usd)}, already '
                f'spent {format_usd(spent_usd)})')
    return (f'the remaining budget {format_usd(remaining)} (BUDGET_USD {format_usd(budget_usd)}'
            f' - already spent {format_usd(spent_usd)})')


def check_budget(estimate: Estimate, budget_usd: float | None, spent_usd: float = 0.0,
                 force: bool = False) -> float:
    """Remaining budget after the run; raises BudgetExceededError unless it fits or `force`."""
    if budget_usd is None:
        return float('inf')
    remaining = budget_usd - spent_usd
    if estimate.usd > remaining and not force:
        what, lower = (('its lowest possible cost', 'TRAIN_STEPS, BATCH_SIZE or the model')
                       if estimate.lower_bound else ('estimated cost',
                                                     'TRAIN_STEPS or the device count'))
        raise BudgetExceededError(
            f'Refusing to start: {what} {estimate.describe()} exceeds '
            f'{describe_remaining(budget_usd, spent_usd)}. Lower {lower}, raise BUDGET_USD, or '
            f'{FORCE_HINT} to start anyway; the run will still stop at the cap.')
    return remaining - estimate.usd


@dataclasses.dataclass(frozen=True)
class Forecast:
    """The cap's look ahead at a stop check: what is spent, plus each cost that running on to the
    next check would add (an evaluation due now, the next stretch of steps, the host time between
    two checks), plus a reserve for the checkpoint save that would then end the run. A run that
    stops as soon as this total exceeds the cap ends within it whenever the measured speeds hold:
    the previous check left room for what the run spent since and for the save."""
    budget_usd: float
    spent_usd: float
    parts: tuple[tuple[str, float], ...]      # (what, dollars), in the order they would be spent

    @property
    def total_usd(self) -> float:
        return self.spent_usd + sum(usd for _, usd in self.parts)

    @property
    def exceeds(self) -> bool:
        return self.total_usd > self.budget_usd

    def describe(self) -> str:
        """'spent $0.0800 + $0.0200 for the next 2 step(s) (...) = $0.100, more than
        BUDGET_USD $0.0950'."""
        terms = ''.join(f' + {format_usd(usd)} for {what}' for what, usd in self.parts)
        verdict = 'more than' if self.exceeds else 'within'
        return (f'spent {format_usd(self.spent_usd)}{terms} = {format_usd(self.total_usd)}, '
                f'{verdict} BUDGET_USD {format_usd(self.budget_usd)}')


def forecast_next_stretch(budget_usd: float, spent_usd: float, *, steps: int,
                          measured_seconds: float, measured_steps: int, host_seconds: float,
                          reserve_seconds: float, device_count: int, usd_per_device_hour: float,
                          first: Sequence[tuple[str, float]] = ()) -> Forecast:
    """The forecast both cost meters (CostCallback, t5x's CostAction) stop on: `steps` more at
    the speed of the last stretch (`measured_seconds` for `measured_steps` steps), the host time
    the last stretch added beyond its steps (`host_seconds`: input, metrics, a checkpoint's
    copy), and `reserve_seconds` for the final checkpoint save; `first` is (what, dollars) spent
    before those steps, e.g. an evaluation due now."""
    def usd(seconds: float) -> float:
        return device_cost_usd(max(0.0, seconds), device_count, usd_per_device_hour)

    parts = [(what, float(d)) for what, d in first if d > 0]
    if steps > 0 and measured_steps > 0:
        sps = measured_seconds / measured_steps
        parts.append((f'the next {steps} step(s) ({sps:.3g} s/step, measured over the last '
                      f'{measured_steps})', usd(sps * steps)))
    if steps > 0 and host_seconds > 0:
        parts.append((f'host time between checks ({host_seconds:.3g} s, as in the last '
                      'stretch)', usd(host_seconds)))
    if reserve_seconds > 0:
        parts.append((f'the final checkpoint save ({reserve_seconds:.3g} s reserved, the '
                      'longest host time measured between checks)', usd(reserve_seconds)))
    return Forecast(float(budget_usd), float(spent_usd), tuple(parts))
