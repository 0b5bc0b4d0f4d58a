"""results.json / results.csv with atomic writes; a point is done when its record exists."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Callable, Iterable, Mapping

FIELDS = ['point_id', 'strategy', 'n_start', 'budget_usd', 'n_labels', 'n_pseudo', 'n_llm',
          'student_steps', 'usd_labels',
          'usd_teacher', 'usd_pseudo_label', 'usd_student', 'usd_compute', 'usd_llm',
          'total_usd', 'metric_name', 'metric', 'status', 'why', 'cost_model',
          'usd_teacher_measured', 'usd_pseudo_label_measured', 'usd_student_measured',
          'usd_crash_overhead_measured']


def finished_records(records) -> list[dict]:
    """Records with a metric (infeasible points, which bought nothing, are left out)."""
    rows = records.values() if isinstance(records, dict) else records
    return [r for r in rows if r.get('status', 'done') == 'done' and r.get('metric') is not None]


def atomic_write(path: str, text: str) -> None:
    """Writes text to a temp file in the same directory and renames it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp_')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def load_results(study_dir: str) -> dict[str, dict]:
    path = os.path.join(study_dir, 'results.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {r['point_id']: r for r in json.load(f)}
    except (ValueError, KeyError) as e:
        raise ValueError(f'{path} is not a valid results file ({e}); fix or remove it and '
                         'rerun: finished points will be recomputed') from e


def save_results(study_dir: str, records: Mapping[str, dict]) -> None:
    rows = [records[k] for k in sorted(records)]
    atomic_write(os.path.join(study_dir, 'results.json'), json.dumps(rows, indent=1))
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)
    atomic_write(os.path.join(study_dir, 'results.csv'), buf.getvalue())


def run_points(study_dir: str, points: Iterable[dict],
               runner: Callable[[dict], dict]) -> tuple[list[str], list[str]]:
    """Run each point not yet recorded; record after each. Returns (ran, skipped) ids."""
    records = load_results(study_dir)
    ran, skipped = [], []
    for p in points:
        pid = p['point_id']
        if pid in records:
            skipped.append(pid)
            continue
        rec = dict(p)
        rec.update(runner(p))
        rec['total_usd'] = sum(float(rec.get(k, 0) or 0)
                               for k in ('usd_labels', 'usd_compute', 'usd_llm'))
        records[pid] = rec
        save_results(study_dir, records)
        ran.append(pid)
    return ran, skipped
