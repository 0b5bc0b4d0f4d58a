"""The jitted train and eval steps: gradient accumulation, donation, on-device metric sums.

Metrics never leave the device inside the hot loop: each step adds its sums into a small
`metrics` dict that is itself an (undonated) argument and result of the step, and the host fetches
it once per logging interval.

A loss that distills from an online teacher (`loss_fn.teacher`, a `distill_losses.OnlineTeacher`)
gets the teacher's logits in its batch: the steps run the teacher forward on each (micro)batch
over `teacher_params`, their last argument, which the caller places once with the teacher's
shardings (`OnlineTeacher.place`), so the teacher's weights are never constants of the program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from doa_jax import partitioning
from doa_jax.losses import LossFn, normalized_loss_weights
from doa_jax.models.t5 import packing_inputs
from doa_jax.train_state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]
# apply_fn(params, batch, dropout_rng or None) -> float32 logits
ApplyFn = Callable[[Any, Batch, Array | None], Array]

METRIC_KEYS = ('loss', 'cross_entropy', 'z_loss', 'correct', 'num_tokens', 'grad_norm',
               'num_steps', 'nonfinite_step')


def zero_metrics() -> dict[str, Array]:
    m = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
    m['nonfinite_step'] = jnp.full((), -1, jnp.int32)
    return m


def model_apply_fn(model: nn.Module) -> ApplyFn:
    """Teacher-forced forward pass of a T5 module on EncDecFeatureConverter features; a packed
    batch's segment ids keep each example's attention to itself."""

    def apply(params, batch, dropout_rng):
        rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
        return model.apply({'params': params}, batch['encoder_input_tokens'],
                           batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                           enable_dropout=dropout_rng is not None, rngs=rngs,
                           **packing_inputs(batch))

    return apply


def with_teacher(teacher: Any | None, teacher_params: Any, batch: Batch) -> Batch:
    """`batch` plus the teacher's features (its logits) when there is a teacher."""
    if teacher is None:
        return batch
    return {**batch, **teacher.features(teacher_params, batch)}


def _split_microbatches(batch: Batch, num_microbatches: int, mesh: Mesh) -> Batch:
    """(B, ...) -> (M, B/M, ...) taking every M-th row, so each microbatch stays spread over the
    data axis (each device's contiguous block holds rows of every microbatch)."""

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        spec = PartitionSpec(None, partitioning.DATA_AXIS, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, dict(batch))


def make_train_step(apply_fn: ApplyFn, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: partitioning.Rules, state_shardings: TrainState, *,
                    loss_normalizing_factor: float | str | None = None, num_microbatches: int = 1,
                    dropout_seed: int = 0, use_dropout: bool = True) -> Callable:
    """Returns jitted `step(state, batch, metrics, teacher_params=None) -> (state, metrics)`; the
    state is donated. `loss_fn.teacher`, if any, runs on each microbatch over `teacher_params`.

    Dropout keys are `fold_in(PRNGKey(dropout_seed), step)`, so a resumed run draws the same masks.
    """
    base_key = jax.random.PRNGKey(dropout_seed)
    teacher = getattr(loss_fn, 'teacher', None)

    def grads_of(params, batch, rng, teacher_params):
        batch = with_teacher(teacher, teacher_params, batch)

        def loss_of(p):
            logits = apply_fn(p, batch, rng)
            return loss_fn(logits, batch)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, aux, grads

    def step(state: TrainState, batch: Batch, metrics: dict[str, Array], teacher_params=None):
        with nn.logical_axis_rules(rules):
            batch = dict(batch)
            batch['loss_weights'] = normalized_loss_weights(batch, loss_normalizing_factor)
            rng = jax.random.fold_in(base_key, state.step) if use_dropout else None
            if num_microbatches <= 1:
                loss, aux, grads = grads_of(state.params, batch, rng, teacher_params)
            else:
                micro = _split_microbatches(batch, num_microbatches, mesh)

                def body(carry, xs):
                    i, mb = xs
                    mrng = None if rng is None else jax.random.fold_in(rng, i)
                    l, a, g = grads_of(state.params, mb, mrng, teacher_params)
                    return jax.tree.map(jnp.add, carry, (l, a, g)), None

                first = jax.tree.map(lambda x: x[0], micro)
                shapes = jax.eval_shape(grads_of, state.params, first, rng, teacher_params)
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                (loss, aux, grads), _ = jax.lax.scan(
                        body, zeros, (jnp.arange(num_microbatches), micro))
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

            def update(operands):
                params, opt_state, grads = operands
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            # Keep the last good values: a NaN step must not poison the state the host saves.
            # A conditional rather than a `where` per leaf: with the state donated, the per-leaf
            # select made XLA copy every optimizer moment before updating it in place (4x the
            # update's memory traffic: AdamW on t5_1_1_small took 215 ms against 60 ms).
            params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2],
                                             (state.params, state.opt_state, grads))
            new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
            new = dict(metrics)
            for k in ('cross_entropy', 'z_loss', 'correct', 'num_tokens'):
                if k in aux:
                    new[k] = metrics[k] + aux[k].astype(jnp.float32)
            new['loss'] = metrics['loss'] + loss
            new['grad_norm'] = metrics['grad_norm'] + grad_norm
            new['num_steps'] = metrics['num_steps'] + 1
            first_bad = (metrics['nonfinite_step'] < 0) & ~finite
            new['nonfinite_step'] = jnp.where(first_bad, state.step, metrics['nonfinite_step'])
            return new_state, new

    rep = NamedSharding(mesh, PartitionSpec())
    metric_shardings = {k: rep for k in METRIC_KEYS}
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, metric_shardings))


def make_eval_step(apply_fn: ApplyFn, loss_fn: LossFn, mesh: Mesh, rules: partitioning.Rules, *,
                   loss_normalizing_factor: float | str | None = None) -> Callable:
    """Returns jitted `eval_step(params, batch, teacher_params=None) -> aux sums + 'loss'`
    (teacher-forced, no dropout); `loss_fn.teacher`, if any, runs over `teacher_params`."""
    teacher = getattr(loss_fn, 'teacher', None)

    def step(params, batch, teacher_params=None):
        with nn.logical_axis_rules(rules):
            batch = with_teacher(teacher, teacher_params, dict(batch))
            batch['loss_weights'] = normalized_loss_weights(batch, loss_normalizing_factor)
            logits = apply_fn(params, batch, None)
            loss, aux = loss_fn(logits, batch)
            return {'loss': loss, **aux}

    return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()))
