"""CPU kernels (doa_jax.kernels.amx), on each instruction path this CPU has (AMX tiles,
AVX512-BF16): products, gradients, packed weights, decode attention, and the model on them as the
`cpu_kernels` op backend against the `xla` reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding, ops
from doa_jax.kernels import amx
from doa_jax.models import get_config
from doa_jax.models.t5 import T5

AVAILABLE, WHY = amx.available()
needs_kernels = pytest.mark.skipif(not AVAILABLE, reason=f'CPU kernels unavailable here: {WHY}')
# Every instruction path, each skipped with its reason where this CPU cannot run it.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
            not amx.available(isa)[0], reason=f'{isa} kernels unavailable here: '
                                              f'{amx.available(isa)[1]}'))
        for isa in amx.ISAS]

CPU = dict(attention_impl='cpu_kernels', matmul_impl='cpu_kernels')
XLA = dict(attention_impl='xla', matmul_impl='xla')
# Odd sizes on purpose: every dimension needs padding to the kernel's multiples of 32.
SHAPES = [(33, 70, 45), (5, 31, 17), (64, 96, 32), (40, 1100, 50)]   # the last one sums K in chunks


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f32(x):
    return np.asarray(x, np.float32)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('m,k,n', SHAPES)
@pytest.mark.parametrize('trans_a,trans_b', [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_products_equal_float32_reference(m, k, n, trans_a, trans_b, isa):
    rng = np.random.default_rng(m * 1000 + k)
    a = _bf16(rng, (k, m) if trans_a else (m, k))
    b = _bf16(rng, (n, k) if trans_b else (k, n))
    got = jax.jit(lambda a, b: amx._call(a, b, (m, n), trans_a=trans_a, trans_b=trans_b,
                                         out_dtype=jnp.float32, isa=isa))(a, b)
    ref = (_f32(a).T if trans_a else _f32(a)) @ (_f32(b).T if trans_b else _f32(b))
    # bf16 x bf16 products are exact in float32; only the summation order differs.
    np.testing.assert_allclose(_f32(got), ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize('isa', ISAS)
def test_bf16_output_is_the_rounded_float32_sum(isa):
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, (33, 64)), _bf16(rng, (64, 40))
    got = jax.jit(lambda a, b: amx._call(a, b, (33, 40), isa=isa))(a, b)
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(jnp.asarray(_f32(a) @ _f32(b)).astype(jnp.bfloat16), np.float32)
    # At most one bf16 rounding step apart (the float32 sums differ in their last bits).
    np.testing.assert_allclose(_f32(got), ref, rtol=2 ** -7)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('m,k,n', SHAPES[:3])
def test_gradients_match_xla_dot(m, k, n, isa):
    rng = np.random.default_rng(1)
    x = _bf16(rng, (2, m, k))   # a leading batch dimension, flattened by matmul
    w = _bf16(rng, (k, n))
    probe = _bf16(rng, (2, m, n))

    def loss(mm):
        return lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32) * probe.astype(jnp.float32))

    dx, dw = jax.jit(jax.grad(loss(lambda x, w: amx.matmul(x, w, isa)), (0, 1)))(x, w)
    rx, rw = jax.jit(jax.grad(loss(lambda x, w: jnp.dot(x, w)), (0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    for got, ref in ((dx, rx), (dw, rw)):
        np.testing.assert_allclose(_f32(got), _f32(ref), rtol=2e-2,
                                   atol=2e-2 * np.abs(_f32(ref)).max())


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('m,k,n', SHAPES)
@pytest.mark.parametrize('trans_b', [False, True])
def test_a_float32_weight_is_rounded_as_xla_rounds_it(m, k, n, trans_b, isa):
    """A float32 b gives the bits of b converted to bf16 by XLA first (round to nearest even,
    halfway cases and a NaN included), on both layouts of b."""
    rng = np.random.default_rng(k)
    a = _bf16(rng, (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    flat = b.reshape(-1)
    flat[:4] = [1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 3.4e38]   # ties; rounds to inf
    b = jnp.asarray(flat.reshape(b.shape))
    run = jax.jit(lambda a, b: amx._call(a, b, (m, n), trans_b=trans_b, out_dtype=jnp.float32,
                                         isa=isa))
    np.testing.assert_array_equal(_f32(run(a, b)), _f32(run(a, b.astype(jnp.bfloat16))))
    with_nan = b.at[0, 0].set(jnp.nan)
    assert np.isnan(_f32(run(a, with_nan))).any()


@pytest.mark.parametrize('isa', ISAS)
def test_a_float32_weight_gets_a_float32_gradient(isa):
    rng = np.random.default_rng(5)
    x = _bf16(rng, (2, 33, 70))
    w = jnp.asarray(rng.standard_normal((70, 45)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((2, 33, 45)), jnp.float32)
    loss = lambda x, w: jnp.sum(amx.matmul(x, w, isa).astype(jnp.float32) * probe)
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    g = probe.astype(jnp.bfloat16).astype(jnp.float32).reshape(-1, 45)
    # The weight gradient is x^T . g summed in float32 and not rounded to bf16.
    np.testing.assert_allclose(_f32(dw), _f32(x).reshape(-1, 70).T @ _f32(g), rtol=1e-5,
                               atol=1e-4)
    ref_dx = _f32(g) @ _f32(w.astype(jnp.bfloat16)).T
    np.testing.assert_allclose(_f32(dx).reshape(-1, 70), ref_dx, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('transpose', [False, True])
def test_packed_weights_give_the_same_bits(transpose, isa):
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, (3, 7, 70)), _bf16(rng, (70, 45))
    packed = jax.jit(lambda w: amx.pack(w.T if transpose else w, transpose=transpose))(w)
    assert packed.shape == (96 * 64,) and packed.dtype == jnp.bfloat16
    got = jax.jit(lambda x, p: amx.matmul_packed(x, p, 45, isa))(x, packed)
    np.testing.assert_array_equal(_f32(got), _f32(jax.jit(lambda x, w: amx.matmul(x, w, isa))(x, w)))


@needs_kernels
def test_a_packed_weight_of_the_wrong_size_is_refused():
    rng = np.random.default_rng(3)
    x, w = _bf16(rng, (4, 64)), _bf16(rng, (64, 64))
    packed = amx.pack(w)
    with pytest.raises(Exception, match='packed b does not match'):
        jax.block_until_ready(amx.matmul_packed(x, packed, 96, amx.best_isa()))


@needs_kernels
def test_both_paths_agree_where_both_run():
    if not all(amx.available(isa)[0] for isa in amx.ISAS):
        pytest.skip('this CPU runs only one instruction path')
    rng = np.random.default_rng(4)
    a, b = _bf16(rng, (70, 300)), _bf16(rng, (300, 90))
    out = [jax.jit(lambda a, b: amx._call(a, b, (70, 90), out_dtype=jnp.float32, isa=isa))(a, b)
           for isa in amx.ISAS]
    np.testing.assert_allclose(_f32(out[0]), _f32(out[1]), rtol=1e-5, atol=1e-3)


def _attention_reference(q, k, v, bias):
    s = jnp.einsum('bhd,blhd->bhl', q, k.astype(jnp.float32)) + bias
    w = jax.nn.softmax(s, -1).astype(jnp.bfloat16).astype(jnp.float32)
    return jnp.einsum('bhl,blhd->bhd', w, v.astype(jnp.float32))


@needs_kernels
@pytest.mark.parametrize('b,h,length,d', [(4, 6, 128, 64), (3, 4, 7, 8), (2, 3, 33, 20),
                                          (1, 2, 5, 130)])
def test_decode_attention_equals_its_reference(b, h, length, d):
    rng = np.random.default_rng(b * 100 + length)
    q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
    k, v = _bf16(rng, (b, length, h, d)), _bf16(rng, (b, length, h, d))
    bias = jnp.asarray(rng.standard_normal((b, h, length)), jnp.float32)
    bias = bias.at[:, :, length // 2 + 1:].set(-1e10)   # masked positions get no weight
    got = jax.jit(amx.decode_attention)(q, k, v, bias)
    assert got.shape == (b, h, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(_f32(got), _f32(_attention_reference(q, k, v, bias)),
                               rtol=1e-4, atol=1e-4)
    # Changing a masked position's values changes nothing.
    v2 = v.at[:, -1].set(100.0)
    np.testing.assert_array_equal(_f32(jax.jit(amx.decode_attention)(q, k, v2, bias)), _f32(got))


@needs_kernels
def test_decode_attention_refuses_mismatched_shapes():
    q = jnp.zeros((2, 3, 8), jnp.float32)
    k = jnp.zeros((2, 5, 3, 8), jnp.bfloat16)
    with pytest.raises(Exception, match='shapes of q, k/v and bias disagree'):
        jax.block_until_ready(amx.decode_attention(q, k, k, jnp.zeros((2, 3, 4), jnp.float32)))


def _ffi_calls(jaxpr, target):
    """The ffi_call equations of `target` in a jaxpr and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.params.get('target_name') == target:
            yield eqn
        for param in eqn.params.values():
            sub = getattr(param, 'jaxpr', param)
            if hasattr(sub, 'eqns'):
                yield from _ffi_calls(sub, target)


def _sequence_attention_reference(q, k, v, bias, round_weights, keep=None):
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', qf, kf) + bias, axis=-1)
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32) if round_weights else x
    w = rounded(w)
    if keep is not None:
        w = rounded(w * keep)
    return jnp.einsum('bhqk,bkhd->bqhd', w, vf).astype(q.dtype)


@needs_kernels
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sequence_attention_with_dropout_scales_equals_the_reference(dtype):
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal((3, n, 2, 24)), dtype) for n in (20, 37, 37))
    bias = jnp.asarray(rng.standard_normal((1, 2, 20, 37)), jnp.float32)
    keep = jnp.where(rng.uniform(size=(3, 2, 20, 37)) < 0.7, 1 / 0.7, 0.0).astype(jnp.float32)
    probe = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    bf16 = dtype == jnp.bfloat16
    ours = lambda q, k, v, b: amx.attention(q, k, v, b, keep=keep)
    ref = lambda q, k, v, b: _sequence_attention_reference(q, k, v, b, bf16, keep)
    np.testing.assert_allclose(_f32(ours(q, k, v, bias)), _f32(ref(q, k, v, bias)), rtol=1e-5,
                               atol=1e-5 if not bf16 else 0.02)
    loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * probe), (0, 1, 2, 3))
    tolerance = 1e-5 if not bf16 else 1e-2
    for g, r in zip(loss(ours)(q, k, v, bias), loss(ref)(q, k, v, bias)):
        np.testing.assert_allclose(_f32(g), _f32(r), atol=tolerance * np.abs(_f32(r)).max())


@needs_kernels
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('b,lq,lk,h,d', [(4, 128, 128, 6, 64), (2, 7, 9, 3, 5), (3, 32, 70, 2, 20),
                                         (1, 33, 17, 1, 130)])
def test_sequence_attention_and_its_gradients_equal_the_reference(b, lq, lk, h, d, dtype):
    """`amx.attention` (one kernel call per pass) against softmax(q k + bias) v written in jnp:
    the output, and the gradients of q, k, v and the bias, with masked keys."""
    rng = np.random.default_rng(lq * 7 + lk)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for n in (lq, lk, lk))
    bias = jnp.asarray(rng.standard_normal((b, h, lq, lk)), jnp.float32).at[..., -2:].set(-1e10)
    probe = jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32)
    bf16 = dtype == jnp.bfloat16
    ours = lambda *a: amx.attention(*a)
    ref = lambda *a: _sequence_attention_reference(*a, round_weights=bf16)
    got, want = jax.jit(ours)(q, k, v, bias), jax.jit(ref)(q, k, v, bias)
    assert got.shape == q.shape and got.dtype == dtype
    # float32: summation order only; bf16: the same rounded weights, so the same bf16 output.
    np.testing.assert_allclose(_f32(got), _f32(want), rtol=1e-5, atol=1e-5 if not bf16 else 0.02)
    loss = lambda f: jax.jit(jax.grad(
            lambda *a: jnp.sum(f(*a).astype(jnp.float32) * probe), argnums=(0, 1, 2, 3)))
    tolerance = 1e-5 if not bf16 else 1e-2   # bf16: the reference rounds its cotangents to bf16
    for name, g, r in zip('qkv', loss(ours)(q, k, v, bias), loss(ref)(q, k, v, bias)):
        assert g.dtype == r.dtype, name
        np.testing.assert_allclose(_f32(g), _f32(r), atol=tolerance * np.abs(_f32(r)).max(),
                                   err_msg=f'd{name}')
    # Masked keys get no weight: their values and the gradient through their bias are zero.
    d_bias = loss(ours)(q, k, v, bias)[3]
    np.testing.assert_array_equal(_f32(d_bias[..., -2:]), 0.0)
    v2 = v.at[:, -1].set(100.0)
    np.testing.assert_array_equal(_f32(jax.jit(ours)(q, k, v2, bias)), _f32(got))


@needs_kernels
def test_sequence_attention_broadcasts_its_bias_and_refuses_bad_shapes():
    rng = np.random.default_rng(9)
    q, k = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (5, 6))
    pos = jnp.asarray(rng.standard_normal((1, 3, 5, 6)), jnp.float32)
    full = jnp.broadcast_to(pos, (2, 3, 5, 6))
    np.testing.assert_array_equal(_f32(amx.attention(q, k, k, pos)), _f32(amx.attention(q, k, k, full)))
    # The gradient of a broadcast bias sums over the broadcast axes.
    g = jax.grad(lambda p: jnp.sum(amx.attention(q, k, k, p)))(pos)
    g_full = jax.grad(lambda p: jnp.sum(amx.attention(q, k, k, p)))(full)
    np.testing.assert_allclose(_f32(g), _f32(g_full.sum(0, keepdims=True)), rtol=1e-6, atol=1e-7)
    # Broadcast over heads and queries too (read in place by the kernel), and a constant mask:
    # no bias gradient is asked for, the others are unchanged.
    for shape in ((2, 1, 5, 6), (2, 3, 1, 6), (1, 1, 1, 6)):
        part = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        np.testing.assert_array_equal(
                _f32(amx.attention(q, k, k, part)),
                _f32(amx.attention(q, k, k, jnp.broadcast_to(part, (2, 3, 5, 6)))))
    both = jax.grad(lambda q, p: jnp.sum(amx.attention(q, k, k, p)), (0, 1))(q, pos)
    only_q = jax.grad(lambda q: jnp.sum(amx.attention(q, k, k, pos)))(q)
    np.testing.assert_array_equal(_f32(only_q), _f32(both[0]))

    def bias_grad_written(f, *args):   # the bias-gradient output of the backward kernel call
        (call,) = _ffi_calls(jax.make_jaxpr(f)(*args).jaxpr, 'doa_attention_bwd')
        return call.params['result_avals'][3].shape

    assert bias_grad_written(jax.grad(lambda q: jnp.sum(amx.attention(q, k, k, pos))), q) == (1,)
    assert bias_grad_written(jax.grad(lambda p: jnp.sum(amx.attention(q, k, k, p))),
                             pos) == (2, 3, 5, 6)
    with pytest.raises(ValueError, match=r'bias \(2, 3, 4, 6\) does not broadcast'):
        amx.attention(q, k, k, jnp.zeros((2, 3, 4, 6)))
    with pytest.raises(ValueError, match=r'q \[B, Lq, H, D\] and k, v \[B, Lk, H, D\]'):
        amx.attention(q, k[:, :, :2], k[:, :, :2])
    with pytest.raises(ValueError, match='bf16 or float32'):
        amx.attention(q.astype(jnp.float16), k, k)


@needs_kernels
@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_every_attention_of_the_model_is_one_kernel_call(name):
    """(tests/test_ops.py checks the cpu_kernels model's logits and gradients against xla.)"""
    cfg = get_config(name, dtype=jnp.float32, **CPU)
    enc, dec = _model_inputs(cfg, seed=3)
    params = jax.eval_shape(lambda: nn.unbox(T5(cfg).init(jax.random.PRNGKey(3), enc, dec)['params']))
    jaxpr = str(jax.make_jaxpr(lambda p: T5(cfg).apply({'params': p}, enc, dec, dec))(params))
    # Encoder self, decoder self and cross attention.
    assert jaxpr.count('doa_attention_fwd') == cfg.num_encoder_layers + 2 * cfg.num_decoder_layers


def _model_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, cfg.vocab_size, (3, 19)).astype(np.int32)
    enc[1, 11:] = 0
    dec = rng.integers(2, cfg.vocab_size, (3, 7)).astype(np.int32)
    return enc, dec


@needs_kernels
def test_bf16_model_on_the_kernels_matches_xla_forward_and_gradients():
    amx_cfg = get_config('t5_1_1_tiny', dtype=jnp.bfloat16, **CPU)
    xla_cfg = amx_cfg.replace(**XLA)
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


@needs_kernels
def test_decoding_on_prepared_weights_agrees_with_teacher_forcing():
    cfg = get_config('t5_tiny', dtype=jnp.bfloat16, **CPU)
    enc, dec = _model_inputs(cfg, seed=1)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(1), enc, dec)['params'])
    decoder = decoding.Decoder(cfg, params, max_decode_length=6, batch_size=3)
    prepared = decoder.weights[ops.PREPARED]
    # The layouts live beside the parameters, at their paths; the parameter tree is untouched.
    assert jax.tree.structure(decoder.weights['params']) == jax.tree.structure(params)
    assert prepared['decoder']['layers_0']['mlp']['wo']['kernel'].dtype == jnp.bfloat16
    assert ('embedding' in prepared.get('token_embedder', {})) == cfg.logits_via_embedding
    tokens, scores = decoder(enc)
    # The score of each decoded sequence, recomputed by a teacher-forced pass on the same kernels.
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    logits = T5(cfg).apply({'params': params}, enc, dec_in)
    logp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))[..., 0]
    alive = np.cumsum(tokens == 1, axis=1) - (tokens == 1) == 0
    np.testing.assert_allclose(np.asarray(scores), (logp * alive).sum(1),
                               rtol=2e-2, atol=2e-2)
    # Every product of a decode step reads its prepared layout, and every attention of a step is
    # one decode_attention call.
    text = str(jax.make_jaxpr(lambda w: decoding.generate(
            w['params'], cfg, enc, max_decode_length=6, prepared=w[ops.PREPARED]))(
            decoder.weights))
    assert text.count('target_name=doa_decode_attention') == 2 * 2 * cfg.num_decoder_layers
    assert 'target_name=doa_amx_pack' not in text


@needs_kernels
def test_decoder_lays_weights_out_once_with_the_same_result():
    cfg = get_config('t5_1_1_tiny', dtype=jnp.bfloat16, **CPU)
    enc, dec = _model_inputs(cfg, seed=2)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(2), enc, dec)['params'])
    decoder = decoding.Decoder(cfg, params, max_decode_length=5, batch_size=3)
    tokens, scores = decoder(enc)
    # generate without prepared weights lays them out inside the call: the same products.
    ref_tokens, ref_scores = jax.jit(lambda p: decoding.generate(p, cfg, enc, max_decode_length=5))(
            params)
    np.testing.assert_array_equal(tokens, np.asarray(ref_tokens))
    np.testing.assert_allclose(scores, np.asarray(ref_scores), rtol=1e-6)


@needs_kernels
def test_every_dense_kernel_runs_on_the_kernels_and_none_under_xla():
    cfg = get_config('t5_1_1_tiny', dtype=jnp.bfloat16, **CPU)
    enc, dec = _model_inputs(cfg)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), enc, dec)['params'])
    kernels = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if p[-1].key == 'kernel']

    def custom_calls(c):
        text = str(jax.make_jaxpr(lambda p: T5(c).apply({'params': p}, enc, dec, dec))(params))
        return text.count('target_name=doa_amx_matmul')

    assert custom_calls(cfg) == len(kernels)
    assert custom_calls(cfg.replace(**XLA)) == 0


@needs_kernels
@pytest.mark.parametrize('m,k,n,transpose', [(32, 512, 384, False), (5, 70, 45, False),
                                             (13, 33, 100, True), (9, 64, 1, False)])
def test_f32_products_on_packed_strips_equal_numpy(m, k, n, transpose):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((2, m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transpose else (k, n)), jnp.float32)
    packed = jax.jit(lambda w: amx.pack_f32(w, transpose=transpose))(w)
    assert packed.shape == (-(-n // 32) * 32 * k,) and packed.dtype == jnp.float32
    got = jax.jit(lambda x, p: amx.matmul_f32_packed(x, p, n))(x, packed)
    ref = np.asarray(x) @ (np.asarray(w).T if transpose else np.asarray(w))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    with pytest.raises(Exception, match='packed w does not match'):
        jax.block_until_ready(amx.matmul_f32_packed(x, packed, n + 32))


@needs_kernels
@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_float32_decoding_reads_float32_layouts_and_the_kernels(name):
    """(tests/test_ops.py checks cpu_kernels greedy and beam decoding against xla.)"""
    cfg = get_config(name, dtype=jnp.float32, **CPU)
    enc, dec = _model_inputs(cfg, seed=3)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(3), enc, dec)['params'])
    decoder = decoding.Decoder(cfg, params, max_decode_length=7, batch_size=3)
    prepared = decoder.weights[ops.PREPARED]
    assert prepared['decoder']['layers_0']['mlp']['wo']['kernel'].dtype == jnp.float32
    assert ('embedding' in prepared.get('token_embedder', {})) == cfg.logits_via_embedding
    text = str(jax.make_jaxpr(lambda w: decoding.generate(
            w['params'], cfg, enc, max_decode_length=7, prepared=w[ops.PREPARED]))(
            decoder.weights))
    assert 'target_name=doa_f32_matmul' in text and 'target_name=doa_decode_attention' in text
