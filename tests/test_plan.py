"""`benchmark plan`: per-device bytes on a fake 2x2 CPU mesh are consistent with the sharding."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plan_small_model_parallel_bytes_and_does_not_fit_tiny_memory(tmp_path):
    out = tmp_path / 'plan.json'
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    r = subprocess.run([sys.executable, '-m', 'doa_jax.benchmark', 'plan', '--model=t5_1_1_small',
                        '--mesh=data:2,model:2', '--batch=4', '--input_len=16', '--target_len=8',
                        '--device_memory_gb=0.1', f'--json={out}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'approximates GPU/TPU' in r.stdout
    plan = json.loads(out.read_text())
    per_model_shard = plan['param_bytes_total'] / 2
    # Model-parallel weights are split over model:2; only small norms/biases are replicated.
    assert per_model_shard <= plan['param_bytes_per_device'] <= 1.01 * per_model_shard
    assert plan['temp_bytes_per_device'] > 0
    assert plan['total_bytes_per_device'] == (plan['param_bytes_per_device'] +
                                              plan['optimizer_bytes_per_device'] +
                                              plan['temp_bytes_per_device'])
    assert plan['total_bytes_per_device'] > 0.1e9 and plan['fits'] is False
