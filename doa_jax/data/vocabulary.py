"""The vocabulary the tasks register with, chosen before `import tasks`.

Order: the DOA_VOCAB environment variable ('byte' for seqio.ByteVocabulary, else a SentencePiece
model path), then `set_default_vocabulary` (the entry points call it from the gin macro VOCABULARY
before importing MIXTURE_OR_TASK_MODULE), then the public T5 SentencePiece model. SentencePiece
vocabularies load lazily, so registering tasks never reads the model file; the public model lives
on gs://t5-data, and when it cannot be read (offline) the error says how to point DOA_VOCAB at a
local copy.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

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


class _PublicT5Vocabulary(seqio.SentencePieceVocabulary):
    """The public T5 model on gs://t5-data: a failed read names DOA_VOCAB instead of being
    TensorFlow's bare network or credentials error. Equal to a SentencePieceVocabulary of the
    same file (seqio compares state), so t5x's vocabulary check still passes."""

    def _model_context(self):
        try:
            return super()._model_context()
        except (tf.errors.OpError, OSError) as e:
            from doa_jax.vocab import VocabularyNotFoundError
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VocabularyNotFoundError(
                    f'cannot read the default T5 vocabulary {self.sentencepiece_model_file} '
                    f'({reason}); no DOA_VOCAB was set. Offline, copy that file and set '
                    f'DOA_VOCAB=/path/to/sentencepiece.model (or --gin.VOCABULARY for the doa_jax '
                    f"entry points); DOA_VOCAB=byte gives seqio's byte vocabulary for tiny runs."
            ) from e


def set_default_vocabulary(spec: seqio.Vocabulary | str | None) -> None:
    """Sets the vocabulary tasks registered from now on use (None restores the T5 default)."""
    global _default
    _default = spec


def default_vocabulary() -> seqio.Vocabulary:
    env = os.environ.get('DOA_VOCAB')
    if env:
        return vocabulary_from_spec(env)
    if _default is not None:
        return vocabulary_from_spec(_default)
    return _PublicT5Vocabulary(T5_SPM_PATH, extra_ids=EXTRA_IDS)
