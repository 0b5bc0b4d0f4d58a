"""Gin glue for the distillation run files (imported by them with `import doa_jax.distill_gin`).

Like `gin_utils`, this is entry-point code: it makes the distillation losses and the pseudo-labeled
task bindable, so `python -m doa_jax.train` runs students without knowing about distillation.
"""

from __future__ import annotations

import gin

from doa_jax import distill_losses


def pseudo_labeled_task(infer_output_dir: str, eval_task: str | None = None,
                        name: str = 'doa_pseudo_labeled', prefix: str = '',
                        with_topk: bool = False, topk_mismatch: str = 'error',
                        gold_task: str | None = None) -> str:
    """Registers the teacher's completed chunks as a task (train = predictions); returns its name.

    `with_topk=True` (distill_kd_offline.gin) also feeds the stored teacher top-k to the batch;
    `topk_mismatch` says what to do with a record it cannot align ('error' or 'drop').
    `gold_task` (gin: GOLD_TASK) adds that task's gold-labeled train split to the student's data.
    """
    from tasks.jsonl_task import register_pseudo_labeled_task
    register_pseudo_labeled_task(name, infer_output_dir, prefix=prefix, eval_task=eval_task,
                                 completed_only=True, with_topk=with_topk,
                                 topk_mismatch=topk_mismatch, gold_task=gold_task,
                                 overwrite=True)
    # The teacher labeled the inputs of EVAL_TASK's dataset: that task's measured lengths apply.
    from doa_jax.data import lengths
    lengths.inherit(name, eval_task)
    return name


# Module `doa_jax`, as gin_utils registers the rest: `doa_jax.pseudo_labeled_task`, ...
gin.external_configurable(pseudo_labeled_task, 'pseudo_labeled_task', module='doa_jax')
gin.external_configurable(distill_losses.sequence_kd_loss, 'sequence_kd_loss', module='doa_jax')
gin.external_configurable(distill_losses.token_kd_loss, 'token_kd_loss', module='doa_jax')


def teacher_kd_loss(checkpoint_path: str, teacher_model: str, temperature: float = 2.0,
                    alpha: float = 0.0, z_loss: float = 0.0, student_config=None):
    """Token-level KD against an online teacher loaded from `checkpoint_path` (named if missing).

    With `student_config` (distill_kd.gin binds the run's model config), a teacher of another
    vocabulary fails here, before its checkpoint is read or anything is computed, and the teacher
    runs in the student's activation dtype (the run's ACTIVATION_DTYPE).
    """
    from doa_jax.models.config import get_config
    from doa_jax.pseudo_label import load_teacher
    config = get_config(teacher_model, dropout_rate=0.0)
    if student_config is not None:
        config = config.replace(dtype=student_config.dtype)
    if student_config is not None:
        distill_losses.check_same_vocab(config.vocab_size, student_config.vocab_size)
    params = load_teacher(checkpoint_path, config)
    return distill_losses.online_teacher_kd_loss(params, config, temperature, alpha, z_loss)


gin.external_configurable(teacher_kd_loss, 'teacher_kd_loss', module='doa_jax')
