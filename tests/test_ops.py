"""The op layer (doa_jax.ops): every backend against the `xla` reference (outputs, gradients,
masks, broadcast bias, dropout, decode steps, the whole model), the choice of backend per config,
lowering for GPU and TPU without one, and a model package free of backend branches."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding, ops
from doa_jax.kernels import amx
from doa_jax.models import get_config
from doa_jax.models.t5 import T5

CPU_OK, CPU_WHY = amx.available()
BACKENDS = ['dot_product_attention',
            pytest.param('cpu_kernels', marks=pytest.mark.skipif(
                    not CPU_OK or jax.device_count() != 1,
                    reason=f'CPU kernels do not run here: {CPU_WHY or "several devices"}'))]
REF = ops.Ops('xla', 'xla')
B, LQ, LK, H, D = 2, 6, 10, 3, 8


def _qkv(seed, dtype, lq=LQ, lk=LK):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, lq, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, lk, H, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, lk, H, D)), dtype)
    return q, k, v


def _masks(lq=LQ, lk=LK):
    """Padding (row 1 has 7 keys), causal-over-padding, and none."""
    valid = np.ones((B, lk), bool)
    valid[1, 7:] = False
    padding = jnp.asarray(valid[:, None, None, :])                          # (B, 1, 1, Lk)
    causal = jnp.asarray(np.tril(np.ones((lq, lk), bool), k=lk - lq))[None, None] & padding
    return {'padding': padding, 'causal': causal, 'none': None}


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)


def _f32(x):
    return np.asarray(x, np.float32)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('mask_name,bias_shape', [
        ('padding', (1, H, LQ, LK)),      # the encoder's: a shared bias, padding per batch row
        ('causal', (1, H, LQ, LK)),       # the decoder's self-attention
        ('causal', (B, 1, LQ, LK)),       # a bias broadcast over heads
        ('padding', None),                # cross-attention: a mask only
        ('none', None)])
def test_attention_outputs_and_gradients_equal_the_reference(backend, dtype, mask_name,
                                                             bias_shape):
    q, k, v = _qkv(0, dtype)
    mask = _masks()[mask_name]
    bias = (None if bias_shape is None else
            jnp.asarray(np.random.default_rng(1).standard_normal(bias_shape), jnp.float32))
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((B, LQ, H, D)), jnp.float32)
    impl = ops.Ops(backend, 'xla')

    def loss(o):
        def f(q, k, v, bias):
            out = o.attention(q, k, v, bias=bias, mask=mask, dtype=dtype)
            return jnp.sum(out.astype(jnp.float32) * probe), out
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))

    (_, got), got_grads = loss(impl)(q, k, v, bias)
    (_, want), want_grads = loss(REF)(q, k, v, bias)
    assert got.shape == (B, LQ, H, D) and got.dtype == dtype
    np.testing.assert_allclose(_f32(got), _f32(want), **_tol(dtype))
    for g, w in zip(got_grads, want_grads):
        scale = np.abs(_f32(w)).max()
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=_tol(dtype)['rtol'],
                                   atol=_tol(dtype)['atol'] * max(scale, 1.0))


@pytest.mark.parametrize('backend', BACKENDS)
def test_attention_dropout_draws_the_reference_masks(backend):
    q, k, v = _qkv(3, jnp.float32)
    mask = _masks()['padding']
    kwargs = dict(mask=mask, dtype=jnp.float32, dropout_rate=0.3)
    rng = jax.random.PRNGKey(7)
    got = ops.Ops(backend, 'xla').attention(q, k, v, dropout_rng=rng, **kwargs)
    want = REF.attention(q, k, v, dropout_rng=rng, **kwargs)
    np.testing.assert_allclose(_f32(got), _f32(want), rtol=1e-5, atol=1e-5)
    # Dropout did act: another key drops other weights, and no key means no dropout.
    other = REF.attention(q, k, v, dropout_rng=jax.random.PRNGKey(8), **kwargs)
    plain = REF.attention(q, k, v, **kwargs)
    assert np.abs(_f32(other) - _f32(want)).max() > 1e-3
    assert np.abs(_f32(plain) - _f32(want)).max() > 1e-3


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_the_reference(backend, dtype):
    q, k, v = _qkv(4, dtype, lq=1, lk=12)
    position = 5   # keys past the current step are masked, as in a cache of 12 slots
    mask = jnp.arange(12)[None, None, None, :] <= position
    bias = jnp.asarray(np.random.default_rng(5).standard_normal((1, H, 1, 12)), jnp.float32)
    impl = ops.Ops(backend, 'xla')
    for m, b in ((mask, bias), (mask & _masks(1, 12)['padding'], None)):
        got = impl.decode_attention(q, k, v, bias=b, mask=m, dtype=dtype)
        want = REF.decode_attention(q, k, v, bias=b, mask=m, dtype=dtype)
        assert got.shape == (B, 1, H, D) and got.dtype == dtype
        np.testing.assert_allclose(_f32(got), _f32(want), **_tol(dtype))
        # A decode step is the last query row of full attention over the filled positions.
        full = REF.attention(q, k, v, bias=b, mask=m, dtype=dtype)
        np.testing.assert_allclose(_f32(got), _f32(full), **_tol(dtype))


@pytest.mark.skipif(not CPU_OK or jax.device_count() != 1, reason=f'CPU kernels: {CPU_WHY}')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_dense_with_and_without_prepared_weights_equals_the_reference(dtype):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 5, 40)), dtype)
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    cpu = ops.Ops('xla', 'cpu_kernels')
    want = REF.dense(x, w, dtype=dtype)
    prepared = ops.cpu_kernels.prepare_weights({'l': {'kernel': w}}, dtype=dtype,
                                               tied_head=False)['l']['kernel']
    for got in (cpu.dense(x, w, dtype=dtype), cpu.dense(x, w, dtype=dtype, prepared=prepared)):
        assert got.shape == (3, 5, 24)
        np.testing.assert_allclose(_f32(got), _f32(want), **_tol(dtype))


def _model_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, cfg.vocab_size, (3, 12)).astype(np.int32)
    enc[1, 7:] = 0
    dec = rng.integers(2, cfg.vocab_size, (3, 6)).astype(np.int32)
    dec[2, 4:] = 0
    return enc, dec


def _impls(backend):
    return dict(attention_impl=backend, matmul_impl='cpu_kernels' if backend == 'cpu_kernels'
                else 'xla')


def _backends_here():
    """The backends under test that run on this machine (the reference is computed once)."""
    return ['dot_product_attention'] + (['cpu_kernels'] if CPU_OK and jax.device_count() == 1
                                        else [])


@pytest.mark.parametrize('name,dropout', [('t5_tiny', 0.0), ('t5_1_1_tiny', 0.2)])
def test_model_logits_and_gradients_equal_the_reference(name, dropout):
    """t5_tiny (relu, tied embedding, no dropout) and t5_1_1_tiny (gated-gelu, separate logits
    layer) with dropout, whose masks every backend must draw as the reference does."""
    ref = get_config(name, dtype=jnp.float32, dropout_rate=dropout, attention_impl='xla',
                     matmul_impl='xla')
    enc, dec = _model_inputs(ref)
    params = nn.unbox(T5(ref).init(jax.random.PRNGKey(0), enc, dec)['params'])

    def run(c):
        def f(p):
            logits = T5(c).apply({'params': p}, enc, dec, dec, enable_dropout=dropout > 0,
                                 rngs={'dropout': jax.random.PRNGKey(1)})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * (dec > 0)), logits
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, want), want_grads = run(ref)
    for backend in _backends_here():
        (_, got), got_grads = run(ref.replace(**_impls(backend)))
        np.testing.assert_allclose(_f32(got), _f32(want), atol=1e-4, err_msg=backend)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(_f32(g), _f32(w), atol=1e-4 * np.abs(_f32(w)).max() + 1e-7,
                                       err_msg=backend)


@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_decoding_equals_the_reference(method):
    ref = get_config('t5_1_1_tiny', dtype=jnp.float32, attention_impl='xla', matmul_impl='xla')
    enc, dec = _model_inputs(ref, seed=1)
    params = nn.unbox(T5(ref).init(jax.random.PRNGKey(1), enc, dec)['params'])
    want = decoding.Decoder(ref, params, max_decode_length=7, batch_size=4, method=method)(enc)
    for backend in _backends_here():
        cfg = ref.replace(**_impls(backend))
        got = decoding.Decoder(cfg, params, max_decode_length=7, batch_size=4, method=method)(enc)
        np.testing.assert_array_equal(got[0], want[0], err_msg=backend)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4, err_msg=backend)


def test_auto_picks_per_platform_and_explicit_choices_are_checked():
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert ops._resolve('auto', 'auto', bf16, True, 'gpu', 8) == ops.Ops(
            'dot_product_attention', 'xla')
    assert ops._resolve('auto', 'auto', bf16, True, 'tpu', 4) == ops.Ops('xla', 'xla')
    # The CPU kernels are single-device; a mesh of CPU devices keeps the reference.
    assert ops._resolve('auto', 'auto', f32, True, 'cpu', 8) == ops.Ops('xla', 'xla')
    with pytest.raises(ValueError, match='cpu_kernels.*cannot run here: there are 8 devices'):
        ops._resolve('cpu_kernels', 'xla', f32, True, 'cpu', 8)
    with pytest.raises(ValueError, match='cpu_kernels.*cannot run here: the backend is gpu'):
        ops._resolve('xla', 'cpu_kernels', f32, True, 'gpu', 1)
    with pytest.raises(ValueError, match="Unknown attention_impl 'flash'.*dot_product_attention"):
        ops._resolve('flash', 'xla', f32, True, 'cpu', 1)
    if CPU_OK:
        auto = ops._resolve('auto', 'auto', bf16, True, 'cpu', 1)
        assert auto == ops.Ops('cpu_kernels', 'cpu_kernels')
        # The kernels compute float32 logits: a bf16-logits model keeps the reference attention.
        assert ops._resolve('auto', 'auto', bf16, False, 'cpu', 1).attention_impl == 'xla'


def test_a_config_with_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="Unknown matmul_impl 'mkl'; choose one of"):
        get_config('t5_1_1_tiny', matmul_impl='mkl')
    with pytest.raises(ValueError, match="Unknown attention_impl 'cpu'; choose one of"):
        get_config('t5_1_1_tiny').replace(attention_impl='cpu')


def _train_loss(cfg):
    model = T5(cfg)

    def loss(params, enc, dec):
        logits = model.apply({'params': params}, enc, dec, dec)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))

    return jax.grad(loss)


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_train_and_decode_steps_lower_for_accelerators(platform):
    """Lowered for a GPU or a TPU on this CPU-only machine: the gradient step and the decoder
    with the dot_product_attention backend, in bf16, with no CPU kernel call in the program."""
    cfg = get_config('t5_1_1_tiny', attention_impl='dot_product_attention', matmul_impl='xla')
    enc = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    dec = jax.ShapeDtypeStruct((4, 8), jnp.int32)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), tokens,
                                                          tokens)['params']))
    grad = jax.jit(_train_loss(cfg)).trace(params, enc, dec).lower(lowering_platforms=(platform,))
    text = grad.as_text()
    assert 'doa_' not in text and 'custom_call' not in text.replace('Sharding', '')
    decoder = decoding.Decoder(cfg, max_decode_length=8, batch_size=4, length_buckets=(16,))
    weights = jax.eval_shape(decoder.prepare, params)
    lowered = decoder._jit(weights).trace(weights, enc, jax.random.PRNGKey(0)).lower(
            lowering_platforms=(platform,))
    assert 'doa_' not in lowered.as_text()


def test_dot_product_attention_asks_cudnn_only_where_it_applies():
    from doa_jax.ops import dot_product_attention as dpa
    q, k, _ = _qkv(0, jnp.bfloat16)
    assert dpa.cudnn_eligible(q, k, platform='gpu')
    assert not dpa.cudnn_eligible(q, k, platform='cpu')
    assert not dpa.cudnn_eligible(q.astype(jnp.float32), k, platform='gpu')
    odd_q, odd_k, _ = _qkv(0, jnp.bfloat16, lq=5)
    assert not dpa.cudnn_eligible(odd_q, odd_k, platform='gpu')


def test_models_hold_no_backend_or_platform_branch():
    """The model package says what to compute; which kernels run is the op layer's business."""
    models = pathlib.Path(__file__).resolve().parents[1] / 'doa_jax' / 'models'
    # Platform queries, imports of a backend, or comparisons with a backend or platform name.
    pattern = re.compile(r"default_backend|\.platform|device_count|jax\.devices|local_devices"
                         r"|doa_jax\.kernels|\bamx\b|from doa_jax\.ops\.|impl\b\s*(==|!=|in\b)"
                         r"|(==|!=)\s*'(xla|cpu_kernels|dot_product_attention|cpu|gpu|tpu|cuda)'")
    hits = [f'{p.name}:{i}: {line.strip()}' for p in sorted(models.glob('*.py'))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_prepared_weights_stay_out_of_the_parameter_tree():
    cfg = get_config('t5_tiny', dtype=jnp.bfloat16)
    enc, dec = _model_inputs(cfg)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), enc, dec)['params'])
    decoder = decoding.Decoder(cfg, params, max_decode_length=4, batch_size=3)
    assert set(decoder.weights) == {'params', ops.PREPARED}
    assert jax.tree.structure(decoder.weights['params']) == jax.tree.structure(params)
    assert jax.tree.structure(params) == jax.tree.structure(
            nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), enc, dec)['params']))
