"""Metric vs total $ (log x), one curve per strategy, overall frontier highlighted."""
from __future__ import annotations

from typing import Iterable

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from doa_jax.study.frontier import Point, pareto_frontier  # noqa: E402


def plot_cost_metric(points: Iterable[Point], path: str, title: str = '') -> str:
    pts = list(points)
    if not pts:
        raise ValueError(f'no points to plot into {path}; run the study first')
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({p.strategy for p in pts}):
        sp = sorted((p for p in pts if p.strategy == s), key=lambda p: p.cost_usd)
        ax.plot([p.cost_usd for p in sp], [p.metric for p in sp], 'o-', label=s)
    fr = pareto_frontier(pts)
    ax.plot([p.cost_usd for p in fr], [p.metric for p in fr], 'k--', lw=2, label='frontier')
    ax.set_xscale('log')
    ax.set_xlabel('total $')
    ax.set_ylabel('metric')
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
