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


class OnlineTeacher:
    """A teacher whose forward runs inside the jitted train and eval steps, on the batch's
    (teacher-decoded) targets, adding `teacher_logits` to the batch.

    Its parameters are an argument of those steps, placed once by `place` with the student's
    parameter rules (over `model`, and over `data` too with FSDP), never closed over: arrays a
    jitted function closes over become constants of the compiled program, 44.5 GB of them for a
    T5-XXL teacher. Matmul weights are held in the compute dtype, as decoding holds them (the
    model casts them to it at every use, so the logits are unchanged): half of float32's bytes.
    """

    def __init__(self, config, params=None):
        self.config = config
        self.params = params    # host arrays (boxed or not); None where only shapes are needed

    def abstract(self, mesh, rules) -> tuple[object, object]:
        """(shapes, NamedShardings) of the parameters as the steps read them; no memory."""
        from doa_jax.models.t5 import T5
        from doa_jax.train_state import abstract_params

        model, dummy = T5(self.config), jnp.ones((1, 1), jnp.int32)
        shapes, shardings = abstract_params(lambda r: model.init(r, dummy, dummy)['params'],
                                            mesh, rules, jax.random.PRNGKey(0))
        return jax.eval_shape(self._cast, shapes), shardings

    def _cast(self, params):
        from flax import linen as nn

        from doa_jax.decoding import cast_matmul_params
        params = nn.unbox(params)
        if jnp.dtype(self.config.dtype) == jnp.float32:
            return params
        return cast_matmul_params(params, self.config.dtype)

    def place(self, mesh, rules):
        """The parameters cast (on the host) and placed with their shardings on `mesh`."""
        if self.params is None:
            raise ValueError('This OnlineTeacher has no parameters to place (it was made for '
                             'planning); give it the loaded teacher parameters.')
        _, shardings = self.abstract(mesh, rules)
        return jax.device_put(self._cast(self.params), shardings)

    def features(self, params, batch: Batch) -> dict[str, Array]:
        """{TEACHER_LOGITS: the teacher's teacher-forced logits}, not differentiated."""
        from doa_jax.models.t5 import T5, packing_inputs

        logits = T5(self.config).apply(
                {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
                batch['decoder_target_tokens'], **packing_inputs(batch))
        return {TEACHER_LOGITS: jax.lax.stop_gradient(logits)}


class OnlineTeacherKDLoss:
    """Token-level KD against an `OnlineTeacher` (`self.teacher`).

    The trainer sees `loss_fn.teacher`, passes its placed parameters to the jitted step as an
    argument and adds the teacher's logits to the batch there (`train_step`), so this loss then
    reads them like any token-KD loss. Called on a batch without them (directly, outside the
    trainer), it runs the teacher forward itself over the parameters it holds; inside a jit those
    are constants, which only a small teacher affords.
    """

    def __init__(self, teacher: OnlineTeacher, temperature: float = 2.0, alpha: float = 0.0,
                 z_loss: float = 0.0):
        self.teacher = teacher
        self.base = token_kd_loss(temperature=temperature, alpha=alpha, z_loss=z_loss)

    def __call__(self, logits: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
        check_same_vocab(self.teacher.config.vocab_size, logits.shape[-1])
        if TEACHER_LOGITS not in batch:
            from flax import linen as nn
            batch = {**batch, **self.teacher.features(nn.unbox(self.teacher.params), batch)}
        return self.base(logits, batch)


def online_teacher_kd_loss(teacher_params, teacher_config, temperature: float = 2.0,
                           alpha: float = 0.0, z_loss: float = 0.0) -> OnlineTeacherKDLoss:
    """Token-level KD with an online teacher forward on the batch's (teacher-decoded) targets;
    in the trainer the teacher's parameters are a sharded argument of the step (see
    `OnlineTeacherKDLoss`)."""
    return OnlineTeacherKDLoss(OnlineTeacher(teacher_config, teacher_params), temperature,
                               alpha, z_loss)
