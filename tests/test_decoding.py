"""Decoding: HF parity for greedy and beam, cache correctness, cross K/V once, early exit, buckets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding
from doa_jax.checkpoints.hf_mapping import config_from_hf, params_from_hf_state_dict
from doa_jax.models import get_config
from doa_jax.models.t5 import T5
from tests.hf_reference import build_hf_t5, state_dict_numpy

VOCAB = 300
XLA = dict(attention_impl='xla', matmul_impl='xla')
SRC_LEN = 23   # distinctive, so the cross-K/V check can recognise encoder-shaped operands
MAX_LEN = 12


def _reference(ff, tied, d_kv):
    # HF generate sizes its cache by num_layers, so keep encoder and decoder depths equal here.
    ref = build_hf_t5(tied=tied, feed_forward_proj=ff, vocab_size=VOCAB, d_model=32, d_kv=d_kv,
                      d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4)
    # The parity tests pin the reference backend: every other backend is tested against it.
    cfg = config_from_hf(ref.config.to_dict(), dtype=jnp.float32).replace(**XLA)
    return ref, cfg, params_from_hf_state_dict(state_dict_numpy(ref), cfg)


def _inputs(seed=0, batch=4):
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, VOCAB, (batch, SRC_LEN))
    enc[1, 12:] = 0
    enc[3, 5:] = 0
    return enc


def _pad_after_eos(tokens: np.ndarray, eos: int = 1) -> np.ndarray:
    after = (np.cumsum(tokens == eos, axis=1) - (tokens == eos)) > 0
    return np.where(after, 0, tokens)


def _hf_generate(ref, enc, **kwargs):
    import torch

    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                           max_new_tokens=MAX_LEN, do_sample=False, **kwargs).numpy()
    out = _pad_after_eos(out[:, 1:])   # drop the decoder start token
    return np.pad(out, ((0, 0), (0, MAX_LEN - out.shape[1])))


# heads * d_kv above d_model (gated-gelu) and equal to it (relu, tied embedding).
CASES = [('gated-gelu', False, 12), ('relu', True, 8)]


@pytest.mark.parametrize('ff,tied,d_kv', CASES)
def test_greedy_matches_hf_generate(ff, tied, d_kv):
    ref, cfg, params = _reference(ff, tied, d_kv)
    enc = _inputs()
    want = _hf_generate(ref, enc, num_beams=1)
    got = decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN, return_scores=False)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize('ff,tied,d_kv', CASES)
def test_beam_search_matches_hf_generate(ff, tied, d_kv):
    ref, cfg, params = _reference(ff, tied, d_kv)
    enc = _inputs(seed=1)
    want = _hf_generate(ref, enc, num_beams=4, length_penalty=0.0, early_stopping=False)
    got = decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN, method='beam',
                            num_beams=4, length_penalty=0.0, return_scores=False)
    np.testing.assert_array_equal(np.asarray(got), want)


def _tiny(seed=0, **overrides):
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32, **overrides)
    enc = np.random.RandomState(seed).randint(2, cfg.vocab_size, (3, SRC_LEN))
    enc[2, 9:] = 0
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(seed), enc, enc[:, :4])['params'])
    return cfg, params, enc


def test_cached_steps_equal_teacher_forced_forward():
    cfg, params, enc = _tiny()
    model = T5(cfg)
    tokens = np.asarray(decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN,
                                          return_scores=False))
    encoded = model.apply({'params': params}, enc, method=T5.encode)
    weights = {'params': params}
    logits, cache = decoding._first_step(model, weights, encoded, jnp.asarray(enc), MAX_LEN)
    step_logits = [logits]
    for i in range(1, MAX_LEN):
        logits, cache = decoding._next_step(model, weights, cache, jnp.asarray(enc),
                                            jnp.asarray(tokens[:, i - 1]), MAX_LEN)
        step_logits.append(logits)
    cached = np.stack([np.asarray(x) for x in step_logits], axis=1)
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    full = np.asarray(model.apply({'params': params}, enc, dec_in))
    np.testing.assert_allclose(cached, full, atol=1e-5)


def _dot_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Operand shapes of every product: XLA dots and doa_jax's CPU matmul kernels."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general' or 'matmul' in str(eqn.params.get('target_name')):
            shapes += [tuple(v.aval.shape) for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _dot_operand_shapes(sub)
    return shapes


def _while_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'while':
            yield eqn.params['body_jaxpr'].jaxpr
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _while_bodies(sub)


@pytest.mark.parametrize('impl', ['auto', 'xla', 'dot_product_attention'])
@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_cross_attention_kv_projected_once_not_per_step(method, impl):
    cfg, params, enc = _tiny(attention_impl=impl, matmul_impl='auto' if impl == 'auto' else 'xla')
    closed = jax.make_jaxpr(lambda p, e: decoding.generate(
            p, cfg, e, max_decode_length=MAX_LEN, method=method, num_beams=2))(params, enc)
    # (batch, source length, emb), or its rows flattened as the CPU kernels take them.
    encoder_shaped = lambda s: s in ((3, SRC_LEN, cfg.emb_dim), (3 * SRC_LEN, cfg.emb_dim))
    outside = [s for s in _dot_operand_shapes(closed.jaxpr) if encoder_shaped(s)]
    bodies = list(_while_bodies(closed.jaxpr))
    assert len(bodies) == 1
    inside = [s for s in _dot_operand_shapes(bodies[0]) if encoder_shaped(s)]
    # Encoder layers + the first step's cross K/V projection use encoder-shaped operands; the loop
    # body (every later step) never does.
    assert outside and not inside


def _eos_at_once(cfg, params):
    """Zeroes every residual branch so the decoder state is the start embedding, then points the
    LM head's EOS column at it: every row emits EOS at the first step."""
    params = jax.tree_util.tree_map(np.array, params)
    dec = params['decoder']
    for i in range(cfg.num_decoder_layers):
        layer = dec[f'layers_{i}']
        for block in ('self_attention', 'encoder_decoder_attention'):
            layer[block]['out']['kernel'][:] = 0
        layer['mlp']['wo']['kernel'][:] = 0
    x = params['token_embedder']['embedding'][0]
    y = x / np.sqrt(np.mean(x ** 2) + cfg.layer_norm_epsilon) * dec['decoder_norm']['scale']
    dec['logits_dense']['kernel'][:] = 0
    dec['logits_dense']['kernel'][:, 1] = y
    return params


def test_decoding_exits_early_when_every_row_ended():
    cfg, params, enc = _tiny()
    _, _, steps = decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN, return_steps=True)
    assert int(steps) == MAX_LEN   # the random model never says EOS
    eos_params = _eos_at_once(cfg, params)
    for method in ('greedy', 'beam'):
        tokens, _, steps = decoding.generate(eos_params, cfg, enc, max_decode_length=MAX_LEN,
                                             method=method, num_beams=2, return_steps=True)
        # Greedy stops after the first step; beam search stops once no alive beam can beat the
        # finished EOS beams, well before the length limit.
        assert int(steps) == 1 if method == 'greedy' else int(steps) < MAX_LEN, method
        np.testing.assert_array_equal(np.asarray(tokens)[:, 0], 1)
        assert not np.asarray(tokens)[:, 1:].any()


def test_sampling_limits_and_reproducibility():
    cfg, params, enc = _tiny()
    greedy = np.asarray(decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN,
                                          return_scores=False))
    kwargs = dict(max_decode_length=MAX_LEN, method='sample', return_scores=False)
    cold = decoding.generate(params, cfg, enc, temperature=1e-6, rng=jax.random.PRNGKey(3),
                             **kwargs)
    top1 = decoding.generate(params, cfg, enc, temperature=1.0, top_k=1,
                             rng=jax.random.PRNGKey(4), **kwargs)
    np.testing.assert_array_equal(np.asarray(cold), greedy)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    a = decoding.generate(params, cfg, enc, temperature=1.0, rng=jax.random.PRNGKey(5), **kwargs)
    b = decoding.generate(params, cfg, enc, temperature=1.0, rng=jax.random.PRNGKey(5), **kwargs)
    c = decoding.generate(params, cfg, enc, temperature=1.0, rng=jax.random.PRNGKey(6), **kwargs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    with pytest.raises(ValueError, match='rng'):
        decoding.generate(params, cfg, enc, temperature=1.0, **kwargs)


def test_bucketed_decoder_compiles_once_per_bucket():
    cfg, params, _ = _tiny()
    decoder = decoding.Decoder(cfg, params, max_decode_length=6, batch_size=4,
                               length_buckets=(8, 16, 32))
    rng = np.random.RandomState(7)
    lengths = [5, 7, 12, 3, 20]   # buckets 8, 8, 16, 8, 32
    for n in lengths:
        rows = [list(rng.randint(2, cfg.vocab_size, rng.randint(1, n + 1))) for _ in range(3)]
        rows[0] = list(rng.randint(2, cfg.vocab_size, n))
        tokens, scores = decoder(rows)
        assert tokens.shape == (3, 6) and scores.shape == (3,)
        padded = np.zeros((3, decoder.bucket_for(n)), np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        want = decoding.generate(params, cfg, padded, max_decode_length=6, return_scores=False)
        np.testing.assert_array_equal(tokens, np.asarray(want))
    assert decoder.compile_count == 3
    with pytest.raises(ValueError, match='largest length bucket'):
        decoder([[5] * 40])


def test_decoded_lengths_count_through_eos():
    tokens = np.array([[7, 1, 0, 0], [7, 8, 9, 4], [1, 0, 0, 0], [5, 6, 0, 0]])
    np.testing.assert_array_equal(decoding.decoded_lengths(tokens), [2, 4, 1, 2])


def test_scanned_params_decode_like_unscanned():
    from doa_jax.models.scan import scan_params

    cfg, params, enc = _tiny()
    want = decoding.generate(params, cfg, enc, max_decode_length=MAX_LEN, return_scores=False)
    scanned_cfg = cfg.replace(scan_layers=True)
    got = decoding.generate(scan_params(params, scanned_cfg), scanned_cfg, enc,
                            max_decode_length=MAX_LEN, return_scores=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_benchmark_cli_reports_both_implementations(tmp_path, capsys):
    import json

    from doa_jax.benchmark.__main__ import main

    out = tmp_path / 'bench.json'
    assert main(['decode', '--model', 't5_1_1_tiny', '--batch', '2', '--input_len', '8',
                 '--new_tokens', '4', '--repeats', '1', '--hf', '--json', str(out)]) == 0
    results = json.loads(out.read_text())['results']
    assert [r['impl'] for r in results] == ['doa_jax float32', 'HF PyTorch float32']
    assert all(r['tokens_per_s'] > 0 for r in results)
    assert 'ours/this' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_bf16_decoding_casts_weights_once_without_changing_results(name):
    """Kernels/embeddings cast to bf16 up front give bit-identical logits to the per-use casts;
    norm scales and relative-position tables stay float32."""
    cfg = get_config(name, dtype=jnp.bfloat16)
    x = jnp.asarray(_inputs(batch=4)[:2])
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(1), x, x[:, :5])['params'])
    cast = decoding.cast_matmul_params(params, jnp.bfloat16)
    flat = {'/'.join(str(k.key) for k in p): v.dtype
            for p, v in jax.tree_util.tree_flatten_with_path(cast)[0]}
    assert flat['token_embedder/embedding'] == jnp.bfloat16
    assert flat['encoder/layers_0/mlp/wo/kernel'] == jnp.bfloat16
    assert flat['encoder/layers_0/pre_mlp_layer_norm/scale'] == jnp.float32
    assert flat['encoder/relpos_bias/rel_embedding'] == jnp.float32
    apply = jax.jit(lambda p: T5(cfg).apply({'params': p}, x, x[:, :5], x[:, :5]))
    np.testing.assert_array_equal(np.asarray(apply(params)), np.asarray(apply(cast)))
    run = jax.jit(lambda p: decoding.generate(p, cfg, x, max_decode_length=6))
    tokens, scores = run(params)
    assert np.asarray(tokens).shape == (2, 6) and np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize('shape', [(32, 32128), (5, 1000), (3, 7), (2, 128), (4, 129)])
def test_first_argmax_is_argmax_with_ties(shape):
    # Small integer logits: many rows hold their maximum more than once, and the first must win.
    rng = np.random.default_rng(shape[1])
    logits = jnp.asarray(rng.integers(0, 4, shape), jnp.float32)
    got = jax.jit(decoding.first_argmax)(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))
    logits = jnp.asarray(rng.standard_normal(shape), jnp.float32).at[:, -1].set(-jnp.inf)
    np.testing.assert_array_equal(np.asarray(jax.jit(decoding.first_argmax)(logits)),
                                  np.argmax(np.asarray(logits), axis=-1))
