"""Task factories: a JSONL text-to-text task, budget slices with an unlabeled pool, and a
pseudo-labeled task from inference outputs. Files are read when a dataset is requested, never at
registration, so `import tasks` works without data."""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from doa_jax import distributed
from doa_jax.data import budget
from doa_jax.data.jsonl import DataError, iter_jsonl
from doa_jax.data.vocabulary import default_vocabulary
from tasks.prepared_source import PreparedOrJsonlSource, Slice
from tasks.sources import FiniteDataSource

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

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
              extra_preprocessors: Sequence = (), source: seqio.DataSource | None = None
              ) -> seqio.Task:
    """Registers a task over `source`, by default a FiniteDataSource over `dataset_fn(split)`."""
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f'task {name!r} is already registered; pick another name or pass '
                             'overwrite=True.')
        seqio.TaskRegistry.remove(name)
    vocab = vocabulary or default_vocabulary()
    features = {k: seqio.Feature(vocab, add_eos=True) for k in ('inputs', 'targets')}
    return seqio.TaskRegistry.add(
            name, source=source or FiniteDataSource(dataset_fn, splits=tuple(splits)),
            preprocessors=[*extra_preprocessors, seqio.preprocessors.tokenize,
                           seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos],
            output_features=features, metric_fns=list(metric_fns))


def register_jsonl_task(name: str, files: Mapping[str, PathLike], prefix: str = '',
                        metric_fns: Sequence[MetricFn] = (), *,
                        vocabulary: seqio.Vocabulary | None = None,
                        labels: Collection[str] | None = None,
                        fields: tuple[str, str] = ('source', 'target'), on_error: str = 'raise',
                        allow_empty_target: bool = False, overwrite: bool = False,
                        prepared: str | None = None) -> seqio.Task:
    """Registers a text-to-text task over JSONL files, one per split: inputs = prefix + source.

    `prepared` names a paper dataset (doa_jax.data.paper.DATASETS) whose TFDS records, where
    `data prepare` wrote them, are read instead of the files (tasks/prepared_source.py).
    """
    files = dict(files)

    def dataset_fn(split: str) -> tf.data.Dataset:
        ids, sources, targets = load_split(files[split], fields, labels, on_error,
                                           allow_empty_target)
        return _to_dataset(ids, [prefix + s for s in sources], targets)

    source = None if not prepared else PreparedOrJsonlSource(
            prepared, {s: Slice(s) for s in files}, files, dataset_fn, prefix=prefix,
            order_seed=None)     # whole splits: any stored order will do
    return _add_task(name, dataset_fn, list(files), metric_fns, vocabulary, overwrite,
                     source=source)


def register_budget_tasks(base_name: str, files: Mapping[str, PathLike], prefix: str,
                          sizes: Sequence[int], metric_fns: Sequence[MetricFn] = (), *,
                          seed: int = 0, pool_size: int | None = None,
                          vocabulary: seqio.Vocabulary | None = None,
                          labels: Collection[str] | None = None, on_error: str = 'raise',
                          allow_empty_target: bool = False, overwrite: bool = False,
                          prepared: str | None = None) -> list[str]:
    """Registers `{base}_labeled_{N}` for each N and `{base}_unlabeled` (the pool after the largest
    N, targets withheld); evaluation splits are those of `files`. Returns the task names.

    `prepared` names a paper dataset whose TFDS records, where `data prepare` wrote them with this
    `seed`, are read instead of the files: the slices are then `train[:N]` and
    `train[max N:]` of its train split, stored in this order (tasks/prepared_source.py).
    """
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
        def dataset_fn(split: str) -> tf.data.Dataset:
            # The slice depends only on order_seed (the source shuffles it by seqio's seed).
            if split != 'train':
                return eval_dataset(split)
            ids, sources, targets = train_lines()
            idx = budget.labeled_indices(len(ids), size, order_seed, pool_start,
                                         where=f'{base_name}_labeled_{size}')
            return _to_dataset([ids[i] for i in idx], [prefix + sources[i] for i in idx],
                               [targets[i] for i in idx])
        return dataset_fn

    def pool_fn(split: str) -> tf.data.Dataset:
        ids, sources, _ = train_lines()
        budget.check_pool(len(ids), pool_start, f'{base_name}_unlabeled')
        idx = budget.pool_indices(len(ids), pool_start, order_seed, pool_size)
        # The gold targets are never put into the pool's dataset.
        return _to_dataset([ids[i] for i in idx], [prefix + sources[i] for i in idx], [''] * len(idx))

    def source(fn, train: Slice | None, splits: Sequence[str], withhold: bool = False):
        if not prepared:
            return None     # the JSONL files only
        slices = {s: train if s == 'train' else Slice(s) for s in splits}
        return PreparedOrJsonlSource(prepared, slices, files, fn, prefix=prefix,
                                     order_seed=order_seed, withhold_targets=withhold)

    def labeled_slice(size: int) -> Slice:
        where = f'{base_name}_labeled_{size}'
        return Slice('train', 0, size,
                     check=lambda n: budget.check_labeled(n, size, pool_start, where))

    pool_slice = Slice('train', pool_start, None if pool_size is None else pool_start + pool_size,
                       check=lambda n: budget.check_pool(n, pool_start, f'{base_name}_unlabeled',
                                                         'prepared train split'))

    names = []
    for size in sizes:
        name = f'{base_name}_labeled_{size}'
        splits, fn = ['train', *eval_splits], make_labeled(size)
        _add_task(name, fn, splits, metric_fns, vocabulary, overwrite,
                  source=source(fn, labeled_slice(size), splits))
        names.append(name)
    _add_task(f'{base_name}_unlabeled', pool_fn, ['train'], (), vocabulary, overwrite,
              extra_preprocessors=[withhold_targets],
              source=source(pool_fn, pool_slice, ['train'], withhold=True))
    return names + [f'{base_name}_unlabeled']


# t5x.infer writes `<task>-predict.jsonl-00000-of-00001` (+ `.COMPLETED`) into its output
# directory, one line per example: {"inputs": {"inputs_pretokenized": ..., "id": ...},
# "prediction": ...} (gin_configs/t5x/runs/pseudo_label.gin asks it for the id and input text).
_T5X_SHARD = re.compile(r'-predict(_with_aux)?\.jsonl-\d{5}-of-\d{5}$')


def _is_shard(path: str) -> bool:
    """doa_jax's chunk files (*.jsonl) and t5x.infer's outputs; not t5x's config.gin or other
    files an output directory holds."""
    name = os.path.basename(path)
    return os.path.isfile(path) and (name.endswith('.jsonl') or bool(_T5X_SHARD.search(name)))


def _shard_lines(shard: str, on_error: str) -> Iterator[tuple[int, dict]]:
    """(line number, {'id'?, 'input', 'prediction', ...}) of a doa_jax or a t5x.infer shard."""
    if not _T5X_SHARD.search(shard):
        # An empty prediction is a real pseudo-label (a WLP sentence without entities).
        yield from iter_jsonl(shard, ('input', 'prediction'), on_error=on_error,
                              allow_empty=('prediction',))
        return
    for number, record in iter_jsonl(shard, ('prediction',), on_error=on_error,
                                     allow_empty=('prediction',)):
        inputs = record.get('inputs')
        if not isinstance(inputs, dict) or not isinstance(inputs.get('inputs_pretokenized'), str):
            raise DataError(f'{shard}:{number}: a t5x.infer line needs inputs.inputs_pretokenized; '
                            'run t5x.infer with gin_configs/t5x/runs/pseudo_label.gin, which '
                            'writes the input text and id of each example.')
        # Without ids (another write_fn setting) the line itself names the example.
        key = inputs.get('id', f'{os.path.basename(shard)}:{number}')
        yield number, {'id': key, 'input': inputs['inputs_pretokenized'],
                       'prediction': record['prediction']}


def _pseudo_label_records(infer_output_dir: str, completed_only: bool,
                          on_error: str) -> Iterator[tuple[str, str, dict]]:
    """(file:line, id, record) of every shard line; ids must be unique across shards."""
    shards = sorted(p for p in glob.glob(os.path.join(infer_output_dir, '*')) if _is_shard(p))
    if completed_only:
        shards = [p for p in shards if os.path.exists(p + '.COMPLETED')]
    if not shards:
        raise FileNotFoundError(f'{infer_output_dir}: no inference shards found'
                                f'{" with a .COMPLETED marker" if completed_only else ""}; run '
                                'inference on the unlabeled pool first.')
    seen: dict[str, str] = {}
    for shard in shards:
        for number, record in _shard_lines(shard, on_error):
            if 'id' not in record:
                raise DataError(f'{shard}:{number}: missing field "id"; every line needs id, '
                                'input and prediction.')
            key = str(record['id'])
            if key in seen:
                raise DataError(f'{shard}:{number}: id {key!r} already seen at {seen[key]}; shards '
                                'overlap (delete duplicate outputs or re-run inference).')
            seen[key] = f'{shard}:{number}'
            yield seen[key], key, record


def read_pseudo_labels(infer_output_dir: str, completed_only: bool = False,
                       on_error: str = 'raise') -> tuple[list[str], list[str], list[str]]:
    """(ids, inputs, predictions) from the JSONL shards of an inference output directory."""
    ids, inputs, preds = [], [], []
    for _, key, record in _pseudo_label_records(infer_output_dir, completed_only, on_error):
        ids.append(key)
        inputs.append(record['input'])
        preds.append(record['prediction'])
    return ids, inputs, preds


TOPK_MISMATCH_MODES = ('error', 'drop')


@dataclasses.dataclass
class TeacherTopK:
    """Pseudo-labels with the teacher's top-k per target token, aligned to the student's targets.

    Row i of `topk_ids[j]` / `topk_logprobs[j]` (each (num_target_tokens, k)) belongs to target
    token i of `predictions[j]` re-tokenized plus EOS; an all-`NO_TEACHER_ID` row has no teacher
    distribution (see `align_topk`).
    """
    ids: list[str]
    inputs: list[str]
    predictions: list[str]
    topk_ids: list[np.ndarray]
    topk_logprobs: list[np.ndarray]
    dropped: list[str]          # 'file:line id ...' of the records left out by topk_mismatch='drop'


def align_topk(topk_ids: Sequence, topk_logprobs: Sequence, targets: int | Sequence[int],
               where: str, teacher_ids: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored top-k as one row per target token (prediction tokens + EOS), or None.

    Pseudo-labeling stores one row per token the teacher decoded, EOS included, and (since
    records carry `target_ids`) the decoded ids themselves. `targets` are the student's target ids
    (the re-tokenized prediction + EOS), or only their count for records without `target_ids`.
    - Same tokens (or, without ids, the same count): aligned one to one.
    - The teacher's tokens are the targets minus the final EOS: it reached its decode limit
      before emitting EOS; the student's EOS gets a `NO_TEACHER_ID` row (cross entropy there).
    - Otherwise the prediction does not re-tokenize to the teacher's tokens: None. Without
      `target_ids` only counts can be compared, so a re-tokenization into other tokens of an
      accepted count goes unnoticed.
    """
    from doa_jax.distill_losses import NO_TEACHER_ID

    ids = np.asarray(topk_ids, np.int32)
    logprobs = np.asarray(topk_logprobs, np.float32)
    if ids.ndim != 2 or ids.shape != logprobs.shape or not ids.size:
        raise DataError(f'{where}: topk_ids {ids.shape} and topk_logprobs {logprobs.shape} must '
                        'both be non-empty (decoded tokens, k) lists of equal shape.')
    if teacher_ids is not None and len(teacher_ids) != ids.shape[0]:
        raise DataError(f'{where}: {len(teacher_ids)} target_ids but {ids.shape[0]} top-k rows; '
                        'the record is corrupt.')
    if isinstance(targets, int):
        n_targets, same, cut = targets, True, True
    else:
        n_targets = len(targets)
        decoded = None if teacher_ids is None else [int(t) for t in teacher_ids]
        same = decoded is None or decoded == [int(t) for t in targets]
        cut = decoded is None or decoded == [int(t) for t in targets[:-1]]
    if ids.shape[0] == n_targets and same:
        return ids, logprobs
    if ids.shape[0] == n_targets - 1 and cut:
        k = ids.shape[1]
        return (np.concatenate([ids, np.full((1, k), NO_TEACHER_ID, np.int32)]),
                np.concatenate([logprobs, np.zeros((1, k), np.float32)]))
    return None


def read_teacher_topk(infer_output_dir: str, vocabulary: seqio.Vocabulary, *,
                      completed_only: bool = False, on_error: str = 'raise',
                      topk_mismatch: str = 'error') -> TeacherTopK:
    """Pseudo-labels and their stored teacher top-k, aligned to the targets `vocabulary` makes.

    Records without top-k (pseudo-labeled with top_k = 0) are an error. A record whose prediction
    re-tokenizes to a token count that `align_topk` cannot match is an error naming it
    (topk_mismatch='error'), or is left out of the result with a warning (topk_mismatch='drop').
    """
    if topk_mismatch not in TOPK_MISMATCH_MODES:
        raise ValueError(f'topk_mismatch={topk_mismatch!r}; choose one of {TOPK_MISMATCH_MODES} '
                         '(gin: pseudo_labeled_task.topk_mismatch).')
    out = TeacherTopK([], [], [], [], [], [])
    mismatched, k = [], None
    for where, key, record in _pseudo_label_records(infer_output_dir, completed_only, on_error):
        if 'topk_ids' not in record or 'topk_logprobs' not in record:
            raise DataError(
                    f'{where}: id {key!r} has no teacher top-k (topk_ids, topk_logprobs): '
                    f'{infer_output_dir} was pseudo-labeled with top_k = 0. Offline token-level KD '
                    '(gin_configs/runs/distill_kd_offline.gin) needs them: rerun pseudo-labeling '
                    'into a new INFER_OUTPUT_DIR with --gin.TOP_K=<k> (gin: infer.top_k, e.g. 10; '
                    'completed chunks are never redone), or train with distill_seq.gin (sequence '
                    'KD) or distill_kd.gin (online teacher).')
        targets = list(vocabulary.encode(record['prediction'])) + [vocabulary.eos_id]
        aligned = align_topk(record['topk_ids'], record['topk_logprobs'], targets, where,
                             teacher_ids=record.get('target_ids'))
        n_targets = len(targets)
        if aligned is None:
            mismatched.append(f'{where} id {key!r} ({len(record["topk_ids"])} top-k rows, '
                              f'{n_targets} target tokens)')
            continue
        if k is None:
            k = aligned[0].shape[1]
        elif aligned[0].shape[1] != k:
            raise DataError(f'{where}: id {key!r} has top-k of width {aligned[0].shape[1]}, '
                            f'earlier records {k}; every chunk of {infer_output_dir} must come '
                            'from one pseudo-labeling run (one TOP_K).')
        out.ids.append(key)
        out.inputs.append(record['input'])
        out.predictions.append(record['prediction'])
        out.topk_ids.append(aligned[0])
        out.topk_logprobs.append(aligned[1])
    if mismatched:
        what = (f'{len(mismatched)} pseudo-labels in {infer_output_dir} re-tokenize to a different '
                'number of target tokens than their stored teacher top-k (the teacher decoded ids '
                'the tokenizer drops, e.g. ids past its vocabulary or bytes that are not UTF-8, or '
                'a segmentation it does not reproduce), so their top-k cannot be aligned: '
                f'{"; ".join(mismatched[:5])}')
        if topk_mismatch == 'error':
            raise DataError(f'{what}. To train without them set topk_mismatch=\'drop\' (gin: '
                            'pseudo_labeled_task.topk_mismatch; with distill_kd_offline.gin: '
                            '--gin.TOPK_MISMATCH="\'drop\'"), or use sequence KD '
                            '(distill_seq.gin).')
        logging.warning('%s. They are left out (topk_mismatch=drop).', what)
        out.dropped = mismatched
    if not out.ids:
        raise DataError(f'{infer_output_dir}: no pseudo-label with an aligned teacher top-k is '
                        'left to train on.')
    return out


def _add_gold_rows(labels: TeacherTopK, gold: tuple[list[str], list[str], list[str]],
                   vocab: seqio.Vocabulary) -> None:
    """Appends gold examples to `labels` with all-`NO_TEACHER_ID` rows (cross entropy there)."""
    from doa_jax.distill_losses import NO_TEACHER_ID

    k = labels.topk_ids[0].shape[1]
    for key, text, target in zip(*gold):
        n = len(vocab.encode(target)) + 1                 # + EOS
        labels.ids.append(key)
        labels.inputs.append(text)
        labels.predictions.append(target)
        labels.topk_ids.append(np.full((n, k), NO_TEACHER_ID, np.int32))
        labels.topk_logprobs.append(np.zeros((n, k), np.float32))


def _topk_dataset(labels: TeacherTopK, prefix: str) -> tf.data.Dataset:
    from doa_jax.distill_losses import TOPK_IDS, TOPK_LOGPROBS

    lengths = [a.shape[0] for a in labels.topk_ids]
    ragged = lambda xs: tf.RaggedTensor.from_row_lengths(np.concatenate(xs), lengths)
    inputs = [x if x.startswith(prefix) else prefix + x for x in labels.inputs]
    as_tensor = lambda xs: tf.constant(list(xs), dtype=tf.string)
    ds = tf.data.Dataset.from_tensor_slices({
            'id': as_tensor(labels.ids), 'inputs': as_tensor(inputs),
            'targets': as_tensor(labels.predictions), TOPK_IDS: ragged(labels.topk_ids),
            TOPK_LOGPROBS: ragged(labels.topk_logprobs)})
    # Rows of a ragged tensor are dense (tokens, k) tensors; give them a plain TensorSpec.
    return ds.map(lambda ex: {key: tf.identity(v) for key, v in ex.items()})


def read_gold(task_name: str, split: str = 'train') -> tuple[list[str], list[str], list[str]]:
    """(ids, inputs, targets) of a gold-labeled task split, as raw text."""
    task = seqio.get_mixture_or_task(task_name)
    ids, inputs, targets = [], [], []
    for i, ex in enumerate(task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator()):
        ids.append(ex['id'].decode() if 'id' in ex else f'gold:{split}:{i}')
        inputs.append(ex['inputs'].decode('utf-8'))
        targets.append(ex['targets'].decode('utf-8'))
    if not ids:
        raise DataError(f'Gold task {task_name!r} split {split!r} is empty (gin: '
                        'pseudo_labeled_task.gold_task / GOLD_TASK).')
    return ids, inputs, targets


def register_pseudo_labeled_task(name: str, infer_output_dir: str, *, prefix: str = '',
                                 eval_task: str | None = None,
                                 metric_fns: Sequence[MetricFn] | None = None,
                                 completed_only: bool = False,
                                 vocabulary: seqio.Vocabulary | None = None,
                                 on_error: str = 'raise', with_topk: bool = False,
                                 topk_mismatch: str = 'error', gold_task: str | None = None,
                                 overwrite: bool = False) -> seqio.Task:
    """Registers a task whose train split is the teacher's predictions (targets = prediction) and
    whose other splits (and metrics) come from `eval_task`. Inputs missing `prefix` get it.

    `with_topk=True` (offline token-level KD) adds the teacher's stored top-k to each train
    example as `teacher_topk_ids` / `teacher_topk_logprobs` (target tokens, k), aligned to the
    targets by `read_teacher_topk`; the other splits have none.

    `gold_task` mixes the train split of a gold-labeled task (e.g. the N labels the teacher was
    fine-tuned on) into the train split, each example once. With top-k its rows are all
    `NO_TEACHER_ID`, so `token_kd_loss` trains on them with cross entropy, and on the teacher's
    examples with `alpha` * cross entropy + (1 - alpha) * KD.
    """
    base = seqio.get_mixture_or_task(eval_task) if eval_task else None
    eval_splits = [s for s in (base.splits if base else ()) if s != 'train']
    vocab = vocabulary or default_vocabulary()
    if topk_mismatch not in TOPK_MISMATCH_MODES:
        raise ValueError(f'topk_mismatch={topk_mismatch!r}; choose one of {TOPK_MISMATCH_MODES} '
                         '(gin: pseudo_labeled_task.topk_mismatch).')
    if gold_task is not None:
        seqio.get_mixture_or_task(gold_task)      # an unknown name fails at registration

    def dataset_fn(split: str) -> tf.data.Dataset:
        if split != 'train':
            return base.source.get_dataset(split=split, shuffle=False)
        gold = read_gold(gold_task) if gold_task else ([], [], [])
        if with_topk:
            labels = read_teacher_topk(infer_output_dir, vocab, completed_only=completed_only,
                                       on_error=on_error, topk_mismatch=topk_mismatch)
            _add_gold_rows(labels, gold, vocab)
            return _topk_dataset(labels, prefix)
        ids, inputs, preds = read_pseudo_labels(infer_output_dir, completed_only, on_error)
        inputs = [x if x.startswith(prefix) else prefix + x for x in [*inputs, *gold[1]]]
        return _to_dataset([*ids, *gold[0]], inputs, [*preds, *gold[2]])

    fns = metric_fns if metric_fns is not None else (base.metric_fns if base else ())
    return _add_task(name, dataset_fn, ['train', *eval_splits], fns, vocab, overwrite)
