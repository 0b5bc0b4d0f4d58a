"""Study figures (matplotlib, Agg): metric against total $ with the frontier, and per-budget bars.

Infeasible points (a budget that cannot pay for the teacher, or for one chunk of pseudo-labels)
are drawn too, marked with why: crosses along the bottom of the cost plot at their budget, and a
labeled empty slot among the bars.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from doa_jax.study.frontier import Point, pareto_frontier  # noqa: E402

Band = tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]  # x, mean, lo, hi
_MARKERS = ('x', '+', '1', '4', '*')


def why_infeasible(rec: Mapping) -> str:
    """A short reason for an infeasible point's mark ('infeasible' when none was recorded)."""
    return str(rec.get('why_short') or 'infeasible')


def _budget(rec: Mapping) -> float:
    return float(rec.get('budget_usd') or rec.get('total_usd') or 0.0)


def _colors(strategies: Iterable[str]) -> dict[str, str]:
    """One color per strategy, the same in both figures."""
    return {s: f'C{i % 10}' for i, s in enumerate(sorted(set(strategies)))}


def plot_cost_metric(points: Iterable[Point], path: str, title: str = '', metric_name: str = 'metric',
                     bands: Mapping[str, Band] | None = None,
                     infeasible: Sequence[Mapping] = ()) -> str:
    """Metric vs total $ (log x), one curve per strategy, the overall frontier highlighted, each
    strategy's fitted learning curve with its uncertainty band where `bands` has one, and the
    `infeasible` records as crosses along the bottom at their budget, one marker per reason."""
    pts = list(points)
    infeasible = [r for r in infeasible if _budget(r) > 0]
    if not pts and not infeasible:
        raise ValueError(f'no points to plot into {path}; run the study first')
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors([p.strategy for p in pts] + [r['strategy'] for r in infeasible])
    for s in sorted({p.strategy for p in pts}):
        sp = sorted((p for p in pts if p.strategy == s), key=lambda p: p.cost_usd)
        ax.plot([p.cost_usd for p in sp], [p.metric for p in sp], 'o-', label=s, alpha=0.85,
                color=colors[s])
    for s, (x, mean, lo, hi) in (bands or {}).items():
        c = colors.get(s, 'gray')
        ax.plot(x, mean, ':', color=c, lw=1)
        ax.fill_between(x, lo, hi, color=c, alpha=0.12, lw=0)
    fr = pareto_frontier(pts)
    if fr:
        ax.plot([p.cost_usd for p in fr], [p.metric for p in fr], 'k--', lw=2,
                label='Pareto frontier')
        ax.scatter([p.cost_usd for p in fr], [p.metric for p in fr], s=90, facecolors='none',
                   edgecolors='k', zorder=3)
    if infeasible:
        lo, hi = ax.get_ylim() if pts else (0.0, 1.0)
        y = lo - 0.06 * (hi - lo)           # a row of marks below the lowest measured point
        reasons = sorted({why_infeasible(r) for r in infeasible})
        order = sorted(colors)
        for j, why in enumerate(reasons):
            rows = [r for r in infeasible if why_infeasible(r) == why]
            # Strategies at one budget sit side by side: a small log-x offset per strategy.
            xs = [_budget(r) * 1.04 ** (order.index(r['strategy']) - (len(order) - 1) / 2)
                  for r in rows]
            ax.scatter(xs, [y] * len(rows), marker=_MARKERS[j % len(_MARKERS)], s=70,
                       c=[colors[r['strategy']] for r in rows], zorder=3,
                       label=f'infeasible (x = budget): {why}')
        for s in sorted({r['strategy'] for r in infeasible} - {p.strategy for p in pts}):
            ax.plot([], [], 'o-', color=colors[s], label=s)   # its color, though it has no curve
        ax.set_ylim(y - 0.06 * (hi - lo), hi)
    ax.set_xscale('log')
    ax.set_xlabel('total cost ($, log scale)')
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_budget_bars(rows: Sequence[Mapping], path: str, title: str = '',
                     metric_name: str = 'metric') -> str:
    """Grouped bars: for each (N, budget), the metric each strategy reached (the paper's
    main-results figure); an infeasible point's slot holds an empty bar outline and its reason."""
    done = [r for r in rows if r.get('metric') is not None]
    infeasible = [r for r in rows if r.get('status') == 'infeasible']
    if not done and not infeasible:
        raise ValueError(f'no finished points to plot into {path}; run the study first')
    key = lambda r: (int(r.get('n_start') or 0), _budget(r))
    groups = sorted({key(r) for r in done + infeasible})
    strategies = sorted({r['strategy'] for r in done + infeasible})
    colors = _colors(strategies)
    value = {(*key(r), r['strategy']): float(r['metric']) for r in done}
    why = {(*key(r), r['strategy']): why_infeasible(r) for r in infeasible}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(strategies)) / 2), 4))
    width = 0.8 / len(strategies)
    x = np.arange(len(groups))
    top = max(value.values(), default=1.0) or 1.0
    for i, s in enumerate(strategies):
        xs = x + (i - (len(strategies) - 1) / 2) * width
        ys = [value.get((n, b, s), np.nan) for n, b in groups]
        bars = ax.bar(xs, ys, width, label=s, color=colors[s])
        ax.bar_label(bars, labels=['' if np.isnan(v) else f'{v:.1f}' for v in ys], fontsize=7,
                     padding=1)
        for xi, (n, b) in zip(xs, groups):
            if (n, b, s) in why:
                ax.bar(xi, top, width, fill=False, edgecolor=colors[s], hatch='//', lw=0.8)
                ax.text(xi, top * 0.03, f'infeasible: {why[(n, b, s)]}', rotation=90,
                        ha='center', va='bottom', fontsize=6, color=colors[s])
    ax.set_xticks(x, [f'N={n}\n+${b:g}' for n, b in groups], fontsize=8)
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
