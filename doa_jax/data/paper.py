"""Where the paper's six datasets live, how their splits map to files, and their budget sizes."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from doa_jax.metrics import classification

REPO_URL = 'https://raw.githubusercontent.com/jm-kang/Distill-or-Annotate/main/'
DEFAULT_DATA_DIR = pathlib.Path.home() / '.cache' / 'doa_jax' / 'distill_or_annotate'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: the paper's prefix word, split files (relative to the data dir), labels."""
    name: str
    prefix_word: str
    files: dict[str, str]
    labels: tuple[str, ...] | None
    budget_sizes: tuple[int, ...]
    allow_empty_target: bool = False  # WLP has sentences without entities.

    @property
    def prefix(self) -> str:
        return f'{self.prefix_word}: '


def _files(folder: str, train: str, evaluation: str) -> dict[str, str]:
    # The paper evaluated on its released dev-or-test file; it serves as validation and test here.
    return {'train': f'{folder}/{train}', 'validation': f'{folder}/{evaluation}',
            'test': f'{folder}/{evaluation}'}


# Budget sizes: the paper's starting labeled sets N (WLP 1K and 5K; 5K or 10K elsewhere).
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec('wlp', 'wlp', _files('wlp', 'wlp_train_all.json', 'wlp_test_all.json'),
                None, (1000, 5000), allow_empty_target=True),
    DatasetSpec('stanceosaurus', 'stanceosaurus',
                _files('stanceosaurus', 'stanceosaurus_train_all.json',
                       'stanceosaurus_test_all.json'),
                classification.STANCE_LABELS, (5000,)),
    DatasetSpec('fever', 'fever', _files('fever', 'fever_train_all.json', 'fever_dev_all.json'),
                classification.FEVER_LABELS, (5000,)),
    DatasetSpec('multipit_id', 'multipit_id',
                _files('multipit_id', 'multipit_id_train_all.json', 'multipit_id_test_all.json'),
                classification.MULTIPIT_ID_LABELS, (5000,)),
    # The paper's run used --task multipit for generation, hence the prefix "multipit: ".
    DatasetSpec('multipit_gen', 'multipit',
                _files('multipit', 'multipit_train_all.json', 'multipit_test_all.json'),
                None, (10000,)),
    DatasetSpec('nq', 'nq', _files('nq', 'nq_train_all.json', 'nq_dev_all.json'), None, (10000,)),
]}

# sha256 and size of the files the paper repository serves publicly (recorded from our copies).
# Train files of five datasets are not in the public repository: `download` cannot fetch them and
# they must be placed in the data dir by hand (checksums unverified).
CHECKSUMS: dict[str, tuple[int, str]] = {
    'fever/fever_dev_all.json': (904525, 'dc7dd53d169b72bead7d9529dd6f67dcbb8c2553ba7e02c58d65aeba52e31ebf'),
    'multipit/multipit_test_all.json': (902576, 'd3bb85e73c527bde4743e84a45e047eeda9cf01c29ed0b94485929a44eba34e3'),
    'multipit_id/multipit_id_test_all.json': (1955897, '2d0ada3d1e7d09fe3eb87dbd5abfd1cea5de6272f0017ff22522c72116f2b684'),
    'nq/nq_dev_all.json': (259041, '0a8ebf451072781cd3ef6dc10dcf655eba0da9cf4c2517461833528a723e91c0'),
    'stanceosaurus/stanceosaurus_test_all.json': (1957121, '69527e4a6a7470990ef5d5069a898f323b687d850bc989f172ac1e5ecc8398fd'),
    'wlp/wlp_test_all.json': (866585, 'b68810f05da2f651454141d4057f3457e93501a345e91a8a0376223123f859b0'),
    'wlp/wlp_train_all.json': (3093259, 'f79f544390275efd367fc5bc27b8ec8c95f8996a7fe13e3e9b75b7e0d43ba15c'),
}


# `python -m doa_jax.data prepare` (doa_jax.data.tfds_builder) writes a dataset's TFDS records to
# <tfds dir>/<TFDS_NAME>/<dataset>/<TFDS_VERSION>, the train split in the budget order of
# TFDS_ORDER_SEED (tasks.register_paper_tasks' default seed); tasks/prepared_source.py reads them.
TFDS_NAME = 'distill_or_annotate'
TFDS_VERSION = '1.1.0'
TFDS_ORDER_SEED = 0


def prepared_dir(tfds_dir: str | os.PathLike, dataset: str) -> pathlib.Path:
    """Where `prepare` writes a dataset's records (its dataset_info.json marks them complete)."""
    return pathlib.Path(tfds_dir) / TFDS_NAME / dataset / TFDS_VERSION


def data_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """--data_dir, else DOA_DATA_DIR, else ~/.cache/doa_jax/distill_or_annotate."""
    return pathlib.Path(override or os.environ.get('DOA_DATA_DIR') or DEFAULT_DATA_DIR)


def split_path(dataset: str, split: str, override: str | os.PathLike | None = None) -> pathlib.Path:
    spec = DATASETS[dataset]
    if split not in spec.files:
        raise ValueError(f'{dataset} has no split {split!r}; splits: {sorted(spec.files)}.')
    return data_dir(override) / spec.files[split]
