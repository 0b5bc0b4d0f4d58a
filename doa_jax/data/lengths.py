"""Feature lengths measured from a task's data, recorded per task and vocabulary.

One TASK_FEATURE_LENGTHS for every task pads FEVER's 2-token labels to the length of WLP's entity
lists. Each task instead records the lengths measured from its own data (`measure`, or
`python -m doa_jax.data lengths`), per vocabulary, since token counts depend on it; a run whose
TASK_FEATURE_LENGTHS is None takes them (`resolve`). Lengths count the tokens a seqio task emits
(the "<task>: " prefix and the EOS included), rounded up to a multiple of 8.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Mapping, Sequence

import numpy as np

FEATURES = ('inputs', 'targets')
ROUND_TO = 8
# (task name, vocabulary key) -> {'inputs': n, 'targets': m}
_RECORDED: dict[tuple[str, str], dict[str, int]] = {}


def vocabulary_key(vocabulary) -> str:
    """'byte' for seqio.ByteVocabulary; 'spm:' + the first 16 hex digits of the sha256 of the
    model for a SentencePiece vocabulary (the same model file under any path or copy)."""
    import seqio
    if isinstance(vocabulary, seqio.ByteVocabulary):
        return 'byte'
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return 'spm:' + hashlib.sha256(vocabulary.sp_model).hexdigest()[:16]
    return f'{type(vocabulary).__name__}:{vocabulary.vocab_size}'


def record(task_names: str | Sequence[str], vocabulary_key: str,
           lengths: Mapping[str, int]) -> None:
    """Records measured lengths for tasks (e.g. a dataset's task and its budget slices)."""
    missing = [k for k in FEATURES if k not in lengths]
    if missing:
        raise ValueError(f'Feature lengths {dict(lengths)} lack {missing}.')
    for name in [task_names] if isinstance(task_names, str) else task_names:
        _RECORDED[(name, vocabulary_key)] = {k: int(lengths[k]) for k in FEATURES}


def inherit(task_name: str, source_task: str | None) -> None:
    """`task_name` takes every length recorded for `source_task` (a task made from its data,
    e.g. pseudo-labels of its inputs), replacing what it had (None: it keeps none)."""
    for key in [k for k in _RECORDED if k[0] == task_name]:
        del _RECORDED[key]
    for (name, vocab), lengths in list(_RECORDED.items()):
        if name == source_task:
            _RECORDED[(task_name, vocab)] = dict(lengths)


def recorded(task_name: str, vocabulary) -> dict[str, int] | None:
    """The lengths recorded for `task_name` under `vocabulary`, or None."""
    if not any(name == task_name for name, _ in _RECORDED):
        return None    # skips the vocabulary key (it loads a SentencePiece model)
    found = _RECORDED.get((task_name, vocabulary_key(vocabulary)))
    return dict(found) if found else None


def resolve(task_name: str, given: Mapping[str, int] | None,
            default: Mapping[str, int] | None = None, vocabulary=None) -> dict[str, int]:
    """`given` (TASK_FEATURE_LENGTHS) when set; else the lengths recorded for the task and its
    vocabulary; else `default` (DEFAULT_FEATURE_LENGTHS); else an error that says what to set."""
    return resolve_with_source(task_name, given, default, vocabulary)[0]


def resolve_with_source(task_name: str | None, given: Mapping[str, int] | None,
                        default: Mapping[str, int] | None = None, vocabulary=None
                        ) -> tuple[dict[str, int], str]:
    """`resolve`, and where the lengths came from: 'TASK_FEATURE_LENGTHS', 'measured for <task>
    (<vocabulary key>)' or 'DEFAULT_FEATURE_LENGTHS'. `vocabulary` is the task's (default: the
    registered task's own); the memory gate passes a study's without registering its data."""
    if given is not None:
        return dict(given), 'TASK_FEATURE_LENGTHS'
    if vocabulary is None and task_name is not None:
        from doa_jax import train_data
        task = train_data.get_task(task_name)
        vocabulary = task.output_features['targets'].vocabulary
    found = recorded(task_name, vocabulary) if task_name and vocabulary is not None else None
    if found is not None:
        key = vocabulary_key(vocabulary)
        logging.info('TASK_FEATURE_LENGTHS=%s: measured for %s (vocabulary %s).', found,
                     task_name, key)
        return found, f'measured for {task_name} ({key})'
    how = (f'measure them with `python -m doa_jax.data lengths {task_name}` (and --vocabulary, '
           '--module as the run uses)')
    if default is not None:
        logging.info('TASK_FEATURE_LENGTHS=%s (DEFAULT_FEATURE_LENGTHS): none are recorded for %s '
                     'with its vocabulary; %s and set TASK_FEATURE_LENGTHS.', dict(default),
                     task_name, how)
        return dict(default), 'DEFAULT_FEATURE_LENGTHS'
    raise ValueError(f'TASK_FEATURE_LENGTHS is None and no lengths are recorded for '
                     f'{task_name!r} with its vocabulary; {how}, then set '
                     "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': N, 'targets': M}\".")


def round_up(n: float, multiple: int = ROUND_TO) -> int:
    return int(multiple * math.ceil(n / multiple))


def measure(task_name: str, splits: Sequence[str] = ('train', 'validation'),
            percentile: float = 99.9) -> dict:
    """Token counts of a registered task's examples over `splits` (those it has): per feature
    the count, max, mean and `percentile`, and `lengths`: that percentile rounded up to a
    multiple of 8. Reads every example once, unshuffled, through the task's preprocessors; a
    split whose data file is missing is left out (`splits` in the result names those read)."""
    from doa_jax import train_data
    task = train_data.get_task(task_name)
    present = [s for s in splits if s in task.splits]
    if not present:
        raise ValueError(f'{task_name} has none of the splits {list(splits)} (it has '
                         f'{sorted(task.splits)}).')
    counts: dict[str, list[int]] = {k: [] for k in FEATURES}
    read = []
    for split in present:
        try:
            ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                                  use_cached=False, trim_output_features=False)
        except FileNotFoundError as e:
            logging.warning('%s: split %s left out: %s', task_name, split, e)
            continue
        ds = ds.map(lambda ex: {k: _size(ex[k]) for k in FEATURES})
        for ex in ds.as_numpy_iterator():
            for k in FEATURES:
                counts[k].append(int(ex[k]))
        read.append(split)
    if not read:
        raise FileNotFoundError(f'{task_name}: no data file of the splits {present} was found.')
    stats: dict = {'task': task_name, 'splits': read,
                   'vocabulary': vocabulary_key(task.output_features['targets'].vocabulary),
                   'percentile': percentile, 'examples': len(counts['inputs'])}
    lengths = {}
    for k in FEATURES:
        x = np.asarray(counts[k])
        p = float(np.percentile(x, percentile))
        stats[k] = {'max': int(x.max()), 'mean': round(float(x.mean()), 1), f'p{percentile:g}': p}
        lengths[k] = round_up(p)
    stats['lengths'] = lengths
    return stats


def _size(x):
    import tensorflow as tf
    return tf.size(x)
