"""What an output directory holds, recorded in the directory, so that a rerun resumes only its own
work and refuses to mix in another's.

Two things are recorded:
- a *run id*, the name of the directory's rows in a cost ledger. It is stored in the directory, so
  a moved or renamed directory keeps resuming its own rows; the directory's base name is only the
  id's default (`folder_run_id`).
- a *fingerprint*: the settings that define what the directory holds (for a MODEL_DIR the task,
  model, optimizer, seed, ...; for pseudo-labels the teacher, task and decode settings). A resume
  compares the stored fingerprint with its own and names every difference (`differences`).

Library code: no gin. The entry points add what only gin knows (e.g. the optimizer's bindings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import uuid
from typing import Any, Mapping

log = logging.getLogger(__name__)

RUN_FILE = 'run.json'    # in a MODEL_DIR: run_id, fingerprint, changes, final_evaluation_step

# Settings a resumed training run may change: they say how long or how often, not what is trained.
RESUMABLE_CHANGES = ('TRAIN_STEPS', 'BUDGET_USD', 'EVAL_PERIOD')
# Model-config fields that choose how the model is computed, not which model it is.
_EXECUTION_FIELDS = ('dtype', 'attention_impl', 'matmul_impl', 'remat_policy')


class RunConfigError(ValueError):
    """A directory holds the work of another configuration; the message lists the differences
    and the fixes (a new directory, or the override flag)."""


def describe(value: Any) -> Any:
    """A JSON value for `value`: dataclasses and mappings as objects, sequences as lists, anything
    else JSON cannot hold (dtypes, functions) as its repr, so that equal settings compare equal."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Number):
        return value.item() if hasattr(value, 'item') else value
    if isinstance(value, type):            # e.g. jnp.float32
        return value.__name__
    if isinstance(getattr(value, 'name', None), str) and hasattr(value, 'itemsize'):
        return value.name                  # a numpy dtype
    return repr(value)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
    else:
        out[prefix] = value


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                common_only: bool = False) -> list[str]:
    """'key: recorded -> current' for every setting that differs (dotted keys, sorted).

    `common_only`: compare only the top-level keys both record (an older record that lacks a key,
    or a caller that does not know one, is not a difference)."""
    if common_only:
        keys = set(recorded) & set(current)
        recorded = {k: recorded[k] for k in keys}
        current = {k: current[k] for k in keys}
    old, new = {}, {}
    _flatten(describe(dict(recorded)), '', old)
    _flatten(describe(dict(current)), '', new)
    absent = '(not set)'
    return [f'{k}: {json.dumps(old.get(k, absent))} -> {json.dumps(new.get(k, absent))}'
            for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)]


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunConfigError(f'{path} is not valid JSON ({e}). It records which run its '
                             f'directory holds; restore it, or delete it to adopt the directory '
                             f'as it is (its settings are then not checked).') from e
    if not isinstance(value, dict):
        raise RunConfigError(f'{path} holds {type(value).__name__}, not a JSON object; delete it '
                             f'to adopt the directory as it is.')
    return value


def write_json(path: str, value: Mapping[str, Any]) -> None:
    """Writes `value` to a dot-prefixed temp file, fsyncs it and renames it over `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(describe(dict(value)), f, indent=1, sort_keys=True)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def update_json(path: str, **fields: Any) -> dict:
    """Sets `fields` in the JSON object at `path` (created if absent); returns the new object."""
    value = read_json(path) or {}
    value.update(fields)
    write_json(path, value)
    return value


def stored_run_id(folder: str, file: str = RUN_FILE) -> str | None:
    """The run id recorded in `folder/file`, or None (an older directory, or none yet)."""
    record = read_json(os.path.join(folder, file))
    run_id = (record or {}).get('run_id')
    return run_id if isinstance(run_id, str) and run_id else None


def run_id_or_name(folder: str, file: str = RUN_FILE) -> str:
    """Read-only: the recorded run id, else the folder's base name (what older code used)."""
    return stored_run_id(folder, file) or os.path.basename(os.path.normpath(
            os.path.abspath(folder)))


def folder_run_id(folder: str, ledger: Any, *, file: str = RUN_FILE,
                  adopt_name: bool = False) -> str:
    """The run id recorded in `folder/file`; on first use one is chosen and recorded.

    The choice is the folder's base name when `adopt_name` (the folder holds work from before run
    ids were recorded: its ledger rows carry that name) or when `ledger` has no rows under that
    name; else the name plus a random suffix, so that a new folder named like a moved one does not
    take over the moved folder's rows."""
    recorded = stored_run_id(folder, file)
    if recorded is not None:
        return recorded
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    run_id = name
    if not adopt_name and ledger is not None and ledger.has_run(name):
        run_id = f'{name}-{uuid.uuid4().hex[:8]}'
    update_json(os.path.join(folder, file), run_id=run_id)
    return run_id


def training_fingerprint(*, mixture_or_task_name: str, model_config: Any,
                         task_feature_lengths: Mapping[str, int], batch_size: int,
                         random_seed: int, shuffle: bool, loss_normalizing_factor: Any,
                         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What defines a training run: the data, the model, the batch and the seed, plus `extra`
    (the entry point's description of the optimizer and loss, which are opaque functions here).
    How the run executes (activation dtype, kernels, mesh, microbatches) and how long it runs
    (TRAIN_STEPS, BUDGET_USD, EVAL_PERIOD) are left out: a resume may change them."""
    model = describe(model_config)
    if isinstance(model, dict):
        model = {k: v for k, v in model.items() if k not in _EXECUTION_FIELDS}
    return {'task': mixture_or_task_name, 'model': model,
            'task_feature_lengths': dict(task_feature_lengths), 'batch_size': int(batch_size),
            'random_seed': int(random_seed), 'shuffle': bool(shuffle),
            'loss_normalizing_factor': loss_normalizing_factor, **dict(extra or {})}


def check_training_fingerprint(model_dir: str, fingerprint: Mapping[str, Any],
                               resume_step: int | None, *, allow_change: bool) -> list[str]:
    """Compares `fingerprint` with the one MODEL_DIR records; returns the differences accepted.

    Nothing to resume (`resume_step` None) accepts anything. A resume with a different
    fingerprint raises RunConfigError listing the differences, unless `allow_change` (gin:
    ALLOW_CONFIG_CHANGE). A MODEL_DIR written before fingerprints were recorded is adopted.
    Read-only: `record_training_fingerprint` writes once the resume is known to work."""
    path = os.path.join(model_dir, RUN_FILE)
    recorded = (read_json(path) or {}).get('fingerprint')
    if resume_step is None:
        return []
    if not isinstance(recorded, Mapping):
        log.info('%s has no recorded run settings (written by an older doa_jax); recording this '
                 "run's settings now.", model_dir)
        return []
    diffs = differences(recorded, fingerprint, common_only=True)
    if diffs and not allow_change:
        listing = '\n  '.join(diffs)
        raise RunConfigError(
                f'MODEL_DIR {model_dir} holds a run with other settings (recorded in {path}; '
                f'its checkpoint is at step {resume_step}). Resuming it would continue that run '
                f'under these settings:\n  {listing}\n'
                f'To train this configuration, use a new MODEL_DIR (to start from that run\'s '
                f'weights: --gin.INITIAL_CHECKPOINT_PATH="\'{model_dir}\'"). To resume it with the '
                f'changed settings anyway, add --gin.ALLOW_CONFIG_CHANGE=True (gin: '
                f'train.allow_config_change). {", ".join(RESUMABLE_CHANGES)} may change on a '
                f'resume without it.')
    if diffs:
        log.warning('Resuming %s at step %d with changed settings (ALLOW_CONFIG_CHANGE): %s',
                    model_dir, resume_step, '; '.join(diffs))
    return diffs


def record_training_fingerprint(model_dir: str, fingerprint: Mapping[str, Any],
                                resume_step: int | None, diffs: list[str]) -> None:
    """Records `fingerprint` in MODEL_DIR (and the accepted `diffs` with their step). Keys only
    the record knows (e.g. the optimizer of a run started from the command line, resumed from
    Python) are kept."""
    path = os.path.join(model_dir, RUN_FILE)
    record = read_json(path) or {}
    recorded = record.get('fingerprint')
    merged = {**(recorded if isinstance(recorded, Mapping) else {}), **describe(dict(fingerprint))}
    if merged == recorded and not diffs:
        return
    changes = list(record.get('changes', []))
    if diffs:
        changes.append({'step': resume_step, 'differences': diffs})
    record.update(fingerprint=merged, changes=changes)
    write_json(path, record)
