"""Run checkpoints with orbax-checkpoint: the sharded train state plus the data position.

Each checkpoint `MODEL_DIR/checkpoints/<step>/` holds `state` (the TrainState, restored straight
into its shardings) and `data` (JSON: batches consumed, so the input pipeline resumes where it
stopped). Saves are synchronous, so a checkpoint that `latest_step` reports is complete.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
