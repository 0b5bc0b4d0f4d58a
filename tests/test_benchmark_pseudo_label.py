"""`benchmark pseudo_label`: labels/s and $/1K come from a real, fully written pseudo-labeling run."""

import json

import pytest

from doa_jax.benchmark.__main__ import main


def _run(tmp_path, *flags):
    out = tmp_path / 'bench.json'
    assert main(['pseudo_label', '--model=t5_1_1_tiny', '--batch=4', '--input_len=16',
                 '--new_tokens=6', '--num_examples=12', '--chunk_size=8', '--dtype=float32',
                 f'--json={out}', *flags]) == 0
    return json.loads(out.read_text())['result']


def test_reports_rate_and_dollars_consistently(tmp_path, capsys):
    kept = tmp_path / 'chunks'
    r = _run(tmp_path, '--top_k=3', f'--output_dir={kept}')
    assert r['examples'] == 12 and r['random_weights']
    # Random weights with the EOS logit pinned: every row decodes the full 6 tokens.
    assert r['mean_new_tokens'] == 6
    assert r['new_tokens_per_s'] == pytest.approx(6 * r['pseudo_labels_per_s'])
    assert r['pseudo_labels_per_s'] == pytest.approx(12 / r['seconds'])
    # $ per 1K labels = devices x $/device-hour x hours for 1K labels (CPU's table entry).
    hours = 1000 / r['pseudo_labels_per_s'] / 3600
    assert r['usd_per_1k_pseudo_labels'] == pytest.approx(hours * r['usd_per_device_hour'])
    assert r['usd_per_device_hour'] > 0
    lines = [json.loads(l) for p in sorted(kept.glob('chunk-*.jsonl')) for l in p.open()]
    assert len(lines) == 12 and all(len(l['topk_ids']) == 6 and len(l['topk_ids'][0]) == 3
                                    for l in lines)
    assert '$/1K labels' in capsys.readouterr().out


def test_refuses_a_used_output_dir_and_a_bad_mesh(tmp_path):
    kept = tmp_path / 'chunks'
    _run(tmp_path, f'--output_dir={kept}')
    with pytest.raises(SystemExit, match='already holds completed chunks'):
        _run(tmp_path, f'--output_dir={kept}')
    with pytest.raises(SystemExit, match='malformed'):
        _run(tmp_path, '--mesh=data=2')
    with pytest.raises(ValueError, match='does not divide'):
        _run(tmp_path, '--mesh=data:-1,model:3')
