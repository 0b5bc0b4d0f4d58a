"""The study report: a table of every point, the frontier, a recommendation per budget, figures.

Infeasible points are in the table, the figures and a list of their own, each with why; the
planner's fits that the points cannot support become sentences here, not console warnings.

`write_report(study_dir)` reads results.json and writes report.md, cost_metric.png and
budget_bars.png next to it; it is what `python -m doa_jax.study report` and the end of a study run.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from doa_jax.cost.prices import format_usd
from doa_jax.study.frontier import Point, frontiers_by_strategy
from doa_jax.study.recommend import recommend
from doa_jax.study.results import atomic_write, finished_records, load_results

_COLUMNS = [('point_id', 'point', '{}'), ('strategy', 'strategy', '{}'), ('n_start', 'N', '{}'),
            ('budget_usd', 'budget', 'usd'), ('n_labels', 'gold', '{}'),
            ('n_pseudo', 'pseudo', '{}'), ('n_llm', 'LLM labels', '{}'),
            ('student_steps', 'student steps', '{}'),
            ('usd_labels', 'labels', 'usd'), ('usd_llm', 'LLM', 'usd'),
            ('usd_teacher', 'teacher', 'usd'), ('usd_pseudo_label', 'pseudo-label', 'usd'),
            ('usd_student', 'student', 'usd'), ('total_usd', 'total', 'usd'),
            ('metric', 'metric', '{:.2f}'), ('status', 'status', '{}')]


def _cell(rec: Mapping, key: str, fmt: str) -> str:
    v = rec.get(key)
    if v is None or v == '':
        return '-'
    try:
        return format_usd(v) if fmt == 'usd' else fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def results_table(records: Sequence[Mapping]) -> str:
    """A Markdown table of every point (infeasible ones included, with their status)."""
    head = '| ' + ' | '.join(h for _, h, _ in _COLUMNS) + ' |'
    sep = '|' + '|'.join('---' for _ in _COLUMNS) + '|'
    body = ['| ' + ' | '.join(_cell(r, k, f) for k, _, f in _COLUMNS) + ' |'
            for r in sorted(records, key=lambda r: (_n(r), _budget(r), r.get('strategy', '')))]
    return '\n'.join([head, sep, *body])


def points_of(records: Sequence[Mapping]) -> list[Point]:
    return [Point(r['strategy'], float(r['total_usd']), float(r['metric']), dict(r))
            for r in finished_records(list(records))]


def planner_bands(points: Sequence[Point], num: int = 60) -> tuple[dict, list[str]]:
    """(fitted saturating curves with a band, per strategy whose points support one; one
    sentence per strategy without, saying why)."""
    from doa_jax.study.planner import fit_curve
    bands, notes = {}, []
    costs = [p.cost_usd for p in points if p.cost_usd > 0]
    if not costs:
        return bands, notes
    xs = np.geomspace(min(costs), max(costs) * 2, num)
    for s in sorted({p.strategy for p in points}):
        sp = [p for p in points if p.strategy == s and p.cost_usd > 0]
        try:
            fit = fit_curve([p.cost_usd for p in sp], [p.metric for p in sp])
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as e:
            notes.append(f'No learning curve for {s}: {e}.')
            continue
        mean, lo, hi = fit.predict(xs)
        bands[s] = (xs, mean, lo, hi)
    return bands, notes


def _n(r: Mapping) -> int:
    return int(r.get('n_start') or 0)


def _budget(r: Mapping) -> float:
    """The point's budget; records written by hand may only carry their total."""
    return float(r.get('budget_usd') or r.get('total_usd') or 0.0)


def recommendations(records: Sequence[Mapping]) -> list[str]:
    """One plain-language line per (N, budget) of the grid, from the measured points."""
    lines = []
    done = finished_records(list(records))
    for n in sorted({_n(r) for r in records}):
        pts = points_of([r for r in done if _n(r) == n])
        for b in sorted({_budget(r) for r in records if _n(r) == n}):
            try:
                rec = recommend(pts, b)
            except ValueError as e:
                lines.append(f'- N={n}, budget {format_usd(b)}: no recommendation ({e}).')
                continue
            lines.append(f'- N={n}, budget {format_usd(b)}: **{rec.strategy}**. {rec.explanation}')
    return lines


def infeasible_lines(records: Sequence[Mapping]) -> list[str]:
    """One line per infeasible point: what it is and why its budget could not pay for it."""
    rows = sorted((r for r in records if r.get('status') == 'infeasible'),
                  key=lambda r: (_n(r), _budget(r), r.get('strategy', '')))
    return [f'- {r.get("point_id")} ({r.get("strategy")}, N={r.get("n_start")}, budget '
            f'{format_usd(_budget(r))}): {r.get("why") or "no reason recorded"}.' for r in rows]


def crash_lines(records: Sequence[Mapping]) -> list[str]:
    """One line per point whose stages were killed and rerun: what the crashes added."""
    rows = sorted((r for r in records if (r.get('usd_crash_overhead_measured') or 0) > 0),
                  key=lambda r: (_n(r), _budget(r), r.get('strategy', '')))
    return [f'- {r.get("point_id")}: {format_usd(r["usd_crash_overhead_measured"])}'
            for r in rows]


def _cost_lines(study_dir: str) -> str:
    """What the totals hold: the study's compute cost model and whether the student counts."""
    path = os.path.join(study_dir, 'study.json')
    settings = {}
    if os.path.exists(path):
        with open(path) as f:
            settings = json.load(f)
    about = settings.get('cost_model_description') or 'not recorded.'
    counted = ('is' if settings.get('count_student_compute') else 'is not') \
        if 'count_student_compute' in settings else 'may be'
    return (f'Compute cost model: {about} The student\'s own training ("student", "student '
            f'steps") is reported for every point and {counted} counted in the total.')


def _teacher_lines(study_dir: str, metric: str) -> list[str]:
    """What each fine-tuned teacher scored and cost (teachers/*/teacher.json)."""
    import glob
    out = []
    for path in sorted(glob.glob(os.path.join(study_dir, 'teachers', '*', 'teacher.json'))):
        with open(path) as f:
            t = json.load(f)
        score = t.get('scores', {}).get(f'task/{metric}')
        steps = f' ({t["train_steps"]} steps)' if t.get('train_steps') else ''
        out.append(f'- {t.get("model")} fine-tuned on {t.get("m")} gold labels{steps}: {metric} '
                   f'{score:.2f} for {format_usd(t.get("usd", 0.0))}' if score is not None else
                   f'- {t.get("model")} fine-tuned on {t.get("m")} gold labels{steps}: '
                   f'{format_usd(t.get("usd", 0.0))}')
    return out or ['- (no teacher in this study)']


def _describe_start(path: str | None) -> str:
    """A starting checkpoint, with what pretrained it when it is a cached pretraining run."""
    if not path:
        return 'a random initialisation (from scratch)'
    about = os.path.join(path, 'pretrained.json')
    if not os.path.exists(about):
        return path
    with open(about) as f:
        p = json.load(f)
    return (f'{path} ({p.get("model")} pretrained for {p.get("steps")} steps by `python '
            f'{" ".join(p.get("command", []))}`; a sunk cost, charged to no point)')


def start_lines(records: Sequence[Mapping]) -> list[str]:
    """Where the points' teachers and students started (results.json records it per point)."""
    students = {r.get('student_initial_checkpoint') for r in records
                if 'student_initial_checkpoint' in r}
    teachers = {r.get('teacher_initial_checkpoint') for r in records
                if 'teacher_initial_checkpoint' in r}
    if teachers == students and len(students) == 1:
        return [f'- Teacher and student started from {_describe_start(next(iter(students)))}.']
    return ([f'- Teachers started from {_describe_start(p)}.' for p in sorted(teachers, key=str)]
            + [f'- Students started from {_describe_start(p)}.'
               for p in sorted(students, key=str)])


def length_lines(records: Sequence[Mapping]) -> list[str]:
    """The feature lengths and packing the points' teachers and students trained with, and where
    the lengths came from (results.json records them per point)."""
    out = []
    for role in ('teacher', 'student'):
        seen = {}
        for r in records:
            lengths = r.get(f'{role}_feature_lengths')
            if lengths:
                seen[(int(lengths['inputs']), int(lengths['targets']),
                      str(r.get(f'{role}_lengths_source') or 'not recorded'),
                      bool(r.get(f'{role}_pack')))] = True
        for inputs, targets, source, pack in sorted(seen):
            rows = 'packed rows' if pack else 'one example per row'
            out.append(f'- {role.capitalize()}s trained with {inputs} input / {targets} target '
                       f'tokens ({source}), {rows}.')
    return out


def write_report(study_dir: str, title: str | None = None) -> dict:
    """Writes report.md and the figures; returns {'report', 'cost_metric', 'budget_bars',
    'recommendations'} (figure paths are None when there is nothing to draw)."""
    from doa_jax.study.plots import plot_budget_bars, plot_cost_metric
    records = list(load_results(study_dir).values())
    if not records:
        raise FileNotFoundError(f'no results.json in {study_dir}; run the study first '
                                '(python -m doa_jax.study --gin_file=...).')
    metric = next((r.get('metric_name') for r in records if r.get('metric_name')), 'metric')
    title = title or os.path.basename(os.path.abspath(study_dir))
    pts = points_of(records)
    infeasible = [r for r in records if r.get('status') == 'infeasible']
    figures = {'cost_metric': None, 'budget_bars': None}
    bands, fit_notes = planner_bands(pts)
    if pts or infeasible:
        figures['cost_metric'] = plot_cost_metric(
                pts, os.path.join(study_dir, 'cost_metric.png'), title, metric, bands=bands,
                infeasible=infeasible)
        figures['budget_bars'] = plot_budget_bars(
                records, os.path.join(study_dir, 'budget_bars.png'), title, metric)
    recs = recommendations(records)
    frontier = frontiers_by_strategy(pts)['overall'] if pts else []
    lines = [f'# Study report: {title}', '', f'Metric: {metric}. Costs in US dollars. '
             f'{_cost_lines(study_dir)}', '']
    starts = start_lines(records)
    if starts:
        lines += ['## Starting checkpoints', '', *starts, '']
    lengths = length_lines(records)
    if lengths:
        lines += ['## Feature lengths', '', *lengths, '']
    lines += ['## Points', '', results_table(records), '']
    if infeasible:
        lines += ['## Infeasible points (their budget cannot pay for them)', '',
                  *infeasible_lines(records), '']
    lines += ['## Pareto frontier (cheapest point for each metric level)', '']
    lines += [f'- {p.strategy} (N={p.info.get("n_start")}, budget '
              f'{format_usd(p.info.get("budget_usd") or 0)}): {p.metric:.2f} for '
              f'{format_usd(p.cost_usd)}' for p in frontier] or ['- (no finished points)']
    lines += ['', '## Teachers', '', *_teacher_lines(study_dir, metric)]
    crashes = crash_lines(records)
    if crashes:
        lines += ['', '## Crash overhead', '', 'Stages killed and rerun: what the crashes added '
                  'on the ledgers (steps redone, the killed attempts\' compile and host time). '
                  'Each point is priced by its work alone.', '', *crashes]
    lines += ['', '## Recommendation per budget', '', *recs]
    if fit_notes:
        lines += ['', '## Learning curves', '', 'The figure draws a fitted saturating curve '
                  '(metric = a - b x cost^-c) with its band per strategy where the points '
                  'support one. ' + ' '.join(fit_notes)]
    if figures['cost_metric']:
        lines += ['', '![metric vs cost](cost_metric.png)', '', '![per budget](budget_bars.png)']
    path = os.path.join(study_dir, 'report.md')
    atomic_write(path, '\n'.join(lines) + '\n')
    return {'report': path, **figures, 'recommendations': recs}
