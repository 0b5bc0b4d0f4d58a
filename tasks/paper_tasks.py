"""The six datasets of the paper as seqio tasks `doa_<dataset>` plus their budget slices.

Inputs are the source prefixed with "<task>: " as the paper's runs did; files are looked up in the
data dir (DOA_DATA_DIR, see doa_jax.data.paper) when a split is read.
"""

from __future__ import annotations

import seqio

from doa_jax import metrics
from doa_jax.data import paper
from tasks.jsonl_task import register_budget_tasks, register_jsonl_task

# BERTScore model for MultiPIT_gen: the paper's by default, DOA_BERTSCORE_MODEL (a hub name or a
# local directory) to override, DOA_BERTSCORE_LAYERS for the layer (doa_jax.metrics.paraphrase).
METRIC_FNS = {
    'wlp': [metrics.wlp_metrics],
    'stanceosaurus': [metrics.stance_f1],
    'fever': [metrics.fever_accuracy],
    'multipit_id': [metrics.multipit_id_accuracy],
    'nq': [metrics.squad],
}


def _metric_fns(dataset: str):
    if dataset == 'multipit_gen':
        model, layers = metrics.bertscore_settings_from_env()
        return [metrics.make_bert_ibleu(model, num_layers=layers)]
    return METRIC_FNS[dataset]


def _lazy_path(dataset: str, split: str):
    return lambda: paper.split_path(dataset, split)


def register_paper_tasks(vocabulary: seqio.Vocabulary | None = None, overwrite: bool = False,
                         seed: int = 0) -> list[str]:
    """Registers doa_<dataset>, doa_<dataset>_labeled_<N> and doa_<dataset>_unlabeled."""
    names = []
    for dataset, spec in paper.DATASETS.items():
        name = f'doa_{dataset}'
        if name in seqio.TaskRegistry.names() and not overwrite:
            continue
        files = {split: _lazy_path(dataset, split) for split in spec.files}
        fns = _metric_fns(dataset)
        register_jsonl_task(name, files, spec.prefix, fns, vocabulary=vocabulary,
                            labels=spec.labels, allow_empty_target=spec.allow_empty_target,
                            overwrite=overwrite)
        names.append(name)
        names += register_budget_tasks(name, files, spec.prefix, spec.budget_sizes, fns,
                                       seed=seed, vocabulary=vocabulary, labels=spec.labels,
                                       allow_empty_target=spec.allow_empty_target,
                                       overwrite=overwrite)
    return names
