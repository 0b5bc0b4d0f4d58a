"""Pseudo-labeling: sharding, chunk markers, resume after SIGKILL, exactly-once merge, top-k."""

import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys

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


def _recording(calls):
    return lambda batch: calls.extend(batch) or _fake(batch)


def _ids_once(out, pool):
    return pl.merge(str(out), [i for i, _ in pool])['count'] == len(pool)


@pytest.mark.fault_injection
def test_limit_then_full_run_labels_only_the_missing_ids(tmp_path):
    """A LIMIT=10 trial, then the whole pool: the trial's labels are kept (its last chunk held
    fewer ids than the full run's grid), the rest is labeled once."""
    pool = _pool(23)
    pl.pseudo_label_shard(pool[:10], _fake, str(tmp_path), chunk_size=4)
    calls = []
    res = pl.pseudo_label_shard(pool, _recording(calls), str(tmp_path), chunk_size=4)
    assert calls == [f'input {i}' for i in range(10, 23)]
    assert res.examples_written == 13 and res.examples_done == 23
    assert _ids_once(tmp_path, pool)
    # A smaller LIMIT afterwards has nothing to do, and its merge accepts the labels past it.
    res = pl.pseudo_label_shard(pool[:5], _recording(calls), str(tmp_path), chunk_size=4)
    assert res.chunks_written == 0 and len(calls) == 13
    pl.merge(str(tmp_path), [i for i, _ in pool[:5]], beyond_limit_ok=True)
    # Every marker names the indices and id range of its chunk.
    markers = [json.loads(p.read_text()) for p in sorted(tmp_path.glob('*.COMPLETED'))]
    assert sorted(i for m in markers for i in m['indices']) == list(range(23))
    assert {(m['first_id'], m['last_id']) for m in markers} >= {('ex0', 'ex3'), ('ex8', 'ex9')}


@pytest.mark.fault_injection
def test_changed_chunk_size_keeps_finished_ids_and_prices_each_example_once(tmp_path):
    from doa_jax.cost import Ledger
    pool, out, ledger = _pool(23), tmp_path / 'out', Ledger(tmp_path)

    def meter(first, last, generation=0):
        class Meter:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                ledger.record_compute('out', 'pseudo_label', first, last, 1.0, 'cpu', 1, 3600.0,
                                      seq=generation)
        return Meter()

    stop_after = lambda n: (lambda chunk_id: chunk_id < n)        # as if killed after n chunks
    pl.pseudo_label_shard(pool, _fake, str(out), chunk_size=4, meter_factory=meter,
                          keep_going=stop_after(3))
    calls = []
    res = pl.pseudo_label_shard(pool, _recording(calls), str(out), chunk_size=5,
                                meter_factory=meter)
    assert calls == [f'input {i}' for i in range(12, 23)]      # 0-11 were labeled in chunks of 4
    assert _ids_once(out, pool) and res.examples_done == 23
    names = {p.name for p in out.glob('chunk-*.jsonl')}
    first = {f'chunk-00000-0000{c}.jsonl' for c in range(3)}
    assert first <= names and all(n.endswith('-g1.jsonl') for n in names - first)
    # Each example is priced exactly once over the two layouts.
    priced = [i for e in ledger.compute_entries('out', 'pseudo_label')
              for i in range(e['first'], e['last'] + 1)]
    assert sorted(priced) == list(range(23))
    # Back to the first chunk size: its layout is generation 0 again, nothing is missing.
    res = pl.pseudo_label_shard(pool, _recording(calls), str(out), chunk_size=4)
    assert res.chunks_written == 0 and len(calls) == 11


@pytest.mark.fault_injection
def test_another_teacher_is_refused_with_the_difference_and_overwrite_replaces(tmp_path):
    pool = _pool(9)
    teacher_a = {'teacher': 'a' * 64, 'task': 'doa_toy', 'decode': {'method': 'greedy'}}
    pl.pseudo_label_shard(pool, _fake, str(tmp_path), chunk_size=4, identity=teacher_a)
    teacher_b = {**teacher_a, 'teacher': 'b' * 64}
    with pytest.raises(pl.PseudoLabelError) as e:
        pl.pseudo_label_shard(pool, _fake, str(tmp_path), chunk_size=4, identity=teacher_b)
    assert f'teacher: "{"a" * 64}" -> "{"b" * 64}"' in str(e.value)
    assert '--overwrite' in str(e.value) and 'new directory' in str(e.value)
    beam = {**teacher_a, 'decode': {'method': 'beam'}}
    with pytest.raises(pl.PseudoLabelError, match='decode.method: "greedy" -> "beam"'):
        pl.pseudo_label_shard(pool, _fake, str(tmp_path), chunk_size=4, identity=beam)
    relabel = lambda batch: [{'prediction': 'B', 'score': 0.0} for _ in batch]
    pl.pseudo_label_shard(pool, relabel, str(tmp_path), chunk_size=3, identity=teacher_b,
                          overwrite=True)
    assert {r['prediction'] for r in pl.read_chunks(str(tmp_path))} == {'B'}
    assert _ids_once(tmp_path, pool)
    manifest = json.loads((tmp_path / '.manifest.json').read_text())
    assert manifest['identity']['teacher'] == 'b' * 64 and len(manifest['layouts']) == 1


def test_directory_from_before_manifests_resumes_with_another_chunk_size(tmp_path):
    pool = _pool(10)
    for c, start in enumerate(range(0, 8, 4)):      # what older versions wrote: {'count'} markers
        pl.write_chunk(pl.chunk_path(str(tmp_path), 0, c),
                       [{'id': pool[i][0], 'input': pool[i][1], 'index': i, 'prediction': 'old'}
                        for i in range(start, start + 4)])
    (tmp_path / 'chunk-00000-00002.jsonl').write_text('{"id": "ex8"}\n')   # killed mid-chunk
    calls = []
    pl.pseudo_label_shard(pool, _recording(calls), str(tmp_path), chunk_size=3,
                          identity={'teacher': 't'})
    assert calls == ['input 8', 'input 9'] and _ids_once(tmp_path, pool)
    manifest = json.loads((tmp_path / '.manifest.json').read_text())
    assert manifest['legacy'] and manifest['layouts'][0] == {'legacy': True}


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


class _TwoPhase:
    """A fake labeler with dispatch/finish halves, logging each call into `events`."""

    def __init__(self, events):
        self.events, self.batches = events, 0

    def dispatch(self, batch):
        k, self.batches = self.batches, self.batches + 1
        self.events.append(('dispatch', k))
        return k, list(batch)

    def finish(self, pending):
        k, batch = pending
        self.events.append(('finish', k))
        return _fake(batch)


def _log_writes(monkeypatch, events):
    write = pl.write_chunk
    monkeypatch.setattr(pl, 'write_chunk', lambda path, *a, **k: (
            events.append(('write', int(os.path.basename(path)[12:17]))), write(path, *a, **k)))


def _log_meters(events):
    def meter(first, last, generation=0):
        class Meter:
            def __enter__(self):
                events.append(('enter', first))

            def __exit__(self, *exc):
                events.append(('exit', first))
        return Meter()
    return meter


def test_next_batch_is_dispatched_before_this_batch_is_finished_and_written(tmp_path, monkeypatch):
    """Event order, no clocks: batch i+1 is dispatched before batch i is finished (waited for,
    detokenized) and before its chunk is written; meters never overlap; chunks are the bytes one
    batch at a time writes."""
    pool, events = _pool(10), []
    _log_writes(monkeypatch, events)
    res = pl.pseudo_label_shard(pool, _TwoPhase(events), str(tmp_path / 'a'), chunk_size=4,
                                batch_size=2, meter_factory=_log_meters(events))
    assert res.chunks_written == 3 and res.examples_written == 10
    at = {e: n for n, e in enumerate(events)}
    for k in range(4):                                  # batches (0,1) (2,3) | (4,5) (6,7) | (8,9)
        assert at[('dispatch', k + 1)] < at[('finish', k)]
    assert at[('dispatch', 2)] < at[('write', 0)] and at[('dispatch', 4)] < at[('write', 1)]
    assert events == [('enter', 0), ('dispatch', 0), ('dispatch', 1), ('finish', 0),
                      ('dispatch', 2), ('finish', 1), ('exit', 0), ('enter', 4), ('dispatch', 3),
                      ('write', 0), ('finish', 2), ('dispatch', 4), ('finish', 3), ('exit', 4),
                      ('enter', 8), ('write', 1), ('finish', 4), ('exit', 8), ('write', 2)]
    # The same files as a plain label_batch, called one batch at a time.
    calls = []
    pl.pseudo_label_shard(pool, _recording(calls), str(tmp_path / 'b'), chunk_size=4,
                          batch_size=2)
    assert calls == [t for _, t in pool]
    names = sorted(p.name for p in (tmp_path / 'b').iterdir() if p.name.startswith('chunk-'))
    assert names == sorted(p.name for p in (tmp_path / 'a').iterdir()
                           if p.name.startswith('chunk-')) and len(names) == 6
    for name in names:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


def test_budget_check_reads_the_priced_chunk_before_the_next_dispatch(tmp_path, monkeypatch):
    pool, events = _pool(8), []
    _log_writes(monkeypatch, events)

    def keep_going(chunk_id):
        events.append(('ask', chunk_id))
        return chunk_id < 1
    res = pl.pseudo_label_shard(pool, _TwoPhase(events), str(tmp_path), chunk_size=4,
                                batch_size=2, meter_factory=_log_meters(events),
                                keep_going=keep_going)
    assert res.stopped_by_budget and res.chunks_written == 1 and res.examples_done == 4
    assert events == [('ask', 0), ('enter', 0), ('dispatch', 0), ('dispatch', 1), ('finish', 0),
                      ('finish', 1), ('exit', 0), ('ask', 1), ('write', 0)]


@pytest.mark.fault_injection
def test_a_failed_batch_keeps_the_chunks_before_it(tmp_path):
    pool = _pool(6)

    def label(batch):
        if 'input 4' in batch:
            raise RuntimeError('device lost')
        return _fake(batch)
    with pytest.raises(RuntimeError, match='device lost'):
        pl.pseudo_label_shard(pool, label, str(tmp_path), chunk_size=2, batch_size=2)
    # The chunks before the failed batch are written, the one it completes too.
    assert [r['id'] for r in pl.read_chunks(str(tmp_path))] == ['ex0', 'ex1', 'ex2', 'ex3']


def _one_at_a_time(label, texts):
    """What TeacherLabeler returned when each batch ran tokenize -> decode -> top-k -> detokenize
    in turn on host copies: decoded rows copied to host, zero-padded, then forced for top-k."""
    rows = [list(label.encode(t))[:label.max_input_length - 1] + [label.eos_id] for t in texts]
    out, scores = label.decoder(rows)
    size = label.decoder.batch_size
    enc = np.zeros((size, label.decoder.bucket_for(max(map(len, rows)))), np.int32)
    for r, ids in enumerate(rows):
        enc[r, :len(ids)] = ids
    dec = np.zeros((size, out.shape[1]), np.int32)
    dec[:len(rows)] = out
    vals, ids = (np.asarray(a)[:len(rows)] for a in label._run(label._topk, label.params, enc, dec))
    from doa_jax.decoding import decoded_lengths
    lengths = decoded_lengths(out, label.eos_id)
    recs = []
    for r in range(len(rows)):
        n = int(lengths[r])
        recs.append({'prediction': label.decode_text([int(t) for t in out[r, :n]
                                                      if t != label.eos_id]),
                     'score': float(scores[r]),
                     'topk_logprobs': np.round(vals[r, :n], 6).tolist(),
                     'topk_ids': ids[r, :n].tolist(), 'target_ids': [int(t) for t in out[r, :n]]})
    return recs


def test_teacher_decodes_the_next_batch_while_the_host_writes_and_labels_are_unchanged(
        tmp_path, monkeypatch):
    """The real labeler: the decode of batch i+1 is enqueued on the device before batch i's
    results are read back to host and before its chunk is written; the chunks hold exactly what
    labeling one batch at a time gives."""
    import jax
    import jax.numpy as jnp
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    config = get_config('t5_1_1_tiny', dtype=jnp.float32)
    x = jnp.ones((1, 8), jnp.int32)
    params = T5(config).init(jax.random.PRNGKey(1), x, x)['params']
    encode = lambda s: [2 + (ord(c) % 500) for c in s]
    decode = lambda ids: ' '.join(map(str, ids))
    label = pl.model_label_batch(params, config, encode, decode, max_input_length=16,
                                 max_decode_length=5, top_k=4, batch_size=2)
    pool = [(f'ex{i}', f'input {i} ' * (1 + i % 3)) for i in range(7)]
    expected = [r for b in range(0, 7, 2)
                for r in _one_at_a_time(label, [t for _, t in pool[b:b + 2]])]
    events = []
    decode_batch, finish = label.decoder.decode_batch, label.finish
    monkeypatch.setattr(label.decoder, 'decode_batch', lambda *a: (
            events.append(('decode', sum(e[0] == 'decode' for e in events))), decode_batch(*a))[1])
    monkeypatch.setattr(label, 'finish', lambda p: (
            events.append(('to_host', sum(e[0] == 'to_host' for e in events))), finish(p))[1])
    _log_writes(monkeypatch, events)
    pl.pseudo_label_shard(pool, label, str(tmp_path), chunk_size=4, batch_size=2)
    at = {e: n for n, e in enumerate(events)}
    for k in range(3):                                  # batches (0,1) (2,3) | (4,5) (6)
        assert at[('decode', k + 1)] < at[('to_host', k)]
    assert at[('decode', 2)] < at[('write', 0)]
    recs = pl.read_chunks(str(tmp_path))
    assert [r['id'] for r in recs] == [i for i, _ in pool]
    assert [{k: r[k] for k in expected[0]} for r in recs] == json.loads(json.dumps(expected))


def _wlp_pool(data_dir, tmp_path, n):
    return str(data_dir / 'wlp' / 'wlp_train_all.json')


def _env():
    return {**os.environ, 'PYTHONPATH': str(REPO), 'CUDA_VISIBLE_DEVICES': ''}


@pytest.mark.fault_injection
def test_sigkilled_run_restarted_labels_each_example_once(data_dir, tmp_path):
    """Killed at a fixed moment (the worker's hook: chunk 3 priced and written, its marker not;
    chunks 0-2 committed), then rerun in this process: each id labeled and billed once, the killed
    attempt's compile is crash overhead, and spent - overhead is an uninterrupted run's bill."""
    from doa_jax import cost
    from tasks.jsonl_task import load_split

    from tests import pseudo_label_worker as worker
    pool_path, out, n, sleep_s = _wlp_pool(data_dir, tmp_path, 0), tmp_path / 'out', 24, 0.02
    cmd = [sys.executable, str(WORKER), pool_path, str(out), '0', '1', str(n), str(sleep_s)]
    env = {**_env(), 'DOA_PL_LEDGER': str(tmp_path), 'DOA_PL_KILL_WRITING_CHUNK': '3'}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert sorted(p.name for p in out.glob('*.COMPLETED')) == [
            f'chunk-00000-{c:05d}.jsonl.COMPLETED' for c in range(3)]
    assert (out / 'chunk-00000-00003.jsonl').exists()
    ledger = cost.Ledger(str(tmp_path))
    assert [(e['first'], e['last']) for e in ledger.compute_entries('pl', 'pseudo_label')] == [
            (0, 3), (4, 7), (8, 11), (12, 15)], 'chunk 3 was priced before the kill'

    worker.label_pool(pool_path, str(out), 0, 1, n, sleep_s, str(tmp_path))   # the rerun
    ids = load_split(pool_path, allow_empty_target=True)[0][:n]
    assert pl.merge(str(out), ids)['count'] == n
    chunks = ledger.compute_entries('pl', 'pseudo_label')
    assert [(e['first'], e['last']) for e in chunks] == [(i, i + 3) for i in range(0, n, 4)], \
        'each id billed once as work (chunk 3, relabeled, was not billed again)'
    assert ledger.attempt_end_reason('pl', 'pseudo_label', 1) == 'crashed'
    assert ledger.attempt_end_reason('pl', 'pseudo_label', 2) == 'done'
    compiles = {a: r for r in ledger._rows("SELECT * FROM entries WHERE category='compile'")
                for a in [r['attempt']]}
    assert sorted(compiles) == [1, 2] and all(
            r['seconds'] == worker.COMPILE_S for r in compiles.values()), compiles
    spent, overhead = ledger.spent_usd('pl'), ledger.crash_overhead_usd('pl')
    assert overhead == pytest.approx(compiles[1]['usd'], rel=1e-12)
    work = math.fsum(e['usd'] for e in chunks) + compiles[2]['usd']
    assert spent - overhead == pytest.approx(work, rel=1e-9)
    assert pl.work_usd(ledger, 'pl') == pytest.approx((work, overhead), rel=1e-9)

    # An uninterrupted run bills the same work: one compile, each chunk once (timing noise apart).
    ref_dir = tmp_path / 'ref'
    worker.label_pool(pool_path, str(ref_dir / 'out'), 0, 1, n, sleep_s, str(ref_dir))
    ref = cost.Ledger(str(ref_dir))
    assert ref.crash_overhead_usd('pl') == 0.0
    ref_chunks = ref.compute_entries('pl', 'pseudo_label')
    assert [(e['first'], e['last']) for e in ref_chunks] == [(e['first'], e['last'])
                                                             for e in chunks]
    assert ref.spent_usd('pl') == pytest.approx(
            math.fsum(e['usd'] for e in ref_chunks) + compiles[2]['usd'], rel=1e-9)
    # The chunk meters tile the labeling (12 batches of sleep_s), the compile in none of them.
    assert 12 * sleep_s <= math.fsum(e['seconds'] for e in ref_chunks) < worker.COMPILE_S
    # Billed inside the rerun's first chunk, the second compile would add about 70% here.
    assert spent - overhead == pytest.approx(ref.spent_usd('pl'), rel=0.25)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
