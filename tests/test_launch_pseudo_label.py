"""The local launcher runs the real pseudo-labeling entry point: 2 processes on 127.0.0.1 label
the same ids, each exactly once, with the same predictions as 1 process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from doa_jax import cost
from doa_jax import pseudo_label as pl
from tests.test_infer import GIN, teacher  # noqa: F401  (an Orbax teacher saved by process 0)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT = 12
# 6 examples per shard in chunks of 4: two chunks per shard, of different sizes.
JOB = [f'--gin.LIMIT={LIMIT}', '--gin.CHUNK_SIZE=4']


def _by_id(out_dir: pathlib.Path) -> dict[str, dict]:
    records = pl.read_chunks(str(out_dir))
    ids = [r['id'] for r in records]
    assert len(ids) == len(set(ids)), f'duplicate ids in {out_dir}'
    return {r['id']: r for r in records}


def test_two_process_pseudo_labels_match_one_process(teacher, tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'JAX_PLATFORMS': 'cpu'}
    entry = [sys.executable, '-m', 'doa_jax.infer', *GIN, f"--gin.CHECKPOINT_PATH='{teacher}'",
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
    # Both hosts priced their own chunks into the one ledger: the ranges tile the pool once.
    for run, ranges in (('one', [(0, 3), (4, 7), (8, 11)]),
                        ('two', [(0, 3), (4, 5), (6, 9), (10, 11)])):
        rows = cost.Ledger(str(tmp_path / run)).compute_entries('pl', 'pseudo_label')
        assert [(r['first'], r['last']) for r in rows] == ranges, run
