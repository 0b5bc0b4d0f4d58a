"""Attention through `jax.nn.dot_product_attention`: T5's unscaled logits (scale=1.0), the
relative-position bias as `bias` and the boolean mask as `mask`.

On an NVIDIA GPU it asks for cuDNN's fused flash attention where cuDNN's constraints hold (bf16 or
fp16 inputs, head_dim a multiple of 8 up to 128, even lengths when a bias is differentiated);
elsewhere it takes the function's XLA implementation. Attention dropout is not part of that
function, so a training step with attention dropout takes the reference path (`ops.xla`) for that
call. Dense products are not this backend's business (see `ops.xla.dense`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from doa_jax.ops import xla

Array = jax.Array


def _as_4d(x: Array | None) -> Array | None:
    if x is None:
        return None
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def cudnn_eligible(q: Array, k: Array, platform: str | None = None) -> bool:
    """Whether cuDNN flash attention takes these shapes and dtypes on `platform` (default: the
    default backend)."""
    platform = platform or jax.default_backend()
    d = q.shape[-1]
    lq, lk = q.shape[1], k.shape[1]
    return (platform == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0
            and d <= 128 and lq % 2 == 0 and lk % 2 == 0)


def _call(q, k, v, bias, mask, implementation):
    if implementation == 'cudnn':
        bias = None if bias is None else bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=_as_4d(bias), mask=_as_4d(mask), scale=1.0,
                                        implementation=implementation)


def attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None, dtype: Any,
              float32_logits: bool, dropout_rate: float, dropout_rng: Array | None) -> Array:
    if dropout_rate > 0 and dropout_rng is not None:
        return xla.attention(q, k, v, bias=bias, mask=mask, dtype=dtype,
                             float32_logits=float32_logits, dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    implementation = 'cudnn' if cudnn_eligible(q, k) else 'xla'
    # The XLA implementation computes float32 logits and softmax for any input dtype.
    return _call(q, k, v, bias, mask, implementation).astype(dtype)


def decode_attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None,
                     dtype: Any, float32_logits: bool) -> Array:
    # One query row per step: a matrix-vector product, where a fused kernel gains nothing.
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    return _call(q, k, v, bias, mask, 'xla').astype(dtype)
