"""The Chat Completions server over a tiny random doa_jax model: API shape, batching, errors,
and the `python -m doa_jax.serve` entry point."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import pytest
import seqio

from doa_jax.models.config import get_config
from doa_jax.serving import Batcher, ChatServer, load_params, make_generate_fn, messages_to_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def generate_fn():
    cfg = get_config('t5_1_1_tiny')
    return make_generate_fn(cfg, load_params('random', cfg), seqio.ByteVocabulary(),
                            max_input_length=128, max_decode_length=8)


def _chat(url: str, text: str, max_tokens: int = 8, **kw) -> httpx.Response:
    return httpx.post(url + '/chat/completions', timeout=60, json={
            'model': 'm', 'messages': [{'role': 'user', 'content': text}],
            'max_tokens': max_tokens, **kw})


def test_response_shape_and_usage(generate_fn):
    server = ChatServer(Batcher(generate_fn), 'tiny').start()
    try:
        r = _chat(server.url, 'hello', max_tokens=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body['object'] == 'chat.completion' and body['model'] == 'tiny'
        text = body['choices'][0]['message']['content']
        usage = body['usage']
        # Byte vocabulary: 5 prompt bytes + EOS; never more completion tokens than max_tokens.
        assert usage['prompt_tokens'] == 6
        assert 1 <= usage['completion_tokens'] <= 5
        assert usage['total_tokens'] == usage['prompt_tokens'] + usage['completion_tokens']
        assert text == generate_fn(['hello'], [5])[0][0]
        assert httpx.get(server.url + '/models').json()['data'][0]['id'] == 'tiny'
    finally:
        server.close()


def test_concurrent_requests_are_decoded_as_one_batch(generate_fn):
    calls = []

    def counting(prompts, max_tokens):
        calls.append(len(prompts))
        return generate_fn(prompts, max_tokens)

    server = ChatServer(Batcher(counting, max_batch=8, wait_ms=200), 'tiny').start()
    try:
        prompts = [f'p{i} ' * (i + 1) for i in range(6)]  # One length bucket.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: _chat(server.url, p).json(), prompts))
        assert max(calls) > 1 and sum(calls) == 6
        # Batched answers equal one-at-a-time answers (padding does not leak between rows).
        for p, a in zip(prompts, answers):
            assert a['choices'][0]['message']['content'] == generate_fn([p], [8])[0][0]
    finally:
        server.close()


def test_bad_requests_and_faults_off_by_default(generate_fn):
    server = ChatServer(Batcher(generate_fn), 'tiny').start()
    try:
        r = httpx.post(server.url + '/chat/completions', json={'messages': 'hi'})
        assert r.status_code == 400 and 'messages' in r.json()['error']['message']
        r = httpx.post(server.url + '/chat/completions', content=b'{not json')
        assert r.status_code == 400 and 'not JSON' in r.json()['error']['message']
        r = httpx.post(server.url.removesuffix('/v1') + '/test/faults', json={'429': 1})
        assert r.status_code == 404 and '--test_faults' in r.json()['error']['message']
        msg = [{'role': 'user', 'content': 'x'}]
        for extra, word in (({'temperature': 0.7}, 'greedily'), ({'n': 3}, 'n=3')):
            r = httpx.post(server.url + '/chat/completions', json={'messages': msg, **extra})
            assert r.status_code == 400 and word in r.json()['error']['message'], extra
        r = httpx.post(server.url + '/chat/completions',
                       json={'messages': msg, 'temperature': 0, 'n': 1})
        assert r.status_code == 200
        assert _chat(server.url, 'x').status_code == 200
    finally:
        server.close()


def test_generation_failure_is_a_500_and_server_keeps_serving():
    state = {'fail': True}

    def flaky(prompts, max_tokens):
        if state['fail']:
            raise RuntimeError('device lost')
        return [('ok', 1, 1) for _ in prompts]

    server = ChatServer(Batcher(flaky), 'tiny').start()
    try:
        r = _chat(server.url, 'x')
        assert r.status_code == 500 and 'device lost' in r.text
        state['fail'] = False
        assert _chat(server.url, 'x').json()['choices'][0]['message']['content'] == 'ok'
    finally:
        server.close()


def test_messages_to_prompt_and_checkpoint_errors(tmp_path):
    assert messages_to_prompt([{'role': 'system', 'content': 'a'},
                               {'role': 'user', 'content': 'b'}]) == 'a\n\nb'
    with pytest.raises(ValueError, match=r'messages\[0\]'):
        messages_to_prompt([{'role': 'user'}])
    with pytest.raises(FileNotFoundError, match='no trainer checkpoint'):
        load_params(str(tmp_path), get_config('t5_1_1_tiny'))


def test_serve_entry_point():
    proc = subprocess.Popen(
            [sys.executable, '-m', 'doa_jax.serve', '--checkpoint=random', '--config=t5_1_1_tiny',
             '--port=0', '--max_decode_length=4', '--model=tiny'],
            cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
    try:
        line = ''
        deadline = time.time() + 90
        while 'serving' not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, 'server exited early'
        url = line.split(' at ')[-1].strip()
        body = _chat(url, 'hello', max_tokens=4).json()
        assert body['model'] == 'tiny' and body['usage']['prompt_tokens'] == 6
    finally:
        proc.kill()
        proc.wait()
