"""`benchmark train` / `benchmark decode`: seqs/s and $ per 1M tokens follow from the timings."""

import json

import jax
import pytest

from doa_jax.benchmark.__main__ import main


def _check_money(r, batch):
    assert r['seqs_per_s'] == pytest.approx(batch / r['median_s'])
    hours_per_1m = 1e6 / r['tokens_per_s'] / 3600
    assert r['usd_per_1m_tokens'] == pytest.approx(
            hours_per_1m * r['device_count'] * r['usd_per_device_hour'])
    assert r['device_kind'] == 'cpu' and r['usd_per_device_hour'] > 0


def test_train_benchmark_compare_hf_reports_seqs_and_dollars(tmp_path, capsys):
    out = tmp_path / 'train.json'
    assert main(['train', '--config=t5_1_1_tiny', '--batch_size=4', '--source_len=16',
                 '--target_len=8', '--steps=2', '--warmup=0', '--compare_hf',
                 f'--json={out}']) == 0
    results = json.loads(out.read_text())['results']
    assert [r['impl'] for r in results] == ['doa_jax bfloat16', 'HF PyTorch float32',
                                            'HF PyTorch bfloat16']
    for r in results:
        _check_money(r, 4)
        assert r['tokens_per_s'] == pytest.approx(4 * 24 / r['median_s'])
    text = capsys.readouterr().out
    assert '$/1M tokens' in text and 'seqs/s' in text


def test_decode_benchmark_prices_with_a_custom_table(tmp_path):
    prices = tmp_path / 'prices.yaml'
    prices.write_text('devices:\n  CPU:\n    usd_per_hour: 3.6\n    aliases: ["^cpu$"]\n')
    out = tmp_path / 'decode.json'
    assert main(['decode', '--model=t5_1_1_tiny', '--batch=2', '--input_len=8', '--new_tokens=4',
                 '--repeats=1', f'--prices={prices}', f'--json={out}']) == 0
    (r,) = json.loads(out.read_text())['results']
    _check_money(r, 2)
    assert r['usd_per_device_hour'] == 3.6
    # $3.60/hour = $0.001/s: 1M tokens at tokens_per_s cost 1000 / tokens_per_s dollars.
    assert r['usd_per_1m_tokens'] == pytest.approx(1000 / r['tokens_per_s'])


def test_train_benchmark_hf_dtypes_picks_hf_precisions_and_rejects_unknown(tmp_path):
    out = tmp_path / 'train.json'
    args = ['train', '--config=t5_1_1_tiny', '--batch_size=2', '--source_len=8', '--target_len=4',
            '--steps=1', '--warmup=0', '--hf']
    assert main(args + ['--hf_dtypes=bfloat16', f'--json={out}']) == 0
    results = json.loads(out.read_text())['results']
    assert [r['impl'] for r in results] == ['doa_jax bfloat16', 'HF PyTorch bfloat16']
    with pytest.raises(SystemExit, match='float16'):
        main(args + ['--hf_dtypes=float16'])


def test_decode_benchmark_records_the_op_backends(tmp_path):
    """The JSON names the backends that served the run: the ones asked for, and for 'auto' the
    concrete one it resolved to here."""
    from doa_jax import ops

    out = tmp_path / 'decode.json'
    base = ['decode', '--model=t5_1_1_tiny', '--batch=2', '--input_len=8', '--new_tokens=3',
            '--repeats=1', f'--json={out}']
    for dtype, attention, matmul in (('float32', 'xla', 'xla'),
                                     ('bfloat16', 'dot_product_attention', 'xla'),
                                     ('bfloat16', 'auto', 'auto')):
        assert main(base + [f'--dtype={dtype}', f'--attention_impl={attention}',
                            f'--matmul_impl={matmul}']) == 0
        (r,) = json.loads(out.read_text())['results']
        if attention == 'auto':
            assert r['attention_impl'] in ops.ATTENTION_IMPLS[1:]
            assert r['matmul_impl'] in ops.MATMUL_IMPLS[1:]
        else:
            assert (r['attention_impl'], r['matmul_impl']) == (attention, matmul)
        assert r['tokens_per_s'] > 0
