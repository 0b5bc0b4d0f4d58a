"""`python -m doa_jax.cost report DIR [--json]`: per-stage hours and dollars from the ledgers."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Sequence

from doa_jax.cost.ledger import LEDGER_FILENAME, Ledger

_COLUMNS = [('run_id', 'run', '{}'), ('stage', 'stage', '{}'),
            ('device', 'devices', '{}'), ('steps', 'steps', '{}'),
            ('device_hours', 'device-h', '{:.4f}'), ('step_usd', 'steps $', '{:,.2f}'),
            ('redone_usd', 'redone $', '{:,.2f}'), ('overhead_usd', 'overhead $', '{:,.2f}'),
            ('compute_usd', 'infer $', '{:,.2f}'), ('labels', 'labels', '{:,}'),
            ('annotation_usd', 'labels+LLM $', '{:,.2f}'), ('total_usd', 'total $', '{:,.2f}'),
            ('status', 'status', '{}')]


def find_ledgers(directory: str) -> list[str]:
    """The ledger in DIR, or else every ledger below it (a study dir with per-run ledgers)."""
    if os.path.isfile(directory):
        return [directory]
    own = os.path.join(directory, LEDGER_FILENAME)
    if os.path.isfile(own):
        return [own]
    return sorted(glob.glob(os.path.join(directory, '**', LEDGER_FILENAME), recursive=True))


def collect(directory: str) -> dict:
    """Rows (one per ledger/run/stage) and totals, as plain JSON-ready values."""
    paths = find_ledgers(directory)
    if not paths:
        raise FileNotFoundError(
            f'no cost ledger ({LEDGER_FILENAME}) in or below {directory!r}; pass the MODEL_DIR '
            f'or study directory a run wrote its ledger to.')
    rows = []
    for path in paths:
        ledger = Ledger(path, readonly=True)
        try:
            for s in ledger.summary():
                d = s.as_dict()
                d['ledger'] = os.path.relpath(path, directory) if os.path.isdir(directory) \
                    else path
                d['device'] = f'{s.device_count} x {s.device_kind}' if s.device_count else '-'
                d['steps'] = f'{s.first_step}-{s.last_step}' if s.first_step is not None else '-'
                d['overhead_usd'] = s.compile_usd + s.eval_usd + s.other_usd
                d['annotation_usd'] = s.labels_usd + s.llm_usd
                d['status'] = s.end_reason or ('running/crashed' if s.attempts else 'recorded')
                rows.append(d)
        finally:
            ledger.close()
    totals = {k: math.fsum(r[k] for r in rows) for k in
              ('device_hours', 'step_usd', 'redone_usd', 'overhead_usd', 'compute_usd',
               'annotation_usd', 'pending_usd', 'total_usd')}
    totals['labels'] = sum(r['labels'] for r in rows)
    return {'directory': directory, 'ledgers': paths, 'rows': rows, 'totals': totals}


def _money(x: float) -> str:
    """Cents for dollar amounts; 3 significant digits below a dollar (tiny runs cost 0.00x)."""
    return f'{x:,.2f}' if x == 0 or abs(x) >= 1 else f'{x:.3g}'


def _fmt(fmt: str, value) -> str:
    return _money(value) if fmt == '{:,.2f}' else fmt.format(value)


def format_table(report: dict) -> str:
    head = [h for _, h, _ in _COLUMNS]
    body = [[_fmt(fmt, r[k]) for k, _, fmt in _COLUMNS] for r in report['rows']]
    t = report['totals']
    body.append(['TOTAL', '', '', '', f"{t['device_hours']:.4f}", _money(t['step_usd']),
                 _money(t['redone_usd']), _money(t['overhead_usd']),
                 _money(t['compute_usd']), f"{t['labels']:,}", _money(t['annotation_usd']),
                 _money(t['total_usd']), ''])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line(['-' * w for w in widths])] + [line(b) for b in body]
    if t['pending_usd']:
        out.append(f"(${t['pending_usd']:,.2f} of steps $ is above the last checkpoint of an "
                   f"unfinished run and may be redone.)")
    return '\n'.join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.cost',
                                     description='Cost ledger tools.')
    sub = parser.add_subparsers(dest='command', required=True)
    rep = sub.add_parser('report', help='per-stage device-hours and dollars')
    rep.add_argument('directory', help='run or study directory (or a ledger file)')
    rep.add_argument('--json', action='store_true', help='print JSON instead of a table')
    args = parser.parse_args(argv)
    try:
        report = collect(args.directory)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_table(report))
    return 0
