"""`python -m doa_jax.study report STUDY_DIR`: frontier table and plot from results.json.

Subcommands live in SUBCOMMANDS so a gin-driven `run` can be registered later.
"""
from __future__ import annotations

import argparse
import os
import sys

from doa_jax.study.frontier import Point, frontiers_by_strategy
from doa_jax.study.results import load_results


def _report(args: argparse.Namespace) -> int:
    recs = load_results(args.study_dir)
    if not recs:
        print(f'no results.json in {args.study_dir}; run the study first', file=sys.stderr)
        return 2
    pts = [Point(r['strategy'], float(r['total_usd']), float(r['metric'])) for r in recs.values()]
    for name, fr in frontiers_by_strategy(pts).items():
        print(name + ': ' + ', '.join(f'${p.cost_usd:.2f}->{p.metric:.3f}' for p in fr))
    from doa_jax.study.plots import plot_cost_metric
    print(plot_cost_metric(pts, os.path.join(args.study_dir, 'cost_metric.png')))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from doa_jax.study.planner import fit_curve
    recs = list(load_results(os.path.dirname(args.results) or '.').values()) \
        if os.path.basename(args.results) == 'results.json' else []
    if not recs:
        print(f'--results={args.results} must name an existing results.json', file=sys.stderr)
        return 2
    for b in args.budgets:
        best = None
        for s in sorted({r['strategy'] for r in recs}):
            rs = [r for r in recs if r['strategy'] == s]
            try:
                fit = fit_curve([float(r['total_usd']) for r in rs], [float(r['metric']) for r in rs])
            except (ValueError, RuntimeError) as e:
                print(f'{s}: not fitted ({e})')
                continue
            m, lo, hi = (float(v[0]) for v in fit.predict([b]))
            if best is None or m > best[1]:
                best = (s, m, lo, hi)
        if best:
            print(f'${b:,.0f}: {best[0]} expected {best[1]:.3f} [{best[2]:.3f}, {best[3]:.3f}]')
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument('--results', required=True, help='path to a study results.json')
    p.add_argument('--budgets', type=float, nargs='+', default=[100.0, 1000.0, 10000.0])


SUBCOMMANDS = {'report': (_report, lambda p: p.add_argument('study_dir')),
               'plan': (_plan, _add_plan)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.study')
    sub = parser.add_subparsers(dest='cmd', required=True)
    for name, (fn, add) in SUBCOMMANDS.items():
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.cmd][0](args)


if __name__ == '__main__':
    sys.exit(main())
