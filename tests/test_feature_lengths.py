"""Per-task feature lengths: measured from the data, recorded per vocabulary, taken by runs
whose TASK_FEATURE_LENGTHS is None."""

from __future__ import annotations

import math

import pytest
import seqio

import tasks.toy  # noqa: F401  registers doa_toy
from doa_jax.data import lengths


def test_measure_counts_the_tokens_the_task_emits():
    stats = lengths.measure('doa_toy', ('train', 'validation'), percentile=100)
    examples = tasks.toy.toy_examples('train') + tasks.toy.toy_examples('validation')
    # Byte vocabulary: one token per UTF-8 byte, plus EOS.
    longest = {k: max(len(e[k].encode()) + 1 for e in examples) for k in ('inputs', 'targets')}
    assert stats['examples'] == len(examples) and stats['vocabulary'] == 'byte'
    assert stats['splits'] == ['train', 'validation']
    for k in ('inputs', 'targets'):
        assert stats[k]['max'] == longest[k]
        assert stats['lengths'][k] == 8 * math.ceil(longest[k] / 8)


@pytest.fixture
def clean_records():
    saved = dict(lengths._RECORDED)
    yield
    lengths._RECORDED.clear()
    lengths._RECORDED.update(saved)


def test_resolve_prefers_given_then_recorded_then_default(clean_records):
    given, default = {'inputs': 40, 'targets': 8}, {'inputs': 512, 'targets': 128}
    assert lengths.resolve('doa_toy', given, default) == given
    assert lengths.resolve('doa_toy', None, default) == default
    with pytest.raises(ValueError, match='python -m doa_jax.data lengths doa_toy'):
        lengths.resolve('doa_toy', None)
    lengths.record('doa_toy', 'byte', {'inputs': 48, 'targets': 8})
    assert lengths.resolve('doa_toy', None, default) == {'inputs': 48, 'targets': 8}
    # Recorded for another vocabulary only: not this task's lengths.
    lengths._RECORDED.clear()
    lengths.record('doa_toy', 'spm:0123456789abcdef', {'inputs': 16, 'targets': 8})
    assert lengths.resolve('doa_toy', None, default) == default


def test_inherit_copies_and_clears(clean_records):
    lengths.record('src_task', 'byte', {'inputs': 24, 'targets': 16})
    lengths.inherit('derived_task', 'src_task')
    assert lengths.recorded('derived_task', seqio.ByteVocabulary()) == {'inputs': 24, 'targets': 16}
    lengths.inherit('derived_task', None)
    assert lengths.recorded('derived_task', seqio.ByteVocabulary()) is None


def test_sentencepiece_key_names_the_model_not_the_path(tmp_path):
    import shutil
    import os
    src = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                       'sentencepiece.model')
    copy = tmp_path / 'copy.model'
    shutil.copy(src, copy)
    a = lengths.vocabulary_key(seqio.SentencePieceVocabulary(src))
    assert a.startswith('spm:') and a == lengths.vocabulary_key(
            seqio.SentencePieceVocabulary(str(copy)))


def test_paper_tasks_record_what_the_command_measures(data_dir, monkeypatch):
    """The registry's numbers for NQ are what `python -m doa_jax.data lengths` measures now, and
    its budget slices and pool share them."""
    monkeypatch.setenv('DOA_DATA_DIR', str(data_dir))
    from tasks import paper_tasks
    vocab = seqio.ByteVocabulary()
    names = paper_tasks.register_paper_tasks(vocabulary=vocab, overwrite=True)
    try:
        recorded = paper_tasks.FEATURE_LENGTHS['byte']['nq']
        assert lengths.measure('doa_nq')['lengths'] == recorded
        for name in ('doa_nq', 'doa_nq_labeled_10000', 'doa_nq_unlabeled'):
            assert name in names and lengths.recorded(name, vocab) == recorded
    finally:
        paper_tasks.register_paper_tasks(overwrite=True)   # back to the default vocabulary
