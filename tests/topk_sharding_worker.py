"""Runs in a subprocess with 4 fake CPU devices: stored teacher top-k through the input pipeline
onto a data=4 mesh and through a token-KD train step, with and without microbatches.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/topk_sharding_worker.py PL_DIR
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
import seqio  # noqa: E402

import tasks.toy  # noqa: E402,F401
from doa_jax import distill_losses, optimizers, partitioning, train_data  # noqa: E402
from doa_jax.models.config import get_config  # noqa: E402
from doa_jax.models.t5 import T5  # noqa: E402
from doa_jax.train_state import abstract_train_state, init_train_state  # noqa: E402
from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics  # noqa: E402
from tasks.jsonl_task import register_pseudo_labeled_task  # noqa: E402

LENGTHS = {'inputs': 48, 'targets': 8}


def main(pl_dir: str) -> None:
    assert jax.device_count() == 4, jax.devices()
    register_pseudo_labeled_task('topk_sharding', pl_dir, eval_task='doa_toy', with_topk=True,
                                 vocabulary=seqio.ByteVocabulary(), overwrite=True)
    ds = train_data.host_dataset('topk_sharding', LENGTHS, 'train', 8, seed=0)
    local = next(train_data.numpy_batches(ds, vocab_size=512))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, model=1))
    batch = train_data.to_global(local, mesh, 8)
    ids = batch['teacher_topk_ids']
    out = {'spec': [a for a in ids.sharding.spec], 'shape': list(ids.shape),
           'shard_shape': list(ids.addressable_shards[0].data.shape),
           'target_spec': [a for a in batch['decoder_target_tokens'].sharding.spec]}

    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32)
    model = T5(cfg)
    opt = optimizers.make_optimizer('adamw', 1e-3)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, 48), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']

    losses = {}
    for micro in (1, 2):
        with jax.set_mesh(mesh):
            _, shardings = abstract_train_state(init_params, opt, mesh,
                                                partitioning.param_rules(False),
                                                jax.random.PRNGKey(0))
            state = init_train_state(init_params, opt, shardings, jax.random.PRNGKey(0))
            step = make_train_step(model_apply_fn(model), distill_losses.token_kd_loss(), opt, mesh,
                                   partitioning.STANDARD_RULES, shardings, num_microbatches=micro,
                                   use_dropout=False)
            _, metrics = step(state, batch, zero_metrics())
        losses[micro] = float(metrics['loss'])
    out['losses'] = losses
    print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
    main(sys.argv[1])
