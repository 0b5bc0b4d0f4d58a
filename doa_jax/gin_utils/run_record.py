"""What a run leaves behind and reports: its record in MODEL_DIR, its fingerprint, its summary line.

`run_configured_training` runs the gin-configured `train` with a `RunRecord` (the operative gin
config, the command line and the package versions, written into MODEL_DIR) and the description of
the run that its fingerprint needs (`training_description`: the optimizer's, the loss's and the
task's bindings, which reach `train` only as opaque functions). `RunSummary` gives the one-line
summary the entry point logs, with the cost from the run's ledger (`ledger_spent_usd`).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Sequence

import gin
import jax

from doa_jax import callbacks as callbacks_lib
from doa_jax import run_identity
from doa_jax.gin_utils.configurables import CONFIGURABLE, register_configurables
from doa_jax.gin_utils.parsing import _bindings, _is_macro_ref

if TYPE_CHECKING:
    from doa_jax import trainer

_RECORDED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'seqio', 'tensorflow',
                      'gin-config', 'clu', 'numpy')


class RunRecord(callbacks_lib.TrainerCallback):
    """Writes what reproduces the run into MODEL_DIR (process 0): the operative gin config, the
    command line and the package versions."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def on_train_start(self, *, model_dir: str, start_step: int, mesh) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(model_dir, exist_ok=True)
        suffix = '' if start_step == 0 else f'.resume_{start_step}'
        with open(os.path.join(model_dir, f'config{suffix}.gin'), 'w') as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(model_dir, f'command_line{suffix}.txt'), 'w') as f:
            f.write(shlex.join([sys.executable] + self.argv) + '\n')
        with open(os.path.join(model_dir, f'versions{suffix}.txt'), 'w') as f:
            f.write(f'python=={sys.version.split()[0]}\n')
            for pkg in _RECORDED_PACKAGES:
                try:
                    f.write(f'{pkg}=={importlib.metadata.version(pkg)}\n')
                except importlib.metadata.PackageNotFoundError:
                    pass
            f.write(f'devices={jax.device_count()}x{jax.devices()[0].device_kind}\n')


def ledger_spent_usd(ledger_dir: str, run_id: str | None = None,
                     stage: str | None = None) -> tuple[float, str] | None:
    """($ billed, ledger file) from the cost ledger in `ledger_dir`: the run's (or, with `stage`,
    that stage's, with the rows of its per-shard stages `STAGE.shardN`: e.g. pseudo-labeling's
    chunks and compiles); None when there is no ledger there (the run is unmetered)."""
    from doa_jax.cost import Ledger
    from doa_jax.cost.ledger import ledger_path
    path = ledger_path(ledger_dir)
    if not os.path.isfile(path):
        return None
    ledger = Ledger(path, readonly=True)
    try:
        if stage is None:
            return ledger.spent_usd(run_id), path
        return math.fsum(s.total_usd for s in ledger.summary() if s.run_id == run_id and (
                s.stage == stage or s.stage.startswith(f'{stage}.'))), path
    finally:
        ledger.close()


class RunSummary(callbacks_lib.TrainerCallback):
    """Remembers where a training run started, for the one-line summary the entry point logs."""

    def __init__(self):
        self.model_dir: str | None = None
        self.start_step: int | None = None
        self.usd_before: float | None = None

    def on_train_start(self, *, model_dir: str, start_step: int, mesh) -> None:
        self.model_dir, self.start_step = model_dir, start_step
        spent = self._spent()
        self.usd_before = spent[0] if spent else None

    def _spent(self) -> tuple[float, str] | None:
        """The cost meter's ledger: CostCallback.ledger if gin binds a path, else MODEL_DIR's."""
        ledger, run_id = self.model_dir, None
        for key, attr in (('CostCallback.ledger', 'ledger'), ('CostCallback.run_id', 'run_id')):
            try:
                value = gin.query_parameter(key)
            except ValueError:
                continue
            while _is_macro_ref(value):
                value = value.scoped_configurable_fn()
            if isinstance(value, str):
                ledger, run_id = (value, run_id) if attr == 'ledger' else (ledger, value)
        run_id = run_id or run_identity.run_id_or_name(self.model_dir)
        return ledger_spent_usd(ledger, run_id)

    def line(self, result: trainer.TrainResult) -> str:
        """`train: done at step 60 (ran 60 steps from step 0); cost $...; checkpoints ...`."""
        if self.model_dir is None:
            return f'train: {result.reason} at step {result.step}.'
        ran = result.step - self.start_step
        why = {'done': 'done', 'stopped': 'stopped early by a callback (BUDGET_USD cap or '
                                          'StopAtStep)'}.get(result.reason, result.reason)
        text = f'train: {why} at step {result.step} (ran {ran} steps from step {self.start_step})'
        if ran == 0 and result.reason == 'done':
            text += '; the checkpoint in MODEL_DIR had already reached TRAIN_STEPS'
            if any(k.startswith('eval/') for row in result.history for k in row):
                text += ', so only its final evaluation ran (an earlier attempt did not finish it)'
        for note in result.notes:     # e.g. an evaluation the BUDGET_USD cap could not pay for
            text += f'; {note}'
        spent = self._spent()
        if spent is None:
            text += '; cost not metered (no ledger; bind train.callbacks = [@CostCallback()])'
        else:
            usd, path = spent
            this = usd - (self.usd_before or 0.0)
            text += f'; cost ${this:.4f}' + (f' (run total ${usd:.4f})' if this != usd else '')
            text += f' in {path}'
        record = 'config.gin' if self.start_step == 0 else f'config.resume_{self.start_step}.gin'
        text += (f'; checkpoints {os.path.join(self.model_dir, "checkpoints")}, run record '
                 f'{os.path.join(self.model_dir, record)}.')
        return text


# Parameters that choose how a run executes, not what it trains: a resume may change them.
_EXECUTION_PARAMS = frozenset({'activation_dtype', 'attention_impl', 'matmul_impl',
                               'remat_policy'})


def _describe_bound(value: Any, depth: int = 0) -> Any:
    """A bound gin value as plain data: macros resolved, a `@configurable()` reference as
    {'configurable': name, param: value, ...} of its bindings. A parameter bound to a macro a
    resume may change (run_identity.RESUMABLE_CHANGES, e.g. make_optimizer.total_steps =
    %TRAIN_STEPS) is left out (returns `_SKIP`)."""
    while _is_macro_ref(value):
        if value.configurable.selector == 'gin.macro' and \
                '/'.join(value.scopes) in run_identity.RESUMABLE_CHANGES:
            return _SKIP
        value = _macro_value(value)
    if isinstance(value, gin.config.ConfigurableReference) and depth < 4:
        selector = value.configurable.selector
        params: dict[str, Any] = dict(_bindings().get(('', selector), {}))
        for i in range(len(value.scopes)):
            params.update(_bindings().get(('/'.join(value.scopes[:i + 1]), selector), {}))
        out = {'configurable': selector.rpartition('.')[2]}    # the same with or without t5x
        for name in sorted(params):
            if name in _EXECUTION_PARAMS:
                continue
            described = _describe_bound(params[name], depth + 1)
            if described is not _SKIP:
                out[name] = described
        return out
    if isinstance(value, (list, tuple)):
        return [v for v in (_describe_bound(x, depth + 1) for x in value) if v is not _SKIP]
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _describe_bound(x, depth + 1)) for k, x in value.items())
                if v is not _SKIP}
    return run_identity.describe(value)


_SKIP = object()


def _macro_value(ref: Any) -> Any:
    """What a macro is bound to, unevaluated (`%M` bound to `@f()` gives the reference, where
    calling the macro would call f)."""
    if ref.configurable.selector == 'gin.macro':
        return gin.query_parameter(f'{"/".join(ref.scopes)}/gin.macro.value')
    return ref.scoped_configurable_fn()


def training_description() -> dict[str, Any]:
    """What gin knows of a run that the trainer cannot see in its arguments: the optimizer's and
    the loss's bindings (they reach `train` as opaque functions), the model's name, and how a
    generated task is made (e.g. @pseudo_labeled_task() with its INFER_OUTPUT_DIR)."""
    out = {}
    for param, key in (('optimizer', 'optimizer'), ('loss_fn', 'loss'),
                       ('model_config', 'model_config'), ('mixture_or_task_name', 'task_source')):
        try:
            value = gin.query_parameter(f'train.{param}')
        except ValueError:
            continue
        if key == 'task_source':    # only a task made by a configurable; a name is typed
            while _is_macro_ref(value):
                value = _macro_value(value)
            if not isinstance(value, gin.config.ConfigurableReference):
                continue
        described = _describe_bound(value)
        if described is not _SKIP:
            out[key] = described
    return out


def run_configured_training(argv: Sequence[str],
                            summary: RunSummary | None = None) -> trainer.TrainResult:
    """Imports the task module(s), then calls the gin-configured `train`, adding a RunRecord (and
    `summary`, which then knows the run's start step and directory) and the run's description
    for its fingerprint (`training_description`)."""
    register_configurables()
    CONFIGURABLE['import_task_modules']()
    extra = [RunRecord(argv)] + ([summary] if summary is not None else [])
    return CONFIGURABLE['train'](extra_callbacks=extra, run_fingerprint=training_description())
