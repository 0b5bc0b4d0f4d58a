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


@pytest.mark.fault_injection
@pytest.mark.slow
def test_limit_then_full_run_with_another_chunk_size_then_another_teacher(teacher, tmp_path):
    """A LIMIT=10 trial, then the whole pool with another CHUNK_SIZE: only the missing ids are
    labeled and priced. Another teacher is refused before decoding; --overwrite relabels."""
    from doa_jax.cost import Ledger
    out = tmp_path / 'pl'
    where = (f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.INFER_OUTPUT_DIR='{out}'")
    assert _run(*where, '--gin.LIMIT=10') == 0
    trial = {p.name: p.stat().st_mtime_ns for p in out.glob('chunk-*')}
    assert _run(*where, '--gin.CHUNK_SIZE=5') == 0
    recs = pl.read_chunks(str(out))
    assert sorted(r['index'] for r in recs) == list(range(32))   # doa_toy's train split
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in trial.items())
    ledger = Ledger(str(tmp_path))
    priced = [i for e in ledger.compute_entries('pl', 'pseudo_label')
              for i in range(e['first'], e['last'] + 1)]
    assert sorted(priced) == list(range(32))

    other = tmp_path / 'teacher_b'
    x = jnp.ones((1, 8), jnp.int32)
    save_params(nn.unbox(T5(get_config('t5_1_1_tiny')).init(jax.random.PRNGKey(1), x, x)
                         ['params']), other)
    moved = (f"--gin.CHECKPOINT_PATH='{other}'", f"--gin.INFER_OUTPUT_DIR='{out}'")
    with pytest.raises(pl.PseudoLabelError, match=r'(?s)teacher: ".*" -> ".*--overwrite'):
        _run(*moved)
    assert {r['prediction'] for r in pl.read_chunks(str(out))} == \
        {r['prediction'] for r in recs}
    assert _run(*moved, '--overwrite') == 0
    relabeled = pl.read_chunks(str(out))
    assert sorted(r['index'] for r in relabeled) == list(range(32))
    manifest = json.loads((out / '.manifest.json').read_text())
    assert manifest['teacher_checkpoint'] == str(other) and manifest['run_id'] != 'pl'


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
