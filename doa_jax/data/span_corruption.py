"""T5's pretraining objective, span corruption, as a seqio preprocessor over token ids.

A share of each example's tokens (`noise_density`), in spans of `mean_noise_span_length` tokens
on average, is taken out of the inputs; each span is replaced by one sentinel, and the targets
list every sentinel followed by the tokens it replaced:

    tokens   10 11 12 13 14 15 16 17 18 19      noise: 12 13 and 17
    inputs   10 11 S0 14 15 16 S1 18 19
    targets  S0 12 13 S1 17

Sentinels are the vocabulary's extra ids from the top, as in T5: S0 = vocab_size - 1, S1 =
vocab_size - 2, ... The mask follows T5's shape (kept and noise spans alternate, the first span
kept, the last one noise; their lengths drawn at random), but the draw is seeded by the example's
own `index`, so an example is corrupted the same way in every epoch, on every machine and in any
order. This is not T5's code or its random stream: masks differ from t5.data's.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from doa_jax import distributed

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

# Bumped whenever the masks or the layout of inputs/targets change (cached pretrained
# checkpoints are keyed by it: doa_jax.study.pretrained).
VERSION = 1


def _segments(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `count` non-empty runs at random cut points."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=count - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over `length` tokens: round(length x noise_density) of them (at least one,
    and one left) are noise, in about noise/mean_noise_span_length spans that alternate with kept
    spans, the first span kept. Shorter than 2 tokens: nothing is noise."""
    if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise ValueError(f'noise_density must be in (0, 1) and mean_noise_span_length >= 1; got '
                         f'{noise_density} and {mean_noise_span_length}.')
    mask = np.zeros(length, bool)
    if length < 2:
        return mask
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = min(max(int(round(noise / mean_noise_span_length)), 1), noise, length - noise)
    position = 0
    for kept, noisy in zip(_segments(length - noise, spans, rng), _segments(noise, spans, rng)):
        position += kept
        mask[position:position + noisy] = True
        position += noisy
    return mask


def corrupt(tokens: Sequence[int], mask: Sequence[bool],
            sentinel: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """(inputs, targets): each run of masked tokens becomes `sentinel(k)` in the inputs (k counts
    the runs from 0), and the targets hold each sentinel followed by the tokens it replaced."""
    inputs, targets = [], []
    spans, previous = 0, False
    for token, masked in zip(tokens, mask):
        if masked:
            if not previous:
                inputs.append(sentinel(spans))
                targets.append(sentinel(spans))
                spans += 1
            targets.append(int(token))
        else:
            inputs.append(int(token))
        previous = bool(masked)
    return inputs, targets


def sentinel_id(vocabulary: seqio.Vocabulary, k: int) -> int:
    """The k-th sentinel: the vocabulary's k-th extra id from the top (T5's convention)."""
    if not 0 <= k < vocabulary.extra_ids:
        raise ValueError(f'span {k} needs a sentinel, but the vocabulary has '
                         f'{vocabulary.extra_ids} extra ids; give it more (extra_ids) or use a '
                         'lower noise density or longer spans.')
    return vocabulary.vocab_size - 1 - k


def span_corruption(dataset: tf.data.Dataset,
                    output_features: Mapping[str, seqio.Feature] | None = None, *,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    seed: int = 0, targets: str = 'spans') -> tf.data.Dataset:
    """seqio preprocessor, after `tokenize`: an example's token ids in 'targets' and its integer
    'index' become {'inputs', 'targets'} as `corrupt` makes them, with the mask `noise_mask`
    draws from (seed, index). Defaults: T5's (15% noise, spans of 3 on average).
    `targets='original'` keeps the whole uncorrupted sequence as the targets (the T5 paper's
    "BERT-style" denoising, as BART and MASS reconstruct): the decoder learns to write the full
    sentence back, copying from the inputs and filling the sentinels."""
    if targets not in ('spans', 'original'):
        raise ValueError(f"targets={targets!r}; use 'spans' (T5) or 'original' (reconstruct).")
    vocabulary = output_features['targets'].vocabulary

    def one(tokens: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = noise_mask(len(tokens), noise_density, mean_noise_span_length,
                          np.random.default_rng([seed, int(index)]))
        inputs, spans = corrupt(tokens, mask, functools.partial(sentinel_id, vocabulary))
        out = spans if targets == 'spans' else tokens
        return np.asarray(inputs, np.int32), np.asarray(out, np.int32)

    def fn(example: dict) -> dict:
        inputs, targets = tf.numpy_function(one, [example['targets'], example['index']],
                                            [tf.int32, tf.int32], stateful=False)
        inputs.set_shape([None])
        targets.set_shape([None])
        return {'inputs': inputs, 'targets': targets}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
