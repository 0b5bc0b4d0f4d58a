"""`benchmark train` / `benchmark decode`: seqs/s and $ per 1M tokens, checked on hand-worked
numbers (a price table of $3.60 per device-hour, i.e. $0.001 per device-second)."""

import argparse
import json

import pytest

from doa_jax.benchmark import price
from doa_jax.benchmark.__main__ import main

PRICES = 'devices:\n  CPU:\n    usd_per_hour: 3.6\n    aliases: ["^cpu$"]\n'


@pytest.fixture
def prices(tmp_path):
    path = tmp_path / 'prices.yaml'
    path.write_text(PRICES)
    return path


def test_money_columns_on_a_hand_worked_case(prices):
    """A 4-sequence batch of 48 tokens each in 0.5 s on two CPUs at $3.60/device-hour: 8 seqs/s,
    384 tokens/s; 1M tokens take 2604.1666 s on 2 devices = 5208.333 device-seconds, at $0.001
    each $5.208333."""
    args = argparse.Namespace(prices=str(prices), device_price_fallback=None)
    r = price({'median_s': 0.5, 'tokens_per_s': 384.0}, device_kind='cpu', device_count=2,
              batch=4, args=args)
    assert r['seqs_per_s'] == 8.0
    assert r['usd_per_device_hour'] == 3.6
    assert r['usd_per_1m_tokens'] == pytest.approx(5.2083333, rel=1e-7)
    assert (r['device_kind'], r['device_count']) == ('cpu', 2)


def _check_run(r, batch, tokens_per_step):
    """The row of a run on one CPU at $0.001/s: `batch` sequences and `tokens_per_step` tokens
    (the flags' numbers, worked by hand) per median step, 1M tokens cost 1000 / tokens_per_s $."""
    assert r['seqs_per_s'] * r['median_s'] == pytest.approx(batch)
    assert r['tokens_per_s'] * r['median_s'] == pytest.approx(tokens_per_step)
    assert (r['device_kind'], r['device_count'], r['usd_per_device_hour']) == ('cpu', 1, 3.6)
    assert r['usd_per_1m_tokens'] == pytest.approx(1000 / r['tokens_per_s'])


def test_train_benchmark_compares_the_hf_precisions_asked_for(tmp_path, prices, capsys):
    """--hf_dtypes picks HF's precisions in its order; each row prices 4 sequences of 16 + 8
    tokens per step; an unknown precision is refused."""
    out = tmp_path / 'train.json'
    args = ['train', '--config=t5_1_1_tiny', '--batch_size=4', '--source_len=16',
            '--target_len=8', '--steps=2', '--warmup=0', '--compare_hf', f'--prices={prices}']
    assert main(args + ['--hf_dtypes=bfloat16,float32', f'--json={out}']) == 0
    results = json.loads(out.read_text())['results']
    assert [r['impl'] for r in results] == ['doa_jax bfloat16', 'HF PyTorch bfloat16',
                                            'HF PyTorch float32']
    for r in results:
        _check_run(r, 4, 4 * (16 + 8))
    text = capsys.readouterr().out
    assert '$/1M tokens' in text and 'seqs/s' in text
    with pytest.raises(SystemExit, match='float16'):
        main(args + ['--steps=1', '--hf_dtypes=float16'])


def test_decode_benchmark_prices_and_records_the_op_backends(tmp_path, prices):
    """Each row prices 2 sequences of 3 new tokens per call, and the JSON names the backends
    that served the run: the ones asked for, and for 'auto' the concrete one it resolved to."""
    from doa_jax import ops

    out = tmp_path / 'decode.json'
    base = ['decode', '--model=t5_1_1_tiny', '--batch=2', '--input_len=8', '--new_tokens=3',
            '--repeats=1', f'--prices={prices}', f'--json={out}']
    for dtype, attention, matmul in (('float32', 'xla', 'xla'),
                                     ('bfloat16', 'dot_product_attention', 'xla'),
                                     ('bfloat16', 'auto', 'auto')):
        assert main(base + [f'--dtype={dtype}', f'--attention_impl={attention}',
                            f'--matmul_impl={matmul}']) == 0
        (r,) = json.loads(out.read_text())['results']
        _check_run(r, 2, 2 * 3)
        if attention == 'auto':
            assert r['attention_impl'] in ops.ATTENTION_IMPLS[1:]
            assert r['matmul_impl'] in ops.MATMUL_IMPLS[1:]
        else:
            assert (r['attention_impl'], r['matmul_impl']) == (attention, matmul)
