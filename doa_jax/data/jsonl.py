"""Validated reading of the paper's JSONL files (one `{"source": ..., "target": ...}` per line).

Bad lines never vanish silently: by default the first one raises a `DataError` naming file:line and
the problem; with `on_error='skip'` they are counted and listed in the returned `ReadReport`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Iterator, Sequence

import tensorflow as tf

from doa_jax import distributed

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU


class DataError(ValueError):
    """A problem in a data file, always naming file:line."""


@dataclasses.dataclass
class ReadReport:
    """What a read kept and what it skipped (skip mode), so a caller can report it."""
    path: str
    kept: int = 0
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f'{self.path}: kept {self.kept} lines, skipped {len(self.skipped)}']
        lines += [f'  {self.path}:{n}: {why}' for n, why in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f'  ... and {len(self.skipped) - 20} more')
        return '\n'.join(lines)


def _check_record(record, fields: Sequence[str], labels: Collection[str] | None,
                  label_field: str, allow_empty: Collection[str] = ()) -> str | None:
    """The problem with one parsed line, or None."""
    if not isinstance(record, dict):
        return f'expected a JSON object, got {type(record).__name__}'
    for field in fields:
        if field not in record:
            return (f'missing field {field!r} (has {sorted(record)}); every line needs '
                    f'{list(fields)}')
        value = record[field]
        if not isinstance(value, str):
            return f'field {field!r} must be a string, got {type(value).__name__}'
        if not value.strip() and field not in allow_empty:
            return f'field {field!r} is an empty string'
    if labels is not None and label_field in record:
        label = record[label_field].strip()
        if label.upper() not in {x.upper() for x in labels}:
            return f'unknown class label {label!r} in {label_field!r}; expected one of {sorted(labels)}'
    return None


def iter_jsonl(path: str, fields: Sequence[str] = ('source', 'target'), *,
               labels: Collection[str] | None = None, label_field: str = 'target',
               on_error: str = 'raise', report: ReadReport | None = None,
               allow_empty: Collection[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yields (line_number, record) for each valid line of a JSONL file (local or gs://);
    fields in `allow_empty` may be empty strings (WLP sentences without entities)."""
    if on_error not in ('raise', 'skip'):
        raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f'{path}: no such data file; run `python -m doa_jax.data download '
                                '--data_dir=...` or point DOA_DATA_DIR at the folder that holds it.')
    report = report if report is not None else ReadReport(path)
    with tf.io.gfile.GFile(path, 'r') as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                problem = 'blank line'
                record = None
            else:
                try:
                    record = json.loads(line)
                    problem = _check_record(record, fields, labels, label_field, allow_empty)
                except json.JSONDecodeError as e:
                    problem = f'malformed JSON ({e.msg} at column {e.colno})'
            if problem is None:
                report.kept += 1
                yield number, record
            elif on_error == 'raise':
                raise DataError(f"{path}:{number}: {problem}. Fix the line, or read with "
                                "on_error='skip' to count and report such lines.")
            else:
                report.skipped.append((number, problem))
    if report.skipped:
        logging.warning('%s', report.summary())


def read_jsonl(path: str, fields: Sequence[str] = ('source', 'target'), *,
               labels: Collection[str] | None = None, label_field: str = 'target',
               on_error: str = 'raise', allow_empty: Collection[str] = ()
               ) -> tuple[list[dict], ReadReport]:
    """All valid records of a file plus the report of what was skipped."""
    report = ReadReport(path)
    records = [r for _, r in iter_jsonl(path, fields, labels=labels, label_field=label_field,
                                        on_error=on_error, report=report, allow_empty=allow_empty)]
    return records, report
