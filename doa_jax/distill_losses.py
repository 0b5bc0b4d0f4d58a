"""Distillation losses with the trainer's signature `loss_fn(logits, batch) -> (loss, aux)`.

As in `doa_jax.losses`, `batch['loss_weights']` already carries the global normalizing factor, so
each loss only sums `weight * per_token_loss` and microbatches add up.

- Sequence-level KD: plain cross entropy on the teacher's decoded sequences (they are the targets).
- Token-level KD (the paper's loss): `T^2 * sum_v p_T(v) (log p_T(v) - log q_S(v))` at temperature T,
  which is torch's `KLDivLoss(log_softmax(student/T), softmax(teacher/T))` the paper's code calls
  KL(student || teacher). The teacher distribution comes either from stored top-k log-probs
  (offline: `teacher_topk_ids`, `teacher_topk_logprobs`, shape (batch, length, k); renormalized over
  the k ids at temperature T, exact when k covers the vocabulary) or from full `teacher_logits`
  (online: a teacher forward, shape (batch, length, vocab)). An offline position whose ids are
  negative (`NO_TEACHER_ID`) has no stored teacher distribution (the EOS of a pseudo-label whose
  teacher reached its decode limit first) and takes cross entropy on the target instead.
- `alpha` mixes in hard-label cross entropy: `alpha * CE + (1 - alpha) * KD` per token. Rows whose
  optional `is_gold` flag (batch,) is set are gold-labeled examples with no teacher distribution and
  take cross entropy only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from doa_jax.losses import (Array, Batch, LossFn, cross_entropy_loss, cross_entropy_with_z_loss,
                            first_argmax)

TOPK_IDS = 'teacher_topk_ids'
TOPK_LOGPROBS = 'teacher_topk_logprobs'
TEACHER_LOGITS = 'teacher_logits'
NO_TEACHER_ID = -1   # top-k id row of a target position without a stored teacher distribution


def sequence_kd_loss(z_loss: float = 1e-4, label_smoothing: float = 0.0) -> LossFn:
    """Sequence-level KD: cross entropy on the teacher's outputs, which the batch holds as targets."""
    return cross_entropy_loss(z_loss=z_loss, label_smoothing=label_smoothing)


def has_teacher(batch: Batch) -> Array | None:
    """(batch, length) bool: positions with a teacher distribution; None when all have one."""
    if TEACHER_LOGITS in batch or TOPK_IDS not in batch:
        return None
    return batch[TOPK_IDS][..., 0] >= 0


def token_kl(student_logits: Array, batch: Batch, temperature: float) -> Array:
    """Per-token `T^2 * KL(p_teacher,T || q_student,T)` (float32, shape (batch, length));
    0 at offline positions without a teacher distribution."""
    t = float(temperature)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    if TEACHER_LOGITS in batch:
        teacher = batch[TEACHER_LOGITS].astype(jnp.float32)
        if teacher.shape != student_logits.shape:
            raise ValueError(f'teacher_logits shape {teacher.shape} != student logits shape '
                             f'{student_logits.shape}: the teacher and student must share a '
                             'vocabulary and the batch its target length.')
        t_logp = jax.nn.log_softmax(teacher / t, axis=-1)
        s_sel = s_logp
    elif TOPK_IDS in batch and TOPK_LOGPROBS in batch:
        ids = jnp.maximum(batch[TOPK_IDS].astype(jnp.int32), 0)   # NO_TEACHER_ID rows: masked
        t_logp = jax.nn.log_softmax(batch[TOPK_LOGPROBS].astype(jnp.float32) / t, axis=-1)
        s_sel = jnp.take_along_axis(s_logp, ids, axis=-1)
    else:
        raise KeyError(f'Token-level KD needs {TEACHER_LOGITS!r} (online teacher) or '
                       f'{TOPK_IDS!r} and {TOPK_LOGPROBS!r} (pseudo-labels written with '
                       f'top_k > 0) in the batch; found keys {sorted(batch)}.')
    t_p = jnp.exp(t_logp)
    kl = (t * t) * jnp.sum(t_p * (t_logp - s_sel), axis=-1)
    mask = has_teacher(batch)
    return kl if mask is None else jnp.where(mask, kl, 0.0)


def _token_kd_loss(logits: Array, batch: Batch, *, temperature: float, alpha: float,
                   z_loss: float) -> tuple[Array, dict[str, Array]]:
    targets = batch['decoder_target_tokens']
    weights = batch['loss_weights']
    real = batch.get('decoder_loss_weights', targets > 0).astype(jnp.float32)
    kd = token_kl(logits, batch, temperature)
    ce, zl = cross_entropy_with_z_loss(logits, targets, z_loss, 0.0)
    per_token = alpha * ce + (1.0 - alpha) * kd
    mask = has_teacher(batch)
    if mask is not None:
        per_token = jnp.where(mask, per_token, ce)
    if 'is_gold' in batch:
        gold = batch['is_gold'].astype(bool)[:, None]
        per_token = jnp.where(gold, ce, per_token)
        kd = jnp.where(gold, 0.0, kd)
    kd_sum = jnp.sum(kd * weights)
    ce_sum = jnp.sum(ce * weights)
    zl_sum = jnp.sum(zl * weights)
    correct = jnp.sum((first_argmax(logits) == targets) * real)
    aux = {'cross_entropy': ce_sum, 'z_loss': zl_sum, 'kd_loss': kd_sum, 'correct': correct,
           'num_tokens': jnp.sum(real)}
    return jnp.sum(per_token * weights) + zl_sum, aux


def token_kd_loss(temperature: float = 2.0, alpha: float = 0.0, z_loss: float = 0.0) -> LossFn:
    """Token-level KD at `temperature` scaled by T^2, mixed with `alpha` * hard-label cross entropy."""
    if temperature <= 0:
        raise ValueError(f'temperature={temperature} must be > 0 (gin: token_kd_loss.temperature).')
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha={alpha} must be in [0, 1] (gin: token_kd_loss.alpha).')
    return functools.partial(_token_kd_loss, temperature=temperature, alpha=alpha, z_loss=z_loss)


def check_same_vocab(teacher_vocab_size: int, student_vocab_size: int) -> None:
    """Fails before any compute when teacher and student vocabularies differ."""
    if int(teacher_vocab_size) != int(student_vocab_size):
        raise ValueError(f'Teacher vocab_size {teacher_vocab_size} != student vocab_size '
                         f'{student_vocab_size}: token-level KD and pseudo-labels need one shared '
                         'vocabulary; pick a teacher and student from the same family (e.g. both '
                         't5_1_1_*) or set the same --gin.VOCABULARY.')


def online_teacher_kd_loss(teacher_params, teacher_config, temperature: float = 2.0,
                           alpha: float = 0.0, z_loss: float = 0.0) -> LossFn:
    """Token-level KD with an online teacher forward on the batch's (teacher-decoded) targets.

    The teacher's parameters are closed over, so they become jit constants: right for small
    teachers; an XXL teacher wants them passed as a sharded argument (a trainer hook).
    """
    from flax import linen as nn

    from doa_jax.models.t5 import T5, packing_inputs

    base = token_kd_loss(temperature=temperature, alpha=alpha, z_loss=z_loss)
    model, params = T5(teacher_config), nn.unbox(teacher_params)

    def loss(logits: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
        check_same_vocab(teacher_config.vocab_size, logits.shape[-1])
        teacher_logits = jax.lax.stop_gradient(model.apply(
                {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
                batch['decoder_target_tokens'], **packing_inputs(batch)))
        return base(logits, {**batch, TEACHER_LOGITS: teacher_logits})

    return loss
