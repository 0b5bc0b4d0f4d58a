"""The model's products behind one interface: sequence attention, cached decode attention, dense.

The T5 modules (`doa_jax.models`) call `Ops.attention`, `Ops.decode_attention` and `Ops.dense` and
never ask which platform they run on. Which implementation serves each op is chosen once per
model config (`T5Config.attention_impl`, `T5Config.matmul_impl`) by `for_config`:

attention_impl
  'xla'                    the reference: einsums, float32 softmax, everywhere.
  'dot_product_attention'  `jax.nn.dot_product_attention` with scale 1.0 and the relative-position
                           bias and mask; cuDNN flash attention on NVIDIA GPUs where its shape and
                           dtype constraints hold, its XLA implementation elsewhere.
  'cpu_kernels'            doa_jax's CPU kernels (`doa_jax.kernels.amx`), single CPU device.
  'auto'                   cpu_kernels where they run, dot_product_attention on GPU, else xla.
matmul_impl
  'xla'                    `jnp.dot` in the compute dtype.
  'cpu_kernels'            the CPU kernels' bf16 products (and float32 decode products over weights
                           laid out once by `prepare_weights`).
  'auto'                   cpu_kernels where they run, else xla.

Every op takes q, k, v and KV caches in one layout, (batch, length, heads, head_dim): the layout
the projections write and `jax.nn.dot_product_attention` reads. Attention bias is additive
float32 broadcastable to (batch, heads, q_len, k_len); masks are boolean (True attends) of the
same rank. Weights that a backend wants laid out beforehand (`prepare_weights`) live in their own
flax collection ('prepared'), owned by the decoder, never in the parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from doa_jax.ops import cpu_kernels, dot_product_attention, xla
from doa_jax.ops.xla import MASK_BIAS, dropout_keep

Array = jax.Array

ATTENTION_IMPLS = ('auto', 'xla', 'dot_product_attention', 'cpu_kernels')
MATMUL_IMPLS = ('auto', 'xla', 'cpu_kernels')
# The flax collection that holds weights laid out for a backend (see `prepare_weights`).
PREPARED = 'prepared'

__all__ = ['ATTENTION_IMPLS', 'MATMUL_IMPLS', 'MASK_BIAS', 'PREPARED', 'Ops', 'dropout_keep',
           'for_config', 'prepare_weights']

_ATTENTION = {'xla': xla, 'dot_product_attention': dot_product_attention,
              'cpu_kernels': cpu_kernels}
_MATMUL = {'xla': xla, 'cpu_kernels': cpu_kernels}


@dataclasses.dataclass(frozen=True)
class Ops:
    """Resolved implementations (no 'auto'); the default is the XLA reference."""

    attention_impl: str = 'xla'
    matmul_impl: str = 'xla'

    def __post_init__(self):
        if self.attention_impl not in _ATTENTION:
            raise ValueError(f'Unknown attention_impl {self.attention_impl!r}; choose one of '
                             f'{ATTENTION_IMPLS}.')
        if self.matmul_impl not in _MATMUL:
            raise ValueError(f'Unknown matmul_impl {self.matmul_impl!r}; choose one of '
                             f'{MATMUL_IMPLS}.')

    def attention(self, q: Array, k: Array, v: Array, *, bias: Array | None = None,
                  mask: Array | None = None, dtype: Any = jnp.bfloat16,
                  float32_logits: bool = True, dropout_rate: float = 0.0,
                  dropout_rng: Array | None = None) -> Array:
        """softmax(q k^T + bias, masked) v per batch row and head; q [B, Lq, H, D], k and v
        [B, Lk, H, D]; no 1/sqrt(D) (T5's query initializer carries it). Dropout on the weights
        when `dropout_rng` is given and `dropout_rate` > 0. Returns [B, Lq, H, D] in `dtype`."""
        return _ATTENTION[self.attention_impl].attention(
                q, k, v, bias=bias, mask=mask, dtype=dtype, float32_logits=float32_logits,
                dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    def decode_attention(self, q: Array, k: Array, v: Array, *, bias: Array | None = None,
                         mask: Array | None = None, dtype: Any = jnp.bfloat16,
                         float32_logits: bool = True) -> Array:
        """One decode step: q [B, 1, H, D] against caches k, v [B, L, H, D]. Not differentiated."""
        return _ATTENTION[self.attention_impl].decode_attention(
                q, k, v, bias=bias, mask=mask, dtype=dtype, float32_logits=float32_logits)

    def dense(self, x: Array, kernel: Array, *, dtype: Any = jnp.bfloat16,
              prepared: Array | None = None) -> Array:
        """x[..., K] . kernel[K, N] in `dtype`; `prepared` is the kernel as `prepare_weights`
        laid it out for this backend, when the caller has it."""
        return _MATMUL[self.matmul_impl].dense(x, kernel, dtype=dtype, prepared=prepared)


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'Unknown {name} {value!r}; choose one of {choices}.')


@functools.cache
def _resolve(attention_impl: str, matmul_impl: str, dtype: Any, float32_logits: bool,
             backend: str, devices: int) -> Ops:
    _check('attention_impl', attention_impl, ATTENTION_IMPLS)
    _check('matmul_impl', matmul_impl, MATMUL_IMPLS)
    kernels, why = cpu_kernels.serves(backend, devices)
    attention_ok = kernels and cpu_kernels.attention_supported(dtype, float32_logits)
    if attention_impl == 'auto':
        attention_impl = ('cpu_kernels' if attention_ok else
                          'dot_product_attention' if backend == 'gpu' else 'xla')
    elif attention_impl == 'cpu_kernels' and not attention_ok:
        why = why or ('the kernels compute float32 logits over bf16 or float32 inputs, not '
                      f'{jnp.dtype(dtype).name} with float32_logits={float32_logits}')
        raise ValueError(f'attention_impl="cpu_kernels" cannot run here: {why}. Use "auto" or '
                         '"xla".')
    if matmul_impl == 'auto':
        matmul_impl = 'cpu_kernels' if kernels else 'xla'
    elif matmul_impl == 'cpu_kernels' and not kernels:
        raise ValueError(f'matmul_impl="cpu_kernels" cannot run here: {why}. Use "auto" or "xla".')
    return Ops(attention_impl, matmul_impl)


def for_config(config: Any) -> Ops:
    """The implementations a model config runs here ('auto' resolved for this process's default
    backend and device count). `config` needs attention_impl, matmul_impl, dtype and
    float32_attention_logits (a `T5Config`)."""
    return _resolve(config.attention_impl, config.matmul_impl, jnp.dtype(config.dtype),
                    bool(config.float32_attention_logits), jax.default_backend(),
                    jax.device_count())


def prepare_weights(params: Any, config: Any) -> dict:
    """The 'prepared' collection for decoding with `params` (unboxed, unscanned, as
    `decoding.prepare_params` gives them): every 2-D `kernel` (and, for a tied LM head, the
    embedding's transpose) laid out once as the config's matmul backend reads it in a decode
    loop, at the same tree paths as in `params`. Empty where the backend reads weights as they
    are (XLA)."""
    ops = for_config(config)
    return _MATMUL[ops.matmul_impl].prepare_weights(
            params, dtype=jnp.dtype(config.dtype), tied_head=config.logits_via_embedding)
