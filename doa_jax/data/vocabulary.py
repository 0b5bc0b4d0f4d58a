"""The vocabulary the tasks register with, chosen before `import tasks`.

Order: the DOA_VOCAB environment variable ('byte' for seqio.ByteVocabulary, else a SentencePiece
model path), then `set_default_vocabulary` (the entry points call it from the gin macro VOCABULARY
before importing MIXTURE_OR_TASK_MODULE), then the public T5 SentencePiece model. SentencePiece
vocabularies load lazily, so registering tasks never reads the model file.
"""

from __future__ import annotations

import os

import seqio

T5_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
EXTRA_IDS = 100
_default: seqio.Vocabulary | str | None = None


def vocabulary_from_spec(spec: seqio.Vocabulary | str, extra_ids: int = EXTRA_IDS) -> seqio.Vocabulary:
    """'byte' -> ByteVocabulary; a path -> SentencePieceVocabulary; a Vocabulary passes through."""
    if isinstance(spec, seqio.Vocabulary):
        return spec
    if spec == 'byte':
        return seqio.ByteVocabulary()
    try:
        from doa_jax import vocab as vocab_lib  # The project's resolver, when present.
        return vocab_lib.get_vocabulary(spec, extra_ids=extra_ids)
    except ImportError:
        return seqio.SentencePieceVocabulary(spec, extra_ids=extra_ids)


def set_default_vocabulary(spec: seqio.Vocabulary | str | None) -> None:
    """Sets the vocabulary tasks registered from now on use (None restores the T5 default)."""
    global _default
    _default = spec


def default_vocabulary() -> seqio.Vocabulary:
    env = os.environ.get('DOA_VOCAB')
    if env:
        return vocabulary_from_spec(env)
    return vocabulary_from_spec(_default if _default is not None else T5_SPM_PATH)
