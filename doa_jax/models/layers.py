"""Building blocks of T5: RMS norm, dense kernels, attention with a KV cache, MLP, relative positions.

Every parameter carries logical axis names (t5x's names: embed, mlp, joined_kv, heads, vocab,
relpos_buckets); one rule table in `doa_jax.partitioning` maps them to mesh axes.
Parameters are float32; the matmuls run in the module's `dtype` (bf16 by default).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.kernels import amx

Array = jax.Array
Initializer = Callable[..., Array]

# Where `pack_for_decode` puts a kernel laid out for the CPU kernels (a sibling of `kernel`), and
# the tied LM head's packed transpose (a sibling of `embedding`).
PACKED_KERNEL = 'kernel_amx'
PACKED_ATTEND = 'attend_amx'

# Products with more rows than this skip the float32 decode kernel for XLA's dot.
F32_KERNEL_MAX_ROWS = 512

# Large negative additive bias for masked attention positions (as t5x does).
MASK_BIAS = -1e10

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


def _kernel_product(module: nn.Module, x: Array, w: Array, packed_name: str) -> Array | None:
    """x . w on doa_jax's CPU kernels, or None where XLA's dot should run: a layout that
    `pack_for_decode` stored beside w (bf16 tiles, or float32 strips in a float32 run) is read as
    it is; otherwise the bf16 kernels lay w out in the call where `amx.kernel_isa` picks them."""
    isa = amx.kernel_isa(module.matmul, module.dtype)
    if module.has_variable('params', packed_name):
        packed = module.get_variable('params', packed_name)
        if packed.dtype == jnp.float32:
            # The strips serve decode steps (a few rows); XLA's dot is faster on many rows
            # (an encoder pass, the first step's cross-attention projection).
            if x.size // x.shape[-1] > F32_KERNEL_MAX_ROWS:
                return None
            return amx.matmul_f32_packed(x, packed, w.shape[1])
        if isa is None:
            raise ValueError(f'{module.name}: a bf16 kernel layout ({packed_name}) needs the CPU '
                             f'bf16 kernels, which cpu_matmul={module.matmul!r} does not run here.')
        return amx.matmul_packed(x, packed, w.shape[1], isa)
    return amx.matmul(x, w, isa) if isa else None


class Dense(nn.Module):
    """A bias-free 2-D kernel, stored (in_features, features) as t5x stores it.

    `matmul` picks the CPU implementation (see `doa_jax.kernels.amx.kernel_isa`): with the CPU
    bf16 kernels, a kernel that `pack_for_decode` laid out beforehand is used as it is.
    """

    features: int
    kernel_axes: tuple[str, str]
    dtype: Any = jnp.bfloat16
    kernel_init: Initializer = default_kernel_init
    matmul: str = 'auto'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                        self.kernel_axes)
        y = _kernel_product(self, x, kernel, PACKED_KERNEL)
        if y is not None:
            return y
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
    """Token embedding; `attend` gives logits against the same table (tied LM head)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.bfloat16
    matmul: str = 'auto'

    def setup(self):
        self.embedding = _param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                                (self.num_embeddings, self.features), ('vocab', 'embed'))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        y = _kernel_product(self, x, self.embedding.T, PACKED_ATTEND)
        if y is not None:
            return y
        return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))


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
        """Returns a (1, heads, q, k) additive bias for the given absolute positions."""
        table = _param(self, 'rel_embedding',
                       nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                       (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        # (heads, q, k): a gather, cheaper than a one-hot matmul for these sizes.
        bias = jnp.take(table, buckets, axis=1)
        return bias[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d) on the logits (the query initializer carries it).

    Self-attention in decode mode keeps a KV cache of length `max_decode_length`, written one
    position per step with `dynamic_update_slice`. Cross-attention in decode mode projects the
    encoder outputs once, on the first step, and reads them from the cache afterwards.
    """

    num_heads: int
    head_dim: int
    dtype: Any = jnp.bfloat16
    dropout_rate: float = 0.0
    float32_logits: bool = True
    deterministic: bool = True
    decode: bool = False
    is_cross: bool = False
    matmul: str = 'auto'

    @nn.compact
    def __call__(self, x: Array, kv: Array | None, bias: Array | None,
                 decode_position: Array | None = None,
                 max_decode_length: int | None = None) -> Array:
        inner = self.num_heads * self.head_dim
        depth_scaling = np.sqrt(self.head_dim)
        query_init = lambda *a: default_kernel_init_normal(*a) / depth_scaling
        dense = functools.partial(Dense, dtype=self.dtype, matmul=self.matmul)
        q_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=query_init, name='query')
        k_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=default_kernel_init_normal,
                       name='key')
        v_proj = dense(inner, ('embed', 'joined_kv'), kernel_init=default_kernel_init_normal,
                       name='value')
        o_proj = dense(x.shape[-1], ('joined_kv', 'embed'), kernel_init=default_kernel_init_normal,
                       name='out')

        b, lq = x.shape[:2]
        q = constrain(q_proj(x).reshape(b, lq, self.num_heads, self.head_dim),
                      ('batch', 'length', 'heads', 'kv'))
        if self.decode and amx.use_attention_kernels(self.matmul, self.dtype,
                                                    self.float32_logits):
            # On a CPU where doa_jax's kernels run, the caches stay in the compute dtype in the
            # (batch, length, heads, head_dim) layout the projections write (no transpose), and
            # one kernel call per step does scores, softmax and the weighted sum over them.
            if lq != 1:
                raise ValueError(f'Cached decoding feeds one token per step, got length {lq}.')
            as_cache = lambda t: t.astype(self.dtype).reshape(b, -1, self.num_heads,
                                                              self.head_dim)
            ck, cv = self._decode_cache(as_cache, k_proj, v_proj, x, kv, decode_position,
                                        max_decode_length,
                                        (b, max_decode_length, self.num_heads, self.head_dim),
                                        (0, decode_position, 0, 0))
            k, v = ck.value, cv.value
            bias = (jnp.zeros((), jnp.float32) if bias is None else bias.astype(jnp.float32))
            bias = jnp.broadcast_to(bias, (b, self.num_heads, 1, k.shape[1]))
            out = amx.decode_attention(q[:, 0], k, v, bias[:, :, 0, :])
            return o_proj(out.astype(self.dtype).reshape(b, lq, inner))
        dropout = self.dropout_rate > 0 and not self.deterministic
        if not self.decode and amx.use_attention_kernels(self.matmul, self.dtype,
                                                         self.float32_logits):
            # On a CPU where doa_jax's kernels run: one call per pass over every batch row and
            # head, reading q, k and v in the layout the projections write (no transposes), with
            # float32 logits and softmax; the backward pass recomputes the weights.
            lk = kv.shape[1]
            k = k_proj(kv).reshape(b, lk, self.num_heads, self.head_dim)
            v = v_proj(kv).reshape(b, lk, self.num_heads, self.head_dim)
            keep = None
            if dropout:
                # The same draw as the dropout of the path below (same module, rng and shape).
                keep = nn.Dropout(self.dropout_rate)(
                        jnp.ones((b, self.num_heads, lq, lk), jnp.float32), deterministic=False)
            out = amx.attention(q, k, v, bias, keep=keep)   # the projections' dtype
            return o_proj(out.reshape(b, lq, inner))
        if self.decode:
            # Decode caches are head-major (batch, heads, length, head_dim): the layout the
            # per-step attention matmuls read, so no step transposes a cache.
            heads_major = lambda t: constrain(
                    t.astype(self.dtype).reshape(b, -1, self.num_heads, self.head_dim)
                    .transpose(0, 2, 1, 3), ('batch', 'heads', 'length', 'kv'))
            ck, cv = self._decode_cache(heads_major, k_proj, v_proj, x, kv, decode_position,
                                        max_decode_length,
                                        (b, self.num_heads, max_decode_length, self.head_dim),
                                        (0, 0, decode_position, 0))
            k, v = ck.value, cv.value
        else:
            lk = kv.shape[1]
            k = constrain(k_proj(kv).reshape(b, lk, self.num_heads, self.head_dim)
                          .transpose(0, 2, 1, 3), ('batch', 'heads', 'length', 'kv'))
            v = constrain(v_proj(kv).reshape(b, lk, self.num_heads, self.head_dim)
                          .transpose(0, 2, 1, 3), ('batch', 'heads', 'length', 'kv'))
        # The attention products run head-major (batch, heads, length, head_dim) on both sides:
        # with the heads axis between length and head_dim XLA:CPU emits a much slower batched
        # dot (4.5x for a float32 encoder layer of t5_1_1_small at batch 32).
        q = constrain(q.transpose(0, 2, 1, 3), ('batch', 'heads', 'length', 'kv'))
        if self.float32_logits:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, k)
        if bias is not None:
            logits = logits + bias.astype(logits.dtype)
        weights = softmax(logits).astype(self.dtype)
        if dropout:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        out = jnp.einsum('bhqk,bhkd->bhqd', weights, v.astype(self.dtype))
        out = out.astype(self.dtype).transpose(0, 2, 1, 3).reshape(b, lq, inner)
        return o_proj(out)

    def _decode_cache(self, layout, k_proj, v_proj, x, kv, decode_position, max_decode_length,
                      self_shape, self_at):
        """The decode caches, in `layout`: cross-attention projects the encoder outputs once (on
        the first step); self-attention writes this step's key and value at `self_at`."""
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
        ck = self.variable('cache', 'cached_key', jnp.zeros, self_shape, self.dtype)
        cv = self.variable('cache', 'cached_value', jnp.zeros, self_shape, self.dtype)
        ck.value = jax.lax.dynamic_update_slice(ck.value, layout(k_proj(x)), self_at)
        cv.value = jax.lax.dynamic_update_slice(cv.value, layout(v_proj(x)), self_at)
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
    matmul: str = 'auto'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for act in self.activations:
            if act not in _ACTIVATIONS:
                raise ValueError(f'Unknown MLP activation {act!r}; known: {sorted(_ACTIVATIONS)}.')
        hidden = None
        for i, act in enumerate(self.activations):
            name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
            h = Dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, matmul=self.matmul,
                      name=name)(x)
            # Activations and the gate product in float32, rounded once to the compute dtype:
            # XLA:CPU evaluates a bf16 tanh-GELU op by op through converts (3x slower than this
            # on a 4096x1024 block), and one rounding is the more precise result.
            h = _ACTIVATIONS[act](h.astype(jnp.float32))
            hidden = h if hidden is None else hidden * h
        hidden = constrain(hidden.astype(self.dtype), ('batch', 'length', 'mlp'))
        if self.dropout_rate > 0 and not self.deterministic:
            hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=False)
        return Dense(x.shape[-1], ('mlp', 'embed'), dtype=self.dtype, matmul=self.matmul,
                     name='wo')(hidden)


def uses_decode_layouts(matmul: str, dtype: Any) -> bool:
    """Whether decoding with this `cpu_matmul` and compute dtype reads weights that
    `pack_for_decode` laid out: bf16 tiles for the bf16 kernels, float32 strips in a float32 run."""
    return amx.use_kernels(matmul, dtype) or amx.use_f32_decode_kernels(matmul, dtype)


def pack_for_decode(params: Any, tied_head: bool, dtype: Any = jnp.bfloat16) -> Any:
    """Adds, beside every 2-D `kernel` (and, for a `tied_head`, the embedding's transpose), its
    layout for the CPU kernels: bf16 tiles (`amx.pack`), or float32 strips (`amx.pack_f32`) when
    `dtype` is float32. A decode loop then reads each weight as the kernel wants it instead of
    laying it out every step. Use it only where `uses_decode_layouts` holds; idempotent."""
    f32 = jnp.dtype(dtype) == jnp.float32
    pack = amx.pack_f32 if f32 else amx.pack

    def visit(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: visit(v) for k, v in tree.items()}
        kernel = out.get('kernel')
        if kernel is not None and getattr(kernel, 'ndim', 0) == 2 and PACKED_KERNEL not in out:
            out[PACKED_KERNEL] = pack(kernel)
        embedding = out.get('embedding') if tied_head else None
        if embedding is not None and getattr(embedding, 'ndim', 0) == 2 and PACKED_ATTEND not in out:
            out[PACKED_ATTEND] = pack(embedding, transpose=True)
        return out
    return visit(params)
