"""The teacher decodes on a (data, model) mesh: weights really sharded, labels unchanged."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import with_xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs on 8 fake CPU devices: label the same pool on a 1x1 mesh and on data=2 x model=4.
_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp
from doa_jax import partitioning
from doa_jax import pseudo_label as pl
from doa_jax.models.config import get_config
from doa_jax.models.t5 import T5

config = get_config('t5_1_1_tiny', dtype=jnp.float32)
x = jnp.ones((1, 8), jnp.int32)
params = T5(config).init(jax.random.PRNGKey(3), x, x)['params']
encode = lambda s: [2 + (ord(c) % 500) for c in s]
decode = lambda ids: ' '.join(map(str, ids))
pool = [f'ex {i}' for i in range(4)] + [f'example number {i} ' * 3 for i in range(6)]
out = {}
for name, (data, model) in {'single': (1, 1), 'mesh': (2, 4)}.items():
    devices = jax.local_devices()[:data * model]
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=data, model=model), devices)
    label = pl.model_label_batch(params, config, encode, decode, max_input_length=64,
                                 max_decode_length=6, top_k=5, batch_size=4, mesh=mesh)
    recs = [r for b in range(0, len(pool), 4) for r in label(pool[b:b + 4])]
    mlp = label.params['decoder']['layers_0']['mlp']['wi_0']['kernel']
    out[name] = {'records': recs, 'mlp_spec': [str(a) for a in mlp.sharding.spec],
                 'mlp_shard': list(mlp.addressable_shards[0].data.shape),
                 'mlp_shape': list(mlp.shape), 'compiles': label.decoder.compile_count}
json.dump(out, sys.stdout)
'''


@pytest.fixture(scope='module')
def labeled():
    env = dict(with_xla_flags('--xla_force_host_platform_device_count=8'), JAX_PLATFORMS='cpu')
    r = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_teacher_weights_are_sharded_over_the_model_axis(labeled):
    single, mesh = labeled['single'], labeled['mesh']
    assert mesh['mlp_spec'][-1] == 'model'                 # (embed, mlp): mlp split 4 ways
    assert mesh['mlp_shard'][-1] * 4 == mesh['mlp_shape'][-1]
    assert single['mlp_shard'] == single['mlp_shape']
    assert mesh['compiles'] == single['compiles'] == 2     # two length buckets in the pool


def test_mesh_labels_equal_single_device_labels(labeled):
    single, mesh = labeled['single']['records'], labeled['mesh']['records']
    assert len(single) == len(mesh) == 10
    for a, b in zip(single, mesh):
        assert a['prediction'] == b['prediction']
        assert a['topk_ids'] == b['topk_ids']
        assert a['score'] == pytest.approx(b['score'], abs=1e-4)
        assert sum(map(len, a['topk_logprobs'])) == sum(map(len, b['topk_logprobs']))
