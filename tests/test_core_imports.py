"""The core (model, ops, decoding, train step, train/decode benchmarks, the GPU check and its test
tier) runs where TensorFlow, seqio and gin are absent, as on the lent GPU machines."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    BLOCKED = ('tensorflow', 'tensorflow_datasets', 'seqio', 'gin', 'clu')

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ImportError(f'{name} is blocked in this test')
            return None

    sys.meta_path.insert(0, Block())
    import doa_jax.models, doa_jax.ops, doa_jax.decoding, doa_jax.train_step
    import doa_jax.benchmark.gpu_check, tests.test_accelerator   # the GPU check and its test tier
    from doa_jax.benchmark.__main__ import main
    assert main(['train', '--config=t5_1_1_tiny', '--batch_size=2', '--source_len=8',
                 '--target_len=4', '--steps=1', '--warmup=0']) == 0
    assert main(['decode', '--model=t5_1_1_tiny', '--batch=2', '--input_len=8',
                 '--new_tokens=2', '--repeats=1']) == 0
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
    assert not loaded, loaded
    print('CORE_OK')
''')


def test_core_imports_and_benchmarks_run_without_tensorflow_seqio_or_gin():
    proc = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and 'CORE_OK' in proc.stdout, proc.stdout + proc.stderr[-3000:]
