"""Benchmarks: `python -m doa_jax.benchmark {train,decode,pseudo_label,plan,gpu_check} ...`.

Shared here: the price flags and the money columns every throughput benchmark reports
(sequences/s and dollars per million tokens at the price table's rate for the device kind), the
`--mesh` parser, the JSON writer and the `python -m doa_jax.benchmark.<name>` entry.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Sequence


def parse_mesh(text: str, default_data: int = -1) -> tuple[int, int]:
    """`data:D,model:M` -> (D, M); a missing axis is `default_data` / 1."""
    try:
        axes = {k: int(v) for k, v in (kv.split(':') for kv in text.split(','))}
    except ValueError:
        raise SystemExit(f'--mesh={text!r} is malformed; write it as data:2,model:4.') from None
    unknown = set(axes) - {'data', 'model'}
    if unknown:
        raise SystemExit(f'--mesh={text!r} names unknown axes {sorted(unknown)}; use data and model.')
    return axes.get('data', default_data), axes.get('model', 1)


def add_impl_arguments(parser: argparse.ArgumentParser) -> None:
    """--attention_impl / --matmul_impl: the op backends (`doa_jax.ops`), as in T5Config."""
    from doa_jax import ops
    parser.add_argument('--attention_impl', default='auto', choices=ops.ATTENTION_IMPLS,
                        help="attention backend; 'auto' picks per platform (CPU kernels on one "
                             "CPU device where they run, dot_product_attention on GPU, else xla)")
    parser.add_argument('--matmul_impl', default='auto', choices=ops.MATMUL_IMPLS,
                        help="dense products; 'auto': CPU kernels where they run, else xla")


def impl_labels(cfg) -> dict[str, str]:
    """The backends the config's ops resolve to here (the JSON's `attention_impl` and
    `matmul_impl`), e.g. {'attention_impl': 'cpu_kernels', 'matmul_impl': 'xla'}."""
    from doa_jax import ops
    resolved = ops.for_config(cfg)
    return {'attention_impl': resolved.attention_impl, 'matmul_impl': resolved.matmul_impl}


def write_json(path: str | None, payload: Any, indent: int = 1) -> None:
    """Writes `payload` to `path` (the --json flag) when one is given."""
    if path:
        with open(path, 'w') as f:
            json.dump(payload, f, indent=indent)


def standalone_main(prog: str, doc: str | None, add_arguments: Callable, run: Callable,
                    argv: Sequence[str] | None = None) -> int:
    """`python -m doa_jax.benchmark.<name> ...`: the subcommand's own parser and run."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or '').split('\n')[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


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
