"""How a study prices compute: FLOPs at a stated nominal throughput (default), or wall clock.

The cost ledger always records measured wall-clock seconds: on an accelerator a job holds alone
and pays for by the hour, they are what the job costs. On a shared CPU they are not the method's
cost. Other processes slow every step, so wall clock moves with machine load, and between a
laptop and a server it moves with machine speed; with it move what a budget buys, which points are
feasible and the recommendation. (The quickstart rerun on a loaded 2-core machine doubled its
teachers' cost and flipped every answer to "annotate".) Process CPU time removes most of the load
but not all of it (caches, SMT siblings and clock frequency are shared, and XLA's worker threads
spin while they wait), and none of the speed.

So the default, `kind='flops'`, prices work, not time: each stage's FLOPs (`doa_jax.flops`:
training = steps x batch x FLOPs per sequence at the padded feature lengths, plus the online
teacher's forward pass for token-level KD; pseudo-labeling = examples x greedy-decode FLOPs at
the maximum input and decode lengths) over a nominal throughput (the device catalog's peak
FLOP/s for the device kind, doa_jax/cost/prices.yaml, times a stated utilisation) are
device-seconds, priced at the catalog's $/device-hour. The same study on the same device kind
costs the same dollars on any machine under any load. Perfect scaling over devices is assumed:
the device count drops out.

`kind='measured'` prices the ledgers' wall clock instead (compile, checkpoint and host time
included, as the cost callback bills them): use it on a dedicated cluster, where wall clock is
the bill.

The default utilisations reproduce the quickstart's wall-clock costs on this project's quiet
2-core Zen 5 machine (its mini teacher's 300 steps cost about $0.002,
pseudo-labeling its 1,536-example pool about $0.0003, at the CPU entry's 0.35 TFLOP/s and $0.40
per device-hour). On GPUs and TPUs state your own (t5x reaches roughly 0.25-0.37 when training),
or use 'measured'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from doa_jax.cost.prices import (DEFAULT_PRICE_PATH, PriceError, PriceTable, device_cost_usd,
                                 format_usd)

COST_MODELS = ('flops', 'measured')


@dataclasses.dataclass(frozen=True)
class ComputeCostModel:
    """A study's compute pricing (see the module docstring): 'flops' or 'measured'."""

    kind: str = 'flops'
    train_utilization: float = 0.15    # achieved / peak FLOP/s of training steps
    decode_utilization: float = 0.10   # the same for greedy pseudo-labeling
    device_kind: str | None = None     # default: the kind of the devices jax runs on

    def __post_init__(self):
        if self.kind not in COST_MODELS:
            raise ValueError(f'ComputeCostModel.kind={self.kind!r}; use '
                             f'{" or ".join(map(repr, COST_MODELS))} '
                             "(gin: ComputeCostModel.kind = 'flops').")
        for name in ('train_utilization', 'decode_utilization'):
            u = getattr(self, name)
            if not 0.0 < u <= 1.0:
                raise ValueError(f'ComputeCostModel.{name}={u}: a utilisation is a fraction of '
                                 'the peak, in (0, 1].')

    @property
    def measured(self) -> bool:
        return self.kind == 'measured'

    def resolved(self) -> 'ComputeCostModel':
        """The model with `device_kind` filled in from jax (the study's devices)."""
        if self.device_kind is not None:
            return self
        import jax
        return dataclasses.replace(self, device_kind=str(jax.devices()[0].device_kind))

    def _peak(self, prices: PriceTable) -> float:
        kind = self.resolved().device_kind
        peak = prices.peak_flops(kind)
        if peak is None:
            raise PriceError(
                f'the FLOPs cost model needs the peak FLOP/s of device kind {kind!r}, and the '
                f'device catalog ({prices.origin}) has none. Add `peak_bf16_tflops` for it to a '
                f'price YAML shaped like {DEFAULT_PRICE_PATH} (study.prices), or price wall clock '
                "with --gin.ComputeCostModel.kind=\"'measured'\".")
        return peak

    def _usd(self, prices: PriceTable, flops: float, utilization: float) -> float:
        seconds = flops / (self._peak(prices) * utilization)
        return device_cost_usd(seconds, 1, prices.usd_per_device_hour(self.resolved().device_kind))

    def train_usd(self, prices: PriceTable, model_config: Any, steps: int, batch_size: int,
                  lengths: Mapping[str, int], forward_only_config: Any = None) -> float:
        """Dollars of `steps` training steps; `forward_only_config` adds a model that runs
        forward on every batch (the online teacher of token-level KD)."""
        from doa_jax.flops import train_flops_per_sequence
        src, tgt = int(lengths['inputs']), int(lengths['targets'])
        per_sequence = train_flops_per_sequence(model_config, src, tgt)
        if forward_only_config is not None:
            per_sequence += train_flops_per_sequence(forward_only_config, src, tgt) / 3
        return self._usd(prices, steps * batch_size * per_sequence, self.train_utilization)

    def decode_usd(self, prices: PriceTable, model_config: Any, examples: int,
                   source_len: int, decode_len: int) -> float:
        """Dollars of greedily decoding `examples` inputs of `source_len` tokens, `decode_len`
        steps each (the maximum: what a budget must be able to pay for)."""
        from doa_jax.flops import decode_flops_per_sequence
        flops = examples * decode_flops_per_sequence(model_config, source_len, decode_len)
        return self._usd(prices, flops, self.decode_utilization)

    def describe(self, prices: PriceTable) -> str:
        """One sentence for the report; raises PriceError (saying how to fix it) when the
        FLOPs model cannot price this device kind."""
        if self.measured:
            return ('measured: the wall-clock device-hours each stage\'s cost ledger recorded '
                    '(compile, checkpoint and host time included), at the price table\'s '
                    '$/device-hour; they move with machine load and speed.')
        kind = self.resolved().device_kind
        return (f'flops: FLOPs (doa_jax.flops) over a nominal throughput, the device catalog\'s '
                f'peak for {kind!r} ({self._peak(prices) / 1e12:g} TFLOP/s) x '
                f'{self.train_utilization:g} for training and x {self.decode_utilization:g} for '
                f'pseudo-labeling, at {format_usd(prices.usd_per_device_hour(kind))}/device-hour; '
                'the same on any machine under any load.')

    def label(self) -> str:
        """A short name for each results.json record, e.g. 'flops(cpu, train 0.15, decode 0.1)'."""
        if self.measured:
            return 'measured'
        return (f'flops({self.resolved().device_kind}, train {self.train_utilization:g}, '
                f'decode {self.decode_utilization:g})')

    def as_dict(self) -> dict:
        return dataclasses.asdict(self.resolved())
