"""LLM annotation against a real doa_jax model served over HTTP on 127.0.0.1 (tiny random T5,
byte vocabulary: the labels are garbage, the plumbing is real)."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
import seqio

from doa_jax import llm
from doa_jax.cost.ledger import Ledger
from doa_jax.cost.prices import llm_cost_usd, load_prices
from doa_jax.llm.annotate import STAGE, Example
from doa_jax.llm.client import Completion, MalformedResponseError, parse_completion
from doa_jax.models.config import get_config
from doa_jax.serving import Batcher, ChatServer, load_params, make_generate_fn

MODEL = 'doa-local'
PRICES_YAML = 'llm:\n  doa-local:\n    usd_per_1k_input: 1.0\n    usd_per_1k_output: 2.0\n'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def generate_fn():
    cfg = get_config('t5_1_1_tiny')
    return make_generate_fn(cfg, load_params('random', cfg), seqio.ByteVocabulary(),
                            max_input_length=256, max_decode_length=8)


@pytest.fixture(scope='module')
def server(generate_fn):
    s = ChatServer(Batcher(generate_fn, max_batch=8, wait_ms=5), MODEL, test_faults=True).start()
    yield s
    s.close()


@pytest.fixture
def prices(tmp_path):
    path = tmp_path / 'prices.yaml'
    path.write_text(PRICES_YAML)
    return str(path)


def _pool(n: int) -> list[Example]:
    return [Example(f'u{i}', f'sentence number {i} about cats') for i in range(n)]


SHOTS = [Example('l0', 'a happy sentence', 'positive'), Example('l1', 'a sad one', 'negative')]


def _run(server, tmp_path, prices_path, pool, **kw):
    ledger = Ledger(tmp_path / 'ledger.sqlite')
    cache = llm.ResponseCache(tmp_path / 'cache.sqlite')
    client = llm.ChatClient(server.url, MODEL, backoff_base_s=0.01)
    defaults = dict(client=client, cache=cache, ledger=ledger, prices=load_prices(prices_path),
                    run_id='run', output_dir=str(tmp_path / 'out'), labels=None,
                    instruction='Continue.', params={'max_tokens': 6, 'temperature': 0.0},
                    num_shards=2, concurrency=4, progress=False)
    defaults.update(kw)
    summary = llm.annotate(pool, SHOTS, **defaults)
    return summary, ledger, cache, client


def _rows(out_dir):
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, '*'))):
        if not path.endswith('.COMPLETED'):
            rows += [json.loads(line) for line in open(path)]
    return rows


def _cache_usd(path, prices_path) -> tuple[float, int]:
    """Dollars of every answer in the cache, from the usage the server reported."""
    con = sqlite3.connect(path)
    values = [json.loads(v) for (v,) in con.execute('SELECT value FROM responses')]
    con.close()
    table = load_prices(prices_path)
    return math.fsum(llm_cost_usd(MODEL, v['prompt_tokens'], v['completion_tokens'], table)
                     for v in values), len(values)


def test_prompt_and_label_parsing():
    msgs = llm.build_messages('Label it.', [('x1', 'yes')], 'x2')
    assert msgs[0] == {'role': 'system', 'content': 'Label it.'}
    assert msgs[1]['content'] == 'Input: x1\nOutput: yes\n\nInput: x2\nOutput:'
    labels = ['SUPPORTS', 'REFUTES', 'NOT ENOUGH INFO']
    assert llm.parse_output(' supports.', labels) == ('SUPPORTS', True)
    assert llm.parse_output('Not enough info, since ...', labels) == ('NOT ENOUGH INFO', True)
    assert llm.parse_output('maybe', labels) == ('maybe', False)
    assert llm.parse_output('a paraphrase\nInput: junk', None) == ('a paraphrase', True)
    assert llm.parse_output('  ', None) == ('', False)
    with pytest.raises(MalformedResponseError):
        parse_completion({'choices': [], 'usage': {}})


def test_labels_come_back_with_costs_from_usage(server, tmp_path, prices):
    pool = _pool(6)
    before = server.chat_requests
    summary, ledger, cache, _ = _run(server, tmp_path, prices, pool)
    summary_ids = [e.id for e in pool]
    rows = _rows(tmp_path / 'out')
    if os.path.exists(tmp_path / 'out.invalid.jsonl'):
        rows += [json.loads(x) for x in open(tmp_path / 'out.invalid.jsonl')]
    assert sorted(r['id'] for r in rows) == sorted(summary_ids)
    assert summary.completed_shards == 2 and summary.requests == server.chat_requests - before
    assert len(glob.glob(str(tmp_path / 'out' / '*.COMPLETED'))) == 2
    for r in rows:
        assert r['valid'] == bool(r['raw'].strip())
        assert r['prediction'] == (r['raw'].strip() if r['valid'] else '')
    # The ledger holds exactly the usage the server reported, priced from the price table.
    usd, n_cached = _cache_usd(tmp_path / 'cache.sqlite', prices)
    assert n_cached == summary.requests
    assert ledger.spent_usd('run') == pytest.approx(usd, rel=1e-9)
    assert ledger.spent_usd('run') == pytest.approx(summary.usd, rel=1e-9)
    in_tokens = sum(r['prompt_tokens'] for r in rows)
    assert in_tokens > 100  # Byte vocabulary: one token per prompt byte.
    # A second pass is served from the cache and records nothing new.
    again, ledger2, _, _ = _run(server, tmp_path, prices, pool, output_dir=str(tmp_path / 'out2'))
    assert again.requests == 0 and again.cached == summary.requests
    assert ledger2.spent_usd('run') == pytest.approx(usd, rel=1e-9)


def test_invalid_outputs_are_reasked_then_marked(server, tmp_path, prices):
    summary, ledger, _, _ = _run(server, tmp_path, prices, _pool(3), num_shards=1,
                                 labels=['zzz-never-said'], max_invalid_retries=2)
    # At temperature 0 each re-ask adds a correction; a re-ask identical to the previous request
    # (the model repeated itself) is not sent.
    assert summary.invalid == 3 and summary.invalid_outputs == summary.requests
    assert summary.requests + summary.reasks_skipped == 9 and summary.requests >= 6
    # Invalid rows stay out of the shards (a pseudo-labeled task would train on them).
    assert _rows(tmp_path / 'out') == []
    assert os.path.exists(tmp_path / 'out' / 'llm_labels.jsonl-00000-of-00001.COMPLETED')
    rows = [json.loads(x) for x in open(tmp_path / 'out.invalid.jsonl')]
    assert [r['id'] for r in rows] == ['u0', 'u1', 'u2']
    assert all(not r['valid'] and r['attempts'] in (2, 3) and r['prediction'] == '' for r in rows)
    # Every paid attempt is one ledger row.
    usd, n = _cache_usd(tmp_path / 'cache.sqlite', prices)
    assert n == summary.requests and ledger.spent_usd('run') == pytest.approx(usd, rel=1e-9)
    assert len(ledger._rows("SELECT * FROM entries WHERE category='llm'")) == n


def test_429_5xx_and_malformed_responses_are_retried(server, tmp_path, prices):
    r = httpx.post(server.url.removesuffix('/v1') + '/test/faults',
                   json={'429': 2, 'malformed': 2, '503': 1})
    assert r.status_code == 200
    summary, ledger, _, client = _run(server, tmp_path, prices, _pool(2), concurrency=1,
                                      num_shards=1)
    assert client.retries == {'429': 2, 'malformed': 2, '503': 1}
    assert summary.labeled == 2 and summary.requests == 2 and not server.faults
    usd, _ = _cache_usd(tmp_path / 'cache.sqlite', prices)
    assert ledger.spent_usd('run') == pytest.approx(usd, rel=1e-9)


def test_retries_exhausted_and_bad_requests_say_what_to_do(server):
    httpx.post(server.url.removesuffix('/v1') + '/test/faults', json={'429': 3})
    client = llm.ChatClient(server.url, MODEL, max_retries=2, backoff_base_s=0.01)
    with pytest.raises(llm.LLMRequestError, match='gave up after 3 attempts.*HTTP 429'):
        client.complete([{'role': 'user', 'content': 'x'}], {'max_tokens': 2})
    with pytest.raises(llm.LLMRequestError, match='HTTP 400.*messages'):
        client.complete([], {'max_tokens': 2})
    assert not server.faults


def test_budget_caps_spend_with_requests_in_flight(server, tmp_path, prices):
    budget = 0.25  # Each request costs ~0.1-0.2$ at $1/1K input tokens: room for about two.
    summary, ledger, _, _ = _run(server, tmp_path, prices, _pool(8), budget_usd=budget,
                                 concurrency=4, num_shards=2)
    assert summary.stopped_for_budget
    assert 0 < summary.labeled < 8
    assert ledger.spent_usd('run') <= budget
    assert not glob.glob(str(tmp_path / 'out' / '*.COMPLETED'))


@pytest.mark.fault_injection
def test_killed_run_resumes_from_cache_without_paying_again(generate_fn, tmp_path, prices):
    # The server kills the client at a fixed moment: when it is asked for the 7th answer, after
    # at most 6 (5 when the 6th and 7th come in one batch) have been sent.
    state = {'answered': 0, 'client': None}

    def killing(prompts, max_tokens):
        if state['client'] is not None and state['answered'] + len(prompts) > 6:
            os.kill(state['client'], signal.SIGKILL)
            state['client'] = None
        state['answered'] += len(prompts)
        return generate_fn(prompts, max_tokens)

    server = ChatServer(Batcher(killing, max_batch=4, wait_ms=1), MODEL).start()
    try:
        labeled = tmp_path / 'labeled.jsonl'
        labeled.write_text(''.join(json.dumps({'source': s.source, 'target': s.target}) + '\n'
                                   for s in SHOTS))
        pool = tmp_path / 'pool.jsonl'
        pool.write_text(''.join(json.dumps({'id': e.id, 'source': e.source}) + '\n'
                                for e in _pool(16)))
        out = tmp_path / 'run' / 'llm'
        cmd = [sys.executable, '-m', 'doa_jax.annotate_llm', f'--model={MODEL}',
               f'--base_url={server.url}', f'--labeled_file={labeled}',
               f'--unlabeled_file={pool}', f'--output_dir={out}', f'--prices={prices}',
               '--labels=', '--concurrency=2', '--num_shards=4', '--max_tokens=4',
               '--no_progress']
        env = {**os.environ, 'PYTHONPATH': REPO}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        state['client'] = proc.pid
        cache_path = str(out) + '.cache.sqlite'
        assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stdout.read()
        assert not os.path.exists(str(out) + '/llm_labels.jsonl-00003-of-00004.COMPLETED')
        assert 7 <= server.chat_requests < 16
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert 'cached' in done.stdout
        rows = _rows(out)
        if os.path.exists(str(out) + '.invalid.jsonl'):
            rows += [json.loads(x) for x in open(str(out) + '.invalid.jsonl')]
        assert sorted(r['id'] for r in rows) == sorted(f'u{i}' for i in range(16))
        usd, n_cached = _cache_usd(cache_path, prices)
        # Every request the server answered is in the cache, except at most the one(s) in flight
        # at the kill; nothing was asked twice.
        assert n_cached == 16
        assert 16 <= server.chat_requests <= 16 + 2
        # One ledger row per paid request: a request paid and recorded but killed before its
        # answer was cached was paid again, and both payments are in the ledger.
        ledger = Ledger(tmp_path / 'run' / 'cost_ledger.sqlite')
        entries = ledger._rows('SELECT first, usd FROM entries WHERE stage=?', (STAGE,))
        assert sorted({e['first'] for e in entries}) == list(range(16))
        assert 16 <= len(entries) <= server.chat_requests
        assert ledger.spent_usd('llm') >= usd * (1 - 1e-9)
    finally:
        server.close()


def test_task_flag_reads_labeled_slice_and_pool(server, tmp_path, prices, data_dir, monkeypatch):
    from doa_jax import annotate_llm
    monkeypatch.setenv('DOA_DATA_DIR', str(data_dir))
    out = tmp_path / 'wlp'
    rc = annotate_llm.main(['--task=doa_wlp', f'--model={MODEL}', f'--base_url={server.url}',
                            f'--output_dir={out}', f'--prices={prices}', '--limit=3',
                            '--k_shot=2', '--max_tokens=4', '--no_progress'])
    assert rc == 0
    rows = _rows(out)
    if os.path.exists(str(out) + '.invalid.jsonl'):
        rows += [json.loads(x) for x in open(str(out) + '.invalid.jsonl')]
    assert len(rows) == 3 and all(r['input'].startswith('wlp: ') for r in rows)
    # Two few-shot examples from the labeled slice are in every prompt.
    assert all(r['prompt_tokens'] > len(r['input'].encode()) + 40 for r in rows)
    assert Ledger(tmp_path / 'cost_ledger.sqlite').spent_usd('wlp') > 0


# ---- the ledger is the money paid (a scripted client: exact and fast) -------------------------
class ScriptedClient:
    """A Chat Completions client whose answer is `reply(messages, params)`; it keeps every
    request it is paid for. Usage: one prompt token per byte, one completion token per byte."""

    def __init__(self, reply=lambda messages, params: 'maybe', delay_s: float = 0.0):
        self.model, self.reply, self.delay_s = MODEL, reply, delay_s
        self.requests: list[tuple[list[dict], dict]] = []
        self.retries: dict[str, int] = {}
        self._lock = threading.Lock()

    def complete(self, messages, params):
        time.sleep(self.delay_s)
        text = self.reply(messages, params)
        with self._lock:
            self.requests.append((messages, dict(params)))
        return Completion(text, sum(len(m['content'].encode()) for m in messages),
                          min(len(text.encode()), params['max_tokens']))

    def paid_usd(self, prices_path) -> float:
        table = load_prices(prices_path)
        return math.fsum(llm_cost_usd(MODEL, sum(len(m['content'].encode()) for m in msgs),
                                      min(len(self.reply(msgs, p).encode()), p['max_tokens']),
                                      table) for msgs, p in self.requests)


def _annotate(tmp_path, prices_path, pool, client, run_id='run', out='out', **kw):
    ledger = Ledger(tmp_path / 'ledger.sqlite')
    args = dict(client=client, cache=llm.ResponseCache(tmp_path / 'cache.sqlite'), ledger=ledger,
                prices=load_prices(prices_path), run_id=run_id, output_dir=str(tmp_path / out),
                labels=['yes', 'no'], instruction='Label it.',
                params={'max_tokens': 6, 'temperature': 0.0}, num_shards=1, concurrency=4,
                progress=False)
    args.update(kw)
    return llm.annotate(pool, SHOTS, **args), ledger


def _llm_rows(ledger, run_id):
    return ledger._rows("SELECT first, usd, note FROM entries WHERE run_id=? AND category='llm'",
                        (run_id,))


def test_cache_hits_are_never_billed(tmp_path, prices):
    # Six examples, three distinct prompts, asked concurrently: each prompt is paid once.
    pool = [Example(f'u{i}', f'sentence {i % 3}') for i in range(6)]
    client = ScriptedClient(lambda m, p: 'yes', delay_s=0.05)
    summary, ledger = _annotate(tmp_path, prices, pool, client)
    assert len(client.requests) == 3 and summary.requests == 3 and summary.cached == 3
    assert summary.labeled == 6
    assert len(_llm_rows(ledger, 'run')) == 3
    assert ledger.spent_usd('run') == pytest.approx(client.paid_usd(prices), rel=1e-12)
    # A rerun elsewhere under the same run id pays and bills nothing.
    again, _ = _annotate(tmp_path, prices, pool, client, out='out2')
    assert again.requests == 0 and len(client.requests) == 3 and len(_llm_rows(ledger, 'run')) == 3
    # Another run reusing the answers is billed nothing, unless it asks to be charged their
    # price (a study point's labels), and then once per answer.
    _annotate(tmp_path, prices, pool, client, run_id='other', out='out3')
    assert ledger.spent_usd('other') == 0.0
    for _ in range(2):
        charged, _ = _annotate(tmp_path, prices, pool, client, run_id='point', out='out4',
                               budget_counts_cached=True)
    rows = _llm_rows(ledger, 'point')
    assert len(rows) == 3 and all(json.loads(r['note'])['reused'] for r in rows)
    assert ledger.spent_usd('point') == pytest.approx(ledger.spent_usd('run'), rel=1e-12)
    assert len(client.requests) == 3


def test_paid_request_is_recorded_when_its_example_does_not_finish(tmp_path, prices):
    # The budget pays for the first answer (unparseable) but not for its re-ask.
    pool = [Example('u0', 'a sentence')]
    messages = llm.build_messages('Label it.', [(s.source, s.target) for s in SHOTS], 'a sentence')
    first_worst = llm_cost_usd(MODEL, sum(len(m['content'].encode()) for m in messages) + 48, 6,
                               load_prices(prices))
    client = ScriptedClient()
    summary, ledger = _annotate(tmp_path, prices, pool, client, budget_usd=first_worst * 1.001)
    assert summary.stopped_for_budget and summary.labeled == 0 and len(client.requests) == 1
    assert len(_llm_rows(ledger, 'run')) == 1
    assert ledger.spent_usd('run') == pytest.approx(client.paid_usd(prices), rel=1e-12)


def test_invalid_answer_file_has_one_row_per_example_over_reruns(tmp_path, prices):
    pool = [Example(f'u{i}', f'sentence {i}') for i in range(6)]
    client = ScriptedClient()
    labeled = []
    for budget in (0.25, 0.4, 100.0):      # two budget stops (each redoes the shard), the rest
        summary, ledger = _annotate(tmp_path, prices, pool, client, budget_usd=budget,
                                    concurrency=1, reask='same')
        ids = [json.loads(x)['id'] for x in open(tmp_path / 'out.invalid.jsonl')]
        assert len(ids) == len(set(ids)) == summary.labeled
        labeled.append(summary.labeled)
    assert labeled[0] < labeled[1] < labeled[2] == 6 and summary.completed_shards == 1
    assert len(client.requests) == 6
    assert ledger.spent_usd('run') == pytest.approx(client.paid_usd(prices), rel=1e-12)


def test_no_identical_reask_at_temperature_zero(tmp_path, prices):
    pool = [Example(f'u{i}', f'sentence {i}') for i in range(3)]
    for reask, params, per_example in (('same', {'temperature': 0.0}, 1),
                                       ('prompt', {'temperature': 0.0}, 2),
                                       ('temperature', {'temperature': 0.0}, 3),
                                       ('same', {'temperature': 0.5}, 3)):
        client = ScriptedClient()          # always the same unparseable answer
        summary, _ = _annotate(tmp_path / reask / str(params['temperature']), prices, pool,
                               client, reask=reask, max_invalid_retries=2,
                               params={'max_tokens': 6, **params})
        assert len(client.requests) == 3 * per_example, reask
        assert summary.invalid == 3 and summary.reasks_skipped == (3 if per_example < 3 else 0)
        zero = [json.dumps(r, sort_keys=True) for r in client.requests
                if r[1]['temperature'] == 0.0]
        assert len(zero) == len(set(zero)), reask        # never the same request twice at T=0
    # A correction the model follows: answered at the re-ask.
    fixes = ScriptedClient(lambda m, p: 'yes' if m[-1]['role'] == 'user' and
                           m[-1]['content'].startswith('That answer') else 'maybe')
    summary, _ = _annotate(tmp_path / 'fix', prices, pool, fixes)
    assert summary.invalid == 0 and len(fixes.requests) == 6
    assert 'yes, no' in fixes.requests[-1][0][-1]['content']


@pytest.mark.parametrize('concurrency', [1, 8])
def test_budget_is_never_exceeded_with_requests_in_flight(tmp_path, prices, concurrency):
    pool = [Example(f'u{i}', f'sentence number {i} ' + 'x' * (i % 7)) for i in range(40)]
    client = ScriptedClient(lambda m, p: 'positive', delay_s=0.01)
    for budget in (1.5, 3.0):            # a first cap, then a larger one over the same run
        summary, ledger = _annotate(tmp_path, prices, pool, client, budget_usd=budget,
                                    concurrency=concurrency, labels=None)
        paid = client.paid_usd(prices)
        assert summary.stopped_for_budget and 0 < paid <= budget
        assert ledger.spent_usd('run') == pytest.approx(paid, rel=1e-12)


def test_dead_endpoint_stops_the_whole_run_fast(tmp_path, prices, capsys):
    from doa_jax import annotate_llm
    with socket.socket() as s:           # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/v1'
    client = llm.ChatClient(url, MODEL, backoff_base_s=0.01, max_connection_failures=5)
    t0 = time.monotonic()
    with pytest.raises(llm.EndpointUnreachableError, match='5 connection failures in a row'):
        _annotate(tmp_path, prices, _pool(40), client)
    assert time.monotonic() - t0 < 20 and client.retries['timeout'] <= 5
    assert not Ledger(tmp_path / 'ledger.sqlite').spent_usd('run')
    # The command line says so and exits 1, with progress (paid $, errors) on the way.
    labeled, pool = tmp_path / 'labeled.jsonl', tmp_path / 'pool.jsonl'
    labeled.write_text(''.join(json.dumps({'source': e.source, 'target': e.target}) + '\n'
                               for e in SHOTS))
    pool.write_text(''.join(json.dumps({'id': e.id, 'source': e.source}) + '\n'
                            for e in _pool(40)))
    rc = annotate_llm.main([f'--model={MODEL}', f'--base_url={url}', f'--prices={prices}',
                            f'--labeled_file={labeled}', f'--unlabeled_file={pool}',
                            f'--output_dir={tmp_path / "cli"}', '--labels=yes,no',
                            '--max_connection_failures=3'])
    err = capsys.readouterr().err
    assert rc == 1 and '3 connection failures in a row' in err and '--base_url' in err
    assert 'paid $0.0000' in err and 'errors' in err
