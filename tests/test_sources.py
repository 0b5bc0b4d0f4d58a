"""tasks/sources.py: a finite split shuffled by a seeded permutation, sharded into disjoint parts
that cover it, and read by the toy and JSONL tasks without seqio's "uncached FunctionDataset"
warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
import tasks.toy
from tasks.jsonl_task import TeacherTopK, _topk_dataset
from tasks.sources import FiniteDataSource

UNCACHED = 'uncached FunctionDataset'
N = 50


def _numbers(split: str) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({'n': tf.range(N if split == 'train' else 7)})


SOURCE = FiniteDataSource(_numbers, splits=('train', 'validation'))


def _read(source=SOURCE, split='train', **kw) -> list[int]:
    return [int(ex['n']) for ex in source.get_dataset(split, **kw).as_numpy_iterator()]


def test_unshuffled_read_is_the_stored_order():
    assert _read(shuffle=False) == list(range(N))
    assert _read(split='validation', shuffle=False) == list(range(7))


def test_shuffled_read_is_a_seeded_permutation_of_the_split():
    first = _read(shuffle=True, seed=3)
    assert sorted(first) == list(range(N)) and first != list(range(N))
    assert _read(shuffle=True, seed=3) == first                  # same seed, same order
    assert _read(shuffle=True, seed=4) != first                  # another seed, another order
    # The same order in every epoch: seqio's in-memory cache of a small split changes nothing.
    ds = SOURCE.get_dataset('train', shuffle=True, seed=3).repeat(2)
    assert [int(ex['n']) for ex in ds.as_numpy_iterator()] == first * 2
    assert sorted(_read(shuffle=True, seed=None)) == list(range(N))


@pytest.mark.parametrize('shuffle,seed', [(False, None), (True, 3), (True, None)])
def test_shards_are_disjoint_and_cover_the_split(shuffle, seed):
    parts = [_read(shuffle=shuffle, seed=seed, shard_info=seqio.ShardInfo(index=i, num_shards=3))
             for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(N))
    assert [len(p) for p in parts] == [17, 17, 16]
    if seed is not None:
        whole = _read(shuffle=shuffle, seed=seed)
        assert parts == [whole[i::3] for i in range(3)]           # every 3rd of the host order
        again = _read(shuffle=shuffle, seed=seed, shard_info=seqio.ShardInfo(1, 3))
        assert again == parts[1]


def test_seqio_hands_shards_to_the_source_and_sizes_are_kept():
    assert SOURCE.supports_arbitrary_sharding and SOURCE.performs_internal_shuffling
    assert SOURCE.caching_permitted and SOURCE.num_input_examples('train') is None
    toy = seqio.get_mixture_or_task('doa_toy').source
    assert isinstance(toy, FiniteDataSource)
    assert toy.num_input_examples('train') == 32 and toy.num_input_examples('validation') == 16
    assert list(toy.list_shards('train')) == ['train']


def test_sizes_unknown_to_tf_are_counted_and_bad_requests_say_what_is_wrong():
    odd = FiniteDataSource(lambda split: _numbers(split).filter(lambda ex: ex['n'] % 2 == 1),
                           splits=('train',))
    got = _read(odd, shuffle=True, seed=1)
    assert sorted(got) == list(range(1, N, 2)) and got != sorted(got)
    with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
        SOURCE.get_dataset('test')
    with pytest.raises(ValueError, match='shard 2 of 2 does not exist'):
        SOURCE.get_dataset('train', shard_info=seqio.ShardInfo(index=2, num_shards=2))
    endless = FiniteDataSource(lambda split: _numbers(split).repeat(), splits=('train',))
    with pytest.raises(ValueError, match='infinite'):
        endless.get_dataset('train', shuffle=True, seed=0)


def test_examples_of_varying_shapes_shuffle():
    """Pseudo-labels with the teacher's top-k: one (target tokens, k) array per example."""
    rows = [np.full((n, 2), n, np.int32) for n in (1, 3, 2, 4)]
    labels = TeacherTopK([f'id{i}' for i in range(4)], ['a', 'b', 'c', 'd'], ['w', 'x', 'y', 'z'],
                         rows, [r.astype(np.float32) for r in rows], [])
    source = FiniteDataSource(lambda split: _topk_dataset(labels, 'p: '), splits=('train',))
    got = list(source.get_dataset('train', shuffle=True, seed=0).as_numpy_iterator())
    assert sorted(ex['id'].decode() for ex in got) == ['id0', 'id1', 'id2', 'id3']
    for ex in got:
        n = int(ex['id'].decode()[2:])
        np.testing.assert_array_equal(ex['teacher_topk_ids'], rows[n])


def _task_ids(task: seqio.Task, key: str, seed: int, n: int = -1, shard=None) -> list[bytes]:
    """The first `n` examples a training read gives (all of one epoch: n=-1)."""
    ds = task.get_dataset({'inputs': 64, 'targets': 16}, split='train', shuffle=True, seed=seed,
                          shard_info=shard, num_epochs=None if n > 0 else 1,
                          shuffle_buffer_size=64)
    return [ex[key] for ex in ds.take(n).as_numpy_iterator()]


@pytest.fixture(scope='module')
def jsonl_task(tmp_path_factory) -> seqio.Task:
    path = tmp_path_factory.mktemp('jsonl') / 'train.jsonl'
    path.write_text(''.join(json.dumps({'source': f's{i}', 'target': f't{i}'}) + '\n'
                            for i in range(40)))
    return tasks.register_jsonl_task('test_sources_jsonl', {'train': str(path)}, 'q: ',
                                     vocabulary=seqio.ByteVocabulary(), overwrite=True)


def test_training_reads_warn_nothing(jsonl_task, caplog):
    """The toy task and a JSONL task read for training (shuffled, seeded, sharded): no warning
    from seqio, and two hosts read disjoint halves of the JSONL split."""
    toy = seqio.get_mixture_or_task('doa_toy')
    with caplog.at_level('WARNING'):
        toy_epoch = _task_ids(toy, 'inputs_pretokenized', seed=7)
        halves = [_task_ids(jsonl_task, 'id', seed=7, shard=seqio.ShardInfo(i, 2))
                  for i in range(2)]
    assert UNCACHED not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.name == 'absl' and r.levelname == 'WARNING']
    assert sorted(toy_epoch) == sorted(e['inputs'].encode()
                                       for e in tasks.toy.toy_examples('train'))
    assert len(halves[0]) == len(halves[1]) == 20 and not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) == {f'train.jsonl:{i}'.encode() for i in range(1, 41)}


def test_training_reads_repeat_exactly(jsonl_task):
    """A second training read with the seed (what a resumed run makes before skipping the batches
    it consumed) gives the same stream, epochs after the first included."""
    toy = seqio.get_mixture_or_task('doa_toy')
    toy_stream = _task_ids(toy, 'inputs_pretokenized', seed=7, n=64)
    assert toy_stream == _task_ids(toy, 'inputs_pretokenized', seed=7, n=64)
    jsonl_stream = _task_ids(jsonl_task, 'id', seed=7, n=120)
    assert jsonl_stream == _task_ids(jsonl_task, 'id', seed=7, n=120)
    assert set(jsonl_stream) == {f'train.jsonl:{i}'.encode() for i in range(1, 41)}
