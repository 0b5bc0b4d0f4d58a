"""Shared pytest fixtures: the real data directory and HF reference models."""

from __future__ import annotations

import os
import pathlib

import pytest

# Tests never touch a GPU and must not let TensorFlow grab one.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get('DOA_DATA_DIR',
                                       REPO.parent / 'shared' / 'data' / 'distill_or_annotate'))


@pytest.fixture(scope='session')
def data_dir() -> pathlib.Path:
    """The paper's released JSONL files; absent data skips locally and fails under CI=true."""
    if not DATA_DIR.is_dir():
        msg = (f'Real data not found at {DATA_DIR}; put the shared data beside the repo '
               'or set DOA_DATA_DIR.')
        if os.environ.get('CI') == 'true':
            pytest.fail(msg)
        pytest.skip(msg)
    return DATA_DIR
