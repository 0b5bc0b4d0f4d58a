"""Training FLOPs of an encoder-decoder and MFU against the device's peak (DESIGN.md)."""

from __future__ import annotations

import jax

from doa_jax.models.config import T5Config

# Peak dense bf16 FLOP/s per device kind (substring of jax's device_kind, lower-cased).
PEAK_BF16_FLOPS = {
    'h200': 989e12,
    'h100': 989e12,
    'a100': 312e12,
    'v100': 125e12,
    'tpu v4': 275e12,
    'tpu v5 lite': 197e12,
    'tpu v5e': 197e12,
    'tpu v5p': 459e12,
}
DEFAULT_CPU_PEAK_FLOPS = 0.35e12   # XLA fp32 matmul peak measured on the 2-core test CPU


def parameter_counts(config: T5Config) -> dict[str, int]:
    """Matmul parameters by role (norms and relative biases are negligible and left out)."""
    d, inner, f = config.emb_dim, config.num_heads * config.head_dim, config.mlp_dim
    n_mlp_in = len(config.mlp_activations)
    attn = 4 * d * inner
    mlp = (n_mlp_in + 1) * d * f
    return {
        'encoder': config.num_encoder_layers * (attn + mlp),
        # Cross-attention K/V projections run over source tokens.
        'cross_kv': config.num_decoder_layers * 2 * d * inner,
        'decoder_rest': config.num_decoder_layers * (attn + 2 * d * inner + mlp),
        'lm_head': d * config.vocab_size,
    }


def train_flops_per_sequence(config: T5Config, source_len: int, target_len: int) -> float:
    """6 * (matmul params x the tokens they see) + attention score/value FLOPs (fwd + bwd)."""
    n = parameter_counts(config)
    s, t = source_len, target_len
    dense = 6 * ((n['encoder'] + n['cross_kv']) * s + (n['decoder_rest'] + n['lm_head']) * t)
    a = config.num_heads * config.head_dim
    attention = 12 * a * (config.num_encoder_layers * s * s
                          + config.num_decoder_layers * (t * t / 2 + s * t))
    return float(dense + attention)


def peak_flops_per_device(device: jax.Device | None = None, cpu_peak: float = DEFAULT_CPU_PEAK_FLOPS) -> float:
    """Peak FLOP/s of one device; CPUs use `cpu_peak` (gin: CPU_PEAK_FLOPS)."""
    device = device or jax.devices()[0]
    if device.platform == 'cpu':
        return cpu_peak
    kind = device.device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in kind:
            return peak
    raise ValueError(f'No peak FLOP/s known for device kind {device.device_kind!r}; add it to '
                     'doa_jax.flops.PEAK_BF16_FLOPS.')


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak_per_device: float) -> float:
    return flops_per_step / seconds_per_step / (num_devices * peak_per_device)
