"""`doa_synthetic_denoising`: denoising over the synthetic protocol corpus, to pretrain on.

The pretraining task of the study quickstart's models (gin_configs/runs/pretrain_synthetic.gin):
sentences of `doa_jax.data.synthetic.corpus` (splits the study never draws from; no tags), byte
vocabulary with 100 extra ids for sentinels. The inputs are T5's span corruption with its defaults
(15% of the bytes, in spans of 3 on average, each span one sentinel; `doa_jax.data.span_corruption`)
and the targets are the whole sentence, which the decoder writes back (the T5 paper's "BERT-style"
objective, as BART and MASS do).

Why not T5's own targets (only the dropped spans): in one measurement (docs/study.md), t5_1_1_mini
pretrained on them for 1,000 steps and fine-tuned 80 steps on the quickstart's 64 labels scored
micro-F1 28.8, below the 38.4 of the same fine-tuning from scratch; pretrained 600 steps on these
targets it scored 76.4 (with the example order of the time; 75.1 with today's). The tagging targets copy the sentence's words in order, which span-only
targets (a few bytes each) never ask the decoder to do.

Deterministic: example i of a split is the same sentence, corrupted the same way, on every machine
and in every epoch.

`import tasks.synthetic_corpus` registers it (MIXTURE_OR_TASK_MODULE = 'tasks.synthetic_corpus').
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from doa_jax import distributed
from doa_jax.data import span_corruption, synthetic
from tasks.sources import ORDER_VERSION, FiniteDataSource

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

TASK_NAME = 'doa_synthetic_denoising'
# 16,384 sentences: 1,024 steps of 16 before an example repeats.
SPLIT_SIZES = {'train': 16384, 'validation': 256}
# The bytes, then 100 sentinels (ids 259..358; the first sentinel is 358). The study's tasks use
# the same byte ids without extra ids; the T5 models' 512-row embedding holds both.
VOCABULARY = seqio.ByteVocabulary(extra_ids=100)
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
TARGETS = 'original'   # the whole sentence; 'spans': T5's span-only targets
# What a checkpoint pretrained on this task depends on besides its run's settings: the corpus,
# the corruption, the settings above and the order training reads the examples in
# (doa_jax.study.pretrained keys its cache by it).
VERSION = (f'corpus{synthetic.CORPUS_VERSION}-denoise{span_corruption.VERSION}-{TARGETS}'
           f'-order{ORDER_VERSION}')


def _dataset_fn(split: str) -> tf.data.Dataset:
    sentences = synthetic.corpus(split, SPLIT_SIZES[split])
    return tf.data.Dataset.from_tensor_slices({
            'index': tf.range(len(sentences), dtype=tf.int64),
            'targets': tf.constant(sentences, tf.string)})


def register() -> None:
    """Registers the task once (importing this module does it)."""
    if TASK_NAME in seqio.TaskRegistry.names():
        return
    features = {k: seqio.Feature(VOCABULARY, add_eos=True) for k in ('inputs', 'targets')}
    seqio.TaskRegistry.add(
            TASK_NAME,
            source=FiniteDataSource(_dataset_fn, splits=tuple(SPLIT_SIZES),
                                    num_input_examples=dict(SPLIT_SIZES)),
            preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                           functools.partial(span_corruption.span_corruption,
                                             noise_density=NOISE_DENSITY,
                                             mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH,
                                             targets=TARGETS),
                           seqio.preprocessors.append_eos],
            output_features=features, metric_fns=[])


register()
