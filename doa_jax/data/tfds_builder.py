"""A TFDS builder for the six datasets (one config each), reading the released JSONL files from a
manual dir (the data dir that `python -m doa_jax.data download` fills)."""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from doa_jax import distributed
from doa_jax.data import paper
from doa_jax.data.jsonl import iter_jsonl

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU


class DistillOrAnnotate(tfds.core.GeneratorBasedBuilder):
    """{'id', 'source', 'target'} examples; splits are the files present in the manual dir."""

    VERSION = tfds.core.Version('1.0.0')
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
                supervised_keys=('source', 'target'))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        spec = paper.DATASETS[self.builder_config.name]
        manual = pathlib.Path(dl_manager.manual_dir)
        splits = {split: manual / rel for split, rel in spec.files.items() if (manual / rel).exists()}
        if not splits:
            raise FileNotFoundError(f'{manual}: none of {sorted(spec.files.values())} found. '
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {split: self._generate_examples(path) for split, path in splits.items()}

    def _generate_examples(self, path: pathlib.Path):
        spec = paper.DATASETS[self.builder_config.name]
        allow = ('target',) if spec.allow_empty_target else ()
        for number, record in iter_jsonl(str(path), labels=spec.labels, allow_empty=allow):
            key = f'{path.name}:{number}'
            yield key, {'id': key, 'source': record['source'], 'target': record['target']}


def prepare(datasets: list[str], data_dir: str, tfds_dir: str) -> dict[str, dict[str, int]]:
    """Builds the TFDS records of the named datasets; returns {dataset: {split: examples}}."""
    out = {}
    for name in datasets:
        builder = DistillOrAnnotate(config=name, data_dir=tfds_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=data_dir))
        out[name] = {s: info.num_examples for s, info in builder.info.splits.items()}
    return out
