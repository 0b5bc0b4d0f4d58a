"""Offline token-level KD input: stored teacher top-k aligned to the student's targets, and the
bad inputs of distillation (issue 5, item 6), each failing before any training step."""

import json

import gin
import numpy as np
import pytest
import seqio

from doa_jax import distill_losses as dl, infer, pseudo_label as pl, train
from doa_jax.data.jsonl import DataError
from tests.conftest import with_xla_flags
from tasks.jsonl_task import align_topk, read_teacher_topk, register_jsonl_task

BYTES = seqio.ByteVocabulary()
EOS = 1


def _record(i, prediction, rows, k=3, first_id=5):
    """A pseudo-label of doa_toy with `rows` top-k rows of width k."""
    return {'id': f'train:{i}', 'input': 'doa_toy: red cat', 'index': i, 'prediction': prediction,
            'score': -1.0, 'topk_ids': [[first_id + j for j in range(k)]] * rows,
            'topk_logprobs': [[-0.5 - j for j in range(k)]] * rows}


def _write(out_dir, records):
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.write_chunk(str(out_dir / 'chunk-00000-00000.jsonl'), records)
    return out_dir


def test_align_topk_rules():
    ids, lp = [[7, 8]] * 4, [[-0.1, -2.0]] * 4
    got_ids, got_lp = align_topk(ids, lp, 4, 'f:1')          # 3 tokens + EOS: one row each
    assert got_ids.shape == (4, 2) and got_lp.dtype == np.float32
    got_ids, got_lp = align_topk(ids, lp, 5, 'f:1')          # decode limit hit before EOS
    assert (got_ids[-1] == dl.NO_TEACHER_ID).all() and (got_ids[:4] == 7).any()
    assert align_topk(ids, lp, 6, 'f:1') is None             # no rule aligns these
    assert align_topk(ids, lp, 2, 'f:1') is None
    with pytest.raises(DataError, match='f:3'):
        align_topk([[1, 2]], [[-1.0]], 1, 'f:3')


def test_align_topk_checks_tokens_when_the_record_has_target_ids():
    ids, lp = [[7, 8]] * 3, [[-0.1, -2.0]] * 3
    assert align_topk(ids, lp, [5, 6, 1], 'f:1', teacher_ids=[5, 6, 1])[0].shape == (3, 2)
    cut = align_topk(ids, lp, [5, 6, 9, 1], 'f:1', teacher_ids=[5, 6, 9])   # no EOS decoded
    assert cut[0].shape == (4, 2) and (cut[0][-1] == dl.NO_TEACHER_ID).all()
    # Same count, other tokens (a different segmentation): refused, where a count check passes.
    assert align_topk(ids, lp, [5, 4, 1], 'f:1', teacher_ids=[5, 6, 1]) is None
    assert align_topk(ids, lp, [5, 6, 4, 1], 'f:1', teacher_ids=[5, 6, 9]) is None
    with pytest.raises(DataError, match='corrupt'):
        align_topk(ids, lp, [5, 6, 1], 'f:2', teacher_ids=[5, 1])


def test_read_teacher_topk_aligns_and_names_mismatches(tmp_path):
    records = [_record(0, 'red', 4),     # 3 bytes + EOS
               _record(1, 'dog', 3),     # the teacher stopped at its decode limit
               _record(2, 'é', 1)]       # 2 bytes + EOS: cannot be aligned to 1 row
    out = _write(tmp_path / 'pl', records)
    with pytest.raises(DataError, match=r"chunk-00000-00000.jsonl:3 id 'train:2' \(1 top-k rows, "
                                        r"3 target tokens\).*topk_mismatch"):
        read_teacher_topk(str(out), BYTES)
    got = read_teacher_topk(str(out), BYTES, topk_mismatch='drop')
    assert got.ids == ['train:0', 'train:1'] and len(got.dropped) == 1
    assert [a.shape for a in got.topk_ids] == [(4, 3), (4, 3)]
    assert (got.topk_ids[1][-1] == dl.NO_TEACHER_ID).all()

    _write(tmp_path / 'widths', [_record(0, 'red', 4), _record(1, 'red', 4, k=2)])
    with pytest.raises(DataError, match="id 'train:1' has top-k of width 2, earlier records 3"):
        read_teacher_topk(str(tmp_path / 'widths'), BYTES)


@pytest.mark.parametrize('with_topk', [True, False])
def test_gold_task_joins_the_students_train_split(tmp_path, with_topk):
    import tasks.toy  # noqa: F401  registers doa_toy
    from tasks.jsonl_task import read_gold, register_pseudo_labeled_task

    records = [_record(0, 'red', 4), _record(1, 'dog', 4)] if with_topk else [
            _plain_record(0), _plain_record(1, 'dog')]
    out = _write(tmp_path / 'pl', records)
    task = register_pseudo_labeled_task('doa_test_gold_mix', str(out), eval_task='doa_toy',
                                        with_topk=with_topk, gold_task='doa_toy',
                                        vocabulary=BYTES, overwrite=True)
    gold_ids, _, gold_targets = read_gold('doa_toy')
    rows = list(task.source.get_dataset('train', shuffle=False).as_numpy_iterator())
    assert [r['id'].decode() for r in rows] == ['train:0', 'train:1', *gold_ids]
    assert [r['targets'].decode() for r in rows[2:]] == gold_targets
    if with_topk:
        assert (rows[0][dl.TOPK_IDS] >= 5).all()
        for r in rows[2:]:       # gold rows: no teacher distribution, cross entropy in the loss
            assert (r[dl.TOPK_IDS] == dl.NO_TEACHER_ID).all()
            assert r[dl.TOPK_IDS].shape == (len(BYTES.encode(r['targets'].decode())) + 1, 3)
    with pytest.raises(ValueError, match='no_such_gold'):
        register_pseudo_labeled_task('doa_test_gold_mix', str(out), gold_task='no_such_gold',
                                     overwrite=True)


def _plain_record(i, prediction='red'):
    return {'id': f'train:{i}', 'input': 'doa_toy: red cat', 'index': i,
            'prediction': prediction, 'score': -1.0}


def _train_offline(model_dir, plabels):
    gin.clear_config()
    return train.main(['--gin_file=gin_configs/runs/distill_kd_offline.gin',
                       '--gin_file=gin_configs/runs/distill_kd_offline_tiny.gin',
                       f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INFER_OUTPUT_DIR='{plabels}'",
                       '--gin.TRAIN_STEPS=2', '--gin.EVAL_PERIOD=0'])


def _no_step_ran(model_dir):
    return not list((model_dir / 'checkpoints').glob('[0-9]*'))


def test_offline_kd_without_stored_topk_says_to_rerun_with_top_k(tmp_path):
    plabels = _write(tmp_path / 'pl', [_plain_record(i) for i in range(8)])
    with pytest.raises(DataError, match=r"chunk-00000-00000.jsonl:1: id 'train:0' has no teacher "
                                        r"top-k.*--gin.TOP_K=<k> \(gin: infer.top_k"):
        _train_offline(tmp_path / 'student', plabels)
    assert _no_step_ran(tmp_path / 'student')


def test_offline_topk_from_another_vocabulary_fails_before_any_step(tmp_path):
    # A teacher with a 32128-token vocabulary stored ids the 512-token student does not have.
    plabels = _write(tmp_path / 'pl', [_record(i, 'red', 4, first_id=600) for i in range(8)])
    with pytest.raises(ValueError, match='token id 602, but the student vocab_size is 512'):
        _train_offline(tmp_path / 'student', plabels)
    assert _no_step_ran(tmp_path / 'student')


def _train_online(tmp_path, *bindings):
    gin.clear_config()
    return train.main(['--gin_file=gin_configs/runs/distill_kd.gin',
                       '--gin_file=gin_configs/runs/distill_kd_tiny.gin',
                       f"--gin.MODEL_DIR='{tmp_path / 'student'}'",
                       f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'pl'}'", *bindings])


def test_online_teacher_of_another_vocabulary_fails_before_its_checkpoint_is_read(tmp_path):
    # The checkpoint does not even exist: the vocabulary check comes first.
    with pytest.raises(ValueError, match='Teacher vocab_size 32128 != student vocab_size 512'):
        _train_online(tmp_path, "--gin.TEACHER_MODEL='t5_1_1_small'",
                      f"--gin.TEACHER_CHECKPOINT='{tmp_path / 'nowhere'}'")
    assert not (tmp_path / 'student').exists()


def test_online_teacher_missing_or_partial_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'nowhere'}' does not exist"):
        _train_online(tmp_path, f"--gin.TEACHER_CHECKPOINT='{tmp_path / 'nowhere'}'")
    partial = tmp_path / 'partial'
    (partial / 'state').mkdir(parents=True)
    (partial / 'state' / '_METADATA').write_text('{"tree_metadata": ')   # cut mid-write
    with pytest.raises(FileNotFoundError, match=f"'{partial}' could not be read.*partial"):
        _train_online(tmp_path, f"--gin.TEACHER_CHECKPOINT='{partial}'")
    assert not (tmp_path / 'student').exists()


def _pseudo_label(tmp_path, task):
    gin.clear_config()
    return infer.main(['--gin_file=gin_configs/runs/pseudo_label.gin',
                       '--gin_file=gin_configs/runs/pseudo_label_tiny.gin',
                       f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
                       f"--gin.CHECKPOINT_PATH='{tmp_path / 'no_teacher'}'",
                       f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'pl'}'"])


def test_empty_unlabeled_pool_says_so_before_the_teacher_loads(tmp_path):
    empty = tmp_path / 'pool.jsonl'
    empty.write_text('')
    register_jsonl_task('test_empty_pool', {'train': str(empty)}, vocabulary=BYTES,
                        overwrite=True)
    with pytest.raises(pl.PseudoLabelError, match="pool 'test_empty_pool' split 'train' is empty"):
        _pseudo_label(tmp_path, 'test_empty_pool')

    # A budget pool with nothing left after the largest labeled slice.
    from tasks.jsonl_task import register_budget_tasks
    small = tmp_path / 'small.jsonl'
    small.write_text(''.join(json.dumps({'source': f's{i}', 'target': 't'}) + '\n'
                             for i in range(3)))
    register_budget_tasks('test_tiny_budget', {'train': str(small)}, '', (3,), vocabulary=BYTES,
                          overwrite=True)
    with pytest.raises(ValueError, match='test_tiny_budget_unlabeled: the train file has 3 lines, '
                                         'none left after the largest labeled slice'):
        _pseudo_label(tmp_path, 'test_tiny_budget_unlabeled')
    assert not (tmp_path / 'pl').exists()


@pytest.mark.slow
def test_topk_features_shard_over_the_data_axis_and_microbatch(tmp_path):
    """On 4 fake devices the stored top-k is split by rows over the data axis like the targets,
    and a token-KD step gives the same loss with 2 microbatches as with 1."""
    import os
    import pathlib
    import subprocess
    import sys

    from tasks.toy import toy_examples
    rng = np.random.default_rng(0)
    records = []
    for i, ex in enumerate(toy_examples('train')[:8]):
        tokens = BYTES.encode(ex['targets']) + [EOS]
        ids = [[t] + [int(x) for x in rng.integers(3, 259, 3)] for t in tokens]
        records.append({'id': f'train:{i}', 'input': ex['inputs'], 'index': i,
                        'prediction': ex['targets'], 'score': -1.0, 'topk_ids': ids,
                        'topk_logprobs': np.sort(rng.normal(size=(len(tokens), 4)))[:, ::-1]
                        .round(4).tolist()})
    plabels = _write(tmp_path / 'pl', records)
    worker = pathlib.Path(__file__).with_name('topk_sharding_worker.py')
    env = {**with_xla_flags('--xla_force_host_platform_device_count=4'),
           'CUDA_VISIBLE_DEVICES': ''}
    proc = subprocess.run([sys.executable, str(worker), str(plabels)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
    assert out['spec'][0] == 'data' == out['target_spec'][0]
    assert out['shape'] == [8, 8, 4] and out['shard_shape'] == [2, 8, 4]
    assert np.isfinite(out['losses']['1'])
    np.testing.assert_allclose(out['losses']['2'], out['losses']['1'], rtol=1e-5)
