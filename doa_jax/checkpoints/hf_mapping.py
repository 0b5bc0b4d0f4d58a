"""Name and layout mapping between HF `transformers` T5 state dicts and t5x-named parameter trees.

HF stores Linear weights as (out, in); t5x stores kernels as (in, out). HF keeps the relative
position table only in block 0 of each stack, as (buckets, heads); t5x keeps it per stack as
(heads, buckets).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from doa_jax.models.config import T5Config

_FF_PROJ = {
    'gated-gelu': ('gelu', 'linear'),
    'gated-gelu_new': ('gelu', 'linear'),
    'relu': ('relu',),
    'gated-relu': ('relu', 'linear'),
    'gated-silu': ('silu', 'linear'),
}
_ACT_TO_FF = {('gelu', 'linear'): 'gated-gelu', ('relu',): 'relu', ('relu', 'linear'): 'gated-relu',
              ('silu', 'linear'): 'gated-silu'}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> T5Config:
    """Builds a T5Config from an HF T5 `config.json` dictionary."""
    ff = hf.get('feed_forward_proj', 'relu')
    if ff not in _FF_PROJ:
        raise ValueError(f'Unsupported HF feed_forward_proj {ff!r}; supported: {sorted(_FF_PROJ)}.')
    num_layers = hf['num_layers']
    # transformers >= 5 records the original-T5 logit scaling as `scale_decoder_outputs` and
    # forces `tie_word_embeddings=True` in memory; saved v1.1 configs say tie_word_embeddings=False.
    tied = bool(hf.get('tie_word_embeddings', True))
    if 'scale_decoder_outputs' in hf:
        tied = bool(hf['scale_decoder_outputs'])
    cfg = T5Config(
            vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
            num_encoder_layers=num_layers,
            num_decoder_layers=hf.get('num_decoder_layers') or num_layers,
            head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], mlp_activations=_FF_PROJ[ff],
            dropout_rate=hf.get('dropout_rate', 0.1),
            logits_via_embedding=tied,
            relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
            relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
            layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6))
    return cfg.replace(**overrides)


def hf_config_dict(cfg: T5Config) -> dict[str, Any]:
    """The HF `config.json` fields that describe `cfg` (T5ForConditionalGeneration)."""
    acts = tuple(cfg.mlp_activations)
    if acts not in _ACT_TO_FF:
        raise ValueError(f'MLP activations {acts} have no HF feed_forward_proj equivalent.')
    return {
        'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
        'vocab_size': cfg.vocab_size, 'd_model': cfg.emb_dim, 'd_kv': cfg.head_dim,
        'd_ff': cfg.mlp_dim, 'num_layers': cfg.num_encoder_layers,
        'num_decoder_layers': cfg.num_decoder_layers, 'num_heads': cfg.num_heads,
        'relative_attention_num_buckets': cfg.relative_attention_num_buckets,
        'relative_attention_max_distance': cfg.relative_attention_max_distance,
        'dropout_rate': cfg.dropout_rate, 'layer_norm_epsilon': cfg.layer_norm_epsilon,
        'feed_forward_proj': _ACT_TO_FF[acts], 'is_encoder_decoder': True,
        'tie_word_embeddings': cfg.logits_via_embedding, 'pad_token_id': 0,
        'eos_token_id': 1, 'decoder_start_token_id': 0,
    }


def _mlp_names(cfg: T5Config) -> list[str]:
    return ['wi'] if len(cfg.mlp_activations) == 1 else [f'wi_{i}' for i in
                                                         range(len(cfg.mlp_activations))]


def hf_to_t5x_names(cfg: T5Config) -> dict[str, tuple[str, str]]:
    """Maps each HF state-dict key to (t5x path joined with '/', transform)."""
    m: dict[str, tuple[str, str]] = {'shared.weight': ('token_embedder/embedding', 'id')}
    attn = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
    for stack, n_layers in (('encoder', cfg.num_encoder_layers),
                            ('decoder', cfg.num_decoder_layers)):
        m[f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = (
                f'{stack}/relpos_bias/rel_embedding', 'T')
        m[f'{stack}.final_layer_norm.weight'] = (f'{stack}/{stack}_norm/scale', 'id')
        for i in range(n_layers):
            hp, tp = f'{stack}.block.{i}.layer', f'{stack}/layers_{i}'
            if stack == 'encoder':
                subs = [('0.SelfAttention', 'attention', '0.layer_norm', 'pre_attention_layer_norm')]
                mlp_idx = 1
            else:
                subs = [('0.SelfAttention', 'self_attention', '0.layer_norm',
                         'pre_self_attention_layer_norm'),
                        ('1.EncDecAttention', 'encoder_decoder_attention', '1.layer_norm',
                         'pre_cross_attention_layer_norm')]
                mlp_idx = 2
            for h_attn, t_attn, h_norm, t_norm in subs:
                for hk, tk in attn.items():
                    m[f'{hp}.{h_attn}.{hk}.weight'] = (f'{tp}/{t_attn}/{tk}/kernel', 'T')
                m[f'{hp}.{h_norm}.weight'] = (f'{tp}/{t_norm}/scale', 'id')
            for name in _mlp_names(cfg) + ['wo']:
                m[f'{hp}.{mlp_idx}.DenseReluDense.{name}.weight'] = (f'{tp}/mlp/{name}/kernel', 'T')
            m[f'{hp}.{mlp_idx}.layer_norm.weight'] = (f'{tp}/pre_mlp_layer_norm/scale', 'id')
    if not cfg.logits_via_embedding:
        m['lm_head.weight'] = ('decoder/logits_dense/kernel', 'T')
    return m


# Keys HF writes that duplicate `shared.weight` (tied input embeddings) or hold buffers.
HF_ALIAS_KEYS = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split('/')
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: Mapping, path: str):
    for p in path.split('/'):
        tree = tree[p]
    return tree


def params_from_hf_state_dict(state: Mapping[str, np.ndarray], cfg: T5Config) -> dict:
    """Converts an HF state dict (numpy arrays) to a nested t5x-named parameter tree.

    Strict: unknown keys, missing keys and shape mismatches raise one error listing them.
    """
    from doa_jax.checkpoints.errors import CheckpointMismatchError

    names = hf_to_t5x_names(cfg)
    expected = expected_shapes(cfg)
    tree: dict = {}
    unexpected = [k for k in state if k not in names and k not in HF_ALIAS_KEYS
                  and not (cfg.logits_via_embedding and k == 'lm_head.weight')]
    missing = [k for k in names if k not in state]
    bad_shapes = []
    for hk, (tpath, transform) in names.items():
        if hk not in state:
            continue
        value = np.asarray(state[hk], dtype=np.float32)
        if transform == 'T':
            value = value.T
        want = expected[tpath]
        if tuple(value.shape) != tuple(want):
            bad_shapes.append((f'{hk} -> {tpath}', tuple(value.shape), tuple(want)))
            continue
        _set(tree, tpath, value)
    if unexpected or missing or bad_shapes:
        raise CheckpointMismatchError.build(source='HF state dict', missing=missing,
                                            unexpected=unexpected, bad_shapes=bad_shapes)
    return tree


def hf_state_dict_from_params(params: Mapping, cfg: T5Config) -> dict[str, np.ndarray]:
    """Converts a t5x-named (unscanned) parameter tree to an HF state dict of numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for hk, (tpath, transform) in hf_to_t5x_names(cfg).items():
        value = np.asarray(_get(params, tpath), dtype=np.float32)
        out[hk] = np.ascontiguousarray(value.T if transform == 'T' else value)
    for alias in HF_ALIAS_KEYS:
        out[alias] = out['shared.weight']
    if cfg.logits_via_embedding:
        out['lm_head.weight'] = out['shared.weight']
    return out


def expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """t5x path -> shape for the unscanned tree of `cfg`, from `jax.eval_shape` (no allocation)."""
    import jax
    import jax.numpy as jnp

    from doa_jax.models.t5 import T5

    model = T5(cfg.replace(scan_layers=False))
    tokens = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens))
    import flax.linen as nn
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes['params']))[0]
    return {'/'.join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
