"""Budget grid: for each extra budget B, how many labels or unlabeled examples it buys."""
from __future__ import annotations

from dataclasses import dataclass

from doa_jax.cost.prices import PriceTable, default_prices


@dataclass(frozen=True)
class ComputeModel:
    """Seconds per example per stage (benchmark table or measured), devices, device kind."""
    sec_teacher_label: float
    sec_student_train: float
    device_count: int = 1
    device_kind: str = 'A100'


def annotate_point(task: str, n_start: int, budget_usd: float,
                   prices: PriceTable | None = None) -> dict:
    per_label = float((prices or default_prices()).usd_per_label(task))
    extra = int(budget_usd / per_label + 1e-9)
    return {'point_id': f'annotate_N{n_start}_B{budget_usd:g}', 'strategy': 'annotate',
            'n_labels': n_start + extra, 'budget_usd': budget_usd,
            'usd_labels': extra * per_label}


def distill_point(n_start: int, budget_usd: float, compute: ComputeModel,
                  prices: PriceTable | None = None, label_fraction: float = 0.0,
                  task: str | None = None) -> dict:
    """Unlabeled examples the compute share buys; label_fraction>0 gives the mixed strategy."""
    if not 0.0 <= label_fraction <= 1.0:
        raise ValueError(f'label_fraction must be in [0, 1], got {label_fraction}')
    p = prices or default_prices()
    rate = float(p.usd_per_device_hour(compute.device_kind)) * compute.device_count / 3600.0
    usd_per_example = (compute.sec_teacher_label + compute.sec_student_train) * rate
    extra_labels, usd_labels = 0, 0.0
    if label_fraction > 0:
        if task is None:
            raise ValueError('a mixed point (label_fraction > 0) needs task= for its $/label')
        per_label = float(p.usd_per_label(task))
        extra_labels = int(budget_usd * label_fraction / per_label + 1e-9)
        usd_labels = extra_labels * per_label
    n_unlabeled = int((budget_usd - usd_labels) / usd_per_example + 1e-9) if usd_per_example > 0 else 0
    strategy = 'mixed' if label_fraction > 0 else 'distill'
    return {'point_id': f'{strategy}_N{n_start}_B{budget_usd:g}_f{label_fraction:g}',
            'strategy': strategy, 'n_labels': n_start + extra_labels, 'n_unlabeled': n_unlabeled,
            'budget_usd': budget_usd, 'usd_labels': usd_labels,
            'usd_compute': n_unlabeled * usd_per_example}
