"""Optimizers and learning-rate schedules as T5 and the paper's code used them (optax)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'rsqrt', 'linear')
OPTIMIZERS = ('adafactor', 'adamw')


def make_schedule(name: str, learning_rate: float, warmup_steps: int = 0,
                  total_steps: int | None = None, end_value: float = 0.0) -> optax.Schedule:
    """'constant' (after optional linear warmup); 'rsqrt': lr / sqrt(max(step, warmup)), T5's
    pre-training schedule; 'linear': linear warmup then linear decay to `end_value` at `total_steps`.
    """
    if name == 'constant':
        if warmup_steps:
            return optax.linear_schedule(0.0, learning_rate, warmup_steps)
        return optax.constant_schedule(learning_rate)
    if name == 'rsqrt':
        warm = max(warmup_steps, 1)
        # lr * sqrt(warm) / sqrt(max(step, warm)): flat at `learning_rate` during warmup, then decays.
        return lambda step: learning_rate * jnp.sqrt(warm / jnp.maximum(step + 1, warm))
    if name == 'linear':
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(f"Schedule 'linear' needs total_steps > warmup_steps; got "
                             f'total_steps={total_steps}, warmup_steps={warmup_steps} (gin: '
                             'TRAIN_STEPS / WARMUP_STEPS).')
        return optax.join_schedules(
                [optax.linear_schedule(0.0, learning_rate, warmup_steps),
                 optax.linear_schedule(learning_rate, end_value, total_steps - warmup_steps)],
                [warmup_steps])
    raise ValueError(f'Unknown learning-rate schedule {name!r} (gin: SCHEDULE); '
                     f'choose one of {SCHEDULES}.')


def make_optimizer(name: str = 'adafactor', learning_rate: float = 1e-3, *,
                   schedule: str = 'constant', warmup_steps: int = 0,
                   total_steps: int | None = None, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip_norm: float | None = None) -> optax.GradientTransformation:
    """Adafactor as T5 uses it (factored second moments, decay 0.8, no momentum, update clipping
    1.0, scaled by parameter RMS) or AdamW (the paper's code: lr 3e-5, batch 32).
    """
    lr = make_schedule(schedule, learning_rate, warmup_steps, total_steps)
    if name == 'adafactor':
        opt = optax.adafactor(learning_rate=lr, decay_rate=0.8, factored=True,
                              multiply_by_parameter_scale=True, clipping_threshold=1.0,
                              momentum=None,
                              weight_decay_rate=weight_decay or None)
    elif name == 'adamw':
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f'Unknown optimizer {name!r} (gin: OPTIMIZER); choose one of {OPTIMIZERS}.')
    if grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
    return opt
