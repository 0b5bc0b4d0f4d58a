"""A seqio data source for a paper dataset: its prepared TFDS records when `python -m doa_jax.data
prepare` wrote them, else its JSONL files.

The choice is made each time a split is read, never at `import tasks`: DOA_DATA_DIR (and
DOA_TFDS_DIR) may be set, or the data prepared, after registration. A split is read from TFDS when
`<tfds_dir>/distill_or_annotate/<dataset>/<version>` holds it, its records were built with the
task's budget seed, and the JSONL file it came from (where still present) has the size recorded at
prepare time. Otherwise the JSONL files are read.

The prepared records are ordered (doa_jax.data.tfds_builder): a labeled slice of N is the TFDS
slice `train[:N]`, the unlabeled pool `train[N_max:]`, in the same order as the JSONL path gives
them. Either way the split is then shuffled and sharded as every finite split is
(tasks/sources.py): a seeded permutation of the whole split, every n-th example of it per host.
So a slice gives the trainer the same stream from the records as from the files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

from doa_jax import distributed
from doa_jax.data import paper
from doa_jax.data.jsonl import DataError
from tasks.sources import FiniteDataSource

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

PathLike = str | os.PathLike | Callable[[], str | os.PathLike]


def tfds_dir() -> pathlib.Path:
    """$DOA_TFDS_DIR, else `<data dir>/tfds` (where `data prepare` writes by default)."""
    return pathlib.Path(os.environ.get('DOA_TFDS_DIR') or paper.data_dir() / 'tfds')


@dataclasses.dataclass(frozen=True)
class Slice:
    """A task split read from a TFDS split: examples [start, stop) of it."""
    tfds_split: str
    start: int = 0
    stop: int | None = None
    check: Callable[[int], None] | None = None   # raises when the split has too few examples

    @property
    def is_slice(self) -> bool:
        """A part of the split, which depends on the stored order (the whole split does not)."""
        return bool(self.start) or self.stop is not None

    def spec(self) -> str:
        if not self.is_slice:
            return self.tfds_split
        return f'{self.tfds_split}[{self.start or ""}:{"" if self.stop is None else self.stop}]'


class PreparedOrJsonlSource(FiniteDataSource):
    """{'id', 'inputs': prefix + source, 'targets'} of a paper dataset, from TFDS or JSONL."""

    def __init__(self, dataset: str, slices: Mapping[str, Slice], files: Mapping[str, PathLike],
                 jsonl_fn: Callable, *, prefix: str, order_seed: int | None,
                 withhold_targets: bool = False):
        """`slices` maps each task split to the part of a TFDS split it reads; `order_seed` is the
        budget seed the records' train order must have where a slice is taken of it; `jsonl_fn` is
        the function `jsonl_fn(split)` that reads `files` when the records do not serve."""
        self._dataset = dataset
        self._slices = dict(slices)
        self._files = dict(files)
        self._prefix = prefix
        self._order_seed = order_seed
        self._withhold = withhold_targets
        self._jsonl_fn = jsonl_fn
        self._tfds: dict[tuple[str, str], seqio.TfdsDataSource] = {}
        super().__init__(self._read, splits=tuple(self._slices))

    def _records(self) -> tuple[pathlib.Path, dict] | None:
        """(tfds dir, metadata) of this dataset's prepared records, or None (with the reason
        logged) when they are absent or do not fit this task."""
        root = tfds_dir()
        where = paper.prepared_dir(root, self._dataset)
        if not (where / 'dataset_info.json').exists():
            logging.info('%s: no prepared TFDS records at %s; reading the JSONL files (run '
                         '`python -m doa_jax.data prepare --tasks=%s` to prepare them).',
                         self._dataset, where, self._dataset)
            return None
        meta_path = where / 'metadata.json'
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return root, meta

    def _check_fresh(self, split: str, meta: dict, where: pathlib.Path) -> None:
        recorded = meta.get('source_bytes', {}).get(split)
        path = self._files.get(split)
        if recorded is None or path is None:
            return
        path = os.fspath(path() if callable(path) else path)
        if os.path.exists(path) and os.path.getsize(path) != recorded:
            raise DataError(f'{where}: the {split!r} records were prepared from a {recorded}-byte '
                            f'{os.path.basename(path)}, but {path} now has '
                            f'{os.path.getsize(path)} bytes. Prepare again (delete {where}, then '
                            f'`python -m doa_jax.data prepare --tasks={self._dataset}`), or '
                            'delete the records to read the JSONL file.')

    def tfds_source(self, split: str) -> seqio.TfdsDataSource | None:
        """The TfdsDataSource this split reads from now, or None for the JSONL files."""
        found = self._records()
        if found is None:
            return None
        root, meta = found
        piece = self._slices[split]
        where = paper.prepared_dir(root, self._dataset)
        if piece.is_slice and meta.get('order_seed') != self._order_seed:
            logging.warning('%s: the records at %s hold the train split in the order of seed %s; '
                            'this task slices it with seed %s, so it reads the JSONL files.',
                            self._dataset, where, meta.get('order_seed'), self._order_seed)
            return None
        key = (str(root), split)
        if key not in self._tfds:
            # Read from the directory (tfds.builder_from_directory), never built here.
            source = seqio.TfdsDataSource(tfds_data_dir=str(where), splits={split: piece.spec()},
                                          read_only=True)
            self._tfds[key] = source
        source = self._tfds[key]
        available = source.tfds_dataset.info.splits
        if piece.tfds_split not in available:
            return None   # e.g. a train file that was not there at prepare time
        self._check_fresh(piece.tfds_split, meta, where)
        if piece.check:
            piece.check(available[piece.tfds_split].num_examples)
        return source

    def _to_features(self, ex: dict) -> dict:
        targets = tf.constant('', tf.string) if self._withhold else ex['target']
        return {'id': ex['id'], 'inputs': tf.strings.join([self._prefix, ex['source']]),
                'targets': targets}

    def _read(self, split: str) -> tf.data.Dataset:
        """The whole split in its stored order, from the records or else the JSONL files."""
        source = self.tfds_source(split)
        if source is None:
            return self._jsonl_fn(split)
        # In the stored order (TFDS refuses shuffle_files for ordered records); shuffled by the
        # caller, FiniteDataSource.get_dataset.
        ds = source.get_dataset(split, shuffle=False)
        return ds.map(self._to_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def num_input_examples(self, split: str) -> int | None:
        """Unknown to seqio, as on the JSONL path: a known small size makes seqio cache the split
        in memory, and TF then warns on every partial read (an eval of eval_steps batches)."""
        del split
        return None
