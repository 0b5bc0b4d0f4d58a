"""Shared pytest fixtures: the real data directory and HF reference models."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

# Tests never touch a GPU and must not let TensorFlow grab one.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One persistent compilation cache for the whole run, its xdist workers and every subprocess they
# start: tests that build the same tiny programs compile them once. A fresh directory per run, so
# a run never reads programs an earlier build of the code wrote.
_OWN_XLA_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'doa_jax_tests_xla_cache_{_RUN}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The tests' programs are tiny, so compiling them costs far more than running them (about 3/4 of
# test_train.py's time is tracing, lowering and compiling). Two XLA CPU settings cut compile
# time: no LLVM optimisation passes (test_train.py: 76 s CPU against 102 s) and the elemental IR
# emitters in place of the MLIR fusion emitters (a further ~16% on train/decode/packing tests).
# Set once here and inherited by every xdist worker and subprocess; tests that add flags of their
# own append to them (`with_xla_flags`). XLA aborts on a flag it does not know, so a flag a newer
# jaxlib dropped is probed first and left out.
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')


def _xla_accepts(flag: str) -> bool:
    probe = 'import jax; jax.numpy.zeros(2).block_until_ready()'
    return subprocess.run([sys.executable, '-c', probe], capture_output=True, timeout=300,
                          env={**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'}
                          ).returncode == 0


for _flag in _FAST_COMPILE:
    if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', '') and (
            _flag == _FAST_COMPILE[0] or _xla_accepts(_flag)):
        os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()


def with_xla_flags(*flags: str) -> dict[str, str]:
    """os.environ with `flags` added to XLA_FLAGS, for a subprocess."""
    return {**os.environ, 'XLA_FLAGS': ' '.join((os.environ.get('XLA_FLAGS', ''),) + flags).strip()}



def pytest_sessionfinish(session):
    """The run's own cache goes when the run ends (the xdist controller, or a plain run)."""
    if _OWN_XLA_CACHE and not hasattr(session.config, 'workerinput'):
        shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


# Test tiers (docs/testing.md). A file's tests are `integration` when they run entry points, whole
# pipelines or subprocesses, `multiprocess` when they start several jax processes; every test
# without a tier mark is `unit`. `slow` marks the minute-long end-to-end tests within them.
MULTIPROCESS_FILES = {'test_cost_resume.py', 'test_launch.py', 'test_launch_pseudo_label.py',
                      'test_launch_train.py'}
INTEGRATION_FILES = {
        'test_annotate_llm.py', 'test_benchmark_cli.py', 'test_benchmark_pseudo_label.py',
        'test_compilation_cache.py', 'test_core_imports.py', 'test_cost_trainer.py',
        'test_distill_e2e.py', 'test_distill_offline.py', 'test_gin_configs.py', 'test_infer.py',
        'test_partitioning.py', 'test_plan.py', 'test_pseudo_label.py', 'test_pseudo_label_mesh.py',
        'test_run_identity.py', 'test_serve.py', 'test_study_runner.py', 'test_train_resume.py'}
TIERS = ('unit', 'integration', 'multiprocess', 'accelerator', 'fault_injection')


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in MULTIPROCESS_FILES:
            item.add_marker(pytest.mark.multiprocess)
        elif name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
    # Longest files first. With `--dist loadfile` and `--no-loadscope-reorder` (pytest.ini) xdist
    # hands the files to its workers in this order, so the long ones start early and the short
    # ones fill in at the end instead of one worker finishing a long file alone. The order only
    # moves the run's wall time, never a result; the tests within a file keep theirs.
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


# The files that take longest, longest first: each file's wall time in a CI run (`.ci/run`) on
# 2 cores, 30-78 s each; every other file takes under 30 s.
LONGEST_FILES = (
        'test_plan.py', 'test_study_runner.py', 'test_launch_train.py', 'test_train.py',
        'test_decoding.py', 'test_packing.py', 'test_pseudo_label.py', 'test_model.py',
        'test_gin_configs.py', 'test_train_resume.py', 'test_distill_e2e.py',
        'test_annotate_llm.py', 'test_partitioning.py', 'test_distill_offline.py', 'test_amx.py',
        'test_serve.py', 'test_pseudo_label_mesh.py', 'test_launch_pseudo_label.py')


REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get('DOA_DATA_DIR',
                                       REPO.parent / 'shared' / 'data' / 'distill_or_annotate'))


@pytest.fixture(scope='session')
def data_dir() -> pathlib.Path:
    """The paper's released JSONL files; absent data skips locally and fails under CI=true."""
    if not DATA_DIR.is_dir():
        msg = (f'Real data not found at {DATA_DIR}; put the shared data beside the repo '
               'or set DOA_DATA_DIR.')
        if os.environ.get('CI') == 'true':
            pytest.fail(msg)
        pytest.skip(msg)
    return DATA_DIR


@pytest.fixture
def gin_at_repo_root(monkeypatch):
    """A clean gin config before and after the test, run from the repository root (gin files are
    given relative to it, as in the docs)."""
    import gin
    monkeypatch.chdir(REPO)
    gin.clear_config()
    yield
    gin.clear_config()
