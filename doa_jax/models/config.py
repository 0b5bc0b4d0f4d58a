"""T5 architecture configs: T5 v1.1 (gated GELU, untied head) and original T5 (ReLU, tied)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 encoder-decoder, named as t5x names them."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    head_dim: int = 64
    mlp_dim: int = 1024
    # ('gelu', 'linear') is T5 v1.1's gated GELU; ('relu',) is the original T5 MLP.
    mlp_activations: Sequence[str] = ('gelu', 'linear')
    dropout_rate: float = 0.0
    # True: the LM head is the token embedding (original T5), logits scaled by emb_dim**-0.5.
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Activation dtype; parameters always stay float32.
    dtype: Any = jnp.bfloat16
    float32_attention_logits: bool = True
    scan_layers: bool = False
    # None, 'full' (recompute everything) or 'minimal' (save matmul outputs without batch dims).
    remat_policy: str | None = None
    # Which implementation serves attention and dense products (doa_jax.ops): attention_impl is
    # 'auto', 'xla' (the reference), 'dot_product_attention' (jax.nn.dot_product_attention; cuDNN
    # flash attention on NVIDIA GPUs) or 'cpu_kernels'; matmul_impl is 'auto', 'xla' or
    # 'cpu_kernels'. 'auto' takes the CPU kernels on a single CPU device where they run,
    # dot_product_attention on GPUs, else xla.
    attention_impl: str = 'auto'
    matmul_impl: str = 'auto'

    def __post_init__(self):
        from doa_jax.ops import ATTENTION_IMPLS, MATMUL_IMPLS
        for field, value, choices in (('attention_impl', self.attention_impl, ATTENTION_IMPLS),
                                      ('matmul_impl', self.matmul_impl, MATMUL_IMPLS)):
            if value not in choices:
                raise ValueError(f'Unknown {field} {value!r}; choose one of {choices}.')

    def replace(self, **kwargs) -> 'T5Config':
        return dataclasses.replace(self, **kwargs)

    @property
    def is_gated(self) -> bool:
        return len(self.mlp_activations) > 1


def _v1_1(emb_dim, num_heads, layers, head_dim, mlp_dim) -> T5Config:
    return T5Config(emb_dim=emb_dim, num_heads=num_heads, num_encoder_layers=layers,
                    num_decoder_layers=layers, head_dim=head_dim, mlp_dim=mlp_dim,
                    mlp_activations=('gelu', 'linear'), logits_via_embedding=False)


def _original(emb_dim, num_heads, layers, head_dim, mlp_dim) -> T5Config:
    return T5Config(emb_dim=emb_dim, num_heads=num_heads, num_encoder_layers=layers,
                    num_decoder_layers=layers, head_dim=head_dim, mlp_dim=mlp_dim,
                    mlp_activations=('relu',), logits_via_embedding=True)


# Sizes from the T5 / T5 v1.1 papers and the public t5x gin files.
NAMED_CONFIGS: dict[str, T5Config] = {
    't5_1_1_small': _v1_1(512, 6, 8, 64, 1024),
    't5_1_1_base': _v1_1(768, 12, 12, 64, 2048),
    't5_1_1_large': _v1_1(1024, 16, 24, 64, 2816),
    't5_1_1_xl': _v1_1(2048, 32, 24, 64, 5120),
    't5_1_1_xxl': _v1_1(4096, 64, 24, 64, 10240),
    't5_small': _original(512, 8, 6, 64, 2048),
    't5_base': _original(768, 12, 12, 64, 3072),
    't5_large': _original(1024, 16, 24, 64, 4096),
    't5_3b': _original(1024, 32, 24, 128, 16384),
    't5_11b': _original(1024, 128, 24, 128, 65536),
    # Tiny configs for tests and laptop runs; heads * head_dim != emb_dim on purpose.
    't5_1_1_tiny': T5Config(vocab_size=512, emb_dim=32, num_heads=4, num_encoder_layers=2,
                            num_decoder_layers=2, head_dim=12, mlp_dim=48),
    # A slightly larger tiny model: the teacher of the offline study quickstart.
    't5_1_1_mini': T5Config(vocab_size=512, emb_dim=64, num_heads=4, num_encoder_layers=3,
                            num_decoder_layers=3, head_dim=16, mlp_dim=128),
    't5_tiny': T5Config(vocab_size=512, emb_dim=32, num_heads=4, num_encoder_layers=2,
                        num_decoder_layers=2, head_dim=12, mlp_dim=48,
                        mlp_activations=('relu',), logits_via_embedding=True),
}


def get_config(name: str, **overrides) -> T5Config:
    """Returns a named config, with field overrides (e.g. dtype=jnp.float32)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(
                f'Unknown model config {name!r}. Known configs: {", ".join(sorted(NAMED_CONFIGS))}.')
    return NAMED_CONFIGS[name].replace(**overrides)


# Activation dtypes by the names gin files and study configs use (parameters stay float32).
ACTIVATION_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}


def activation_dtype(name: str, setting: str = 'activation_dtype') -> Any:
    """The jnp dtype named `name`; an unknown name is an error that names `setting` (where the user
    wrote it) and the choices."""
    if name not in ACTIVATION_DTYPES:
        raise ValueError(f'{setting}={name!r}; choose one of {sorted(ACTIVATION_DTYPES)}.')
    return ACTIVATION_DTYPES[name]
