"""End to end on the real WLP files with tiny byte-vocabulary models: a teacher fine-tunes on a
labeled slice, pseudo-labels a pool (with its full top-k), and students train with sequence KD,
offline token KD (stored top-k, no teacher), online token KD and, for the annotation baseline, on
more gold labels. Every student's eval writes the WLP span metrics of what it decoded, which the
tests read back from the events and recompute.
"""

import collections
import json
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from doa_jax import distill_losses as dl, gin_utils, infer, pseudo_label as pl
from doa_jax.gin_utils import configurables
from doa_jax import train_data
from doa_jax.data import paper
from doa_jax.losses import normalized_loss_weights
from doa_jax.metrics import WLP_LABELS, wlp_metrics
from doa_jax.models.config import get_config
from doa_jax.models.t5 import T5

# Every test trains a student (the module also trains and runs a teacher): minute-long runs.
pytestmark = pytest.mark.slow

BASE = 'e2e_wlp'
LABELED, MORE_LABELED = 32, 64           # the teacher's slice; the annotation baseline's
POOL = 16                                # pseudo-labeled examples
LENGTHS = {'inputs': 256, 'targets': 32}  # no pool input is cut: the teacher sees it whole
FAST = ['TRAIN_STEPS=4', 'LOG_PERIOD=2', 'CHECKPOINT_PERIOD=4', 'EVAL_PERIOD=4',
        'train.eval_steps=1', f'TASK_FEATURE_LENGTHS={LENGTHS}']
TOP_K = 512                              # the tiny model's whole vocabulary
TEACHER_STEPS = 20   # enough that its greedy outputs are valid UTF-8 bytes (they re-tokenize)


# (targets, predictions) of every call of the eval's WLP metric, as the trainer decoded them.
SCORED: list[tuple[list[str], list[str]]] = []


def _scored_wlp_metrics(targets, predictions):
    SCORED.append((list(targets), list(predictions)))
    return wlp_metrics(targets, predictions)


def _register_wlp(data_dir):
    """The paper's WLP files through the same factory as doa_wlp_*, as a small byte-vocab slice
    whose metric (the paper task's) also records what it scored."""
    spec = paper.DATASETS['wlp']
    from tasks.jsonl_task import register_budget_tasks
    files = {'train': str(data_dir / spec.files['train']),
             'validation': str(data_dir / spec.files['validation'])}
    register_budget_tasks(BASE, files, spec.prefix, (LABELED, MORE_LABELED), [_scored_wlp_metrics],
                          pool_size=POOL, vocabulary=seqio.ByteVocabulary(),
                          allow_empty_target=spec.allow_empty_target, overwrite=True)


def _train(files, *bindings):
    """Trains through the gin run files as `python -m doa_jax.train` does; returns its history."""
    gin.clear_config()
    SCORED.clear()
    gin_utils.parse_gin([f'gin_configs/runs/{f}.gin' for f in files], FAST + list(bindings))
    return gin_utils.run_configured_training(['-m', 'doa_jax.train']).history


def _eval_scalars(model_dir) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the eval summaries, read back with TF's summary iterator."""
    events = sorted((model_dir / 'eval').glob('events.out.tfevents.*'))
    assert events, f'no eval summaries under {model_dir}'
    out = collections.defaultdict(dict)
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                out[event.step][value.tag] = float(tf.make_ndarray(value.tensor))
    return dict(out)


_LABEL_WORD = re.compile(r'\[([A-Za-z-]+)\]')


def _entities(text: str) -> collections.Counter:
    """(span, LABEL) of `span [Label] span [Label] ...`: the standard span reading, written
    apart from doa_jax.metrics (a bracketed word that is not a WLP label belongs to the span)."""
    found, start = collections.Counter(), 0
    words = text.split()
    for i, word in enumerate(words):
        m = _LABEL_WORD.fullmatch(word)
        if m and m.group(1).upper() in WLP_LABELS:
            found[' '.join(words[start:i]), m.group(1).upper()] += 1
            start = i + 1
    return found


def _paper_keyed(text: str) -> dict[str, str]:
    """The paper's own reading of a WLP sequence (its evaluation script, as doa_jax.metrics.wlp's
    docstring describes it): an entity's key is the words since the previous label minus the last
    one, a label word is one with '[' and ']' whose inside is a label, and the last label of a key
    wins."""
    words, found, start = text.split(), {}, 0
    for i, word in enumerate(words):
        if '[' in word and ']' in word and word[1:-1].upper() in WLP_LABELS:
            found[' '.join(words[start:i - 1])] = word[1:-1].upper()
            start = i + 1
    return found


def _assert_task_metrics(model_dir, data_dir):
    """The eval wrote the metrics of the predictions it decoded, scored against the gold targets
    of the first eval batch (the validation file's first lines, cut to the target length as the
    model sees them), as recomputed here: span precision, recall and F1, and the paper's micro F1,
    which with one predicted label per gold entity (AMOUNT where the prediction lacks it) is the
    share of gold entities whose label the prediction gives."""
    scalars = _eval_scalars(model_dir)
    step = max(s for s, tags in scalars.items() if 'task/span_f1' in tags)
    written = scalars[step]
    targets, predictions = SCORED[-1]
    lines = (data_dir / paper.DATASETS['wlp'].files['validation']).read_text().splitlines()
    gold = [json.loads(line)['target'] for line in lines[:len(targets)]]
    assert targets == [g.encode()[:LENGTHS['targets']].decode('utf-8', 'ignore') for g in gold]
    assert len(targets) == 8            # tiny.gin's BATCH_SIZE, one eval step
    tp = n_gold = n_pred = 0
    for target, prediction in zip(targets, predictions):
        want, got = _entities(target), _entities(prediction)
        tp += sum(min(n, got[e]) for e, n in want.items())
        n_gold, n_pred = n_gold + sum(want.values()), n_pred + sum(got.values())
    assert n_gold > 0
    precision = 100 * tp / n_pred if n_pred else 0.0
    recall = 100 * tp / n_gold
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    assert written['task/span_precision'] == pytest.approx(precision, abs=1e-4)
    assert written['task/span_recall'] == pytest.approx(recall, abs=1e-4)
    assert written['task/span_f1'] == pytest.approx(f1, abs=1e-4)
    hits = total = 0
    for target, prediction in zip(targets, predictions):
        want, got = _paper_keyed(target), _paper_keyed(prediction)
        hits += sum(got.get(key, 'AMOUNT') == label for key, label in want.items())
        total += len(want)
    assert written['task/micro_f1'] == pytest.approx(100 * hits / total, abs=1e-4)


@pytest.fixture(scope='module')
def wlp_tasks(data_dir):
    _register_wlp(data_dir)


@pytest.fixture(scope='module')
def wlp_pseudo_labels(wlp_tasks, tmp_path_factory):
    """(teacher MODEL_DIR, pseudo-label dir) for a tiny teacher fine-tuned on WLP."""
    root = tmp_path_factory.mktemp('wlp')
    teacher, plabels = root / 'teacher', root / 'pl'
    _train(['finetune_teacher', 'finetune_teacher_tiny'], f"MODEL_DIR='{teacher}'",
           f"MIXTURE_OR_TASK_NAME='{BASE}_labeled_{LABELED}'", 'EVAL_PERIOD=0',
           f'TRAIN_STEPS={TEACHER_STEPS}', f'CHECKPOINT_PERIOD={TEACHER_STEPS}')
    gin.clear_config()
    assert infer.main(['--gin_file=gin_configs/runs/pseudo_label.gin',
                       '--gin_file=gin_configs/runs/pseudo_label_tiny.gin',
                       f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.INFER_OUTPUT_DIR='{plabels}'",
                       f"--gin.MIXTURE_OR_TASK_NAME='{BASE}_unlabeled'", f'--gin.TOP_K={TOP_K}',
                       f'--gin.BATCH_SIZE={POOL}',
                       f"--gin.infer.max_input_length={LENGTHS['inputs']}",
                       f"--gin.infer.max_decode_length={LENGTHS['targets']}"]) == 0
    records = pl.read_chunks(str(plabels))
    assert len(records) == POOL and all(len(r['topk_ids'][0]) == TOP_K for r in records)
    return teacher, plabels


def test_wlp_sequence_kd_student(wlp_pseudo_labels, tmp_path, data_dir):
    _, plabels = wlp_pseudo_labels
    _train(['distill_seq', 'distill_seq_tiny'], f"MODEL_DIR='{tmp_path}'",
           f"INFER_OUTPUT_DIR='{plabels}'", f"EVAL_TASK='{BASE}_labeled_{LABELED}'")
    _assert_task_metrics(tmp_path, data_dir)


def test_wlp_annotation_baseline(wlp_tasks, tmp_path, data_dir):
    _train(['annotate', 'annotate_tiny'], f"MODEL_DIR='{tmp_path}'",
           f"MIXTURE_OR_TASK_NAME='{BASE}_labeled_{MORE_LABELED}'")
    _assert_task_metrics(tmp_path, data_dir)


def test_wlp_offline_token_kd_trains_on_stored_topk(wlp_pseudo_labels, tmp_path, data_dir):
    _, plabels = wlp_pseudo_labels
    history = _train(['distill_kd_offline', 'distill_kd_offline_tiny'],
                     f"MODEL_DIR='{tmp_path / 'kd'}'", f"INFER_OUTPUT_DIR='{plabels}'",
                     f"EVAL_TASK='{BASE}_labeled_{LABELED}'")
    assert history[-1]['loss'] < history[0]['loss'], history
    assert np.isfinite(history[-1]['eval/loss'])   # cross entropy on the gold eval split
    _assert_task_metrics(tmp_path / 'kd', data_dir)


def test_wlp_stored_topk_batch_matches_online_teacher(wlp_pseudo_labels):
    """The trainer's batch carries the stored top-k; with k = the whole vocabulary, the offline KD
    loss on it equals the online-teacher KD loss on the same batch."""
    teacher, plabels = wlp_pseudo_labels
    task = configurables.pseudo_labeled_task(str(plabels), with_topk=True, name='e2e_wlp_topk')
    ds = train_data.host_dataset(task, LENGTHS, 'train', 8, seed=0, shuffle=False, repeat=False)
    batch = next(train_data.numpy_batches(ds, vocab_size=TOP_K))
    assert batch['teacher_topk_ids'].shape == (8, LENGTHS['targets'], TOP_K)
    assert batch['teacher_topk_logprobs'].dtype == np.float32
    assert (batch['encoder_input_tokens'] == 1).any(axis=1).all()   # no input was cut
    # Greedy pseudo-labels: each target token is its position's top-1 teacher id.
    real = batch['decoder_loss_weights'] > 0
    np.testing.assert_array_equal(batch['teacher_topk_ids'][..., 0][real],
                                  batch['decoder_target_tokens'][real])
    config = get_config('t5_1_1_tiny', dtype=jnp.float32)
    model = T5(config)
    online_kd = dl.online_teacher_kd_loss(pl.load_teacher(str(teacher), config), config)

    @jax.jit
    def both(batch):
        batch = dict(batch, loss_weights=normalized_loss_weights(batch, None))
        student = model.init(jax.random.PRNGKey(7), batch['encoder_input_tokens'],
                             batch['decoder_input_tokens'])['params']
        logits = model.apply({'params': student}, batch['encoder_input_tokens'],
                             batch['decoder_input_tokens'], batch['decoder_target_tokens'])
        return dl.token_kd_loss()(logits, batch)[0], online_kd(logits, batch)[0]

    offline, online = both(batch)
    assert abs(float(offline) - float(online)) < 1e-4, (float(offline), float(online))


def test_wlp_online_token_kd(wlp_pseudo_labels, tmp_path, data_dir):
    teacher, plabels = wlp_pseudo_labels
    _train(['distill_kd', 'distill_kd_tiny'], f"MODEL_DIR='{tmp_path / 'kd'}'",
           f"INFER_OUTPUT_DIR='{plabels}'", f"TEACHER_CHECKPOINT='{teacher}'",
           f"EVAL_TASK='{BASE}_labeled_{LABELED}'")
    _assert_task_metrics(tmp_path / 'kd', data_dir)
