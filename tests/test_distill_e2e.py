"""End to end on the tiny model and the offline toy task: teacher -> pseudo-labels -> students."""

import gin

from doa_jax import infer, pseudo_label as pl, train

FAST = ['--gin.TRAIN_STEPS=6', '--gin.EVAL_PERIOD=6', '--gin.CHECKPOINT_PERIOD=6',
        '--gin.LOG_PERIOD=3']


def _train(files, *bindings):
    gin.clear_config()
    return train.main([f'--gin_file=gin_configs/runs/{f}.gin' for f in files] + FAST + list(bindings))


def _metrics(model_dir):
    """The eval summaries carry the task metric (toy accuracy) computed on decoded outputs."""
    events = list((model_dir / 'eval').glob('events.out.tfevents.*'))
    assert events, f'no eval summaries under {model_dir}'
    assert b'task/accuracy' in b''.join(p.read_bytes() for p in events)


def test_teacher_pseudo_labels_students(tmp_path):
    teacher, plabels = tmp_path / 'teacher', tmp_path / 'pl'
    assert _train(['finetune_teacher', 'finetune_teacher_tiny'], f"--gin.MODEL_DIR='{teacher}'") == 0
    gin.clear_config()
    assert infer.main(['--gin_file=gin_configs/runs/pseudo_label.gin',
                       '--gin_file=gin_configs/runs/pseudo_label_tiny.gin',
                       f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.INFER_OUTPUT_DIR='{plabels}'",
                       '--gin.LIMIT=16']) == 0
    assert len(pl.read_chunks(str(plabels))) == 16
    seq = tmp_path / 'seq'
    assert _train(['distill_seq', 'distill_seq_tiny'], f"--gin.MODEL_DIR='{seq}'",
                  f"--gin.INFER_OUTPUT_DIR='{plabels}'") == 0
    _metrics(seq)
    kd = tmp_path / 'kd'
    assert _train(['distill_kd', 'distill_kd_tiny'], f"--gin.MODEL_DIR='{kd}'",
                  f"--gin.INFER_OUTPUT_DIR='{plabels}'", f"--gin.TEACHER_CHECKPOINT='{teacher}'") == 0
    _metrics(kd)
    ann = tmp_path / 'annotate'
    assert _train(['annotate', 'annotate_tiny'], f"--gin.MODEL_DIR='{ann}'") == 0
    _metrics(ann)
