"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) match one process."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name('train_worker.py')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_loss_trajectory(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'JAX_PLATFORMS': 'cpu'}
    # Unshuffled streams: each host reads the even or odd examples of the same global batch.
    common = {'steps': 6, 'log_period': 1, 'checkpoint_period': 6, 'shuffle': False}
    port = _free_port()
    procs = [subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps({
                    **common, 'model_dir': str(tmp_path / 'two'), 'out': str(tmp_path / 'two.npz'),
                    'coordinator': f'127.0.0.1:{port}', 'num_processes': 2, 'process_id': i})],
            env=env) for i in range(2)]
    single = subprocess.Popen([sys.executable, str(WORKER), json.dumps({
            **common, 'model_dir': str(tmp_path / 'one'), 'out': str(tmp_path / 'one.npz')})],
            env=env)
    for p in procs + [single]:
        assert p.wait(timeout=240) == 0
    two, one = np.load(tmp_path / 'two.npz'), np.load(tmp_path / 'one.npz')
    assert len(one['losses']) == 6 and one['losses'][-1] < one['losses'][0]
    np.testing.assert_allclose(two['losses'], one['losses'], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two['decoder/logits_dense/kernel'], one['decoder/logits_dense/kernel'],
                               atol=1e-5)
