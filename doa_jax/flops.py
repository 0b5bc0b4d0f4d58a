"""Training FLOPs of an encoder-decoder and MFU against the device's peak (docs/design.md, "FLOPs").

Peaks come from the device catalog, the `devices` section of doa_jax/cost/prices.yaml, which also
holds the prices: one table and one matching rule (`PriceTable.match_device`) for both.
"""

from __future__ import annotations

import logging

import jax

from doa_jax.cost.prices import DEFAULT_PRICE_PATH, PriceTable, default_prices
from doa_jax.models.config import T5Config

log = logging.getLogger(__name__)

# The catalog's CPU figure: an XLA fp32 matmul peak measured on the 2-core test CPU, not a vendor
# number; training overrides it with the CPU_PEAK_FLOPS gin macro.
DEFAULT_CPU_PEAK_FLOPS = default_prices().peak_flops('cpu')
_warned_kinds: set[str] = set()


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


def decode_flops_per_sequence(config: T5Config, source_len: int, decode_len: int) -> float:
    """Forward FLOPs of greedy decoding with a KV cache: the encoder and the cross-attention K/V
    once over `source_len` tokens, then `decode_len` one-token decoder steps, step t attending to
    t cached targets and every source token. A third of `train_flops_per_sequence` (no backward
    pass), with causal self-attention counted as t * (t + 1) / 2."""
    n = parameter_counts(config)
    s, t = source_len, decode_len
    dense = 2 * ((n['encoder'] + n['cross_kv']) * s + (n['decoder_rest'] + n['lm_head']) * t)
    a = config.num_heads * config.head_dim
    attention = 4 * a * (config.num_encoder_layers * s * s
                         + config.num_decoder_layers * (t * (t + 1) / 2 + s * t))
    return float(dense + attention)


def peak_flops_per_device(device: jax.Device | None = None,
                          cpu_peak: float = DEFAULT_CPU_PEAK_FLOPS,
                          catalog: PriceTable | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device; CPUs use `cpu_peak` (gin: CPU_PEAK_FLOPS).

    None, with a warning once per device kind, when the catalog has no peak for the device: MFU
    is then unknown, which must not stop a run.
    """
    device = device or jax.devices()[0]
    if device.platform == 'cpu':
        return cpu_peak
    peak = (catalog or default_prices()).peak_flops(device.device_kind)
    if peak is None and device.device_kind not in _warned_kinds:
        _warned_kinds.add(device.device_kind)
        log.warning('No peak FLOP/s known for device kind %r, so MFU is not reported. Add '
                    '`peak_bf16_tflops` for it to the device catalog (%s, devices section; '
                    'benchmarks also take --peak_flops).', device.device_kind, DEFAULT_PRICE_PATH)
    return peak


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation; None (unknown) when the device's peak is unknown."""
    if peak_per_device is None:
        return None
    return flops_per_step / seconds_per_step / (num_devices * peak_per_device)
