"""A training run's own checkpoints (orbax-checkpoint): the sharded train state plus the data
position.

Each checkpoint `MODEL_DIR/checkpoints/<step>/` holds `state` (the TrainState, restored straight
into its shardings) and `data` (JSON: batches consumed, so the input pipeline resumes where it
stopped). Saves are synchronous, so a checkpoint that `latest_step` reports is complete.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

if TYPE_CHECKING:
    from doa_jax.train_state import TrainState


class RunCheckpointer:
    """Periodic/final saves keeping the last `keep` checkpoints, and resume from the latest."""

    def __init__(self, model_dir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(model_dir), 'checkpoints')
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'data'))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_position: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_position)),
                          force=True)
        self.manager.wait_until_finished()

    def mismatch(self, step: int, abstract_state: TrainState) -> list[str]:
        """How checkpoint `step`'s train state differs in structure from `abstract_state`: the
        parameters that are missing, extra or of another shape, and the optimizer state's array
        count (another optimizer). Empty when they fit, or when the metadata cannot be read (the
        restore then reports its own error)."""
        try:
            meta = ocp.PyTreeCheckpointer().metadata(
                    os.path.join(self.directory, str(step), 'state'))
            saved = getattr(meta, 'item_metadata', meta)
            saved_leaves = jax.tree_util.tree_flatten_with_path(getattr(saved, 'tree', saved))[0]
        except Exception:   # pylint: disable=broad-except
            return []
        if not saved_leaves:
            return []

        def split(leaves):
            params, opt = {}, []
            for path, leaf in leaves:
                keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                        for k in path]
                shape = tuple(getattr(leaf, 'shape', ()) or ())
                if keys[:1] == ['params']:
                    params['/'.join(keys[1:])] = shape
                elif keys[:1] == ['opt_state']:
                    opt.append(shape)
            return params, sorted(opt)

        old_params, old_opt = split(saved_leaves)
        new_params, new_opt = split(jax.tree_util.tree_flatten_with_path(abstract_state)[0])
        out = []
        for name in sorted(set(old_params) | set(new_params)):
            a, b = old_params.get(name), new_params.get(name)
            if a != b:
                out.append(f'params/{name}: ' + ('missing in the checkpoint' if a is None else
                                                 'not in this model' if b is None else
                                                 f'shape {a} in the checkpoint, {b} now'))
        if not out and old_opt != new_opt:
            out.append(f'optimizer state: {len(old_opt)} arrays in the checkpoint, {len(new_opt)} '
                       f'for this optimizer (another optimizer or its settings)')
        return out

    def restore(self, step: int, state_shardings: TrainState,
                abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              abstract_state, state_shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out['state'], dict(out['data'])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
