"""Every gin file parses; the tiny overlay runs the `python -m doa_jax.train` entry point end to end."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import subprocess
import sys

import gin
import pytest

from doa_jax import gin_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
# gin_configs/t5x/ binds t5x's configurables, for t5x's own runner: tests/test_t5x_interop.py.
GIN_FILES = sorted(str(pathlib.Path(p).relative_to(REPO))
                   for p in glob.glob(str(REPO / 'gin_configs' / '**' / '*.gin'), recursive=True)
                   if not pathlib.Path(p).is_relative_to(REPO / 'gin_configs' / 't5x'))


def _register_all_entry_points() -> None:
    """Every entry point's configurables: one registration, doa_jax.gin_utils.configurables."""
    gin_utils.register_configurables()


def _include_depth(path: pathlib.Path, seen=()) -> int:
    includes = re.findall(r"^include\s+'([^']+)'", path.read_text(), flags=re.M)
    return max([1 + _include_depth(REPO / inc, seen + (path,)) for inc in includes], default=0)


@pytest.mark.parametrize('gin_file', GIN_FILES)
def test_gin_file_parses(gin_file):
    _register_all_entry_points()
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(REPO))
        gin.parse_config_files_and_bindings([gin_file], [], finalize_config=False)
        assert _include_depth(REPO / gin_file) <= 2, f'{gin_file}: more than two include levels'
        if gin_file.startswith('gin_configs/models/'):
            config = gin.get_configurable('get_model_config')()
            assert config.num_encoder_layers > 0
    finally:
        gin.clear_config()


def test_gin_files_found():
    assert 'gin_configs/runs/finetune.gin' in GIN_FILES
    assert 'gin_configs/runs/finetune_tiny.gin' in GIN_FILES
    assert {f'gin_configs/models/{n}.gin' for n in ('t5_1_1_small', 't5_1_1_xxl', 't5_1_1_tiny',
                                                    't5_small', 't5_11b', 't5_tiny')} <= set(GIN_FILES)


def test_cost_callback_is_bindable_from_gin():
    gin_utils.register_configurables()
    gin.clear_config()
    try:
        gin.parse_config(['CostCallback.budget_usd = 5.0'])
        from doa_jax.cost import CostCallback
        assert isinstance(gin.get_configurable('CostCallback')(), CostCallback)
        assert gin.query_parameter('CostCallback.budget_usd') == 5.0
    finally:
        gin.clear_config()


def test_flags_turn_gin_dot_into_bindings():
    args = gin_utils.parse_flags(['--gin_file=a.gin', '--gin.TRAIN_STEPS=5',
                                  "--gin.MODEL_DIR='/tmp/x'", '--gin_search_paths=p,q'])
    assert args.gin_file == ['a.gin']
    assert args.gin_bindings == ['TRAIN_STEPS=5', "MODEL_DIR='/tmp/x'"]
    assert args.gin_search_paths == 'p,q'


@pytest.mark.slow
def test_tiny_entry_point_trains_evaluates_checkpoints_and_records(tmp_path):
    model_dir = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'doa_jax.train', '--gin_file=gin_configs/runs/finetune.gin',
           '--gin_file=gin_configs/runs/finetune_tiny.gin', f"--gin.MODEL_DIR='{model_dir}'",
           '--gin.TRAIN_STEPS=12', '--gin.EVAL_PERIOD=4', '--gin.CHECKPOINT_PERIOD=4',
           # A gin-bound callback (here: stop at 8) runs beside the entry point's run record.
           '--gin.train.callbacks=[@StopAtStep()]', '--gin.StopAtStep.step=8']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (model_dir / 'config.gin').read_text()
    assert 'TRAIN_STEPS = 12' in config and 'StopAtStep.step = 8' in config and "MIXTURE_OR_TASK_NAME = 'doa_toy'" in config
    assert 'finetune_tiny.gin' in (model_dir / 'command_line.txt').read_text()
    assert 'jax==' in (model_dir / 'versions.txt').read_text()
    assert sorted(p.name for p in (model_dir / 'checkpoints').iterdir()) == ['4', '8']
    assert glob.glob(str(model_dir / 'train' / 'events.*'))
    assert glob.glob(str(model_dir / 'eval' / 'events.*'))
