"""The seqio data source of the project's finite data: examples made in code (doa_toy, the
synthetic corpus) or read whole from small files (JSONL tasks, the study's train sets and pools,
pseudo-labels).

Why not seqio's `FunctionDataSource`: it neither shuffles nor shards below the task's shuffle
buffer, so seqio warns on every training read ("Using an uncached FunctionDataset for training
is not recommended...") and several hosts each read a whole split to keep one part of it. A split
here is finite and small, so this source can do both exactly:

- shuffle=False: the split in its stored order (what `dataset_fn` returns).
- shuffle=True: a permutation of the whole split drawn by `seed` (a shuffle buffer as large as the
  split is a uniform permutation), the same one on every host and in every epoch for a given
  seed; the task's shuffle buffer then shuffles the preprocessed stream as before.
- shard_info (index i of n): examples i, i + n, i + 2n, ... of that order, so the hosts' parts are
  disjoint, cover the split, and are fixed by the seed. With shuffle=True and no seed, each host
  draws its own permutation of its part, taken from the stored order (so the parts stay disjoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import seqio
import tensorflow as tf

from doa_jax import distributed

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

DatasetFn = Callable[[str], tf.data.Dataset]
# The order a shuffled read gives, for caches of what was trained on it (the pretraining cache
# keys by tasks.synthetic_corpus.VERSION): 1 was seqio's FunctionDataSource (the stored order into
# the task's shuffle buffer); 2 is this source's seeded permutation of the split first.
ORDER_VERSION = 2


def split_size(ds: tf.data.Dataset, where: str) -> int:
    """The number of examples of a finite dataset (counted by reading it when TF cannot tell)."""
    n = int(ds.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError(f'{where}: the dataset is infinite; a FiniteDataSource needs a finite '
                         'split (drop the .repeat() from its dataset function).')
    if n == tf.data.UNKNOWN_CARDINALITY:
        n = int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    return n


def shuffle_and_shard(ds: tf.data.Dataset, *, shuffle: bool, seed: int | None,
                      shard_info: seqio.ShardInfo | None, where: str) -> tf.data.Dataset:
    """This host's part of a finite split, in the order the module docstring describes."""
    shards, index = (shard_info.num_shards, shard_info.index) if shard_info else (1, 0)
    if shards < 1 or not 0 <= index < shards:
        raise ValueError(f'{where}: shard {index} of {shards} does not exist; a ShardInfo needs '
                         'num_shards >= 1 and 0 <= index < num_shards.')
    if shuffle and seed is None and shards > 1:
        # Unseeded, the hosts' permutations would differ: shard the stored order first.
        ds = ds.shard(shards, index)
        return ds.shuffle(max(split_size(ds, where), 1), reshuffle_each_iteration=False)
    if shuffle:
        ds = ds.shuffle(max(split_size(ds, where), 1), seed=seed, reshuffle_each_iteration=False)
    return ds.shard(shards, index) if shards > 1 else ds


class FiniteDataSource(seqio.DataSource):
    """A seqio source over `dataset_fn(split)`, a finite tf.data.Dataset of the split in its stored
    order, with exact seeded shuffling and sharding (module docstring)."""

    def __init__(self, dataset_fn: DatasetFn, splits: Iterable[str],
                 num_input_examples: Mapping[str, int] | None = None,
                 caching_permitted: bool = True):
        """`num_input_examples`, when given, are the splits' sizes: seqio then caches a small
        split in memory after this source (its order, shuffled or not, is the same each time)."""
        self._dataset_fn = dataset_fn
        super().__init__(splits=splits, num_input_examples=num_input_examples,
                         caching_permitted=caching_permitted, performs_internal_shuffling=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> list[str]:
        return [split]

    def read_split(self, split: str) -> tf.data.Dataset:
        """The whole split in its stored order."""
        if split not in self.splits:
            raise ValueError(f'{self!r} has no split {split!r}; its splits: '
                             f'{", ".join(self.splits)}.')
        return self._dataset_fn(split)

    def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs   # seqio's Task handles them
        return shuffle_and_shard(self.read_split(split), shuffle=shuffle, seed=seed,
                                 shard_info=shard_info, where=f'{self!r} split {split!r}')

    def __repr__(self) -> str:
        name = getattr(self._dataset_fn, '__qualname__', type(self._dataset_fn).__name__)
        return f'{type(self).__name__}({name}, splits={self.splits})'
