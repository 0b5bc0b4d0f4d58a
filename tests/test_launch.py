"""Launchers: env detection (fake environments), static checks of cluster scripts, local 2-process run."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

from doa_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_detect_single_process_by_default():
    assert distributed.detect({}) is None


def test_detect_explicit_flags_win_and_add_default_port():
    spec = distributed.detect({'JOB_COMPLETION_INDEX': '3'}, coordinator_address='10.0.0.1',
                              num_processes=4, process_id=1)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == (
            f'10.0.0.1:{distributed.DEFAULT_PORT}', 4, 1, 'flags')


def test_detect_flags_without_counts_says_how_to_fix():
    with pytest.raises(ValueError, match='--num_processes'):
        distributed.detect({}, coordinator_address='h:1')


def test_detect_gke_indexed_job():
    env = {'JOB_COMPLETION_INDEX': '1', 'DOA_COORDINATOR_ADDRESS': 'doa-jax-train-0.svc:8476',
           'DOA_NUM_PROCESSES': '2'}
    spec = distributed.detect(env)
    assert (spec.source, spec.process_id, spec.num_processes) == ('gke', 1, 2)
    with pytest.raises(ValueError, match='DOA_COORDINATOR_ADDRESS'):
        distributed.detect({'JOB_COMPLETION_INDEX': '0'})
    with pytest.raises(ValueError, match='not an integer'):
        distributed.detect({**env, 'DOA_NUM_PROCESSES': 'two'})


def test_detect_local_launcher_env_slurm_and_tpu():
    spec = distributed.detect({'DOA_COORDINATOR_ADDRESS': '127.0.0.1:5', 'DOA_NUM_PROCESSES': '2',
                               'DOA_PROCESS_ID': '0'})
    assert (spec.source, spec.coordinator_address) == ('doa-env', '127.0.0.1:5')
    assert distributed.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}).auto
    assert distributed.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
    assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'a,b'}).source == 'tpu'


@pytest.mark.parametrize('script', ['slurm.sbatch', 'tpu_pod.sh'])
def test_shell_scripts_parse(script):
    subprocess.run(['bash', '-n', str(ROOT / 'launch' / script)], check=True)


def test_gke_manifest_kinds_and_coordinator_wiring():
    docs = list(yaml.safe_load_all((ROOT / 'launch' / 'gke_jobset.yaml').read_text()))
    kinds = {d['kind']: d for d in docs}
    assert set(kinds) == {'Service', 'Job'}
    svc, job = kinds['Service'], kinds['Job']
    assert svc['spec']['clusterIP'] == 'None'
    assert job['spec']['completionMode'] == 'Indexed'
    pod = job['spec']['template']['spec']
    assert pod['subdomain'] == svc['metadata']['name']
    env = {e['name']: e['value'] for e in pod['containers'][0]['env']}
    assert env['DOA_NUM_PROCESSES'] == str(job['spec']['completions'])
    assert env['DOA_COORDINATOR_ADDRESS'].startswith(f"{job['metadata']['name']}-0.{svc['metadata']['name']}")


_PSUM = ('from doa_jax import distributed; distributed.initialize(); import jax, numpy as np; '
         'from jax.experimental import multihost_utils as m; '
         'x = m.process_allgather(np.array([jax.process_index() + 1.0])); '
         'print("SUM", float(x.sum()), jax.process_count())')


def _local(args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / 'launch' / 'local.py'), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_local_launcher_forms_a_two_process_cluster():
    r = _local(['-n', '2', '--', sys.executable, '-c', _PSUM])
    assert r.returncode == 0, r.stdout + r.stderr
    assert '[0] SUM 3.0 2' in r.stdout and '[1] SUM 3.0 2' in r.stdout


def test_local_launcher_kills_the_rest_when_one_fails():
    code = ('import os, sys, time; i = int(os.environ["DOA_PROCESS_ID"]); '
            'sys.exit(3) if i == 1 else time.sleep(60)')
    r = _local(['-n', '2', '--', sys.executable, '-c', code], timeout=30)
    assert r.returncode == 3, r.stdout + r.stderr
    assert 'stopping the others' in r.stderr


_TF_CALLS = '''
import importlib, sys
import tensorflow as tf
calls = []
tf.config.set_visible_devices = lambda devices, kind=None: calls.append((list(devices), kind))
from doa_jax import distributed
for name in sys.argv[1:]:
    distributed._TF_GPUS_HIDDEN = False
    calls.clear()
    module = sys.modules.get(name)
    importlib.reload(module) if module else importlib.import_module(name)
    assert calls == [([], 'GPU')], (name, calls)
print('OK')
'''


def test_every_module_that_touches_tensorflow_hides_the_gpus_from_it():
    """Not only the entry points: a library user's trainer.train, task or vocabulary import on a
    GPU host leaves the accelerators to JAX."""
    import subprocess
    import sys
    modules = ['doa_jax.data.vocabulary', 'doa_jax.data.jsonl', 'doa_jax.train_data',
               'tasks.toy', 'tasks.jsonl_task', 'tasks.paper_tasks', 'doa_jax.study.data',
               'doa_jax.serving.model', 'doa_jax.data.tfds_builder']
    r = subprocess.run([sys.executable, '-c', _TF_CALLS, *modules], capture_output=True,
                       text=True, timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and 'OK' in r.stdout, r.stderr[-3000:]
