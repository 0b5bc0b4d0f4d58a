"""The Chat Completions server (starlette + uvicorn) over a tiny random doa_jax model, over real
HTTP on 127.0.0.1: API shape, batching, finish_reason, errors (400/401/404/405/408/413/415/503/504),
the API key, the bind warning, and the `python -m doa_jax.serve` entry point.

`test_server_abuse` (marker `fault_injection`, also in the default run) throws oversized bodies,
bad Content-Length headers, garbage, slow-loris connections and 200 concurrent clients at it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import seqio

from doa_jax import llm
from doa_jax.models.config import get_config
from doa_jax.serving import (Batcher, ChatServer, Generation, bind_warning, is_loopback,
                             load_params, make_generate_fn, messages_to_prompt)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE = 8  # max_decode_length of the tiny model's generate function


@pytest.fixture(scope='module')
def generate_fn():
    cfg = get_config('t5_1_1_tiny')
    return make_generate_fn(cfg, load_params('random', cfg), seqio.ByteVocabulary(),
                            max_input_length=128, max_decode_length=DECODE)


def _chat(url: str, text: str, max_tokens: int | None = 8, model: str = 'tiny',
          **kw) -> httpx.Response:
    body = {'model': model, 'messages': [{'role': 'user', 'content': text}], **kw}
    if max_tokens is not None:
        body['max_tokens'] = max_tokens
    return httpx.post(url + '/chat/completions', timeout=60, json=body)


def _post(url: str, content: bytes, content_type: str | None = 'application/json',
          **headers) -> httpx.Response:
    if content_type is not None:
        headers['Content-Type'] = content_type
    return httpx.post(url + '/chat/completions', content=content, headers=headers, timeout=30)


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()['error']
    assert set(err) == {'message', 'type', 'param', 'code'}
    return err['message']


def test_response_shape_usage_and_finish_reason(generate_fn):
    with ChatServer(Batcher(generate_fn), 'tiny') as server:
        r = _chat(server.url, 'hello', max_tokens=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body['object'] == 'chat.completion' and body['model'] == 'tiny'
        choice, usage = body['choices'][0], body['usage']
        # Byte vocabulary: 5 prompt bytes + EOS; never more completion tokens than max_tokens.
        assert usage['prompt_tokens'] == 6
        assert 1 <= usage['completion_tokens'] <= 5
        assert usage['total_tokens'] == usage['prompt_tokens'] + usage['completion_tokens']
        direct = generate_fn(['hello'], [5])[0]
        assert choice['message'] == {'role': 'assistant', 'content': direct.text}
        assert choice['finish_reason'] == direct.finish_reason
        # max_tokens beyond the model's decode length is capped; the cut answer says "length".
        for max_tokens in (1, 2, 1000, None):
            r = _chat(server.url, 'hello there', max_tokens=max_tokens)
            assert r.status_code == 200, r.text
            n, finish = r.json()['usage']['completion_tokens'], r.json()['choices'][0]['finish_reason']
            limit = min(max_tokens or DECODE, DECODE)
            assert n <= limit
            assert finish == generate_fn(['hello there'], [limit])[0].finish_reason
            assert finish in ('stop', 'length') and (finish == 'stop' or n == limit)
        # Leaving "model" out asks for the one model served; max_completion_tokens is accepted.
        r = httpx.post(server.url + '/chat/completions', json={
                'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}],
                'max_completion_tokens': 2})
        assert r.status_code == 200 and r.json()['usage']['completion_tokens'] <= 2
        assert httpx.get(server.url + '/models').json()['data'][0]['id'] == 'tiny'
        assert httpx.get(server.url + '/models/tiny').json()['id'] == 'tiny'
        assert httpx.get(server.url.removesuffix('/v1') + '/health').json()['status'] == 'ok'


def test_make_generate_fn_finish_reason(generate_fn):
    """'stop' exactly when the answer ends with EOS (counted in completion_tokens)."""
    prompts = [f'prompt {i} ' * (i % 3) for i in range(6)]  # one length bucket (one compile)
    for max_tokens in (1, 3, DECODE, 100):
        for g in generate_fn(prompts, [max_tokens] * len(prompts)):
            assert isinstance(g, Generation) and 1 <= g.completion_tokens <= min(max_tokens, DECODE)
            if g.finish_reason == 'length':
                assert g.completion_tokens == min(max_tokens, DECODE)
            else:
                assert g.finish_reason == 'stop'


def test_finish_reason_from_plain_tuples():
    """A generate function returning (text, prompt_tokens, completion_tokens) tuples: the server
    says "length" when the answer used all of min(max_tokens, max_decode_length)."""
    def fake(prompts, max_tokens):
        return [('x' * min(m, 4, len(p)), 1, min(m, 4, len(p))) for p, m in zip(prompts, max_tokens)]

    fake.max_decode_length = 4
    with ChatServer(Batcher(fake), 'tiny') as server:
        def finish(text, max_tokens):
            return _chat(server.url, text, max_tokens).json()['choices'][0]['finish_reason']

        assert finish('ab', 8) == 'stop'        # 2 tokens of 4 allowed
        assert finish('abcdef', 3) == 'length'  # cut by max_tokens
        assert finish('abcdef', 1000) == 'length'  # cut by the server's decode length


def test_concurrent_requests_are_decoded_as_one_batch(generate_fn):
    calls = []

    def counting(prompts, max_tokens):
        calls.append(len(prompts))
        return generate_fn(prompts, max_tokens)

    with ChatServer(Batcher(counting, max_batch=8, wait_ms=200), 'tiny') as server:
        prompts = [f'p{i} ' * (i + 1) for i in range(6)]  # One length bucket.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: _chat(server.url, p).json(), prompts))
        assert max(calls) > 1 and sum(calls) == 6
        # Batched answers equal one-at-a-time answers (padding does not leak between rows).
        for p, a in zip(prompts, answers):
            assert a['choices'][0]['message']['content'] == generate_fn([p], [8])[0].text


def test_bad_requests_say_what_where_and_how_to_fix(generate_fn):
    msg = [{'role': 'user', 'content': 'x'}]
    with ChatServer(Batcher(generate_fn), 'tiny') as server:
        url = server.url
        m = _error(httpx.post(url + '/chat/completions', json={'messages': 'hi'}), 400)
        assert '"messages" must be a non-empty list' in m and '"role": "user"' in m
        m = _error(httpx.post(url + '/chat/completions', json={'messages': [{'role': 'user'}]}),
                   400)
        assert 'messages[0]' in m and 'content' in m
        m = _error(_post(url, b'{not json'), 400)
        assert 'not JSON' in m and 'line 1 column 2' in m and 'Send one JSON object' in m
        assert 'NaN is not JSON' in _error(_post(url, b'{"messages": NaN}'), 400)
        assert 'JSON object' in _error(_post(url, b'[1, 2]'), 400)
        assert 'not JSON' in _error(_post(url, b'\xff\xfe\xfa'), 400)
        for value, raw in (('"abc"', 'abc'), ('0', '0'), ('-3', '-3'), ('1.5', '1.5'),
                           ('true', 'true'), ('1e999', 'inf'), ('null', None)):
            r = _post(url, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": %s}'
                      % value.encode())
            if raw is None:  # null: the default
                assert r.status_code == 200
                continue
            m = _error(r, 400)
            assert '"max_tokens" must be an integer >= 1' in m and raw in m, m
            assert f'at most {DECODE} tokens' in m and r.json()['error']['param'] == 'max_tokens'
        for extra, word in (({'temperature': 0.7}, 'greedily'), ({'top_p': 0.5}, 'greedily'),
                            ({'n': 3}, 'n=3'), ({'stream': True}, '"stream": true'),
                            ({'temperature': 'hot'}, '"temperature" must be a number'),
                            ({'n': 'two'}, '"n" must be an integer')):
            r = httpx.post(url + '/chat/completions', json={'messages': msg, **extra})
            assert word in _error(r, 400), extra
        r = httpx.post(url + '/chat/completions',
                       json={'messages': msg, 'temperature': 0, 'top_p': 1, 'n': 1,
                             'stream': False})
        assert r.status_code == 200
        # Unknown model: 404 naming the served one.
        m = _error(_chat(url, 'x', model='gpt-4'), 404)
        assert "'gpt-4' is not served" in m and '"model": "tiny"' in m
        assert _error(httpx.get(url + '/models/gpt-4'), 404)
        # Wrong or missing content type: 415 with the header to send.
        for ctype in ('text/plain', 'application/x-www-form-urlencoded', None):
            m = _error(_post(url, b'{"messages": []}', ctype), 415)
            assert 'Content-Type: application/json' in m
        assert _post(url, b'{"messages": [{"role": "user", "content": "x"}]}',
                     'application/json; charset=utf-8').status_code == 200
        # Unknown routes and methods.
        root = url.removesuffix('/v1')
        assert 'no route GET /v1/nothing' in _error(httpx.get(root + '/v1/nothing'), 404)
        assert 'POST /v1/chat/completions' in _error(httpx.post(root + '/v1/completions',
                                                                json={}), 404)
        m = _error(httpx.get(url + '/chat/completions'), 405)
        assert 'GET /v1/chat/completions is not allowed' in m and 'POST' in m
        m = _error(httpx.post(root + '/test/faults', json={'429': 1}), 404)
        assert '--test_faults' in m
        assert _chat(url, 'x').status_code == 200


def test_fault_injection_endpoint(generate_fn):
    with ChatServer(Batcher(generate_fn), 'tiny', test_faults=True) as server:
        root = server.url.removesuffix('/v1')
        assert httpx.post(root + '/test/faults', json={'429': 1, 'malformed': 1}).json() == {
                'queued': 2}
        r = _chat(server.url, 'x')
        assert r.status_code == 429 and r.headers['retry-after'] == '0'
        r = _chat(server.url, 'x')
        assert r.status_code == 200 and r.text.startswith('{"choices": [ this is not json')
        assert _chat(server.url, 'x').status_code == 200
        assert 'fault count' in _error(httpx.post(root + '/test/faults', json={'abc': 1}), 400)
        assert 'fault count' in _error(httpx.post(root + '/test/faults', json={'500': -1}), 400)


def test_generation_failure_is_a_500_and_server_keeps_serving():
    state = {'fail': True}

    def flaky(prompts, max_tokens):
        if state['fail']:
            raise RuntimeError('device lost')
        return [('ok', 1, 1) for _ in prompts]

    with ChatServer(Batcher(flaky), 'tiny') as server:
        assert 'device lost' in _error(_chat(server.url, 'x'), 500)
        state['fail'] = False
        assert _chat(server.url, 'x').json()['choices'][0]['message']['content'] == 'ok'


def test_full_queue_is_a_503_and_slow_answers_time_out():
    release = threading.Event()
    calls = []

    def slow(prompts, max_tokens):
        calls.append(list(prompts))
        release.wait(10)
        return [('ok', 1, 1) for _ in prompts]

    # One request decodes, one waits (max_queue=1): the rest are turned away at once.
    with ChatServer(Batcher(slow, max_batch=1, wait_ms=1, max_queue=1), 'tiny') as server:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(_chat, server.url, 'first')
            while not calls:
                time.sleep(0.01)
            rest = [pool.submit(_chat, server.url, f'r{i}') for i in range(4)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in rest) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)  # one of the four waits in the queue, three are turned away
            release.set()
            answers = [first.result()] + [f.result() for f in rest]
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 200, 503, 503, 503], codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers['retry-after'] == '1'
        assert 'max_queue=1' in _error(busy, 503)

    # An answer not ready within request_timeout_s is a 504; a timed-out request whose batch had
    # not started is dropped, never decoded.
    release.clear()
    calls.clear()
    with ChatServer(Batcher(slow, max_batch=1, wait_ms=1), 'tiny',
                    request_timeout_s=0.3) as server:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = pool.submit(_chat, server.url, 'a')
            while not calls:
                time.sleep(0.01)
            b = pool.submit(_chat, server.url, 'b')
            m = _error(a.result(), 504)
            assert 'request_timeout_s=0.3' in m
            _error(b.result(), 504)
        release.set()
        time.sleep(0.2)
        assert calls == [['a']]


def test_api_key(generate_fn):
    with ChatServer(Batcher(generate_fn), 'tiny', api_key='s3cret') as server:
        r = _chat(server.url, 'x')
        m = _error(r, 401)
        assert 'Authorization: Bearer' in m and r.headers['www-authenticate'] == 'Bearer'
        for value in ('Bearer nope', 's3cret', 'Basic s3cret'):
            r = httpx.post(server.url + '/chat/completions', headers={'Authorization': value},
                           json={'messages': [{'role': 'user', 'content': 'x'}]})
            assert 'invalid API key' in _error(r, 401)
        assert _error(httpx.get(server.url + '/models'), 401)
        ok = httpx.get(server.url + '/models', headers={'Authorization': 'Bearer s3cret'})
        assert ok.status_code == 200
        assert httpx.get(server.url.removesuffix('/v1') + '/health').status_code == 200
        client = llm.ChatClient(server.url, 'tiny', api_key='s3cret')
        try:
            out = client.complete([{'role': 'user', 'content': 'hi'}], {'max_tokens': 3})
            assert out.completion_tokens <= 3
        finally:
            client.close()


def test_non_loopback_bind_warns(generate_fn, caplog):
    assert is_loopback('127.0.0.1') and is_loopback('::1') and is_loopback('localhost')
    assert not is_loopback('0.0.0.0') and not is_loopback('192.168.1.10')
    assert bind_warning('127.0.0.1', None) is None
    assert 'no API key' in bind_warning('0.0.0.0', None)
    assert 'TLS' in bind_warning('0.0.0.0', 'k') and 'no API key' not in bind_warning('0.0.0.0', 'k')
    with caplog.at_level(logging.WARNING, logger='doa_jax.serving'):
        ChatServer(Batcher(generate_fn), 'tiny', host='0.0.0.0').close()  # bound, never served
    assert any('0.0.0.0' in r.message and 'no API key' in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='doa_jax.serving'):
        ChatServer(Batcher(generate_fn), 'tiny').close()
    assert not caplog.records


def test_messages_to_prompt_and_checkpoint_errors(tmp_path):
    assert messages_to_prompt([{'role': 'system', 'content': 'a'},
                               {'role': 'user', 'content': 'b'}]) == 'a\n\nb'
    assert messages_to_prompt([{'role': 'user', 'content': [
            {'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]}]) == 'ab'
    with pytest.raises(ValueError, match=r'messages\[0\]'):
        messages_to_prompt([{'role': 'user'}])
    with pytest.raises(ValueError, match=r'messages\[0\]\.content\[0\] is not a text part'):
        messages_to_prompt([{'role': 'user', 'content': [{'type': 'image_url'}]}])
    with pytest.raises(FileNotFoundError, match='no trainer checkpoint'):
        load_params(str(tmp_path), get_config('t5_1_1_tiny'))


# --- abuse ---------------------------------------------------------------------------------------


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or `timeout`)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # The server may answer and close before reading it all.
            pass
        out = b''
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def _head(path: str = '/v1/chat/completions', length: str | None = None, extra: str = '') -> bytes:
    head = f'POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
    if length is not None:
        head += f'Content-Length: {length}\r\n'
    return (head + extra + '\r\n').encode()


@pytest.mark.fault_injection
def test_server_abuse(generate_fn):
    """Oversized bodies, bad Content-Length, garbage, slow-loris connections, bad max_tokens and
    200 concurrent clients: every one gets a bounded, correct answer, and the server keeps
    serving with bounded time and memory."""
    with ChatServer(Batcher(generate_fn, max_batch=16, wait_ms=5), 'tiny',
                    max_body_bytes=64 * 1024, read_timeout_s=1.0) as server:
        url, port = server.url, server.port

        # Oversized bodies: 413 from the Content-Length alone (nothing read), or once a chunked
        # body passes the limit; the message names the limit and the flag.
        t0 = time.monotonic()
        out = _raw(port, _head(length=str(10 ** 12)))
        assert out.startswith(b'HTTP/1.1 413') and b'max_body_bytes=65536' in out
        assert b'connection: close' in out.lower() and time.monotonic() - t0 < 5
        big = b'{"messages": [{"role": "user", "content": "' + b'x' * 200_000 + b'"}]}'
        m = _error(_post(url, big), 413)
        assert 'max_body_bytes=65536' in m and '--max_body_bytes' in m
        r = httpx.post(url + '/chat/completions', content=iter([big[:50_000]] * 4),
                       headers={'Content-Type': 'application/json'}, timeout=30)  # chunked
        assert _error(r, 413)

        # Bad Content-Length headers are refused by the HTTP parser; garbage too.
        for length in ('-1', '1e12', 'abc', '5, 6'):
            assert _raw(port, _head(length=length) + b'{}').startswith(b'HTTP/1.1 400'), length
        assert _raw(port, b'\x16\x03\x01\x02\x00garbage\r\n\r\n').startswith(b'HTTP/1.1 400')
        assert _raw(port, b'GET / HTTP/1.1\r\n' + b'X-Junk: ' + b'a' * 100_000 + b'\r\n\r\n'
                    ).startswith(b'HTTP/1.1 4')  # an over-long head
        m = _error(_post(url, b'[' * 30_000 + b']' * 30_000), 400)
        assert 'nested too deeply' in m

        # Bad max_tokens values.
        for value in (b'1e999', b'-1', b'"many"', b'1.5', b'[]'):
            r = _post(url, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": '
                      + value + b'}')
            assert 'max_tokens' in _error(r, 400), value
        r = _chat(url, 'x', max_tokens=10 ** 30)  # capped, not refused
        assert r.status_code == 200 and r.json()['usage']['completion_tokens'] <= DECODE

        # Slow-loris: heads and bodies that trickle in are cut off after read_timeout_s (408),
        # while a normal client is served meanwhile.
        loris = []
        for i in range(30):
            s = socket.create_connection(('127.0.0.1', port), timeout=10)
            s.sendall(_head(length='100')[:-2] if i % 2 else _head(length='100') + b'{"mess')
            loris.append(s)
        t0 = time.monotonic()
        for _ in range(2):
            time.sleep(0.1)
            for s in loris[1::2]:
                s.sendall(b'X-Slow: 1\r\n')  # the head never ends (1 s deadline: sent well before)
        assert _chat(url, 'served meanwhile').status_code == 200
        for s in loris:
            out = b''
            while chunk := s.recv(65536):
                out += chunk
            s.close()
            assert out.startswith(b'HTTP/1.1 408'), out[:100]
        assert time.monotonic() - t0 < 5
        # A connection that never sends anything is closed (silently) too.
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            t0 = time.monotonic()
            assert s.recv(65536) == b'' and time.monotonic() - t0 < 5

        assert _chat(url, 'still alive').status_code == 200

    # 200 concurrent clients, each on its own connection: every one answered, in batches.
    with ChatServer(Batcher(generate_fn, max_batch=16, wait_ms=5), 'tiny') as server:
        url = server.url

        async def many(n: int) -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(*(client.post(url + '/chat/completions', json={
                        'model': 'tiny', 'messages': [{'role': 'user', 'content': f'c {i:03d}'}],
                        'max_tokens': 4}) for i in range(n)))

        answers = asyncio.run(many(200))
        assert [r.status_code for r in answers] == [200] * 200
        assert all(r.json()['usage']['prompt_tokens'] == 6 for r in answers)
        batches = server.batcher.batch_sizes
        assert sum(batches) == 200 and max(batches) > 1   # batched, not one at a time
        assert _chat(url, 'still alive').status_code == 200


def test_serve_entry_point():
    proc = subprocess.Popen(
            [sys.executable, '-m', 'doa_jax.serve', '--checkpoint=random', '--config=t5_1_1_tiny',
             '--port=0', '--max_decode_length=4', '--model=tiny'],
            cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO, 'DOA_API_KEY': 'k3y'},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ''
        deadline = time.time() + 90
        while 'serving' not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, 'server exited early'
        assert line.endswith('(API key required)\n'), line
        url = line.split(' at ')[-1].split(' ')[0].strip()
        assert _chat(url, 'hello', max_tokens=4).status_code == 401
        r = httpx.post(url + '/chat/completions', headers={'Authorization': 'Bearer k3y'},
                       json={'model': 'tiny', 'max_tokens': 100,
                             'messages': [{'role': 'user', 'content': 'hello'}]}, timeout=60)
        body = r.json()
        assert body['model'] == 'tiny' and body['usage']['prompt_tokens'] == 6
        assert body['usage']['completion_tokens'] <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0  # Ctrl-C: a clean shutdown
        finally:
            proc.kill()


def test_serve_flag_errors(capsys):
    from doa_jax import serve
    for flag, says in (('--max_queue=0', '--max_queue=0: must be >= 1'),
                       ('--request_timeout_s=0', '--request_timeout_s=0.0: must be > 0')):
        with pytest.raises(SystemExit) as e:
            serve.main(['--checkpoint=random', flag])
        assert e.value.code == 2 and says in capsys.readouterr().err
