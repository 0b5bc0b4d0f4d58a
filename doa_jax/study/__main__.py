"""`python -m doa_jax.study --gin_file=gin_configs/studies/quickstart.gin --gin.STUDY_DIR=...`
runs a study; `python -m doa_jax.study report STUDY_DIR` and `... plan --results=...` read one.

gin binds `doa_jax.study(...)`, `StageConfig` (scoped `teacher/` and `student/`),
`ComputeCostModel` (how compute is priced) and the data sources (`synthetic_wlp`,
`paper_dataset`), all registered in doa_jax.gin_utils.configurables; the logic is
doa_jax.study.runner.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from doa_jax.cost.prices import format_usd
from doa_jax.study.frontier import frontiers_by_strategy
from doa_jax.study.results import load_results


def _report(args: argparse.Namespace) -> int:
    from doa_jax.study.report import points_of, write_report
    recs = load_results(args.study_dir)
    if not recs:
        print(f'no results.json in {args.study_dir}; run the study first', file=sys.stderr)
        return 2
    for name, fr in frontiers_by_strategy(points_of(list(recs.values()))).items():
        print(name + ': ' + ', '.join(f'{format_usd(p.cost_usd)}->{p.metric:.3f}' for p in fr))
    out = write_report(args.study_dir)
    print('\n'.join(out['recommendations']))
    print('\n'.join(str(out[k]) for k in ('report', 'cost_metric', 'budget_bars') if out[k]))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import os

    from doa_jax.study.planner import fit_curve
    from doa_jax.study.report import points_of
    recs = list(load_results(os.path.dirname(args.results) or '.').values()) \
        if os.path.basename(args.results) == 'results.json' else []
    if not recs:
        print(f'--results={args.results} must name an existing results.json', file=sys.stderr)
        return 2
    pts = points_of(recs)
    for b in args.budgets:
        best = None
        for s in sorted({p.strategy for p in pts}):
            sp = [p for p in pts if p.strategy == s]
            try:
                fit = fit_curve([p.cost_usd for p in sp], [p.metric for p in sp])
            except (ValueError, RuntimeError) as e:
                print(f'{s}: not fitted ({e})')
                continue
            m, lo, hi = (float(v[0]) for v in fit.predict([b]))
            if best is None or m > best[1]:
                best = (s, m, lo, hi)
        if best:
            print(f'{format_usd(b)}: {best[0]} expected {best[1]:.3f} '
                  f'[{best[2]:.3f}, {best[3]:.3f}]')
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument('--results', required=True, help='path to a study results.json')
    p.add_argument('--budgets', type=float, nargs='+', default=[100.0, 1000.0, 10000.0])


PROG = 'python -m doa_jax.study'
SUBCOMMANDS = {'report': (_report, lambda p: p.add_argument('study_dir')),
               'plan': (_plan, _add_plan)}


def run_from_flags(argv: Sequence[str]) -> int:
    from doa_jax import distributed, gin_macros, gin_utils
    if gin_macros.FLAG in argv:   # the macros, their values and where each is set; no study
        return gin_macros.list_macros(argv, prog=PROG,
                                      example='gin_configs/studies/quickstart.gin')
    args = gin_utils.parse_flags(argv, prog=PROG, example='gin_configs/studies/quickstart.gin',
                                 description='Run a distill-or-annotate budget study.')
    gin_utils.setup_logging()
    distributed.hide_gpus_from_tensorflow()
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    sources = gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    gin_utils.check_entry_bindings('study', sources)
    gin_utils.check_path('study.study_dir', sources)
    # Before anything compiles: the study's teachers and students (same shapes, again and
    # again) share STUDY_DIR/compilation_cache (COMPILATION_CACHE_DIR; '' turns it off).
    from doa_jax import compilation_cache
    cache_dir = gin_utils.macro_value('COMPILATION_CACHE_DIR')
    compilation_cache.configure(cache_dir, os.path.join(
            gin_utils.bound_value('study.study_dir', sources).value, 'points'))
    out = gin_utils.CONFIGURABLE['study']()
    print('\n'.join(['', 'Recommendation per budget:', *out['recommendations'], '',
                     f'Report: {out["report"]}'] +
                    [f'Figure: {out[k]}' for k in ('cost_metric', 'budget_bars') if out[k]]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog=PROG)
        sub = parser.add_subparsers(dest='cmd', required=True)
        for name, (fn, add) in SUBCOMMANDS.items():
            add(sub.add_parser(name))
        args = parser.parse_args(argv)
        return SUBCOMMANDS[args.cmd][0](args)
    if not argv or argv[0] in ('-h', '--help'):
        print('usage: python -m doa_jax.study --gin_file=gin_configs/studies/quickstart.gin '
              "--gin.STUDY_DIR=\"'/tmp/study'\"   (run a study)\n"
              '       python -m doa_jax.study --gin_file=... --list_macros   (its macros, '
              'their values and where each is set)\n'
              '       python -m doa_jax.study report STUDY_DIR\n'
              '       python -m doa_jax.study plan --results=STUDY_DIR/results.json '
              '--budgets 10 100')
        return 0 if argv else 2
    return run_from_flags(argv)


if __name__ == '__main__':
    from doa_jax.gin_utils import run_cli
    sys.exit(run_cli(main, PROG))
