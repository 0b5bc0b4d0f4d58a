"""Runs in a subprocess with 8 fake CPU devices; prints shardings and losses as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tasks.toy  # noqa: E402,F401
from doa_jax import losses, optimizers, partitioning, train_data  # noqa: E402
from doa_jax.models.config import get_config  # noqa: E402
from doa_jax.models.t5 import T5  # noqa: E402
from doa_jax.train_state import abstract_train_state, init_train_state  # noqa: E402
from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics  # noqa: E402

LENGTHS = {'inputs': 48, 'targets': 8}
WATCH = ('token_embedder/embedding', 'encoder/layers_0/attention/query/kernel',
         'encoder/layers_0/attention/out/kernel', 'decoder/layers_1/mlp/wi_0/kernel',
         'decoder/layers_1/mlp/wo/kernel', 'encoder/relpos_bias/rel_embedding',
         'decoder/decoder_norm/scale', 'decoder/logits_dense/kernel')


def _get(tree, path):
    for key in path.split('/'):
        tree = tree[key]
    return tree


def run(mesh, rules, optimizer_name, batches) -> dict:
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32)
    model = T5(cfg)
    opt = optimizers.make_optimizer(optimizer_name, 3e-3)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, 48), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']

    abstract, shardings = abstract_train_state(init_params, opt, mesh, rules, jax.random.PRNGKey(0))
    state = init_train_state(init_params, opt, shardings, jax.random.PRNGKey(0))
    step = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, mesh,
                           partitioning.STANDARD_RULES, shardings, use_dropout=False)
    report = {'params': {}, 'opt': {}}
    for name in WATCH:
        arr = _get(state.params, name)
        report['params'][name] = {'spec': [a for a in arr.sharding.spec],
                                  'shard_shape': list(arr.addressable_shards[0].data.shape),
                                  'shape': list(arr.shape)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        keys = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
        if keys.endswith(('encoder/layers_0/attention/query/kernel',
                          'decoder/layers_1/mlp/wo/kernel')):
            report['opt'][keys] = {'spec': [a for a in leaf.sharding.spec],
                                   'shape': list(leaf.shape)}
    losses_out = []
    with jax.set_mesh(mesh):
        for local in batches:
            batch = train_data.to_global(local, mesh, 8)
            state, metrics = step(state, batch, zero_metrics())
            losses_out.append(float(metrics['loss']))
    report['losses'] = losses_out
    return report


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    ds = train_data.host_dataset('doa_toy', LENGTHS, 'train', 8, seed=0)
    it = train_data.numpy_batches(ds)
    batches = [next(it) for _ in range(3)]
    mesh8 = partitioning.make_mesh(partitioning.MeshConfig(data=4, model=2))
    mesh1 = partitioning.make_mesh(partitioning.MeshConfig(data=1, model=1), jax.devices()[:1])
    out = {'mesh_shape': dict(mesh8.shape),
           'tp': run(mesh8, partitioning.param_rules(False), 'adamw', batches),
           'fsdp': run(mesh8, partitioning.param_rules(True), 'adamw', batches),
           'one': run(mesh1, partitioning.param_rules(False), 'adamw', batches)}
    try:
        partitioning.check_batch_size(6, mesh8)
    except ValueError as e:
        out['batch_error'] = str(e)
    print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
    main()
