"""Sharding on 8 fake CPU devices (in a subprocess) and the optimizer-state sharding rules."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from jax.sharding import PartitionSpec as P

from doa_jax import optimizers, partitioning
from doa_jax.train_state import abstract_train_state
from tests.conftest import with_xla_flags

WORKER = pathlib.Path(__file__).with_name('sharded_worker.py')


@pytest.mark.slow
def test_eight_devices_data4_model2_shards_params_and_matches_one_device():
    env = {**with_xla_flags('--xla_force_host_platform_device_count=8'),
           'CUDA_VISIBLE_DEVICES': ''}
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
    out = json.loads(line[len('RESULT '):])
    assert out['mesh_shape'] == {'data': 4, 'model': 2}

    tp = out['tp']['params']
    expect = {'token_embedder/embedding': (['model', None], [256, 32]),
              'encoder/layers_0/attention/query/kernel': ([None, 'model'], [32, 24]),
              'encoder/layers_0/attention/out/kernel': (['model', None], [24, 32]),
              'decoder/layers_1/mlp/wi_0/kernel': ([None, 'model'], [32, 24]),
              'decoder/layers_1/mlp/wo/kernel': (['model', None], [24, 32]),
              'encoder/relpos_bias/rel_embedding': (['model', None], [2, 32]),
              'decoder/decoder_norm/scale': ([None], [32]),
              'decoder/logits_dense/kernel': ([None, 'model'], [32, 256])}
    for name, (spec, shard_shape) in expect.items():
        assert (tp[name]['spec'], tp[name]['shard_shape']) == (spec, shard_shape), name
    # AdamW moments follow their parameters.
    for path, leaf in out['tp']['opt'].items():
        want = [None, 'model'] if path.endswith('query/kernel') else ['model', None]
        assert leaf['spec'] == want, path
    # FSDP: `embed` dims are also split over the data axis (a quarter of a model shard each).
    fsdp = out['fsdp']['params']
    assert fsdp['encoder/layers_0/attention/query/kernel']['spec'] == ['data', 'model']
    assert fsdp['encoder/layers_0/attention/query/kernel']['shard_shape'] == [8, 24]
    assert fsdp['decoder/layers_1/mlp/wo/kernel']['spec'] == ['model', 'data']
    assert all(leaf['spec'][:2] in (['data', 'model'], ['model', 'data'])
               for leaf in out['fsdp']['opt'].values())

    one = np.array(out['one']['losses'])
    assert len(one) == 3 and one[-1] < one[0]
    np.testing.assert_allclose(out['tp']['losses'], one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out['fsdp']['losses'], one, rtol=0, atol=1e-5)
    assert 'BATCH_SIZE=6' in out['batch_error'] and 'data axis size 4' in out['batch_error']


class _TwoKernels(nn.Module):
    @nn.compact
    def __call__(self):
        init = nn.initializers.ones
        a = self.param('wi', nn.with_logical_partitioning(init, ('embed', 'mlp')), (256, 384))
        b = self.param('wo', nn.with_logical_partitioning(init, ('mlp', 'embed')), (384, 256))
        return a, b


def test_adafactor_factored_statistics_drop_the_reduced_axis():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, model=1), jax.devices()[:1])
    opt = optimizers.make_optimizer('adafactor')
    abstract, shardings = abstract_train_state(lambda rng: _TwoKernels().init(rng)['params'], opt,
                                               mesh, partitioning.param_rules(fsdp=True),
                                               jax.random.PRNGKey(0))
    assert shardings.params['wi'].spec == P('data', 'model')
    # Each factored statistic keeps the mesh axis of the dimension it did not reduce:
    # a 256-vector is an `embed` statistic (data), a 384-vector an `mlp` one (model).
    vectors = {}
    for shape, sh in zip(jax.tree.leaves(abstract.opt_state), jax.tree.leaves(shardings.opt_state)):
        if shape.ndim == 1 and shape.shape[0] > 1:
            vectors.setdefault(shape.shape[0], set()).add(sh.spec)
    assert vectors == {256: {P('data')}, 384: {P('model')}}


def test_make_mesh_shapes():
    mesh = partitioning.make_mesh()
    assert mesh.axis_names == ('data', 'model') and mesh.size == jax.device_count()
    assert partitioning.batch_sharding(mesh).spec == P('data', None)
    rules = dict(partitioning.param_rules(True))
    assert rules['embed'] == 'data' and rules['mlp'] == 'model' and rules['batch'] == 'data'
    assert dict(partitioning.STANDARD_RULES)['embed'] is None
