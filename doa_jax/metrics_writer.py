"""TensorBoard scalars (clu metric writers, t5x metric names) and a tqdm progress bar."""

from __future__ import annotations

from typing import Mapping

import jax
import tqdm
from clu import metric_writers


class TrainMetricsWriter:
    """Writes `train/` and `eval/` scalars on process 0 only; other processes write nothing."""

    def __init__(self, model_dir: str, total_steps: int, start_step: int, show_progress: bool = True):
        self.is_main = jax.process_index() == 0
        if self.is_main:
            self.train = metric_writers.create_default_writer(model_dir + '/train', asynchronous=False)
            self.eval = metric_writers.create_default_writer(model_dir + '/eval', asynchronous=False)
        self.bar = (tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
                    if self.is_main and show_progress else None)

    def write_train(self, step: int, scalars: Mapping[str, float], steps_done: int) -> None:
        if not self.is_main:
            return
        self.train.write_scalars(step, dict(scalars))
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                                 steps_per_s=f"{scalars.get('timing/steps_per_second', 0):.2f}")

    def write_compile(self, step: int, seconds: float) -> None:
        if self.is_main:
            self.train.write_scalars(step, {'timing/compilation_seconds': seconds})

    def write_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.is_main:
            self.eval.write_scalars(step, dict(scalars))

    def close(self) -> None:
        if self.is_main:
            self.train.flush()
            self.eval.flush()
            self.train.close()
            self.eval.close()
        if self.bar is not None:
            self.bar.close()
