"""The local launcher runs the real pseudo-labeling entry point: 2 processes on 127.0.0.1 label
the same ids, each exactly once, with the same predictions as 1 process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from doa_jax import pseudo_label as pl
from doa_jax.checkpoints.hf import save_hf
from doa_jax.models.config import get_config
from doa_jax.models.t5 import T5
from tests.test_infer import GIN

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT = 12
# One example per chunk: each chunk is priced into the shared cost ledger under its global index
# range [first, last], and strided shards' longer chunks have interleaved ranges, which the
# ledger refuses as double counting.
JOB = [f'--gin.LIMIT={LIMIT}', '--gin.CHUNK_SIZE=1']


@pytest.fixture(scope='module')
def hf_teacher(tmp_path_factory):
    """A tiny random teacher in HF format, which every process reads into host memory.

    (An Orbax teacher is restored onto the device it was saved from, cpu:0, which process 1 of
    a 2-process cluster does not have.)
    """
    config = get_config('t5_1_1_tiny')
    x = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(T5(config).init(jax.random.PRNGKey(0), x, x)['params'])
    path = tmp_path_factory.mktemp('teacher') / 'hf'
    save_hf(params, config, path)
    return str(path)


def _by_id(out_dir: pathlib.Path) -> dict[str, dict]:
    records = pl.read_chunks(str(out_dir))
    ids = [r['id'] for r in records]
    assert len(ids) == len(set(ids)), f'duplicate ids in {out_dir}'
    return {r['id']: r for r in records}


def test_two_process_pseudo_labels_match_one_process(hf_teacher, tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'JAX_PLATFORMS': 'cpu'}
    entry = [sys.executable, '-m', 'doa_jax.infer', *GIN, f"--gin.CHECKPOINT_PATH='{hf_teacher}'",
             *JOB]
    # Joins the cluster from the DOA_* variables the launcher sets (no --pass_flags).
    two = subprocess.Popen([sys.executable, 'launch/local.py', '-n', '2', '--timeout', '240', '--',
                            *entry, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'two' / 'pl'}'"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    one = subprocess.run([*entry, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'one' / 'pl'}'"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out, _ = two.communicate(timeout=260)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, out[-3000:]
    assert '[0] ' in out and '[1] ' in out
    # Each process wrote its own stride of the pool; process 0 merged after both had finished.
    shards = {p.name.split('-')[1] for p in (tmp_path / 'two' / 'pl').glob('chunk-*.jsonl')}
    assert shards == {'00000', '00001'}
    assert (tmp_path / 'two' / 'pl' / '.merge.json').exists()
    one_recs, two_recs = _by_id(tmp_path / 'one' / 'pl'), _by_id(tmp_path / 'two' / 'pl')
    assert len(one_recs) == LIMIT
    assert set(two_recs) == set(one_recs)
    assert len({r['prediction'] for r in one_recs.values()}) > 1, 'a degenerate teacher'
    for key, rec in one_recs.items():
        assert two_recs[key]['input'] == rec['input']
        assert two_recs[key]['prediction'] == rec['prediction'], key
        assert two_recs[key]['score'] == pytest.approx(rec['score'], abs=1e-4), key
