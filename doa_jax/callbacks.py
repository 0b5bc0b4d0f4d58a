"""The trainer's callback protocol (shared with the cost meter and other observers).

Hooks are keyword-only. The trainer calls them on every process alike; a callback decides itself
whether only process 0 writes. `on_plan` comes first, before `on_train_start` and before anything
compiles: what the run will do, for estimates (the cost meter refuses a run it cannot pay for).
Resume semantics: after a crash the trainer restarts from the latest checkpoint step S and calls
`on_train_start(start_step=S)`; steps after S that ran before the crash are redone, so a callback
should treat an interval as final only once `on_checkpoint` covers it. A run resumed at TRAIN_STEPS
whose final evaluation did not finish runs no step: only that evaluation (`skip_eval`, then
`on_eval_end(step=S)`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What `train` is about to run, known before it compiles (doa_jax.flops counts the FLOPs)."""
    train_steps: int                # the step training ends at (TRAIN_STEPS)
    flops_per_step: float           # one training step, global batch, an online teacher included
    eval_flops: float               # a lower bound on one evaluation's FLOPs (0: no evaluation)
    peak_flops_per_device: float | None   # the device's peak FLOP/s; None: not in the catalog
    # Where the trainer stops to check (fetch metrics, save, evaluate): every log, checkpoint
    # and eval period and TRAIN_STEPS. 0: never (log_period 0: only at those others).
    log_period: int = 0
    checkpoint_period: int = 0
    eval_period: int = 0

    def interval_end(self, step: int) -> int:
        """The step the trainer's next stretch of steps, starting after `step`, ends at: where
        it next calls on_steps_end, should_stop and skip_eval."""
        periods = (self.log_period, self.checkpoint_period, self.eval_period)
        return min([self.train_steps] + [(step // p + 1) * p for p in periods if p > 0])

    def eval_due(self, step: int) -> bool:
        """Whether the trainer evaluates at `step` (an interval's end)."""
        return self.eval_period > 0 and (step % self.eval_period == 0
                                         or step == self.train_steps)


class TrainerCallback:
    """Base class: every hook is a no-op."""

    stop_reason: str | None = None   # why should_stop last said True (the run's exit summary)

    def on_plan(self, *, plan: TrainPlan) -> None:
        """Once per `train` call, before on_train_start; raising here stops the run before it
        compiles or writes anything."""

    def on_train_start(self, *, model_dir: str, start_step: int, mesh: jax.sharding.Mesh) -> None:
        pass

    def on_steps_end(self, *, first_step: int, last_step: int, seconds: float) -> None:
        """Once per logging interval, after its results reached the host. Steps [first, last]
        inclusive; `seconds` is their wall-clock time, compilation excluded."""

    def on_compile(self, *, seconds: float) -> None:
        pass

    def on_eval_end(self, *, step: int, seconds: float) -> None:
        pass

    def on_checkpoint(self, *, step: int) -> None:
        """After checkpoint `step` is durably saved."""

    def should_stop(self, *, step: int) -> bool:
        """Checked at each interval's end (`TrainPlan.interval_end`), before the next stretch of
        steps runs; True makes the trainer save at `step` and stop (evaluating first when one is
        due and skip_eval lets it)."""
        return False

    def skip_eval(self, *, step: int, final: bool) -> str | None:
        """Asked before each evaluation (`final`: the one at TRAIN_STEPS), after should_stop: a
        reason to skip it, or None to run it. A skipped periodic evaluation also stops the run
        (saved at `step`); a skipped final one leaves the finished run without its scores."""
        return None

    def on_train_end(self, *, step: int, reason: str) -> None:
        """reason: 'done' | 'stopped' | 'error'."""


class CallbackList(TrainerCallback):
    """Fans every hook out to several callbacks; should_stop is True if any says so."""

    def __init__(self, callbacks: Sequence[TrainerCallback] = ()):
        self.callbacks = list(callbacks)

    def on_plan(self, **kw) -> None:
        for c in self.callbacks:
            c.on_plan(**kw)

    def on_train_start(self, **kw) -> None:
        for c in self.callbacks:
            c.on_train_start(**kw)

    def on_steps_end(self, **kw) -> None:
        for c in self.callbacks:
            c.on_steps_end(**kw)

    def on_compile(self, **kw) -> None:
        for c in self.callbacks:
            c.on_compile(**kw)

    def on_eval_end(self, **kw) -> None:
        for c in self.callbacks:
            c.on_eval_end(**kw)

    def on_checkpoint(self, **kw) -> None:
        for c in self.callbacks:
            c.on_checkpoint(**kw)

    def should_stop(self, **kw) -> bool:
        stopping = [c for c in self.callbacks if c.should_stop(**kw)]
        self.stop_reason = '; '.join(c.stop_reason for c in stopping if c.stop_reason) or None
        return bool(stopping)

    def skip_eval(self, **kw) -> str | None:
        """Every callback is asked (each may agree with the other processes); the reasons join."""
        reasons = [r for r in [c.skip_eval(**kw) for c in self.callbacks] if r]
        return '; '.join(reasons) or None

    def on_train_end(self, **kw) -> None:
        for c in self.callbacks:
            c.on_train_end(**kw)


class StopAtStep(TrainerCallback):
    """Asks the trainer to stop cleanly once `step` is reached (tests, budget caps)."""

    def __init__(self, step: int):
        self.step = step

    def should_stop(self, *, step: int) -> bool:
        if step >= self.step:
            self.stop_reason = f'StopAtStep({self.step})'
        return step >= self.step
