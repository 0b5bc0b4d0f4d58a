"""Input pipeline: a seqio task/mixture, this host's share of each global batch, onto the mesh.

Every host reads `global_batch / process_count` examples per step from its own seqio shard and
`jax.make_array_from_process_local_data` assembles the global array; no host ever sees another
host's examples. The order is fixed by `seed`, so skipping the batches a checkpoint records as
consumed resumes the stream exactly where it stopped.

A task whose examples carry the teacher's stored top-k (`TEACHER_FEATURES`, each (target tokens,
k); see `tasks.jsonl_task.register_pseudo_labeled_task(with_topk=True)`) keeps them: they are cut
and padded to the target length beside `decoder_target_tokens` and travel in the batch, sharded
over the data axis like the other features, for offline token-level KD.

`pack=True` packs several examples into each row as t5x trains by default
(`seqio.EncDecFeatureConverter(pack=True)`): the batches then also carry `SEGMENT_FEATURES`, which
the model uses to keep each example's attention to itself. Evaluation reads unpacked rows (one
input per row, as decoding needs).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from doa_jax import distributed, partitioning

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
            'decoder_loss_weights')
# The packing features the model reads. seqio also writes encoder_positions/decoder_positions; they
# stay on the host, since for seqio's consecutive positions the model's shared relative-position
# bias is already each example's own (doa_jax.models.t5).
SEGMENT_FEATURES = ('encoder_segment_ids', 'decoder_segment_ids')
# Optional per-target-token features (offline KD); names as doa_jax.distill_losses reads them.
TEACHER_FEATURES = {'teacher_topk_ids': tf.int32, 'teacher_topk_logprobs': tf.float32}
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
            if key not in ex:
                continue
            x = ex[key]
            if key == 'inputs':
                # A cut input keeps its final EOS (as seqio's append_eos_after_trim does, and as
                # pseudo-labeling tokenizes the teacher's inputs): the encoder sees where it ends.
                ex[key] = tf.cond(tf.shape(x)[0] > n,
                                  lambda: tf.concat([x[:n - 1], x[-1:]], 0), lambda: x)
            else:
                # Targets (and the teacher's top-k rows aligned to them) are cut plainly, so every
                # kept target token keeps its own teacher row.
                ex[key] = x[:n]
        return ex

    return ds.map(fn)


def host_dataset(task_name: str, feature_lengths: Mapping[str, int], split: str, global_batch: int,
                 *, seed: int, shuffle: bool = True, repeat: bool = True, skip_batches: int = 0,
                 overlong: str = 'truncate', counter: OverlongCounter | None = None,
                 pack: bool = False) -> tf.data.Dataset:
    """This host's batches (numpy-ready) of EncDecFeatureConverter features, `skip_batches` skipped;
    with `pack`, each row packs as many examples as fit (t5x's default for training)."""
    n_hosts = jax.process_count()
    if global_batch % n_hosts:
        raise ValueError(f'BATCH_SIZE={global_batch} is not divisible by the {n_hosts} processes.')
    ds = _host_rows(task_name, feature_lengths, split, seed=seed, shuffle=shuffle,
                    num_epochs=None if repeat else 1, overlong=overlong, counter=counter,
                    pack=pack)
    ds = ds.batch(global_batch // n_hosts, drop_remainder=repeat)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(2)


def epoch_rows(task_name: str, feature_lengths: Mapping[str, int], split: str = 'train', *,
               seed: int, shuffle: bool = True, overlong: str = 'truncate',
               pack: bool = False) -> int:
    """The rows one pass over this host's share of `split` makes, built as `host_dataset` builds
    its batches (the same task, lengths, shuffle seed and feature converter; with `pack`, the
    packed rows). A study's epochs rule counts them (doa_jax.study.runner.train_rows). Training
    streams the data repeated, so rows at an epoch's end may pack with the next epoch's first
    examples; one pass counts its own rows only."""
    ds = _host_rows(task_name, feature_lengths, split, seed=seed, shuffle=shuffle, num_epochs=1,
                    overlong=overlong, counter=None, pack=pack)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _host_rows(task_name: str, feature_lengths: Mapping[str, int], split: str, *, seed: int,
               shuffle: bool, num_epochs: int | None, overlong: str,
               counter: OverlongCounter | None, pack: bool) -> tf.data.Dataset:
    """This host's examples of `split` cut to `feature_lengths` and converted to model features
    (packed with `pack`), unbatched."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f'OVERLONG={overlong!r}; choose one of {OVERLONG_MODES}.')
    task = get_task(task_name)
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, use_cached=False,
                          shuffle=shuffle, seed=seed, shard_info=shard, num_epochs=num_epochs,
                          trim_output_features=False)
    teacher = _teacher_features(ds, task_name)
    lengths = {**feature_lengths, **{k: feature_lengths['targets'] for k in teacher}}
    ds = _limit_lengths(ds, lengths, overlong, counter or OverlongCounter(), task_name)
    if pack and teacher:
        raise ValueError(f'Task {task_name!r} carries the teacher\'s top-k ({sorted(teacher)}), '
                         'which seqio cannot pack; train it unpacked (gin: PACK=False, as '
                         'runs/distill_kd_offline.gin does).')
    converter = seqio.EncDecFeatureConverter(pack=pack, passthrough_features=teacher or None)
    return converter(ds, lengths)


def _teacher_features(ds: tf.data.Dataset, task_name: str) -> dict:
    """The TEACHER_FEATURES `ds` carries, as passthrough specs for the feature converter."""
    spec = ds.element_spec
    found = {k: dtype for k, dtype in TEACHER_FEATURES.items() if k in spec}
    if found and len(found) != len(TEACHER_FEATURES):
        raise ValueError(f'Task {task_name!r} has {sorted(found)} but not all of '
                         f'{sorted(TEACHER_FEATURES)}; offline KD needs both.')
    for key, dtype in found.items():
        if spec[key].shape.rank != 2 or spec[key].dtype != dtype:
            raise ValueError(f'Task {task_name!r} feature {key!r} is {spec[key]}; expected '
                             f'{dtype.name} of shape (target tokens, k).')
    return {k: seqio.FeatureConverter.FeatureSpec(dtype=dtype, rank=2)
            for k, dtype in found.items()}


def check_teacher_ids(batch: Mapping[str, np.ndarray], vocab_size: int) -> None:
    """Stored teacher top-k ids must index the student's vocabulary (else: another vocabulary)."""
    ids = batch.get('teacher_topk_ids')
    if ids is None or not ids.size:
        return
    top = int(ids.max())
    if top >= vocab_size:
        raise ValueError(f'The pseudo-labels\' teacher top-k holds token id {top}, but the student '
                         f'vocab_size is {vocab_size}: the teacher used another vocabulary. Token-'
                         'level KD needs one shared vocabulary; pseudo-label with a teacher of the '
                         "student's family (e.g. both t5_1_1_*) and --gin.VOCABULARY, or use "
                         'sequence KD (gin_configs/runs/distill_seq.gin).')


def to_global(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
              global_batch: int | None = None) -> dict[str, jax.Array]:
    """Assembles each host's numpy batch (FEATURES; SEGMENT_FEATURES and TEACHER_FEATURES when
    present) into global
    arrays sharded over the data axis (batch dimension only).

    This is the hot loop's one intended host-to-device transfer, so it is allowed explicitly
    inside the trainer's `jax.transfer_guard('disallow')`.
    """
    sharding = partitioning.batch_sharding(mesh)
    out = {}
    optional = (*SEGMENT_FEATURES, *TEACHER_FEATURES)
    with jax.transfer_guard('allow'):
        for key in (*FEATURES, *(k for k in optional if k in local)):
            x = np.asarray(local[key])
            shape = None if global_batch is None else (global_batch,) + x.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def numpy_batches(ds: tf.data.Dataset,
                  vocab_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of FEATURES plus any SEGMENT_FEATURES and TEACHER_FEATURES; with `vocab_size`,
    teacher ids are checked against the student's vocabulary on the host (before each batch
    reaches a device)."""
    keys = [*FEATURES, *(k for k in (*SEGMENT_FEATURES, *TEACHER_FEATURES)
                         if k in ds.element_spec)]
    for batch in ds.as_numpy_iterator():
        out = {k: batch[k] for k in keys}
        if vocab_size is not None:
            check_teacher_ids(out, vocab_size)
        yield out


def log_overlong(counter: OverlongCounter, task_name: str) -> None:
    new = counter.new_since_last()
    if new:
        logging.warning('Truncated %d examples of %s longer than TASK_FEATURE_LENGTHS (total %d).',
                        new, task_name, counter.reported)
