"""Input pipeline: a seqio task/mixture, this host's share of each global batch, onto the mesh.

Every host reads `global_batch / process_count` examples per step from its own seqio shard and
`jax.make_array_from_process_local_data` assembles the global array; no host ever sees another
host's examples. The order is fixed by `seed`, so skipping the batches a checkpoint records as
consumed resumes the stream exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from doa_jax import partitioning

FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
            'decoder_loss_weights')
OVERLONG_MODES = ('truncate', 'error')


def get_task(name: str) -> seqio.Task | seqio.Mixture:
    """Looks up a registered task or mixture; an unknown name lists what is registered."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        tasks = sorted(seqio.TaskRegistry.names())
        mixtures = sorted(seqio.MixtureRegistry.names())
        raise ValueError(
                f'Unknown task or mixture {name!r} (gin: MIXTURE_OR_TASK_NAME). Registered tasks: '
                f'{", ".join(tasks) or "(none)"}; mixtures: {", ".join(mixtures) or "(none)"}. '
                'Check MIXTURE_OR_TASK_MODULE imports the module that registers it.') from None


@dataclasses.dataclass
class OverlongCounter:
    """Counts examples whose inputs or targets exceed TASK_FEATURE_LENGTHS (then truncated)."""

    variable: tf.Variable = dataclasses.field(
            default_factory=lambda: tf.Variable(0, dtype=tf.int64, trainable=False))
    reported: int = 0

    def new_since_last(self) -> int:
        total = int(self.variable.numpy())
        new, self.reported = total - self.reported, total
        return new


def _limit_lengths(ds: tf.data.Dataset, lengths: Mapping[str, int], mode: str,
                   counter: OverlongCounter, task_name: str) -> tf.data.Dataset:
    def fn(ex):
        ex = dict(ex)
        too_long = tf.constant(False)
        for key, n in lengths.items():
            if key in ex:
                too_long = too_long | (tf.shape(ex[key])[0] > n)
        if mode == 'error':
            tf.debugging.assert_equal(
                    too_long, False,
                    message=f'An example of {task_name!r} is longer than TASK_FEATURE_LENGTHS='
                            f'{dict(lengths)}; raise the lengths, or set OVERLONG="truncate".')
        else:
            counter.variable.assign_add(tf.cast(too_long, tf.int64))
        for key, n in lengths.items():
            if key in ex:
                ex[key] = ex[key][:n]
        return ex

    return ds.map(fn)


def host_dataset(task_name: str, feature_lengths: Mapping[str, int], split: str, global_batch: int,
                 *, seed: int, shuffle: bool = True, repeat: bool = True, skip_batches: int = 0,
                 overlong: str = 'truncate',
                 counter: OverlongCounter | None = None) -> tf.data.Dataset:
    """This host's batches (numpy-ready) of EncDecFeatureConverter features, `skip_batches` skipped."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f'OVERLONG={overlong!r}; choose one of {OVERLONG_MODES}.')
    n_hosts = jax.process_count()
    if global_batch % n_hosts:
        raise ValueError(f'BATCH_SIZE={global_batch} is not divisible by the {n_hosts} processes.')
    task = get_task(task_name)
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=n_hosts)
    ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, use_cached=False,
                          shuffle=shuffle, seed=seed, shard_info=shard,
                          num_epochs=None if repeat else 1, trim_output_features=False)
    ds = _limit_lengths(ds, feature_lengths, overlong, counter or OverlongCounter(), task_name)
    converter = seqio.EncDecFeatureConverter(pack=False)
    ds = converter(ds, dict(feature_lengths))
    ds = ds.batch(global_batch // n_hosts, drop_remainder=repeat)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(2)


def to_global(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
              global_batch: int | None = None) -> dict[str, jax.Array]:
    """Assembles each host's numpy batch into global arrays sharded over the data axis.

    This is the hot loop's one intended host-to-device transfer, so it is allowed explicitly
    inside the trainer's `jax.transfer_guard('disallow')`.
    """
    sharding = partitioning.batch_sharding(mesh)
    out = {}
    with jax.transfer_guard('allow'):
        for key in FEATURES:
            x = np.asarray(local[key])
            shape = None if global_batch is None else (global_batch,) + x.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    for batch in ds.as_numpy_iterator():
        yield {k: batch[k] for k in FEATURES}


def log_overlong(counter: OverlongCounter, task_name: str) -> None:
    new = counter.new_since_last()
    if new:
        logging.warning('Truncated %d examples of %s longer than TASK_FEATURE_LENGTHS (total %d).',
                        new, task_name, counter.reported)
