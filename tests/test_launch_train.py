"""The local launcher runs the real entry point: 2 processes match 1 process on the toy task."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ['--gin_file=gin_configs/runs/finetune.gin', '--gin_file=gin_configs/runs/finetune_tiny.gin',
        '--gin.TRAIN_STEPS=4', '--gin.LOG_PERIOD=1', '--gin.EVAL_PERIOD=0',
        '--gin.CHECKPOINT_PERIOD=4', '--gin.train.shuffle=False',
        # Packed rows are built per host (as in t5x), so a 2-host packed run trains on the same
        # examples in other rows; unpacked, each host's rows are exactly its half of the batch.
        '--gin.PACK=False']


def _losses(model_dir: pathlib.Path) -> list[float]:
    import tensorflow as tf
    out = {}
    for f in sorted((model_dir / 'train').glob('events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                if v.tag == 'loss':
                    out[event.step] = float(tf.make_ndarray(v.tensor))
    return [out[k] for k in sorted(out)]


@pytest.mark.slow
def test_two_process_launch_matches_one_process_losses(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'JAX_PLATFORMS': 'cpu'}
    entry = [sys.executable, '-m', 'doa_jax.train', *ARGS]
    two = subprocess.Popen([sys.executable, 'launch/local.py', '-n', '2', '--pass_flags', '--timeout', '400',
                            '--', *entry, f"--gin.MODEL_DIR='{tmp_path / 'two'}'"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([*entry, f"--gin.MODEL_DIR='{tmp_path / 'one'}'"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    out, _ = two.communicate(timeout=420)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, out[-3000:]
    assert '[0] ' in out and '[1] ' in out
    l1, l2 = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
    assert len(l1) == 4 and l1[-1] < l1[0]
    np.testing.assert_allclose(l2, l1, rtol=0, atol=1e-4)
