"""doa_jax's CPU kernels (`doa_jax.kernels.amx`) behind the op interface.

They serve a single CPU device where the kernel library builds and loads (x86-64 with AVX-512 and
AVX512-BF16; AMX tiles where the processor has them):
- attention: one kernel call per pass over every batch row and head, float32 logits and softmax,
  bf16 or float32 inputs; a model with bf16 logits keeps the reference;
- dense: bf16 products on the best instruction path; float32 products take XLA's dot, except decode
  steps over weights laid out once as float32 strips (`prepare_weights`), for up to
  F32_KERNEL_MAX_ROWS rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from doa_jax.kernels import amx
from doa_jax.ops import xla

Array = jax.Array

# Products with more rows than this skip the float32 decode kernel for XLA's dot (an encoder pass,
# the first step's cross-attention projections).
F32_KERNEL_MAX_ROWS = 512
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def serves(backend: str, devices: int) -> tuple[bool, str]:
    """(True, '') where the kernels run for a process on `backend` with `devices` devices, else
    (False, why not)."""
    if backend != 'cpu':
        return False, f'the backend is {backend}, not cpu'
    if devices != 1:
        return False, f'there are {devices} devices (the kernels are single-device)'
    return amx.available()


def attention_supported(dtype: Any, float32_logits: bool) -> bool:
    return bool(float32_logits) and jnp.dtype(dtype) in _DTYPES


def _keep_scales(dropout_rate, dropout_rng, q, k):
    if dropout_rate > 0 and dropout_rng is not None:
        return xla.dropout_keep(dropout_rng, dropout_rate,
                                (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return None


def attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None, dtype: Any,
              float32_logits: bool, dropout_rate: float, dropout_rng: Array | None) -> Array:
    keep = _keep_scales(dropout_rate, dropout_rng, q, k)
    out = amx.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                        xla.combined_bias(bias, mask), keep=keep)
    return out.astype(dtype)


def decode_attention(q: Array, k: Array, v: Array, *, bias: Array | None, mask: Array | None,
                     dtype: Any, float32_logits: bool) -> Array:
    b, _, h, _ = q.shape
    full = xla.combined_bias(bias, mask)
    full = jnp.zeros((), jnp.float32) if full is None else full
    full = jnp.broadcast_to(full, (b, h, 1, k.shape[1]))
    out = amx.decode_attention(q[:, 0], k.astype(dtype), v.astype(dtype), full[:, :, 0, :])
    return out.astype(dtype)[:, None]


def dense(x: Array, kernel: Array, *, dtype: Any, prepared: Array | None = None) -> Array:
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    if prepared is not None:
        if prepared.dtype == jnp.float32:
            if x.size // x.shape[-1] <= F32_KERNEL_MAX_ROWS:
                return amx.matmul_f32_packed(x, prepared, kernel.shape[1])
        elif bf16:
            return amx.matmul_packed(x, prepared, kernel.shape[1], amx.best_isa())
    if bf16:
        return amx.matmul(x, kernel, amx.best_isa())
    return xla.dense(x, kernel, dtype=dtype)


def prepare_weights(params: Any, *, dtype: Any, tied_head: bool) -> dict:
    """Every 2-D `kernel` (and a tied head's embedding, transposed) in the kernels' layout: bf16
    tiles for bf16 compute, float32 strips for float32; empty for other dtypes."""
    dtype = jnp.dtype(dtype)
    if dtype not in _DTYPES:
        return {}
    pack = amx.pack_f32 if dtype == jnp.float32 else amx.pack

    def visit(tree):
        out = {}
        for name, value in tree.items():
            if isinstance(value, Mapping):
                sub = visit(value)
                if sub:
                    out[name] = sub
            elif name == 'kernel' and getattr(value, 'ndim', 0) == 2:
                out[name] = pack(value)
            elif name == 'embedding' and tied_head and getattr(value, 'ndim', 0) == 2:
                out[name] = pack(value, transpose=True)
        return out

    return jax.jit(visit)(dict(params))
