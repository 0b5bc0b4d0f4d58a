"""T5 model: parameter counts, tree layout, HF numerics parity, scan/remat equivalence."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax.checkpoints.hf_mapping import config_from_hf, params_from_hf_state_dict
from doa_jax.models import NAMED_CONFIGS, get_config
from doa_jax.models.scan import scan_params, unscan_params
from doa_jax.models.t5 import T5
from tests.hf_reference import build_hf_t5, state_dict_numpy


def _count(name: str) -> int:
    model = T5(get_config(name))
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


@pytest.mark.parametrize('name,expected', [
        ('t5_1_1_small', 76_961_152), ('t5_1_1_base', 247_577_856),
        ('t5_1_1_large', 783_150_080), ('t5_1_1_xl', 2_849_757_184),
        ('t5_1_1_xxl', 11_135_332_352), ('t5_small', 60_506_624), ('t5_base', 222_903_552),
        ('t5_large', 737_668_096), ('t5_3b', 2_851_598_336), ('t5_11b', 11_307_321_344)])
def test_parameter_counts_match_t5x(name, expected):
    """The hand-worked count below equals t5x's published counts; the next test holds every
    built model to it."""
    assert _t5_parameter_count(get_config(name)) == expected


def _t5_parameter_count(cfg) -> int:
    """The T5 architecture's parameter count, worked out by hand from its parts (Raffel et al.;
    t5x's layers): shared embedding (+ a separate LM head in T5 v1.1), per layer the attention
    projections, the MLP (two input projections when gated) and RMS-norm scales, one
    relative-position table per stack, and each stack's final norm."""
    d, inner, ff = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    attention = 4 * d * inner
    mlp = (len(cfg.mlp_activations) + 1) * d * ff
    encoder_layer = attention + mlp + 2 * d
    decoder_layer = 2 * attention + mlp + 3 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.logits_via_embedding else 2)
    relpos = 2 * cfg.relative_attention_num_buckets * cfg.num_heads
    return (embeddings + cfg.num_encoder_layers * encoder_layer +
            cfg.num_decoder_layers * decoder_layer + relpos + 2 * d)


@pytest.mark.parametrize('name', sorted(NAMED_CONFIGS))
def test_every_named_config_has_the_architectures_parameter_count(name):
    assert _count(name) == _t5_parameter_count(get_config(name))


def test_an_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match='Known configs'):
        get_config('t5_1_1_huge')


def test_one_activation_dtype_table_for_gin_and_the_study():
    from doa_jax.gin_utils import get_model_config
    from doa_jax.study.runner import StageConfig
    for name, dtype in (('bfloat16', jnp.bfloat16), ('float32', jnp.float32),
                        ('float16', jnp.float16)):
        assert get_model_config('t5_1_1_tiny', activation_dtype=name).dtype == dtype
        assert StageConfig(model='t5_1_1_tiny', activation_dtype=name).model_config().dtype == dtype
    with pytest.raises(ValueError, match=r"get_model_config.activation_dtype='fp8'; choose one of"):
        get_model_config('t5_1_1_tiny', activation_dtype='fp8')
    with pytest.raises(ValueError, match=r"activation_dtype='fp8'; choose one of"):
        StageConfig(activation_dtype='fp8').model_config()


def test_t5x_tree_names_and_logical_axes():
    model = T5(get_config('t5_1_1_tiny'))
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))
    specs = nn.get_partition_spec(variables)['params']
    assert tuple(specs['token_embedder']['embedding']) == ('vocab', 'embed')
    assert tuple(specs['encoder']['relpos_bias']['rel_embedding']) == ('heads', 'relpos_buckets')
    layer = specs['decoder']['layers_1']
    assert tuple(layer['self_attention']['query']['kernel']) == ('embed', 'joined_kv')
    assert tuple(layer['encoder_decoder_attention']['out']['kernel']) == ('joined_kv', 'embed')
    assert tuple(layer['mlp']['wi_1']['kernel']) == ('embed', 'mlp')
    assert tuple(layer['pre_cross_attention_layer_norm']['scale']) == ('embed',)
    assert tuple(specs['decoder']['logits_dense']['kernel']) == ('embed', 'vocab')
    params = nn.unbox(variables['params'])
    assert params['encoder']['layers_0']['attention']['query']['kernel'].shape == (32, 48)
    tied = jax.eval_shape(lambda: T5(get_config('t5_tiny')).init(jax.random.PRNGKey(0), tokens,
                                                                  tokens))
    assert 'logits_dense' not in tied['params']['decoder']
    assert 'wi' in tied['params']['encoder']['layers_0']['mlp']


PARITY_CASES = [
        # (feed_forward_proj, tied, d_kv): heads * d_kv != d_model in the first and third.
        ('gated-gelu', False, 12),
        ('relu', True, 8),
        ('relu', True, 6),
]


def _batch(rng, vocab):
    enc = rng.randint(2, vocab, (3, 40))
    enc[1, 29:] = 0
    dec_t = rng.randint(2, vocab, (3, 25))
    dec_t[2, 19:] = 0
    dec_in = np.concatenate([np.zeros((3, 1), int), dec_t[:, :-1]], 1)
    return enc, dec_in, dec_t


@pytest.mark.parametrize('ff,tied,d_kv', PARITY_CASES)
def test_logits_match_hf_transformers(ff, tied, d_kv):
    import torch

    ref = build_hf_t5(tied=tied, feed_forward_proj=ff, vocab_size=300, d_model=32, d_kv=d_kv,
                      d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=20)
    # The parity tests pin the reference backend: every other backend is tested against it.
    cfg = config_from_hf(ref.config.to_dict(), dtype=jnp.float32).replace(
            attention_impl='xla', matmul_impl='xla')
    assert cfg.logits_via_embedding == tied
    params = params_from_hf_state_dict(state_dict_numpy(ref), cfg)
    enc, dec_in, dec_t = _batch(np.random.RandomState(0), 300)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
    got = np.asarray(T5(cfg).apply({'params': params}, jnp.asarray(enc), jnp.asarray(dec_in),
                                   jnp.asarray(dec_t)))
    valid = dec_t > 0
    assert np.abs(got - want)[valid].max() <= 1e-4


def test_scan_remat_and_unscanned_agree():
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32)
    enc, dec_in, dec_t = _batch(np.random.RandomState(1), cfg.vocab_size)
    model = T5(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec_in)['params'])
    plain = model.apply({'params': params}, enc, dec_in, dec_t)
    scanned_cfg = cfg.replace(scan_layers=True, remat_policy='minimal')
    scanned = scan_params(params, scanned_cfg)
    shapes = jax.eval_shape(lambda: T5(scanned_cfg).init(jax.random.PRNGKey(0), enc, dec_in))
    assert (jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(shapes['params']))
            == jax.tree_util.tree_map(lambda x: x.shape, scanned))
    out = T5(scanned_cfg).apply({'params': scanned}, enc, dec_in, dec_t)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    back = unscan_params(scanned, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_bf16_activations_fp32_params():
    cfg = get_config('t5_1_1_tiny')
    enc, dec_in, dec_t = _batch(np.random.RandomState(2), cfg.vocab_size)
    model = T5(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec_in)['params'])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    bf16 = model.apply({'params': params}, enc, dec_in, dec_t)
    fp32 = T5(cfg.replace(dtype=jnp.float32)).apply({'params': params}, enc, dec_in, dec_t)
    assert bf16.dtype == jnp.float32  # logits come back float32
    assert np.abs(np.asarray(bf16) - np.asarray(fp32)).max() < 0.5
    assert np.abs(np.asarray(bf16) - np.asarray(fp32)).max() > 0  # really computed in bf16


def test_dropout_is_active_only_when_enabled():
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32, dropout_rate=0.3)
    enc, dec_in, dec_t = _batch(np.random.RandomState(3), cfg.vocab_size)
    model = T5(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), enc, dec_in)['params'])
    a = model.apply({'params': params}, enc, dec_in, dec_t)
    b = model.apply({'params': params}, enc, dec_in, dec_t)
    np.testing.assert_array_equal(a, b)
    c = model.apply({'params': params}, enc, dec_in, dec_t, enable_dropout=True,
                    rngs={'dropout': jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
