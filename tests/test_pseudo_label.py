"""Pseudo-labeling: sharding, chunk markers, resume after SIGKILL, exactly-once merge, top-k."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from doa_jax import pseudo_label as pl

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / 'tests' / 'pseudo_label_worker.py'


def _fake(batch):
    return [{'prediction': t.upper(), 'score': -1.0} for t in batch]


def _pool(n):
    return [(f'ex{i}', f'input {i}') for i in range(n)]


def test_shards_are_disjoint_and_cover_pool(tmp_path):
    pool = _pool(23)
    for s in range(3):
        res = pl.pseudo_label_shard(pool, _fake, str(tmp_path), shard_id=s, num_shards=3,
                                    chunk_size=3, batch_size=2)
        assert res.examples_written == len(pl.shard_indices(23, 3, s))
    assert pl.merge(str(tmp_path), [i for i, _ in pool])['count'] == 23
    from tasks.jsonl_task import read_pseudo_labels
    ids, inputs, preds = read_pseudo_labels(str(tmp_path), completed_only=True)
    assert sorted(ids) == sorted(i for i, _ in pool)
    assert preds[inputs.index('input 5')] == 'INPUT 5'


def test_resume_redoes_only_unmarked_chunks(tmp_path):
    pool = _pool(10)
    pl.pseudo_label_shard(pool, _fake, str(tmp_path), chunk_size=4)
    os.remove(pl.chunk_path(str(tmp_path), 0, 1) + pl.MARKER)  # as if killed before the marker
    calls = []
    res = pl.pseudo_label_shard(pool, lambda b: calls.append(b) or _fake(b), str(tmp_path),
                                chunk_size=4, batch_size=8)
    assert (res.chunks_written, res.chunks_skipped) == (1, 2)
    assert calls == [['input 4', 'input 5', 'input 6', 'input 7']]
    pl.merge(str(tmp_path), [i for i, _ in pool])


def test_merge_names_missing_and_duplicates(tmp_path):
    pool = _pool(6)
    pl.pseudo_label_shard(pool, _fake, str(tmp_path), chunk_size=3)
    with pytest.raises(pl.PseudoLabelError, match=r"missing \['ex6'\]"):
        pl.merge(str(tmp_path), [i for i, _ in pool] + ['ex6'])
    pl.write_chunk(pl.chunk_path(str(tmp_path), 1, 0), [{'id': 'ex0', 'input': 'x', 'prediction': 'y'}])
    with pytest.raises(pl.PseudoLabelError, match=r"duplicates \['ex0'\]"):
        pl.merge(str(tmp_path), [i for i, _ in pool])


def test_empty_pool_and_bad_shard_say_so(tmp_path):
    with pytest.raises(pl.PseudoLabelError, match='unlabeled pool is empty'):
        pl.pseudo_label_shard([], _fake, str(tmp_path))
    with pytest.raises(pl.PseudoLabelError, match='shard_id=2'):
        pl.shard_indices(5, 2, 2)


def test_tiny_teacher_labels_with_full_topk(tmp_path):
    import jax
    import jax.numpy as jnp
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    config = get_config('t5_1_1_tiny')
    x = jnp.ones((1, 8), jnp.int32)
    params = T5(config).init(jax.random.PRNGKey(0), x, x)['params']
    encode = lambda s: [2 + (ord(c) % 500) for c in s]
    decode = lambda ids: ' '.join(map(str, ids))
    label = pl.model_label_batch(params, config, encode, decode, max_input_length=16,
                                 max_decode_length=6, top_k=config.vocab_size)
    pool = _pool(3)
    pl.pseudo_label_shard(pool, label, str(tmp_path), chunk_size=2, batch_size=2)
    recs = pl.read_chunks(str(tmp_path))
    assert [r['id'] for r in recs] == ['ex0', 'ex1', 'ex2']
    for r in recs:
        lp = np.asarray(r['topk_logprobs'])
        assert lp.shape[1] == config.vocab_size and lp.shape[0] >= 1
        np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-4)
        # Greedy decoding picks each step's argmax, which is the top-1 of the forced forward.
        assert r['topk_ids'][0][0] == (int(r['prediction'].split()[0]) if r['prediction'] else 1)
        assert r['score'] <= 0.0


def _wlp_pool(data_dir, tmp_path, n):
    return str(data_dir / 'wlp' / 'wlp_train_all.json')


def _env():
    return {**os.environ, 'PYTHONPATH': str(REPO), 'CUDA_VISIBLE_DEVICES': ''}


def test_sigkilled_run_restarted_labels_each_example_once(data_dir, tmp_path):
    from tasks.jsonl_task import load_split
    pool_path, out, n = _wlp_pool(data_dir, tmp_path, 0), tmp_path / 'out', 24
    cmd = [sys.executable, str(WORKER), pool_path, str(out), '0', '1', str(n), '0.25']
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob('*.COMPLETED'))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob('*.COMPLETED')))
    assert 2 <= done_before < 6, 'the kill must land mid-run'
    res = subprocess.run(cmd[:-1] + ['0'], env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = load_split(pool_path, allow_empty_target=True)[0][:n]
    assert pl.merge(str(out), ids)['count'] == n


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_run_writes_disjoint_covering_shards(data_dir, tmp_path):
    from tasks.jsonl_task import load_split
    pool_path, out, n = _wlp_pool(data_dir, tmp_path, 0), tmp_path / 'out', 14
    env = dict(_env(), DOA_COORDINATOR=f'127.0.0.1:{_free_port()}')
    procs = [subprocess.Popen([sys.executable, str(WORKER), pool_path, str(out), str(p), '2',
                               str(n), '0'], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    by_shard = {}
    for path in out.glob('chunk-*.jsonl'):
        shard = int(path.name.split('-')[1])
        by_shard.setdefault(shard, []).extend(json.loads(l)['id'] for l in path.open())
    assert sorted(by_shard) == [0, 1]
    assert not set(by_shard[0]) & set(by_shard[1])
    assert pl.merge(str(out), load_split(pool_path, allow_empty_target=True)[0][:n])['count'] == n
