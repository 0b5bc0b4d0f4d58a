"""Pretrained starting points of the study quickstart: span corruption (worked by hand), the
synthetic corpus's denoising task, the checkpoint cache, and a stage that starts from the checkpoint."""

from __future__ import annotations

import os
import threading

import jax
import numpy as np
import pytest
import seqio

from doa_jax.checkpoints import save_params
from doa_jax.cost import Ledger
from doa_jax.data import span_corruption, synthetic
from doa_jax.study import pretrained
from doa_jax.study.pretrained import Pretraining


# ---- span corruption -------------------------------------------------------------------------

def test_corrupt_a_hand_worked_example():
    """tokens 10..19, noise at 12 13 and 17: two spans, sentinels 99 and 98."""
    tokens = list(range(10, 20))
    mask = [False, False, True, True, False, False, False, True, False, False]
    inputs, targets = span_corruption.corrupt(tokens, mask, lambda k: 99 - k)
    assert inputs == [10, 11, 99, 14, 15, 16, 98, 18, 19]
    assert targets == [99, 12, 13, 98, 17]


def test_reconstruction_targets_are_the_original_tokens():
    """targets='original': the inputs as span corruption makes them, the targets the whole
    uncorrupted sequence (T5's "BERT-style" objective). 10 tokens at 30% noise: 3 noise tokens."""
    import tensorflow as tf
    vocab = seqio.ByteVocabulary(extra_ids=4)
    feature = {'targets': seqio.Feature(vocab)}
    ds = tf.data.Dataset.from_tensors({'index': tf.constant(3, tf.int64),
                                       'targets': tf.range(10, 20, dtype=tf.int32)})
    spans, original = (next(span_corruption.span_corruption(
            ds, feature, noise_density=0.3, mean_noise_span_length=1.5, targets=t
    ).as_numpy_iterator()) for t in ('spans', 'original'))
    mask = span_corruption.noise_mask(10, 0.3, 1.5, np.random.default_rng([0, 3]))
    want_inputs, want_spans = span_corruption.corrupt(range(10, 20), mask, lambda k: 262 - k)
    assert mask.sum() == 3
    assert spans['inputs'].tolist() == original['inputs'].tolist() == want_inputs
    assert spans['targets'].tolist() == want_spans
    assert original['targets'].tolist() == list(range(10, 20))


def _runs(mask) -> list[tuple[bool, int]]:
    out = []
    for m in mask:
        if out and out[-1][0] == bool(m):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((bool(m), 1))
    return out


def test_noise_mask_has_t5s_shape():
    # 35 tokens at 15%: round(5.25) = 5 noise tokens in round(5 / 3) = 2 spans, kept span first,
    # a noise span last.
    for seed in range(20):
        mask = span_corruption.noise_mask(35, 0.15, 3.0, np.random.default_rng(seed))
        runs = _runs(mask)
        assert mask.sum() == 5 and [m for m, _ in runs] == [False, True, False, True]
    a, b = (span_corruption.noise_mask(35, 0.15, 3.0, np.random.default_rng([0, 7]))
            for _ in range(2))
    assert (a == b).all()
    assert not span_corruption.noise_mask(1, 0.15, 3.0, np.random.default_rng(0)).any()
    assert span_corruption.noise_mask(2, 0.15, 3.0, np.random.default_rng(0)).tolist() == \
        [False, True]


def test_sentinels_are_the_extra_ids_from_the_top():
    vocab = seqio.ByteVocabulary(extra_ids=2)
    assert [span_corruption.sentinel_id(vocab, k) for k in (0, 1)] == [260, 259]
    with pytest.raises(ValueError, match='extra ids'):
        span_corruption.sentinel_id(vocab, 2)


def test_corpus_task_denoises_its_sentences():
    """doa_synthetic_denoising: the targets are the corpus sentence; the inputs are that sentence
    with 15% of its bytes (at least one span) cut out, each cut one sentinel, counted down from
    the top id. The same examples twice."""
    import re

    import tasks.synthetic_corpus as corpus_task
    vocab = corpus_task.VOCABULARY
    first_sentinel = vocab.vocab_size - 1
    task = seqio.get_mixture_or_task(corpus_task.TASK_NAME)
    first = list(task.get_dataset(None, split='train', shuffle=False).take(16).as_numpy_iterator())
    again = list(task.get_dataset(None, split='train', shuffle=False).take(16).as_numpy_iterator())
    for ex, ex2, sentence in zip(first, again, synthetic.corpus('train', 16)):
        assert (ex['inputs'] == ex2['inputs']).all() and (ex['targets'] == ex2['targets']).all()
        assert ex['inputs'][-1] == ex['targets'][-1] == vocab.eos_id
        assert vocab.decode(ex['targets'].tolist()) == sentence
        inputs = ex['inputs'][:-1].tolist()
        sentinels = [t for t in inputs if t >= vocab.vocab_size - vocab.extra_ids]
        assert sentinels == list(range(first_sentinel, first_sentinel - len(sentinels), -1))
        assert sentinels and inputs[0] not in sentinels          # a kept span comes first
        pattern = ''.join('(.+?)' if t in sentinels else re.escape(chr(t - 3)) for t in inputs)
        cut = re.fullmatch(pattern, sentence, flags=re.S)
        assert cut and sum(map(len, cut.groups())) == round(len(sentence) * 0.15)
    # The corpus is drawn from splits the study never uses.
    assert set(synthetic.CORPUS_SPLITS.values()).isdisjoint({'train', 'validation'})


# ---- the cache ---------------------------------------------------------------------------------

def _fake_pretraining(calls: list, barrier: threading.Barrier | None = None, params=None):
    """A stand-in for the pretraining run: a step-`steps` checkpoint of `params` and a ledger
    that charges it $1,000, in the directory it is given."""
    def build(model, p, model_dir):
        calls.append(model_dir)
        if barrier is not None:
            barrier.wait(timeout=30)
        save_params({'w': np.arange(3, dtype=np.float32)} if params is None else params,
                    os.path.join(model_dir, 'checkpoints', str(p.steps), 'state'))
        ledger = Ledger(model_dir)
        a = ledger.begin_attempt(os.path.basename(model_dir), 'train', start_step=0)
        ledger.record_steps(os.path.basename(model_dir), 'train', a, 1, p.steps, seconds=3600.0,
                            device_count=1, device_kind='cpu', usd_per_device_hour=1000.0)
        ledger.end_attempt(os.path.basename(model_dir), 'train', a, p.steps, 'done')
        ledger.close()
    return build


def test_cache_builds_once_per_key(tmp_path):
    calls = []
    p = Pretraining(steps=5, cache_dir=str(tmp_path))
    path = pretrained.ensure_pretrained('t5_1_1_tiny', p, build=_fake_pretraining(calls))
    again = pretrained.ensure_pretrained('t5_1_1_tiny', p, build=_fake_pretraining(calls))
    assert path == again and len(calls) == 1                         # the second call built nothing
    assert os.path.dirname(path) == str(tmp_path / 'pretrained')
    assert os.listdir(tmp_path / 'pretrained') == [os.path.basename(path)]   # no temp dir left
    for other in (Pretraining(steps=6, cache_dir=str(tmp_path)),
                  Pretraining(steps=5, seed=1, cache_dir=str(tmp_path))):
        assert pretrained.ensure_pretrained('t5_1_1_tiny', other,
                                            build=_fake_pretraining(calls)) != path
    assert pretrained.ensure_pretrained('t5_1_1_mini', p, build=_fake_pretraining(calls)) != path
    assert len(calls) == 4


def test_cache_race_and_failure(tmp_path):
    """Two processes that build at once both get the one cached checkpoint; a failed build leaves
    nothing behind."""
    calls, results = [], []
    p = Pretraining(steps=3, cache_dir=str(tmp_path))
    build = _fake_pretraining(calls, threading.Barrier(2))
    threads = [threading.Thread(target=lambda: results.append(
            pretrained.ensure_pretrained('t5_1_1_tiny', p, build=build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and len(set(results)) == 1 and len(results) == 2
    assert os.listdir(tmp_path / 'pretrained') == [os.path.basename(results[0])]

    def broken(model, p, model_dir):
        raise RuntimeError('pretraining failed')
    q = Pretraining(steps=4, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match='pretraining failed'):
        pretrained.ensure_pretrained('t5_1_1_tiny', q, build=broken)
    assert os.listdir(tmp_path / 'pretrained') == [os.path.basename(results[0])]


def test_the_command_is_the_documented_run(tmp_path):
    argv = pretrained.command('t5_1_1_mini', Pretraining(steps=7, seed=2), '/x')
    assert argv[1:] == ['-m', 'doa_jax.train',
                        '--gin_file=gin_configs/runs/pretrain_synthetic.gin',
                        '--gin_file=gin_configs/models/t5_1_1_mini.gin', "--gin.MODEL_DIR='/x'",
                        '--gin.TRAIN_STEPS=7', '--gin.RANDOM_SEED=2']
    with pytest.raises(ValueError, match='set one'):
        pretrained.resolve(_stage(Pretraining(steps=1, cache_dir=str(tmp_path)),
                                  initial_checkpoint_path='/elsewhere'))


def _stage(pretraining, **kw):
    from doa_jax.study.runner import StageConfig
    return StageConfig(model='t5_1_1_tiny', epochs=1, batch_size=2, learning_rate=0.0,
                       activation_dtype='float32', dropout_rate=0.0, min_steps=1, max_steps=1,
                       task_feature_lengths={'inputs': 64, 'targets': 64}, log_period=1,
                       pretraining=pretraining, **kw)


# ---- a study stage starts from the checkpoint ------------------------------------------------

def test_a_stage_starts_from_its_pretrained_checkpoint(tmp_path):
    """The stage's model at step 0 is the pretrained checkpoint: trained one step at learning rate
    0 it still equals it, and differs from the initialisation it would have had without it. The
    pretraining's ledger is not the stage's."""
    from flax.core.meta import unbox

    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    from doa_jax.study import data as data_lib
    from doa_jax.study import runner

    model = T5(get_config('t5_1_1_tiny', dtype='float32'))
    ones = np.ones((1, 8), np.int32)
    init = jax.jit(lambda rng: unbox(model.init(rng, ones, ones)['params']))
    pretrained_params, scratch = (jax.device_get(init(jax.random.PRNGKey(k))) for k in (7, 0))

    p = Pretraining(steps=2, cache_dir=str(tmp_path / 'cache'))
    path = pretrained.ensure_pretrained('t5_1_1_tiny', p,
                                        build=_fake_pretraining([], params=pretrained_params))
    stage = pretrained.resolve(_stage(p))
    assert stage.initial_checkpoint_path == path

    data = data_lib.synthetic_wlp(train_size=4, eval_size=2)
    s = runner.StudySettings(study_dir=str(tmp_path / 'study'), data=data, teacher=stage,
                             student=stage, task_feature_lengths={'inputs': 64, 'targets': 64},
                             prices=runner.load_prices_for(data, None, 0.0001), show_progress=False)
    train = os.path.join(s.study_dir, 'train.jsonl')
    data_lib.write_jsonl(train, data.train)
    task = data_lib.register_train_task('doa_test_pretrained_start', data, train,
                                        data_lib.write_jsonl(train + '.eval', data.eval))
    run_dir = os.path.join(s.study_dir, 'student')
    result = runner._train(s, stage, run_dir, task, len(data.train))
    assert result.step == 1
    got = jax.tree_util.tree_leaves(jax.device_get(result.state.params))
    want = jax.tree_util.tree_leaves(pretrained_params)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert not all(np.array_equal(g, w) for g, w in zip(got, jax.tree_util.tree_leaves(scratch)))
    # The stage's ledger holds its own step, not the pretraining's $1,000.
    assert 0 < runner._ledger_usd(run_dir) < 1.0
    assert runner._ledger_usd(path) > 100.0


def test_report_says_where_the_models_started(tmp_path):
    from doa_jax.study.report import start_lines
    start = tmp_path / 'mini'
    start.mkdir()
    (start / 'pretrained.json').write_text(
            '{"model": "t5_1_1_mini", "steps": 7, "command": ["-m", "doa_jax.train"]}')
    recs = [{'student_initial_checkpoint': None},
            {'student_initial_checkpoint': None, 'teacher_initial_checkpoint': str(start)}]
    assert start_lines(recs) == [
            f'- Teachers started from {start} (t5_1_1_mini pretrained for 7 steps by `python -m '
            'doa_jax.train`; a sunk cost, charged to no point).',
            '- Students started from a random initialisation (from scratch).']
    assert start_lines([{'student_initial_checkpoint': 'x', 'teacher_initial_checkpoint': 'x'}]) \
        == ['- Teacher and student started from x.']
    assert start_lines([{'metric': 1.0}]) == []     # results written before the field existed
