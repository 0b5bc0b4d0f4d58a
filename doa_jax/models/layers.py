"""Building blocks of T5: RMS norm, dense kernels, attention with a KV cache, MLP, relative positions.

Every parameter carries logical axis names (t5x's names: embed, mlp, joined_kv, heads, vocab,
relpos_buckets); one rule table in `doa_jax.partitioning` maps them to mesh axes.
Parameters are float32; the matmuls run in the module's `dtype` (bf16 by default). Attention and
dense products go through `doa_jax.ops` (an `Ops` per model config), so the layers say what to
compute and the op layer picks how.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.ops import MASK_BIAS, PREPARED, Ops

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def _param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
           axes: Sequence[str | None]) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        jnp.float32)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias. Statistics in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
        return rms_norm(x, scale, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: Array, scale: Array, epsilon: float, dtype: Any) -> Array:
    """x / rms(x) * scale in float32, returned in `dtype`. The gradient is written out (below)
    rather than derived, so XLA:CPU fuses it row by row instead of materializing `scale`
    broadcast to the activation's shape for the forward and backward products."""
    return _rms_norm_fwd(x, scale, epsilon, dtype)[0]


def _rms_norm_fwd(x, scale, epsilon, dtype):
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + epsilon)
    return (xf * inv * scale).astype(dtype), (x, inv, scale)


def _rms_norm_bwd(epsilon, dtype, res, g):
    x, inv, scale = res
    g = g.astype(jnp.float32)
    y = x.astype(jnp.float32) * inv
    d_scale = jnp.sum(g * y, axis=tuple(range(g.ndim - 1)))
    gs = g * scale
    dx = inv * (gs - y * jnp.mean(gs * y, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class Dense(nn.Module):
    """A bias-free 2-D kernel, stored (in_features, features) as t5x stores it. The product runs
    on `ops`; a decoder may supply the kernel laid out for it in the 'prepared' collection."""

    features: int
    kernel_axes: tuple[str, str]
    dtype: Any = jnp.bfloat16
    kernel_init: Initializer = default_kernel_init
    ops: Ops = Ops()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                        self.kernel_axes)
        return self.ops.dense(x, kernel, dtype=self.dtype,
                              prepared=self.get_variable(PREPARED, 'kernel'))


class Embed(nn.Module):
    """Token embedding; `attend` gives logits against the same table (tied LM head)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.bfloat16
    ops: Ops = Ops()

    def setup(self):
        self.embedding = _param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                                (self.num_embeddings, self.features), ('vocab', 'embed'))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return self.ops.dense(x, self.embedding.T, dtype=self.dtype,
                              prepared=self.get_variable(PREPARED, 'embedding'))


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """Maps key_pos - query_pos to T5's log-spaced buckets (exact near 0, logarithmic beyond)."""
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    val_if_large = max_exact + (
            jnp.log(n_safe / max_exact) / np.log(max_distance / max_exact)
            * (num_buckets - max_exact)).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """One (heads x buckets) table per stack, shared by all its layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """The additive bias for absolute positions: (1, heads, q, k) for positions shared by
        every row ((q,) and (k,)), (batch, heads, q, k) for per-row positions ((batch, q) and
        (batch, k))."""
        table = _param(self, 'rel_embedding',
                       nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                       (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
        rel = key_positions[..., None, :] - query_positions[..., :, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        # (heads, [batch,] q, k): a gather, cheaper than a one-hot matmul for these sizes.
        bias = jnp.take(table, buckets, axis=1)
        bias = bias[None] if rel.ndim == 2 else jnp.moveaxis(bias, 0, 1)
        return bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d) on the logits (the query initializer carries it).

    `bias` is the additive relative-position bias, `mask` the boolean attention mask (True
    attends); both broadcast to (batch, heads, q_len, k_len). Self-attention in decode mode keeps
    a KV cache of length `max_decode_length`, written one position per step with
    `dynamic_update_slice`. Cross-attention in decode mode projects the encoder outputs once, on
    the first step, and reads them from the cache afterwards. Caches are (batch, length, heads,
    head_dim), the layout the projections write.
    """

    num_heads: int
    head_dim: int
    dtype: Any = jnp.bfloat16
    dropout_rate: float = 0.0
    float32_logits: bool = True
    deterministic: bool = True
    decode: bool = False
    is_cross: bool = False
    ops: Ops = Ops()

    @nn.compact
    def __call__(self, x: Array, kv: Array | None, bias: Array | None, mask: Array | None,
                 decode_position: Array | None = None,
                 max_decode_length: int | None = None) -> Array:
        inner = self.num_heads * self.head_dim
        depth_scaling = np.sqrt(self.head_dim)
        query_init = lambda *a: default_kernel_init_normal(*a) / depth_scaling
        dense = functools.partial(Dense, dtype=self.dtype, ops=self.ops)
        q_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=query_init, name='query')
        k_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=default_kernel_init_normal,
                       name='key')
        v_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=default_kernel_init_normal,
                       name='value')
        o_proj = dense(x.shape[-1], ('joined_kv', 'embed'), kernel_init=default_kernel_init_normal,
                       name='out')
        heads = lambda t: constrain(t.astype(self.dtype).reshape(
                t.shape[0], -1, self.num_heads, self.head_dim), ('batch', 'length', 'heads', 'kv'))

        b, lq = x.shape[:2]
        q = heads(q_proj(x))
        if self.decode:
            ck, cv = self._decode_cache(heads, k_proj, v_proj, x, kv, decode_position,
                                        max_decode_length)
            out = self.ops.decode_attention(q, ck.value, cv.value, bias=bias, mask=mask,
                                            dtype=self.dtype, float32_logits=self.float32_logits)
        else:
            dropout = self.dropout_rate > 0 and not self.deterministic
            out = self.ops.attention(q, heads(k_proj(kv)), heads(v_proj(kv)), bias=bias,
                                     mask=mask, dtype=self.dtype,
                                     float32_logits=self.float32_logits,
                                     dropout_rate=self.dropout_rate,
                                     dropout_rng=self.make_rng('dropout') if dropout else None)
        return o_proj(out.astype(self.dtype).reshape(b, lq, inner))

    def _decode_cache(self, layout, k_proj, v_proj, x, kv, decode_position, max_decode_length):
        """The decode caches: cross-attention projects the encoder outputs once (on the first
        step); self-attention writes this step's key and value at `decode_position`."""
        if self.is_cross:
            # Project encoder outputs only when the cache does not hold them yet (first step).
            ck = self.variable('cache', 'cached_key', lambda: layout(k_proj(_require(kv))))
            cv = self.variable('cache', 'cached_value', lambda: layout(v_proj(_require(kv))))
            return ck, cv
        if max_decode_length is None or decode_position is None:
            raise ValueError('decode=True self-attention needs max_decode_length and '
                             'decode_position.')
        if x.shape[1] != 1:
            raise ValueError(f'Cached decoding feeds one token per step, got length {x.shape[1]}.')
        shape = (x.shape[0], max_decode_length, self.num_heads, self.head_dim)
        ck = self.variable('cache', 'cached_key', jnp.zeros, shape, self.dtype)
        cv = self.variable('cache', 'cached_value', jnp.zeros, shape, self.dtype)
        at = (0, decode_position, 0, 0)
        ck.value = jax.lax.dynamic_update_slice(ck.value, layout(k_proj(x)), at)
        cv.value = jax.lax.dynamic_update_slice(cv.value, layout(v_proj(x)), at)
        return ck, cv


default_kernel_init_normal = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')


def _require(kv: Array | None) -> Array:
    if kv is None:
        raise ValueError('The first decode step must be given the encoder outputs so that '
                         'cross-attention keys/values can be cached.')
    return kv


_ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
    'linear': lambda x: x,
    'silu': jax.nn.silu,
}


class MlpBlock(nn.Module):
    """T5 feed-forward: wi_0/wi_1 gated (v1.1) or a single `wi` (original T5), then `wo`."""

    mlp_dim: int
    activations: Sequence[str] = ('gelu', 'linear')
    dtype: Any = jnp.bfloat16
    dropout_rate: float = 0.0
    deterministic: bool = True
    ops: Ops = Ops()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for act in self.activations:
            if act not in _ACTIVATIONS:
                raise ValueError(f'Unknown MLP activation {act!r}; known: {sorted(_ACTIVATIONS)}.')
        hidden = None
        for i, act in enumerate(self.activations):
            name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
            h = Dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, ops=self.ops,
                      name=name)(x)
            # Activations and the gate product in float32, rounded once to the compute dtype:
            # XLA:CPU evaluates a bf16 tanh-GELU op by op through converts (3x slower than this
            # on a 4096x1024 block), and one rounding is the more precise result.
            h = _ACTIVATIONS[act](h.astype(jnp.float32))
            hidden = h if hidden is None else hidden * h
        hidden = constrain(hidden.astype(self.dtype), ('batch', 'length', 'mlp'))
        if self.dropout_rate > 0 and not self.deterministic:
            hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=False)
        return Dense(x.shape[-1], ('mlp', 'embed'), dtype=self.dtype, ops=self.ops,
                     name='wo')(hidden)
