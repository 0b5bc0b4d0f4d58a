"""Runs one tiny training in its own process, for the SIGKILL and multi-process tests.

    python tests/train_worker.py '<json>'   # keys: model_dir, out, steps, and optional
                                            # coordinator, num_processes, process_id, sleep, ...
Writes the per-step loss history and the final parameters (process 0) to `out` as .npz.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _SlowDown:
    """Sleeps after each logging interval so a test can kill the run mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_steps_end(self, **_):
        time.sleep(self.seconds)


def main(spec: dict) -> None:
    import jax
    if spec.get('coordinator'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address=spec['coordinator'],
                                   num_processes=spec['num_processes'],
                                   process_id=spec['process_id'])
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    import tasks.toy  # noqa: F401  registers doa_toy
    from doa_jax import callbacks, optimizers, trainer
    from doa_jax.models.config import get_config

    class Slow(callbacks.TrainerCallback, _SlowDown):
        pass

    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32, dropout_rate=spec.get('dropout', 0.0))
    result = trainer.train(
            model_dir=spec['model_dir'], model_config=cfg, mixture_or_task_name='doa_toy',
            task_feature_lengths={'inputs': 48, 'targets': 8}, train_steps=spec['steps'],
            batch_size=spec.get('batch_size', 8),
            optimizer=optimizers.make_optimizer('adamw', 3e-3),
            shuffle=spec.get('shuffle', True), log_period=spec.get('log_period', 5),
            checkpoint_period=spec.get('checkpoint_period', 10), show_progress=False,
            callbacks=[Slow(spec.get('sleep', 0.0))])
    params = jax.tree.map(np.asarray, jax.device_get(
            multihost_utils.process_allgather(result.state.params, tiled=True)))
    if jax.process_index() == 0:
        flat = {'/'.join(str(k.key) for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(spec['out'], losses=np.array([r['loss'] for r in result.history]), **flat)


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
