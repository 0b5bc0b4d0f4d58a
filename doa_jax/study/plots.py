"""Study figures (matplotlib, Agg): metric against total $ with the frontier, and per-budget bars."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from doa_jax.study.frontier import Point, pareto_frontier  # noqa: E402

Band = tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]  # x, mean, lo, hi


def plot_cost_metric(points: Iterable[Point], path: str, title: str = '', metric_name: str = 'metric',
                     bands: Mapping[str, Band] | None = None) -> str:
    """Metric vs total $ (log x), one curve per strategy, the overall frontier highlighted, and
    each strategy's fitted learning curve with its uncertainty band where `bands` has one."""
    pts = list(points)
    if not pts:
        raise ValueError(f'no points to plot into {path}; run the study first')
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for i, s in enumerate(sorted({p.strategy for p in pts})):
        sp = sorted((p for p in pts if p.strategy == s), key=lambda p: p.cost_usd)
        line, = ax.plot([p.cost_usd for p in sp], [p.metric for p in sp], 'o-', label=s, alpha=0.85)
        colors[s] = line.get_color()
    for s, (x, mean, lo, hi) in (bands or {}).items():
        c = colors.get(s, 'gray')
        ax.plot(x, mean, ':', color=c, lw=1)
        ax.fill_between(x, lo, hi, color=c, alpha=0.12, lw=0)
    fr = pareto_frontier(pts)
    ax.plot([p.cost_usd for p in fr], [p.metric for p in fr], 'k--', lw=2, label='Pareto frontier')
    ax.scatter([p.cost_usd for p in fr], [p.metric for p in fr], s=90, facecolors='none',
               edgecolors='k', zorder=3)
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
    main-results figure); infeasible points are left empty."""
    rows = [r for r in rows if r.get('metric') is not None]
    if not rows:
        raise ValueError(f'no finished points to plot into {path}; run the study first')
    key = lambda r: (int(r.get('n_start') or 0),
                     float(r.get('budget_usd') or r.get('total_usd') or 0.0))
    groups = sorted({key(r) for r in rows})
    strategies = sorted({r['strategy'] for r in rows})
    value = {(*key(r), r['strategy']): float(r['metric']) for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(strategies)) / 2), 4))
    width = 0.8 / len(strategies)
    x = np.arange(len(groups))
    for i, s in enumerate(strategies):
        ys = [value.get((n, b, s), np.nan) for n, b in groups]
        bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * width, ys, width, label=s)
        ax.bar_label(bars, fmt='%.1f', fontsize=7, padding=1)
    ax.set_xticks(x, [f'N={n}\n+${b:g}' for n, b in groups], fontsize=8)
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
