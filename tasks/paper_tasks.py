"""The six datasets of the paper as seqio tasks `doa_<dataset>` plus their budget slices.

Inputs are the source prefixed with "<task>: " as the paper's runs did. When a split is read, the
tasks read the dataset's TFDS records if `python -m doa_jax.data prepare` wrote them, else its JSONL
files in the data dir (DOA_DATA_DIR, see doa_jax.data.paper); tasks/prepared_source.py decides.
"""

from __future__ import annotations

import seqio

from doa_jax import distributed, metrics
from doa_jax.data import lengths, paper
from tasks.jsonl_task import register_budget_tasks, register_jsonl_task

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

# BERTScore model for MultiPIT_gen: the paper's by default, DOA_BERTSCORE_MODEL (a hub name or a
# local directory) to override, DOA_BERTSCORE_LAYERS for the layer (doa_jax.metrics.paraphrase).
METRIC_FNS = {
    'wlp': [metrics.wlp_metrics],
    'stanceosaurus': [metrics.stance_f1],
    'fever': [metrics.fever_accuracy],
    'multipit_id': [metrics.multipit_id_accuracy],
    'nq': [metrics.squad],
}


# Feature lengths measured from each dataset's data (p99.9 of the tokens per input and target,
# "<task>: " prefix and EOS included, rounded up to a multiple of 8), per vocabulary key
# (doa_jax.data.lengths.vocabulary_key). A run with TASK_FEATURE_LENGTHS = None takes them for its
# task and the budget slices and pool derived from it. Measured over the released files in
# ../shared/data (WLP: train + test; the other five: their evaluation file only, since their
# train files are not public) with the byte vocabulary, the only one available offline there:
#
#   python -m doa_jax.data lengths --vocabulary=byte --data_dir=../shared/data/distill_or_annotate
#
# A SentencePiece vocabulary (the T5 model) has no entry until that command is run with
# --vocabulary=/path/to/sentencepiece.model and its lines are pasted under the key it prints;
# until then runs take DEFAULT_FEATURE_LENGTHS.
FEATURE_LENGTHS: dict[str, dict[str, dict[str, int]]] = {
    'byte': {
        # max 1716 / 2790, mean 82.3 / 114.5 over 17833 examples (train + validation)
        'wlp': {'inputs': 480, 'targets': 784},
        # max 1360 / 11, mean 385.4 / 10.9 over 4750 (validation)
        'stanceosaurus': {'inputs': 1080, 'targets': 16},
        # max 220 / 9, mean 58.1 / 8.5 over 10444 (validation)
        'fever': {'inputs': 184, 'targets': 16},
        # max 269 / 4, mean 152.1 / 3.5 over 11530 (validation)
        'multipit_id': {'inputs': 248, 'targets': 8},
        # max 147 / 137, mean 70.2 / 60.2 over 6120 (validation)
        'multipit_gen': {'inputs': 136, 'targets': 128},
        # max 106 / 52, mean 53.9 / 14.4 over 2837 (validation)
        'nq': {'inputs': 112, 'targets': 48},
    },
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
                            overwrite=overwrite, prepared=dataset)
        derived = register_budget_tasks(name, files, spec.prefix, spec.budget_sizes, fns,
                                        seed=seed, vocabulary=vocabulary, labels=spec.labels,
                                        allow_empty_target=spec.allow_empty_target,
                                        overwrite=overwrite, prepared=dataset)
        for key, measured in FEATURE_LENGTHS.items():
            if dataset in measured:
                lengths.record([name, *derived], key, measured[dataset])
        names += [name, *derived]
    return names
