"""What a study trains and scores on: a gold train set, an evaluation set, a metric, a label price.

The paper simulates annotation: the whole train set is gold-labeled, and a strategy that buys
labels reveals the next ones in a fixed seeded order. Distillation draws its unlabeled pool from
the same order after the largest starting set, with targets withheld. Every training set a study
uses is written as JSONL into its directory, so each stage can be inspected and rerun by hand.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Mapping, Sequence

import seqio

from doa_jax import distributed
from doa_jax.data import budget, lengths
from doa_jax.data.jsonl import read_jsonl
from doa_jax.data.vocabulary import vocabulary_from_spec

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

MetricFn = Callable[[Sequence[str], Sequence[str]], Mapping[str, float]]

# The headline metric of each paper dataset (docs/design.md, "The paper's study"): the key its
# metric function returns.
PAPER_METRIC = {'wlp': 'micro_f1', 'stanceosaurus': 'macro_f1', 'fever': 'accuracy',
                'multipit_id': 'accuracy', 'multipit_gen': 'bert_ibleu', 'nq': 'f1'}


@dataclasses.dataclass
class StudyData:
    """A study's examples ({'source', 'target'} dicts) and how they are scored and priced."""

    name: str                      # used in task names and file names
    prefix: str                    # inputs are prefix + source
    train: Sequence[Mapping[str, str]]
    eval: Sequence[Mapping[str, str]]
    metric_fns: Sequence[MetricFn]
    metric: str                    # the key of the headline metric
    vocabulary: seqio.Vocabulary
    price_key: str                 # annotation price table key ($ per label)
    allow_empty_target: bool = False
    labels: Sequence[str] | None = None   # the label set of a classification task (LLM parsing)
    # The registered task whose measured feature lengths (doa_jax.data.lengths) the study's tasks
    # take, as a run on it would: the paper dataset's doa_<dataset>; None: none recorded.
    lengths_task: str | None = None

    def order(self, seed: int):
        """The seeded order in which train labels are revealed (labeled slices are prefixes)."""
        return budget.shuffled_order(len(self.train), seed)


def synthetic_wlp(train_size: int = 4000, eval_size: int = 200,
                  vocabulary: str = 'byte') -> StudyData:
    """The embedded offline default: protocol steps tagged in the WLP format (data.synthetic)."""
    from doa_jax.data import synthetic
    from doa_jax.metrics import wlp_metrics
    return StudyData(name=synthetic.NAME, prefix=f'{synthetic.PREFIX_WORD}: ',
                     train=synthetic.examples('train', train_size),
                     eval=synthetic.examples('validation', eval_size), metric_fns=[wlp_metrics],
                     metric='micro_f1', vocabulary=vocabulary_from_spec(vocabulary),
                     price_key=synthetic.NAME)


def _split_one_file(rows: list, eval_fraction: float, where: str) -> tuple[list, list]:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f'{where}: no eval file, so eval_fraction must be in (0, 1) to hold out '
                         f'part of the train file; got {eval_fraction}.')
    n_eval = max(1, int(round(len(rows) * eval_fraction)))
    order = budget.shuffled_order(len(rows), 12345)   # fixed: the held-out set never moves
    held = set(order[:n_eval].tolist())
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def paper_dataset(dataset: str, data_dir: str | None = None, vocabulary: str | None = None,
                  train_file: str | None = None, eval_file: str | None = None,
                  eval_fraction: float = 0.0, eval_size: int | None = None) -> StudyData:
    """One of the paper's six datasets, with its prefix, labels, metric and $/label.

    Files default to the data dir's (`python -m doa_jax.data download`); `train_file` /
    `eval_file` override them. With no eval file, `eval_fraction` holds out part of the train
    file (e.g. the public test-only files in ../shared/data). `eval_size` keeps the first examples.
    """
    from doa_jax.data import paper
    from doa_jax.data.vocabulary import default_vocabulary
    if dataset not in paper.DATASETS:
        raise ValueError(f'Unknown paper dataset {dataset!r}; choose one of '
                         f'{", ".join(sorted(paper.DATASETS))}, or use jsonl_files(...).')
    spec = paper.DATASETS[dataset]
    allow = ('target',) if spec.allow_empty_target else ()

    def read(path) -> list:
        return read_jsonl(str(path), ('source', 'target'), labels=spec.labels,
                          label_field='target', allow_empty=allow)[0]

    train_path = str(train_file or paper.split_path(dataset, 'train', data_dir))
    train = read(train_path)
    if eval_file or not eval_fraction:
        evaluation = read(eval_file or paper.split_path(dataset, 'validation', data_dir))
    else:
        train, evaluation = _split_one_file(train, eval_fraction, train_path)
    from tasks.paper_tasks import _metric_fns
    vocab = vocabulary_from_spec(vocabulary) if vocabulary else default_vocabulary()
    return StudyData(name=dataset, prefix=spec.prefix, train=train,
                     eval=evaluation[:eval_size] if eval_size else evaluation,
                     metric_fns=_metric_fns(dataset), metric=PAPER_METRIC[dataset],
                     vocabulary=vocab, price_key=dataset,
                     allow_empty_target=spec.allow_empty_target,
                     labels=list(spec.labels) if spec.labels else None,
                     lengths_task=paper_lengths_task(dataset))


def paper_lengths_task(dataset: str) -> str:
    """The task whose measured lengths a paper dataset's study takes (tasks/paper_tasks.py
    FEATURE_LENGTHS, recorded when `tasks` is imported, as paper_dataset does)."""
    return f'doa_{dataset}'


def write_jsonl(path: str, rows: Sequence[Mapping[str, str]]) -> str:
    """Writes rows atomically (temp file + rename), so a crash never leaves half a file."""
    from doa_jax.study.results import atomic_write
    atomic_write(path, ''.join(json.dumps({'source': r['source'], 'target': r['target']},
                                          ensure_ascii=False) + '\n' for r in rows))
    return path


def register_train_task(name: str, data: StudyData, train_path: str, eval_path: str,
                        allow_empty_target: bool | None = None) -> str:
    """A seqio task over the study's files: train = train_path, validation = eval_path, with the
    feature lengths measured for `data.lengths_task` (a run on that task would take them)."""
    from tasks.jsonl_task import register_jsonl_task
    allow = data.allow_empty_target if allow_empty_target is None else allow_empty_target
    files = {'train': train_path, 'validation': eval_path}
    register_jsonl_task(name, files, data.prefix, data.metric_fns, vocabulary=data.vocabulary,
                        allow_empty_target=allow, overwrite=True)
    lengths.inherit(name, data.lengths_task)
    return name


def register_pool_task(name: str, data: StudyData, pool_path: str) -> str:
    """The unlabeled pool as a task (targets are empty in the file: nothing to leak)."""
    from tasks.jsonl_task import register_jsonl_task
    register_jsonl_task(name, {'train': pool_path}, data.prefix, (), vocabulary=data.vocabulary,
                        allow_empty_target=True, overwrite=True)
    lengths.inherit(name, data.lengths_task)
    return name
