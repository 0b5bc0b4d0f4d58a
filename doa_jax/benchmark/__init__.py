"""Throughput benchmarks: `python -m doa_jax.benchmark {train,decode,pseudo_label,plan} ...`.

Shared here: the price flags and the money columns every throughput benchmark reports
(sequences/s and dollars per million tokens at the price table's rate for the device kind).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_price_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--prices', default=None, help='price YAML overriding the default table')
    parser.add_argument('--device_price_fallback', default=None,
                        help='price entry for a device kind the table lacks (e.g. A100)')


def price(result: dict[str, Any], *, device_kind: str, device_count: int, batch: int,
          args: argparse.Namespace) -> dict[str, Any]:
    """Adds seqs/s, $/device-hour and $ per 1M tokens (of `tokens_per_s`) to a result dict."""
    from doa_jax.cost.prices import device_cost_usd, load_prices

    table = load_prices(getattr(args, 'prices', None))
    rate = float(table.usd_per_device_hour(device_kind,
                                           getattr(args, 'device_price_fallback', None)))
    result['seqs_per_s'] = batch / result['median_s']
    result['device_kind'], result['device_count'] = device_kind, device_count
    result['usd_per_device_hour'] = rate
    result['usd_per_1m_tokens'] = device_cost_usd(1e6 / result['tokens_per_s'], device_count, rate)
    return result


def torch_device_kind() -> tuple[str, int]:
    """(device kind, count) PyTorch runs on in the HF comparisons: one CUDA GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), 1
    return 'cpu', 1
