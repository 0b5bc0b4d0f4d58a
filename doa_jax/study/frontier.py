"""Pareto frontier over (total $, metric) points: cheaper and better dominates."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Point:
    strategy: str
    cost_usd: float
    metric: float
    info: dict = field(default_factory=dict, compare=False, hash=False)


def pareto_frontier(points: Iterable[Point]) -> list[Point]:
    """Points no other point beats on both cost (lower) and metric (higher), by cost.

    Exact ties (same cost and metric) are all kept so no strategy is hidden arbitrarily.
    """
    pts = sorted(points, key=lambda p: (p.cost_usd, -p.metric))
    out: list[Point] = []
    best = float('-inf')
    for p in pts:
        if p.metric > best:
            out.append(p)
            best = p.metric
        elif out and p.metric == best and p.cost_usd == out[-1].cost_usd:
            out.append(p)
    return out


def frontiers_by_strategy(points: Iterable[Point]) -> dict[str, list[Point]]:
    """One frontier per strategy plus the overall one under key 'overall'."""
    pts = list(points)
    res = {s: pareto_frontier(p for p in pts if p.strategy == s)
           for s in sorted({p.strategy for p in pts})}
    res['overall'] = pareto_frontier(pts)
    return res


def within_budget(cost_usd: float, budget_usd: float) -> bool:
    """`cost_usd <= budget_usd` up to floating-point rounding: 3 labels at $0.00001 sum to
    3.0000000000000004e-05, which a $3e-05 budget pays for."""
    return cost_usd <= budget_usd * (1 + 1e-9) + 1e-15


def best_within_budget(points: Iterable[Point], budget_usd: float) -> Point | None:
    """Highest-metric point costing at most budget_usd (cheapest on ties)."""
    ok = [p for p in points if within_budget(p.cost_usd, budget_usd)]
    return max(ok, key=lambda p: (p.metric, -p.cost_usd)) if ok else None
