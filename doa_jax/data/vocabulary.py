"""The T5 vocabulary: which one the tasks register with, and how a path becomes one.

A vocabulary is a seqio SentencePieceVocabulary with T5's 100 sentinel (extra) ids; users point it
at the sentencepiece model they have (the public T5 one is
gs://t5-data/vocabs/cc_all.32000/sentencepiece.model, 32000 pieces + 100 extra ids = 32100; the
model's embedding table is padded to 32128). 'byte' selects seqio.ByteVocabulary for offline
tiny runs.

The default, chosen before `import tasks`: the DOA_VOCAB environment variable ('byte' or a
SentencePiece model path), then `set_default_vocabulary` (the entry points call it from the gin
macro VOCABULARY before importing MIXTURE_OR_TASK_MODULE), then the public T5 SentencePiece model.
SentencePiece vocabularies load lazily, so registering tasks never reads the model file; the public
model lives on gs://t5-data, and when it cannot be read (offline) the error says how to point
DOA_VOCAB at a local copy.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

from doa_jax import distributed

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

T5_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
EXTRA_IDS = 100
_HOW_TO_SET = ('set it with --gin.VOCABULARY="\'/path/to/sentencepiece.model\'" (gin macro '
               "VOCABULARY), or the environment variable DOA_VOCAB; 'byte' selects "
               'seqio.ByteVocabulary for offline tiny runs')
_default: seqio.Vocabulary | str | None = None


class VocabularyNotFoundError(FileNotFoundError):
    """The sentencepiece model file does not exist (or cannot be read)."""


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


def vocabulary_from_spec(spec: seqio.Vocabulary | str, extra_ids: int = EXTRA_IDS) -> seqio.Vocabulary:
    """'byte' -> ByteVocabulary; a path -> SentencePieceVocabulary; a Vocabulary passes through."""
    if isinstance(spec, seqio.Vocabulary):
        return spec
    return get_vocabulary(spec, extra_ids=extra_ids)


class _PublicT5Vocabulary(seqio.SentencePieceVocabulary):
    """The public T5 model on gs://t5-data: a failed read names DOA_VOCAB instead of being
    TensorFlow's bare network or credentials error. Equal to a SentencePieceVocabulary of the
    same file (seqio compares state), so t5x's vocabulary check still passes."""

    def _model_context(self):
        try:
            return super()._model_context()
        except (tf.errors.OpError, OSError) as e:
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
