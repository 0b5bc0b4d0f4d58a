"""Runs one tiny training in its own process, for the SIGKILL and multi-process tests (or, as
`main(spec)`, in the caller's).

    python tests/train_worker.py '<json>'   # keys: model_dir, out, steps, and optional
                                            # coordinator, num_processes, process_id,
                                            # eval_period, eval_steps, kill_after_step,
                                            # kill_in_final_eval, ...
Writes the per-interval loss history, the steps evaluated and the final parameters (process 0) to
`out` as .npz. Every run is metered (CostCallback: MODEL_DIR/cost_ledger.sqlite).

Two test hooks SIGKILL the process at a chosen moment, each once the checkpoint it names is
committed (orbax renames the step directory then), so the state a kill leaves is always the same:
- `kill_after_step: N`: at the end of the logging interval that reaches step N, after the cost
  meter recorded its steps; the latest checkpoint (at a multiple of checkpoint_period) is kept.
- `kill_in_final_eval`: during the final evaluation, after its teacher-forced pass and before it
  decodes, the final checkpoint committed. It first writes `out` (the losses so far, the
  parameters evaluated), as the run would have at its end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kill_once_committed(model_dir: str, step: int) -> None:
    """SIGKILLs this process once checkpoint `step` of `model_dir` is committed."""
    committed = os.path.join(model_dir, 'checkpoints', str(step))
    deadline = time.monotonic() + 120
    while not os.path.isdir(committed):
        if time.monotonic() > deadline:
            raise RuntimeError(f'{committed} was never committed')
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_final_evaluation(spec: dict, trainer, losses: list, save) -> None:
    """Makes the final evaluation SIGKILL this process (see the module docstring)."""
    real_scalars = trainer._interval_scalars

    def interval_scalars(*args, **kwargs):
        row = real_scalars(*args, **kwargs)
        losses.append(row['loss'])
        return row

    def task_metrics(self, params, batches):
        save(params, losses, evals=[])
        _kill_once_committed(spec['model_dir'], spec['steps'])

    trainer._interval_scalars = interval_scalars
    trainer._Evaluator.task_metrics = task_metrics


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
    from doa_jax.cost import CostCallback
    from doa_jax.models.config import get_config

    class KillAfterStep(callbacks.TrainerCallback):
        def on_steps_end(self, *, first_step, last_step, seconds):
            if spec.get('kill_after_step') and last_step >= spec['kill_after_step']:
                period = spec.get('checkpoint_period', 10)
                _kill_once_committed(spec['model_dir'], last_step // period * period)

    def save(params, losses, evals) -> None:
        params = jax.tree.map(np.asarray, jax.device_get(
                multihost_utils.process_allgather(params, tiled=True)))
        if jax.process_index() == 0:
            flat = {'/'.join(str(k.key) for k in path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
            np.savez(spec['out'], losses=np.array(losses), evals=np.array(evals, np.int64),
                     **flat)

    if spec.get('kill_in_final_eval'):
        _kill_in_final_evaluation(spec, trainer, [], save)
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32, dropout_rate=spec.get('dropout', 0.0))
    result = trainer.train(
            model_dir=spec['model_dir'], model_config=cfg, mixture_or_task_name='doa_toy',
            task_feature_lengths={'inputs': 48, 'targets': 8}, train_steps=spec['steps'],
            batch_size=spec.get('batch_size', 8),
            optimizer=optimizers.make_optimizer('adamw', 3e-3),
            shuffle=spec.get('shuffle', True), log_period=spec.get('log_period', 5),
            checkpoint_period=spec.get('checkpoint_period', 10),
            eval_period=spec.get('eval_period', 0), eval_steps=spec.get('eval_steps'),
            show_progress=False, callbacks=[CostCallback(), KillAfterStep()])
    save(result.state.params, [r['loss'] for r in result.history if 'loss' in r],
         [r['step'] for r in result.history if any(k.startswith('eval/') for k in r)])


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
