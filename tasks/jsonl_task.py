"""Task factories: a JSONL text-to-text task, budget slices with an unlabeled pool, and a
pseudo-labeled task from inference outputs. Files are read when a dataset is requested, never at
registration, so `import tasks` works without data."""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Collection, Mapping, Sequence

import seqio
import tensorflow as tf

from doa_jax.data import budget
from doa_jax.data.jsonl import DataError, iter_jsonl
from doa_jax.data.vocabulary import default_vocabulary

PathLike = str | os.PathLike | Callable[[], str | os.PathLike]
MetricFn = Callable[[Sequence[str], Sequence[str]], Mapping[str, float]]


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, mtime: float, fields: tuple[str, str], labels: tuple[str, ...] | None,
                 on_error: str, allow_empty_target: bool
                 ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    del mtime  # Part of the key only: an edited file is read again.
    ids, sources, targets = [], [], []
    for number, record in iter_jsonl(path, fields, labels=labels, label_field=fields[1],
                                     on_error=on_error,
                                     allow_empty=fields[1:] if allow_empty_target else ()):
        ids.append(f'{os.path.basename(path)}:{number}')
        sources.append(record[fields[0]])
        targets.append(record[fields[1]])
    return tuple(ids), tuple(sources), tuple(targets)


def load_split(path: PathLike, fields: tuple[str, str] = ('source', 'target'),
               labels: Collection[str] | None = None, on_error: str = 'raise',
               allow_empty_target: bool = False) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(ids, sources, targets) of one validated JSONL file; ids are 'file:line'."""
    path = os.fspath(path() if callable(path) else path)
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return _load_cached(path, mtime, tuple(fields), tuple(labels) if labels else None, on_error,
                        allow_empty_target)


def _to_dataset(ids: Sequence[str], inputs: Sequence[str], targets: Sequence[str]) -> tf.data.Dataset:
    as_tensor = lambda xs: tf.constant(list(xs), dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices(
            {'id': as_tensor(ids), 'inputs': as_tensor(inputs), 'targets': as_tensor(targets)})


@seqio.map_over_dataset
def withhold_targets(example: dict) -> dict:
    """Empties the targets so nothing downstream of an unlabeled pool can see gold labels."""
    return {**example, 'targets': tf.constant('', tf.string)}


def _add_task(name: str, dataset_fn, splits: Sequence[str], metric_fns: Sequence[MetricFn],
              vocabulary: seqio.Vocabulary | None, overwrite: bool,
              extra_preprocessors: Sequence = ()) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f'task {name!r} is already registered; pick another name or pass '
                             'overwrite=True.')
        seqio.TaskRegistry.remove(name)
    vocab = vocabulary or default_vocabulary()
    features = {k: seqio.Feature(vocab, add_eos=True) for k in ('inputs', 'targets')}
    return seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(dataset_fn, splits=tuple(splits)),
            preprocessors=[*extra_preprocessors, seqio.preprocessors.tokenize,
                           seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos],
            output_features=features, metric_fns=list(metric_fns))


def register_jsonl_task(name: str, files: Mapping[str, PathLike], prefix: str = '',
                        metric_fns: Sequence[MetricFn] = (), *,
                        vocabulary: seqio.Vocabulary | None = None,
                        labels: Collection[str] | None = None,
                        fields: tuple[str, str] = ('source', 'target'), on_error: str = 'raise',
                        allow_empty_target: bool = False, overwrite: bool = False) -> seqio.Task:
    """Registers a text-to-text task over JSONL files, one per split: inputs = prefix + source."""
    files = dict(files)

    def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
        del shuffle_files, seed
        ids, sources, targets = load_split(files[split], fields, labels, on_error,
                                           allow_empty_target)
        return _to_dataset(ids, [prefix + s for s in sources], targets)

    return _add_task(name, dataset_fn, list(files), metric_fns, vocabulary, overwrite)


def register_budget_tasks(base_name: str, files: Mapping[str, PathLike], prefix: str,
                          sizes: Sequence[int], metric_fns: Sequence[MetricFn] = (), *,
                          seed: int = 0, pool_size: int | None = None,
                          vocabulary: seqio.Vocabulary | None = None,
                          labels: Collection[str] | None = None, on_error: str = 'raise',
                          allow_empty_target: bool = False, overwrite: bool = False) -> list[str]:
    """Registers `{base}_labeled_{N}` for each N and `{base}_unlabeled` (the pool after the largest
    N, targets withheld); evaluation splits are those of `files`. Returns the task names."""
    sizes = budget.check_sizes(sizes)
    pool_start, order_seed = sizes[-1], seed
    files = dict(files)
    eval_splits = [s for s in files if s != 'train']

    def eval_dataset(split: str) -> tf.data.Dataset:
        ids, sources, targets = load_split(files[split], ('source', 'target'), labels, on_error,
                                           allow_empty_target)
        return _to_dataset(ids, [prefix + s for s in sources], targets)

    def train_lines():
        return load_split(files['train'], ('source', 'target'), labels, on_error,
                          allow_empty_target)

    def make_labeled(size: int):
        def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
            # seqio's shuffle seed; the slice itself depends only on order_seed.
            if split != 'train':
                return eval_dataset(split)
            ids, sources, targets = train_lines()
            idx = budget.labeled_indices(len(ids), size, order_seed, pool_start,
                                         where=f'{base_name}_labeled_{size}')
            return _to_dataset([ids[i] for i in idx], [prefix + sources[i] for i in idx],
                               [targets[i] for i in idx])
        return dataset_fn

    def pool_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
        ids, sources, _ = train_lines()
        if len(ids) <= pool_start:
            raise ValueError(f'{base_name}_unlabeled: the train file has {len(ids)} lines, none left '
                             f'after the largest labeled slice ({pool_start}).')
        idx = budget.pool_indices(len(ids), pool_start, order_seed, pool_size)
        # The gold targets are never put into the pool's dataset.
        return _to_dataset([ids[i] for i in idx], [prefix + sources[i] for i in idx], [''] * len(idx))

    names = []
    for size in sizes:
        name = f'{base_name}_labeled_{size}'
        _add_task(name, make_labeled(size), ['train', *eval_splits], metric_fns, vocabulary, overwrite)
        names.append(name)
    _add_task(f'{base_name}_unlabeled', pool_fn, ['train'], (), vocabulary, overwrite,
              extra_preprocessors=[withhold_targets])
    return names + [f'{base_name}_unlabeled']


def read_pseudo_labels(infer_output_dir: str, completed_only: bool = False,
                       on_error: str = 'raise') -> tuple[list[str], list[str], list[str]]:
    """(ids, inputs, predictions) from the JSONL shards of an inference output directory."""
    shards = sorted(p for p in glob.glob(os.path.join(infer_output_dir, '*'))
                    if os.path.isfile(p) and not p.endswith('.COMPLETED'))
    if completed_only:
        shards = [p for p in shards if os.path.exists(p + '.COMPLETED')]
    if not shards:
        raise FileNotFoundError(f'{infer_output_dir}: no inference shards found'
                                f'{" with a .COMPLETED marker" if completed_only else ""}; run '
                                'inference on the unlabeled pool first.')
    ids, inputs, preds, seen = [], [], [], {}
    for shard in shards:
        # An empty prediction is a real pseudo-label (a WLP sentence without entities).
        for number, record in iter_jsonl(shard, ('input', 'prediction'), on_error=on_error,
                                         allow_empty=('prediction',)):
            if 'id' not in record:
                raise DataError(f'{shard}:{number}: missing field "id"; every line needs id, '
                                'input and prediction.')
            key = str(record['id'])
            if key in seen:
                raise DataError(f'{shard}:{number}: id {key!r} already seen at {seen[key]}; shards '
                                'overlap (delete duplicate outputs or re-run inference).')
            seen[key] = f'{shard}:{number}'
            ids.append(key)
            inputs.append(record['input'])
            preds.append(record['prediction'])
    return ids, inputs, preds


def register_pseudo_labeled_task(name: str, infer_output_dir: str, *, prefix: str = '',
                                 eval_task: str | None = None,
                                 metric_fns: Sequence[MetricFn] | None = None,
                                 completed_only: bool = False,
                                 vocabulary: seqio.Vocabulary | None = None,
                                 on_error: str = 'raise', overwrite: bool = False) -> seqio.Task:
    """Registers a task whose train split is the teacher's predictions (targets = prediction) and
    whose other splits (and metrics) come from `eval_task`. Inputs missing `prefix` get it."""
    base = seqio.get_mixture_or_task(eval_task) if eval_task else None
    eval_splits = [s for s in (base.splits if base else ()) if s != 'train']

    def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
        if split != 'train':
            return base.source.get_dataset(split=split, shuffle=False)
        ids, inputs, preds = read_pseudo_labels(infer_output_dir, completed_only, on_error)
        inputs = [x if x.startswith(prefix) else prefix + x for x in inputs]
        return _to_dataset(ids, inputs, preds)

    fns = metric_fns if metric_fns is not None else (base.metric_fns if base else ())
    return _add_task(name, dataset_fn, ['train', *eval_splits], fns, vocabulary, overwrite)
