"""The T5 vocabulary: a seqio SentencePieceVocabulary with T5's 100 sentinel (extra) ids.

Users point it at the sentencepiece model they have (the public T5 one is
gs://t5-data/vocabs/cc_all.32000/sentencepiece.model, 32000 pieces + 100 extra ids = 32100; the
model's embedding table is padded to 32128).
"""

from __future__ import annotations

import os

import seqio

EXTRA_IDS = 100
_HOW_TO_SET = ('set it with --gin.VOCABULARY="\'/path/to/sentencepiece.model\'" (gin macro '
               "VOCABULARY), or the environment variable DOA_VOCAB; 'byte' selects "
               'seqio.ByteVocabulary for offline tiny runs')


class VocabularyNotFoundError(FileNotFoundError):
    """The sentencepiece model file does not exist."""


def get_vocabulary(path: str | None, extra_ids: int = EXTRA_IDS) -> seqio.Vocabulary:
    """A SentencePieceVocabulary for `path` ('byte' gives seqio.ByteVocabulary).

    Local paths are checked now, so a typo fails before any data is read; remote paths (gs://)
    load lazily on first use.
    """
    if not path:
        raise VocabularyNotFoundError(f'No vocabulary given; {_HOW_TO_SET}.')
    if path == 'byte':
        return seqio.ByteVocabulary()
    if '://' not in path and not os.path.isfile(path):
        raise VocabularyNotFoundError(f'Vocabulary file {path!r} does not exist; {_HOW_TO_SET}.')
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
