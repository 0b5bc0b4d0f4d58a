"""The reference implementations: plain XLA ops, on every platform. Other backends are tested
against these."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Large negative additive bias for masked attention positions (as t5x does).
MASK_BIAS = -1e10


def combined_bias(bias: Array | None, mask: Array | None, dtype: Any = jnp.float32) -> Array | None:
    """bias + (0 where mask holds, MASK_BIAS elsewhere), broadcast, in `dtype`; None if both
    are None."""
    out = None if bias is None else bias.astype(dtype)
    if mask is not None:
        m = jnp.where(mask, 0.0, MASK_BIAS).astype(dtype)
        out = m if out is None else out + m
    return out


def _add_bias(logits: Array, bias: Array | None, mask: Array | None) -> Array:
    # Bias first, then the mask, each in the logits' dtype: an unmasked logit gets exactly
    # logit + bias, a masked one MASK_BIAS (rounded), as t5x adds its combined bias.
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, MASK_BIAS).astype(logits.dtype)
    return logits


@jax.custom_vjp
def softmax(logits: Array) -> Array:
    """Softmax over the last axis, as `jax.nn.softmax`, with its gradient y * (g - sum(g * y))
    written out: XLA:CPU otherwise materializes the normalizer broadcast to the full
    (batch, heads, q, k) shape for the forward and backward passes."""
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(logits):
    y = softmax(logits)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dropout_keep(rng: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """Dropout keep scales: 0 where dropped, 1 / (1 - rate) elsewhere (float32). Every backend
    draws its attention dropout here, so the same rng drops the same weights on each."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(jnp.float32)


def attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None, dtype: Any,
              float32_logits: bool, dropout_rate: float, dropout_rng: Array | None) -> Array:
    # The products run head-major (batch, heads, length, head_dim) on both sides: with the heads
    # axis between length and head_dim XLA:CPU emits a much slower batched dot (4.5x for a
    # float32 encoder layer of t5_1_1_small at batch 32).
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    if float32_logits:
        qh, kh = qh.astype(jnp.float32), kh.astype(jnp.float32)
    logits = _add_bias(jnp.einsum('bhqd,bhkd->bhqk', qh, kh), bias, mask)
    weights = softmax(logits).astype(dtype)
    if dropout_rate > 0 and dropout_rng is not None:
        keep = dropout_keep(dropout_rng, dropout_rate, weights.shape)
        weights = (weights * keep.astype(dtype)).astype(dtype)
    out = jnp.einsum('bhqk,bhkd->bhqd', weights, vh.astype(dtype))
    return out.astype(dtype).transpose(0, 2, 1, 3)


def decode_attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None,
                     dtype: Any, float32_logits: bool) -> Array:
    # The caches are read in their (batch, length, heads, head_dim) layout: no per-step copy.
    if float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = _add_bias(jnp.einsum('bqhd,bkhd->bhqk', q, k), bias, mask)
    weights = softmax(logits).astype(dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v.astype(dtype)).astype(dtype)


def dense(x: Array, kernel: Array, *, dtype: Any, prepared: Array | None = None) -> Array:
    del prepared   # XLA reads the kernel as it is
    return jnp.dot(x.astype(dtype), kernel.astype(dtype))


def prepare_weights(params: Any, *, dtype: Any, tied_head: bool) -> dict:
    del params, dtype, tied_head
    return {}
