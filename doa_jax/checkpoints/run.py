"""A training run's own checkpoints (orbax-checkpoint): the sharded train state plus the data
position.

Each checkpoint `MODEL_DIR/checkpoints/<step>/` holds `state` (the TrainState, restored straight
into its shardings) and `data` (JSON: batches consumed, so the input pipeline resumes where it
stopped).

Saves are asynchronous (as t5x and maxtext save): `save` returns once the arrays are copied off
the devices, so the next train steps may reuse (donate) their buffers, and orbax writes the files
in the background while training goes on. Orbax writes each checkpoint into a temporary directory
and renames it when complete, so a process killed mid-save leaves the previous checkpoint as the
latest (the resumed run saves that step again in its place). `durable` says which saves have completed; a
checkpoint that `latest_step` reports is complete.
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

    def __init__(self, model_dir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(model_dir), 'checkpoints')
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'data'))
        self._pending: list[int] = []

    def latest_step(self) -> int | None:
        """The latest complete checkpoint (waits for a save in flight)."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_position: dict[str, Any]) -> None:
        """Starts saving checkpoint `step` (waiting first for the previous save, as orbax does);
        `durable` reports it once it is complete."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_position)),
                          force=True)
        self._pending.append(step)

    def durable(self, wait: bool = False) -> list[int]:
        """The steps whose saves have completed since the last call; with `wait`, all of them
        (a background save that failed raises here)."""
        if not self._pending:
            return []
        if wait or not self.manager.is_saving_in_progress():
            self.manager.wait_until_finished()
            done, self._pending = self._pending, []
        else:   # a save starts only after the previous one finished: all but the last are done
            done, self._pending = self._pending[:-1], self._pending[-1:]
        return done

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
        """Waits for a save in flight, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
