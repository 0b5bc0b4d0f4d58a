"""A plain-language recommendation per budget from measured study points."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from doa_jax.cost.prices import format_usd
from doa_jax.study.frontier import Point, best_within_budget


@dataclass
class Recommendation:
    budget_usd: float
    strategy: str
    expected_metric: float
    cost_usd: float
    explanation: str


def recommend(points: Iterable[Point], budget_usd: float) -> Recommendation:
    pts = list(points)
    best = best_within_budget(pts, budget_usd)
    if best is None:
        cheapest = min((p.cost_usd for p in pts), default=None)
        raise ValueError(f'no measured point fits a {format_usd(budget_usd)} budget (cheapest is '
                         f'{format_usd(cheapest) if cheapest is not None else "none"}); raise the '
                         'budget or run cheaper points')
    others = [best_within_budget([p for p in pts if p.strategy == s], budget_usd)
              for s in sorted({p.strategy for p in pts}) if s != best.strategy]
    alt = '; '.join(f'{o.strategy} reaches {o.metric:.1f} for {format_usd(o.cost_usd)}'
                    for o in others if o)
    text = (f'With {format_usd(budget_usd)}, {best.strategy} gives the best measured metric '
            f'({best.metric:.1f}) for {format_usd(best.cost_usd)}.'
            + (f' By comparison, {alt}.' if alt else ''))
    return Recommendation(budget_usd, best.strategy, best.metric, best.cost_usd, text)
