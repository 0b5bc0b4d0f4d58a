"""AMX bf16 kernels (doa_jax.kernels.amx): products, gradients, packed weights, the model on them,
and the trace-time choice between them and XLA's dot."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding
from doa_jax.kernels import amx
from doa_jax.models import get_config
from doa_jax.models.layers import PACKED_ATTEND, PACKED_KERNEL, pack_for_decode
from doa_jax.models.t5 import T5

AVAILABLE, WHY = amx.available()
needs_amx = pytest.mark.skipif(not AVAILABLE, reason=f'AMX kernels unavailable here: {WHY}')

# Odd sizes on purpose: every dimension needs padding to the kernel's multiples of 32.
SHAPES = [(33, 70, 45), (5, 31, 17), (64, 96, 32), (40, 1100, 50)]   # the last one sums K in chunks


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f32(x):
    return np.asarray(x, np.float32)


@needs_amx
@pytest.mark.parametrize('m,k,n', SHAPES)
@pytest.mark.parametrize('trans_a,trans_b', [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_products_equal_float32_reference(m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 1000 + k)
    a = _bf16(rng, (k, m) if trans_a else (m, k))
    b = _bf16(rng, (n, k) if trans_b else (k, n))
    got = jax.jit(lambda a, b: amx._call(a, b, (m, n), trans_a=trans_a, trans_b=trans_b,
                                         out_dtype=jnp.float32))(a, b)
    ref = (_f32(a).T if trans_a else _f32(a)) @ (_f32(b).T if trans_b else _f32(b))
    # bf16 x bf16 products are exact in float32; only the summation order differs.
    np.testing.assert_allclose(_f32(got), ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@needs_amx
def test_bf16_output_is_the_rounded_float32_sum():
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, (33, 64)), _bf16(rng, (64, 40))
    got = jax.jit(lambda a, b: amx._call(a, b, (33, 40)))(a, b)
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(jnp.asarray(_f32(a) @ _f32(b)).astype(jnp.bfloat16), np.float32)
    # At most one bf16 rounding step apart (the float32 sums differ in their last bits).
    np.testing.assert_allclose(_f32(got), ref, rtol=2 ** -7)


@needs_amx
@pytest.mark.parametrize('m,k,n', SHAPES[:3])
def test_gradients_match_xla_dot(m, k, n):
    rng = np.random.default_rng(1)
    x = _bf16(rng, (2, m, k))   # a leading batch dimension, flattened by matmul
    w = _bf16(rng, (k, n))
    probe = _bf16(rng, (2, m, n))

    def loss(mm):
        return lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32) * probe.astype(jnp.float32))

    dx, dw = jax.jit(jax.grad(loss(amx.matmul), (0, 1)))(x, w)
    rx, rw = jax.jit(jax.grad(loss(lambda x, w: jnp.dot(x, w)), (0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    for got, ref in ((dx, rx), (dw, rw)):
        np.testing.assert_allclose(_f32(got), _f32(ref), rtol=2e-2,
                                   atol=2e-2 * np.abs(_f32(ref)).max())


@needs_amx
@pytest.mark.parametrize('transpose', [False, True])
def test_packed_weights_give_the_same_bits(transpose):
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, (3, 7, 70)), _bf16(rng, (70, 45))
    packed = jax.jit(lambda w: amx.pack(w.T if transpose else w, transpose=transpose))(w)
    assert packed.shape == (96 * 64,) and packed.dtype == jnp.bfloat16
    got = jax.jit(lambda x, p: amx.matmul_packed(x, p, 45))(x, packed)
    np.testing.assert_array_equal(_f32(got), _f32(jax.jit(amx.matmul)(x, w)))


@needs_amx
def test_a_packed_weight_of_the_wrong_size_is_refused():
    rng = np.random.default_rng(3)
    x, w = _bf16(rng, (4, 64)), _bf16(rng, (64, 64))
    packed = amx.pack(w)
    with pytest.raises(Exception, match='packed b does not match'):
        jax.block_until_ready(amx.matmul_packed(x, packed, 96))


def test_choice_between_amx_and_xla():
    assert not amx.use_amx('xla', jnp.bfloat16)
    assert not amx.use_amx('auto', jnp.float32)
    assert amx.use_amx('auto', jnp.bfloat16) == (AVAILABLE and jax.device_count() == 1)
    with pytest.raises(ValueError, match='compute dtype is float32'):
        amx.use_amx('amx', jnp.float32)
    with pytest.raises(ValueError, match="Unknown cpu_matmul 'mkl'"):
        amx.use_amx('mkl', jnp.bfloat16)


def _model_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, cfg.vocab_size, (3, 19)).astype(np.int32)
    enc[1, 11:] = 0
    dec = rng.integers(2, cfg.vocab_size, (3, 7)).astype(np.int32)
    return enc, dec


@needs_amx
@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_model_on_amx_matches_xla_forward_and_gradients(name):
    amx_cfg = get_config(name, dtype=jnp.bfloat16, cpu_matmul='amx')
    xla_cfg = amx_cfg.replace(cpu_matmul='xla')
    enc, dec = _model_inputs(amx_cfg)
    params = nn.unbox(T5(xla_cfg).init(jax.random.PRNGKey(0), enc, dec)['params'])

    def loss(cfg):
        def f(p):
            logits = T5(cfg).apply({'params': p}, enc, dec, dec)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))
        return jax.jit(jax.value_and_grad(f))

    (la, ga), (lx, gx) = loss(amx_cfg)(params), loss(xla_cfg)(params)
    np.testing.assert_allclose(float(la), float(lx), rtol=2e-3)
    for a, x in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gx)):
        np.testing.assert_allclose(_f32(a), _f32(x), atol=0.05 * np.abs(_f32(x)).max() + 1e-6)


@needs_amx
@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_decoding_on_packed_weights_agrees_with_teacher_forcing(name):
    cfg = get_config(name, dtype=jnp.bfloat16, cpu_matmul='amx')
    enc, dec = _model_inputs(cfg, seed=1)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(1), enc, dec)['params'])
    prepared, _ = decoding.prepare_params(params, cfg)
    packed = pack_for_decode(prepared, cfg.logits_via_embedding)
    layer = packed['decoder']['layers_0']['mlp']['wo']
    assert set(layer) == {'kernel', PACKED_KERNEL}
    assert (PACKED_ATTEND in packed['token_embedder']) == cfg.logits_via_embedding
    tokens, scores = jax.jit(lambda p: decoding.generate(p, cfg, enc, max_decode_length=6))(params)
    tokens = np.asarray(tokens)
    # The score of each decoded sequence, recomputed by a teacher-forced pass on the same kernels.
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    logits = T5(cfg).apply({'params': params}, enc, dec_in)
    logp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))[..., 0]
    alive = np.cumsum(tokens == 1, axis=1) - (tokens == 1) == 0
    np.testing.assert_allclose(np.asarray(scores), (logp * alive).sum(1),
                               rtol=2e-2, atol=2e-2)


@needs_amx
def test_every_dense_kernel_runs_on_amx_and_none_under_xla():
    cfg = get_config('t5_1_1_tiny', dtype=jnp.bfloat16, cpu_matmul='amx')
    enc, dec = _model_inputs(cfg)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), enc, dec)['params'])
    kernels = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if p[-1].key == 'kernel']

    def custom_calls(c):
        text = str(jax.make_jaxpr(lambda p: T5(c).apply({'params': p}, enc, dec, dec))(params))
        return text.count('target_name=doa_amx_matmul')

    assert custom_calls(cfg) == len(kernels)
    assert custom_calls(cfg.replace(cpu_matmul='xla')) == 0
