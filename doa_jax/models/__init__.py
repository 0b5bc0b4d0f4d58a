"""T5 encoder-decoder models (T5 v1.1 and original T5) in flax.linen."""

from doa_jax.models.config import NAMED_CONFIGS, T5Config, get_config
