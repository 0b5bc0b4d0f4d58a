"""The accelerator tier: what must hold on a GPU or TPU before anyone trusts a run there.

Needs only jax, flax, optax, torch and transformers (no TensorFlow, seqio or gin), so it runs on
the lent GPU machines. Skipped where JAX has no accelerator, unless DOA_ACCELERATOR_TESTS_ON_CPU=1
(the dry run of `python -m doa_jax.benchmark gpu_check --dry_run` on a CPU machine).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from doa_jax import decoding, ops
from doa_jax.checkpoints.hf_mapping import config_from_hf, params_from_hf_state_dict
from doa_jax.models import get_config
from doa_jax.models.t5 import T5
from tests.hf_reference import build_hf_t5, state_dict_numpy

ON_ACCELERATOR = jax.default_backend() in ('gpu', 'tpu')
pytestmark = [pytest.mark.accelerator, pytest.mark.skipif(
        not ON_ACCELERATOR and os.environ.get('DOA_ACCELERATOR_TESTS_ON_CPU') != '1',
        reason=f'no accelerator (jax backend {jax.default_backend()}); '
               'DOA_ACCELERATOR_TESTS_ON_CPU=1 runs this tier on the CPU')]

# bf16 activations against HF's float32 on the same weights: bf16 keeps 8 bits of mantissa, and
# the error grows through the layers. Stated tolerance: 3% of the largest logit (measured on the
# CPU: 1.2%, logits up to 30).
BF16_LOGIT_REL_TOL = 0.03
VOCAB = 300


def _torch_device():
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _reference(**kw):
    ref = build_hf_t5(tied=False, feed_forward_proj='gated-gelu', vocab_size=VOCAB, d_model=64,
                      d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, **kw)
    cfg = config_from_hf(ref.config.to_dict(), dtype=jnp.float32)
    return ref, cfg, params_from_hf_state_dict(state_dict_numpy(ref), cfg)


def _inputs(seed=0, batch=4, src=24, tgt=10):
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, VOCAB, (batch, src))
    enc[1, 15:] = 0
    dec = rng.randint(2, VOCAB, (batch, tgt))
    dec_in = np.concatenate([np.zeros((batch, 1), np.int64), dec[:, :-1]], axis=1)
    return enc, dec_in, dec


def _hf_logits(ref, enc, dec_in):
    import torch
    device = _torch_device()
    ref = ref.to(device)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(enc, device=device),
                   attention_mask=torch.tensor(enc > 0, device=device),
                   decoder_input_ids=torch.tensor(dec_in, device=device)).logits.float().cpu().numpy()


@pytest.mark.parametrize('attention_impl', ['xla', 'dot_product_attention', 'auto'])
def test_logits_match_hf_on_the_device(attention_impl):
    ref, cfg, params = _reference()
    enc, dec_in, dec = _inputs()
    want = _hf_logits(ref, enc, dec_in)
    cfg = cfg.replace(attention_impl=attention_impl)
    got = np.asarray(jax.jit(lambda p: T5(cfg).apply({'params': p}, enc, dec_in, dec))(params))
    assert np.abs(got - want).max() <= 1e-4
    bf16 = np.asarray(jax.jit(lambda p: T5(cfg.replace(dtype=jnp.bfloat16)).apply(
            {'params': p}, enc, dec_in, dec))(params))
    assert np.abs(bf16 - want).max() <= BF16_LOGIT_REL_TOL * np.abs(want).max()


def test_greedy_tokens_match_hf_generate():
    import torch
    ref, cfg, params = _reference()
    enc, _, _ = _inputs(seed=1)
    device = _torch_device()
    with torch.no_grad():
        out = ref.to(device).generate(input_ids=torch.tensor(enc, device=device),
                                      attention_mask=torch.tensor(enc > 0, device=device),
                                      max_new_tokens=8, do_sample=False, num_beams=1)
    want = out.cpu().numpy()[:, 1:]
    want = np.where(np.cumsum(want == 1, axis=1) - (want == 1) > 0, 0, want)
    want = np.pad(want, ((0, 0), (0, 8 - want.shape[1])))
    got, _ = decoding.Decoder(cfg, params, max_decode_length=8, batch_size=4)(enc)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_every_backend_equals_the_xla_reference_on_the_device(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 4, 64)), dtype) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, 4, 16, 16)), jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((16, 16), bool)))[None, None]
    ref = ops.Ops('xla', 'xla')
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    resolved = ops.for_config(get_config('t5_1_1_tiny', dtype=dtype))
    for backend in sorted({'dot_product_attention', resolved.attention_impl}):
        impl = ops.Ops(backend, 'xla')
        f = lambda o: jax.jit(jax.value_and_grad(lambda q, b: jnp.sum(o.attention(
                q, k, v, bias=b, mask=mask, dtype=dtype).astype(jnp.float32) ** 2), (0, 1)))
        (lo, (gq, gb)), (lr, (rq, rb)) = f(impl)(q, bias), f(ref)(q, bias)
        np.testing.assert_allclose(float(lo), float(lr), rtol=tol)
        np.testing.assert_allclose(np.asarray(gq, np.float32), np.asarray(rq, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(rq).max()))
        np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=tol,
                                   atol=tol * float(jnp.abs(rb).max()))


def test_tiny_training_loss_falls_over_20_steps():
    cfg = get_config('t5_1_1_tiny')     # bf16 activations, the default backends for the device
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, cfg.vocab_size, (8, 16)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, cfg.vocab_size, (8, 6)), jnp.int32)
    dec_in = jnp.pad(dec[:, :-1], ((0, 0), (1, 0)))
    model = T5(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec_in)['params'])
    opt = optax.adamw(3e-3)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply({'params': p}, enc, dec_in, dec)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    losses = []
    for _ in range(20):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_decoder_compiles_once_per_bucket():
    cfg = get_config('t5_1_1_tiny')
    tokens = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(0), tokens, tokens)['params'])
    decoder = decoding.Decoder(cfg, params, max_decode_length=6, batch_size=4,
                               length_buckets=(8, 16))
    rng = np.random.default_rng(0)
    for length in (3, 8, 5, 12, 16, 7):
        decoder([rng.integers(2, cfg.vocab_size, length) for _ in range(3)])
    assert decoder.compile_count == 2
