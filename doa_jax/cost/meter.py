"""Device-seconds metering: which devices a stage holds, and timing of range-keyed work.

A stage pays for every device in its mesh for its whole wall-clock time, so device-seconds =
wall-clock x mesh size; the device kind (for the price) comes from jax itself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from doa_jax.cost.ledger import Ledger
from doa_jax.cost.prices import PriceTable


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    kind: str           # jax's device_kind, e.g. 'NVIDIA A100-SXM4-40GB', 'TPU v4', 'cpu'
    count: int          # devices paid for (the whole mesh, across hosts)


def device_info(mesh: Any = None) -> DeviceInfo:
    """Kind and count of the devices in `mesh` (anything with `.devices`), else all jax devices."""
    if mesh is not None:
        devices = list(getattr(mesh.devices, 'flat', mesh.devices))
    else:
        import jax
        devices = jax.devices()
    if not devices:
        raise ValueError('the mesh has no devices; cannot price an empty mesh.')
    return DeviceInfo(str(devices[0].device_kind), len(devices))


def is_writer_process() -> bool:
    """Only jax process 0 writes the ledger, so a multi-host job records each interval once."""
    import jax
    return jax.process_index() == 0


class ComputeMeter:
    """Times a block of range-keyed work (e.g. one inference shard) and records it on exit.

    with ComputeMeter(ledger, prices, 'teacher', 'pseudo_label', first=0, last=999):
        decode_shard(...)

    Only a block that finishes is recorded: a shard that crashes midway is redone and billed once.
    """

    def __init__(self, ledger: Ledger, prices: PriceTable, run_id: str, stage: str, first: int,
                 last: int, mesh: Any = None, device_price_fallback: str | None = None,
                 write: bool | None = None, seq: int = 0):
        self.ledger, self.run_id, self.stage, self.seq = ledger, run_id, stage, seq
        self.first, self.last = first, last
        self.device = device_info(mesh)
        self.rate = prices.usd_per_device_hour(self.device.kind, device_price_fallback)
        self.write = is_writer_process() if write is None else write
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> 'ComputeMeter':
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.seconds = time.perf_counter() - self._t0
        if exc_type is None and self.write:
            self.ledger.record_compute(self.run_id, self.stage, self.first, self.last,
                                       self.seconds, self.device.kind, self.device.count,
                                       self.rate, seq=self.seq)
