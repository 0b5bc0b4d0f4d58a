"""A TFDS builder for the six datasets (one config each), reading the released JSONL files from a
manual dir (the data dir that `python -m doa_jax.data download` fills).

The records are ordered (`disable_shuffling`): evaluation splits in file order, and the train split
in the budget order of `ORDER_SEED` (doa_jax.data.budget), so that the paper's labeled slice of N
is the TFDS slice `train[:N]` and the unlabeled pool `train[N_max:]`, exactly the examples the
JSONL path gives (tasks/prepared_source.py reads them, from the directory alone: no builder code). `metadata.json` records that seed and the
size of each source file, so a task can tell records built with another seed, or from an older
copy of a file, from current ones.
"""

from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from doa_jax import distributed
from doa_jax.data import budget, paper
from doa_jax.data.jsonl import iter_jsonl

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

ORDER_SEED = paper.TFDS_ORDER_SEED


class DistillOrAnnotate(tfds.core.GeneratorBasedBuilder):
    """{'id', 'source', 'target'} examples; splits are the files present in the manual dir."""

    name = paper.TFDS_NAME
    VERSION = tfds.core.Version(paper.TFDS_VERSION)
    RELEASE_NOTES = {
        '1.0.0': 'Splits in TFDS hash order.',
        '1.1.0': 'Ordered records: the train split in the budget order of ORDER_SEED, evaluation '
                 'splits in file order; metadata records the seed and the source file sizes.',
    }
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f'{name} from the paper')
                       for name in paper.DATASETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
            'Run `python -m doa_jax.data download --data_dir=DIR` (public files) and place the '
            'train files the paper repository does not serve under DIR/<dataset>/; then pass '
            '--data_dir=DIR to prepare.')

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
                builder=self, description='Distill or Annotate? (ACL 2023) text-to-text data.',
                features=tfds.features.FeaturesDict({'id': tfds.features.Text(),
                                                      'source': tfds.features.Text(),
                                                      'target': tfds.features.Text()}),
                supervised_keys=('source', 'target'), disable_shuffling=True,
                metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        spec = paper.DATASETS[self.builder_config.name]
        manual = pathlib.Path(dl_manager.manual_dir)
        splits = {split: manual / rel for split, rel in spec.files.items() if (manual / rel).exists()}
        if not splits:
            raise FileNotFoundError(f'{manual}: none of {sorted(spec.files.values())} found. '
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        self.info.metadata['order_seed'] = ORDER_SEED
        self.info.metadata['source_bytes'] = {s: os.path.getsize(p) for s, p in splits.items()}
        return {split: self._generate_examples(path, split == 'train')
                for split, path in splits.items()}

    def _generate_examples(self, path: pathlib.Path, budget_order: bool):
        spec = paper.DATASETS[self.builder_config.name]
        allow = ('target',) if spec.allow_empty_target else ()
        records = [{'id': f'{path.name}:{number}', 'source': r['source'], 'target': r['target']}
                   for number, r in iter_jsonl(str(path), labels=spec.labels, allow_empty=allow)]
        order = (budget.shuffled_order(len(records), ORDER_SEED) if budget_order
                 else range(len(records)))
        # Integer keys: an ordered builder writes the examples sorted by key.
        for position, index in enumerate(order):
            yield position, records[index]


def prepare(datasets: list[str], data_dir: str, tfds_dir: str) -> dict[str, dict[str, int]]:
    """Builds the TFDS records of the named datasets; returns {dataset: {split: examples}}."""
    out = {}
    for name in datasets:
        builder = DistillOrAnnotate(config=name, data_dir=tfds_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=data_dir))
        out[name] = {s: info.num_examples for s, info in builder.info.splits.items()}
    return out
