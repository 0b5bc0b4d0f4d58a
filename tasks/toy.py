"""`doa_toy`: a small deterministic synthetic text-to-text task, generated in code, for offline runs.

Input: "doa_toy: " + 3-6 words drawn from a 8-word list; target: the last word. Splits: 'train'
(32 examples) and 'validation' (16), the same on every machine. Byte vocabulary, so no
SentencePiece model is needed; metric: exact-match accuracy.
"""

from __future__ import annotations

import random

import seqio
import tensorflow as tf

from doa_jax import distributed
from tasks.sources import FiniteDataSource

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

TASK_NAME = 'doa_toy'
WORDS = ('red', 'green', 'blue', 'cat', 'dog', 'sun', 'moon', 'tree')
SPLIT_SIZES = {'train': 32, 'validation': 16}
VOCABULARY = seqio.ByteVocabulary()


def toy_examples(split: str) -> list[dict[str, str]]:
    """The fixed examples of a split (seeded by the split name, independent of the hash seed)."""
    rng = random.Random(f'doa_toy/{split}')
    out = []
    for _ in range(SPLIT_SIZES[split]):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        out.append({'inputs': f'{TASK_NAME}: ' + ' '.join(words), 'targets': words[-1]})
    return out


def _dataset_fn(split: str) -> tf.data.Dataset:
    examples = toy_examples(split)
    return tf.data.Dataset.from_tensor_slices({
            'inputs': [e['inputs'] for e in examples],
            'targets': [e['targets'] for e in examples]})


def accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
    hits = sum(t == p for t, p in zip(targets, predictions))
    return {'accuracy': 100.0 * hits / max(len(targets), 1)}


def register() -> None:
    """Registers `doa_toy` once (importing this module does it)."""
    if TASK_NAME in seqio.TaskRegistry.names():
        return
    features = {k: seqio.Feature(VOCABULARY, add_eos=True) for k in ('inputs', 'targets')}
    seqio.TaskRegistry.add(
            TASK_NAME,
            source=FiniteDataSource(_dataset_fn, splits=tuple(SPLIT_SIZES),
                                    num_input_examples=dict(SPLIT_SIZES)),
            preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                           # append_eos (not _after_trim): the trainer counts over-long examples.
                           seqio.preprocessors.append_eos],
            output_features=features,
            metric_fns=[accuracy])


register()
