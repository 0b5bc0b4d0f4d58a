"""Every gin configurable of doa_jax, registered here and nowhere else.

`register_configurables()` registers them in gin's module `doa_jax`: a gin file binds
`doa_jax.<name>` for each name in the table below (`doa_jax.train.batch_size = 32`,
`@doa_jax.get_model_config()`, ...), and grepping this file for a name finds what it binds. doa_jax's
gin files write the names in full, so they mean the same in a process where t5x registered its own
`train` and `infer`; a short name (`train.model_dir`) works where doa_jax's are the only ones.

Library modules never import gin: the table registers their plain functions and classes. The few
functions defined here are gin glue: they turn what a gin file can write (names, paths) into the
objects the library takes.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Mapping, Sequence

import gin

from doa_jax.models.config import T5Config, get_config
from doa_jax.models.config import activation_dtype as activation_dtype_named

GIN_MODULE = 'doa_jax'   # the gin module of doa_jax's configurables: `doa_jax.train`, ...
CONFIGURABLE: dict[str, Callable] = {}   # name -> the registered configurable, once registered


def _table() -> dict[str, Callable]:
    """name -> what `doa_jax.<name>` binds. Imported here, when registering, so that importing
    gin_utils stays cheap."""
    from doa_jax import callbacks, distill_losses, losses, optimizers, partitioning, pseudo_label
    from doa_jax import trainer
    from doa_jax.cost import CostCallback
    from doa_jax.cost.cost_model import ComputeCostModel
    from doa_jax.study import data as study_data
    from doa_jax.study import runner
    return {
        # Training: python -m doa_jax.train (gin_configs/runs/finetune*.gin, annotate*.gin).
        'train': trainer.train,
        'get_model_config': get_model_config,
        'import_task_modules': import_task_modules,
        'make_optimizer': optimizers.make_optimizer,
        'cross_entropy_loss': losses.cross_entropy_loss,
        'MeshConfig': partitioning.MeshConfig,
        'StopAtStep': callbacks.StopAtStep,
        'CostCallback': CostCallback,    # train.callbacks = [@doa_jax.CostCallback()]
        # Distillation: the student runs (gin_configs/runs/distill_*.gin).
        'pseudo_labeled_task': pseudo_labeled_task,
        'sequence_kd_loss': distill_losses.sequence_kd_loss,
        'token_kd_loss': distill_losses.token_kd_loss,
        'teacher_kd_loss': teacher_kd_loss,
        # Pseudo-labeling: python -m doa_jax.infer (gin_configs/runs/pseudo_label*.gin).
        'infer': pseudo_label.run_pseudo_labeling,
        # The study: python -m doa_jax.study (gin_configs/studies/*.gin); StageConfig is scoped
        # teacher/ and student/.
        'study': study,
        'StageConfig': runner.StageConfig,
        'Pretraining': runner.Pretraining,   # StageConfig.pretraining: a cached pretrained start
        'ComputeCostModel': ComputeCostModel,
        'LLMAnnotator': runner.LLMAnnotator,
        'synthetic_wlp': study_data.synthetic_wlp,
        'paper_dataset': study_data.paper_dataset,
    }


def register_configurables() -> None:
    """Registers every configurable of the table as `doa_jax.<name>` (idempotent)."""
    if CONFIGURABLE:
        return
    for name, fn in _table().items():
        CONFIGURABLE[name] = gin.external_configurable(fn, name, module=GIN_MODULE)


# ---- gin glue: what a gin file writes, turned into what the library takes ----------------------

def get_model_config(name: str, dropout_rate: float = 0.0, activation_dtype: str = 'bfloat16',
                     scan_layers: bool = False, remat_policy: str | None = None,
                     attention_impl: str = 'auto', matmul_impl: str = 'auto') -> T5Config:
    """A named T5 config with the run's overrides (gin: MODEL_CONFIG via get_model_config.*).

    attention_impl / matmul_impl: the op backends (see `doa_jax.ops`); 'auto' picks per platform.
    """
    dtype = activation_dtype_named(activation_dtype, 'get_model_config.activation_dtype')
    return get_config(name, dropout_rate=dropout_rate, dtype=dtype,
                      scan_layers=scan_layers, remat_policy=remat_policy,
                      attention_impl=attention_impl, matmul_impl=matmul_impl)


def import_task_modules(module: str | Sequence[str] | None = 'tasks',
                        vocabulary: str | None = None) -> None:
    """Imports the module(s) that register seqio tasks (gin: MIXTURE_OR_TASK_MODULE).

    `vocabulary` (gin: VOCABULARY) is a sentencepiece model path or 'byte'; it becomes the default
    vocabulary of tasks registered by those modules, so it is set before they are imported.
    """
    if vocabulary is not None:
        from doa_jax.data.vocabulary import set_default_vocabulary
        set_default_vocabulary(vocabulary)
    names = [module] if isinstance(module, str) else list(module or ())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f'MIXTURE_OR_TASK_MODULE={name!r} cannot be imported ({e}); set it to '
                             'a module on PYTHONPATH that registers your tasks.') from e


def pseudo_labeled_task(infer_output_dir: str, eval_task: str | None = None,
                        name: str = 'doa_pseudo_labeled', prefix: str = '',
                        with_topk: bool = False, topk_mismatch: str = 'error',
                        gold_task: str | None = None) -> str:
    """Registers the teacher's completed chunks as a task (train = predictions); returns its name.

    `with_topk=True` (distill_kd_offline.gin) also feeds the stored teacher top-k to the batch;
    `topk_mismatch` says what to do with a record it cannot align ('error' or 'drop').
    `gold_task` (gin: GOLD_TASK) adds that task's gold-labeled train split to the student's data.
    """
    from doa_jax.data import lengths
    from tasks.jsonl_task import register_pseudo_labeled_task
    register_pseudo_labeled_task(name, infer_output_dir, prefix=prefix, eval_task=eval_task,
                                 completed_only=True, with_topk=with_topk,
                                 topk_mismatch=topk_mismatch, gold_task=gold_task,
                                 overwrite=True)
    # The teacher labeled the inputs of EVAL_TASK's dataset: that task's measured lengths apply.
    lengths.inherit(name, eval_task)
    return name


def teacher_kd_loss(checkpoint_path: str, teacher_model: str, temperature: float = 2.0,
                    alpha: float = 0.0, z_loss: float = 0.0, student_config=None):
    """Token-level KD against an online teacher loaded from `checkpoint_path` (named if missing).

    With `student_config` (distill_kd.gin binds the run's model config), a teacher of another
    vocabulary fails here, before its checkpoint is read or anything is computed, and the teacher
    runs in the student's activation dtype (the run's ACTIVATION_DTYPE).
    """
    from doa_jax import distill_losses
    from doa_jax.pseudo_label import load_teacher
    config = get_config(teacher_model, dropout_rate=0.0)
    if student_config is not None:
        config = config.replace(dtype=student_config.dtype)
        distill_losses.check_same_vocab(config.vocab_size, student_config.vocab_size)
    params = load_teacher(checkpoint_path, config)
    return distill_losses.online_teacher_kd_loss(params, config, temperature, alpha, z_loss)


def study(*, study_dir: str, data, strategies: Sequence[str], n_labels: Sequence[int],
          budgets_usd: Sequence[float], teacher, student,
          task_feature_lengths: Mapping[str, int] | None,
          default_feature_lengths: Mapping[str, int] | None = None, prices: str | None = None,
          usd_per_label: float | None = None,
          usd_per_device_hour: Mapping[str, float] | None = None, seed: int = 0,
          pool_size: int | None = None, chunk_size: int = 256, infer_batch_size: int = 32,
          eval_batch_size: int = 32, student_loss: str = 'sequence',
          count_student_compute: bool = False, show_progress: bool = True,
          llm=None, cost_model=None) -> dict:
    """Runs (or resumes) the study, then writes its report; returns write_report's dict.
    `cost_model` (a `ComputeCostModel`; default: FLOPs at the default utilisations) prices
    compute. `task_feature_lengths` None (TASK_FEATURE_LENGTHS): each stage takes the lengths
    measured for its task and vocabulary, else `default_feature_lengths`, as a run does."""
    from doa_jax.cost.cost_model import ComputeCostModel
    from doa_jax.study import runner
    from doa_jax.study.report import write_report
    table = runner.load_prices_for(data, prices, usd_per_label, usd_per_device_hour)
    settings = runner.StudySettings(
            study_dir=study_dir, data=data, teacher=teacher, student=student,
            task_feature_lengths=None if task_feature_lengths is None
            else dict(task_feature_lengths),
            default_feature_lengths=None if default_feature_lengths is None
            else dict(default_feature_lengths), prices=table, seed=seed,
            pool_size=pool_size, chunk_size=chunk_size, infer_batch_size=infer_batch_size,
            eval_batch_size=eval_batch_size, student_loss=student_loss,
            count_student_compute=count_student_compute, show_progress=show_progress, llm=llm,
            cost_model=cost_model or ComputeCostModel())
    ran, skipped = runner.run_study(settings, strategies, n_labels, budgets_usd)
    logging.info('study: ran %d points, skipped %d finished ones.', len(ran), len(skipped))
    return write_report(study_dir)
