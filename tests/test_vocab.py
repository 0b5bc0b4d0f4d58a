"""The T5 vocabulary: a sentencepiece model trained on the real data, with 100 extra ids."""

from __future__ import annotations

import json

import pytest

from doa_jax.data.vocabulary import VocabularyNotFoundError, get_vocabulary


def _train_spm(data_dir, tmp_path, pieces=300):
    import sentencepiece as spm

    lines = []
    with open(data_dir / 'fever' / 'fever_dev_all.json') as f:
        for i, line in enumerate(f):
            if i >= 2000:
                break
            lines.append(json.loads(line)['source'])
    prefix = tmp_path / 'spm'
    # T5's conventions: pad 0, eos 1, unk 2, no bos.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=pieces, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type='unigram', character_coverage=1.0)
    return str(prefix) + '.model', lines


def test_sentencepiece_vocabulary_with_extra_ids(data_dir, tmp_path):
    path, lines = _train_spm(data_dir, tmp_path)
    vocab = get_vocabulary(path)
    assert vocab.vocab_size == 300 + 100
    assert vocab.eos_id == 1 and vocab.pad_id == 0
    ids = vocab.encode(lines[0])
    assert ids and max(ids) < 300
    assert vocab.decode(ids) == lines[0]
    # Sentinels are the last 100 ids, as in T5 (<extra_id_0> is the highest id).
    assert vocab.decode([399]) == '<extra_id_0>'


def test_missing_vocabulary_names_the_gin_macro(tmp_path):
    with pytest.raises(VocabularyNotFoundError, match='--gin.VOCABULARY=.*DOA_VOCAB'):
        get_vocabulary(str(tmp_path / 'missing.model'))
    with pytest.raises(VocabularyNotFoundError, match='VOCABULARY'):
        get_vocabulary(None)
    assert get_vocabulary('byte').vocab_size == 259   # ByteVocabulary: 3 special ids + 256 bytes
