"""`python -m doa_jax.infer` on the tiny teacher and the offline toy task."""

import json

import gin
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from doa_jax import infer, pseudo_label as pl
from doa_jax.checkpoints import save_params
from doa_jax.models.config import get_config
from doa_jax.models.t5 import T5

GIN = ['--gin_file=gin_configs/runs/pseudo_label.gin',
       '--gin_file=gin_configs/runs/pseudo_label_tiny.gin']


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'params'
    x = jnp.ones((1, 8), jnp.int32)
    params = T5(get_config('t5_1_1_tiny')).init(jax.random.PRNGKey(0), x, x)['params']
    save_params(nn.unbox(params), path)
    return str(path)


def _run(*bindings):
    gin.clear_config()
    return infer.main(GIN + list(bindings))


def test_infer_writes_complete_chunks_and_resumes(teacher, tmp_path):
    out = tmp_path / 'pl'
    args = (f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.INFER_OUTPUT_DIR='{out}'",
            '--gin.LIMIT=12', '--gin.TOP_K=4')
    assert _run(*args) == 0
    recs = pl.read_chunks(str(out))
    assert len(recs) == 12 and len({r['id'] for r in recs}) == 12
    assert all(len(r['topk_ids']) == len(r['topk_logprobs']) for r in recs)
    assert all(len(step) == 4 for r in recs for step in r['topk_ids'])
    before = sorted(p.stat().st_mtime_ns for p in out.glob('chunk-*.jsonl'))
    assert _run(*args) == 0  # every chunk already has its marker: nothing is redone
    assert sorted(p.stat().st_mtime_ns for p in out.glob('chunk-*.jsonl')) == before
    json.loads((out / '.merge.json').read_text())
    # The labelled chunks were priced into the ledger beside the output directory.
    from doa_jax.cost import Ledger
    (stage,) = [s for s in Ledger(str(tmp_path)).summary() if s.stage == 'pseudo_label']
    assert stage.run_id == 'pl' and stage.compute_device_hours > 0


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        _run(f"--gin.CHECKPOINT_PATH='{tmp_path}/nowhere'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'")


def test_partial_checkpoint_is_named(tmp_path):
    bad = tmp_path / 'partial'
    bad.mkdir()
    (bad / 'garbage').write_text('x')
    with pytest.raises(FileNotFoundError, match='partial'):
        _run(f"--gin.CHECKPOINT_PATH='{bad}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}/o'")


def test_vocab_mismatch_fails_before_compute(teacher, tmp_path):
    with pytest.raises(ValueError, match='vocab_size 512 != student vocab_size 32128'):
        _run(f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}/o'",
             '--gin.STUDENT_VOCAB_SIZE=32128')
    assert not (tmp_path / 'o').exists()
