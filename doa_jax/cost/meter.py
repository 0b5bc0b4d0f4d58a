"""Device-seconds metering: which devices a stage holds, and timing of range-keyed work.

A stage pays for every device in its mesh for its whole wall-clock time, so device-seconds =
wall-clock x mesh size; the device kind (for the price) comes from jax itself.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

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


# jax.monitoring events that time tracing, lowering and compiling (a persistent-cache hit is timed
# inside the backend compile event).
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
_compile = {'seconds': 0.0, 'listening': False}
_compile_lock = threading.Lock()


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling jax programs since its first
    call (jax.monitoring events). A meter reads it before and after a block of work to bill the
    compiles inside the block apart from the work: a rerun compiles again, the work does not."""
    with _compile_lock:
        if not _compile['listening']:
            import jax

            def listen(event: str, seconds: float, **_) -> None:
                if event in COMPILE_EVENTS:
                    with _compile_lock:
                        _compile['seconds'] += seconds

            jax.monitoring.register_event_duration_secs_listener(listen)
            _compile['listening'] = True
        return _compile['seconds']


class ComputeMeter:
    """Times a block of range-keyed work (e.g. one inference shard) and records it on exit.

    with ComputeMeter(ledger, prices, 'teacher', 'pseudo_label', first=0, last=999):
        decode_shard(...)

    Only a block that finishes is recorded: a shard that crashes midway is redone and billed once.
    With `compile_clock` (e.g. `compile_seconds`), the compile time inside the block is taken out
    of the block's compute and handed to `on_compile(seconds, meter)` instead (what a resumed job
    compiles again is not the work of its first block).
    """

    def __init__(self, ledger: Ledger, prices: PriceTable, run_id: str, stage: str, first: int,
                 last: int, mesh: Any = None, device_price_fallback: str | None = None,
                 write: bool | None = None, seq: int = 0,
                 compile_clock: Callable[[], float] | None = None,
                 on_compile: Callable[[float, 'ComputeMeter'], None] | None = None):
        self.ledger, self.run_id, self.stage, self.seq = ledger, run_id, stage, seq
        self.compile_clock, self.on_compile = compile_clock, on_compile
        self.compile_seconds = 0.0
        self._c0 = 0.0
        self.first, self.last = first, last
        self.device = device_info(mesh)
        self.rate = prices.usd_per_device_hour(self.device.kind, device_price_fallback)
        self.write = is_writer_process() if write is None else write
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> 'ComputeMeter':
        self._t0 = time.perf_counter()
        if self.compile_clock is not None:
            self._c0 = self.compile_clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        wall = time.perf_counter() - self._t0
        if self.compile_clock is not None:
            self.compile_seconds = min(wall, max(0.0, self.compile_clock() - self._c0))
        self.seconds = wall - self.compile_seconds
        if exc_type is None and self.on_compile is not None and self.compile_seconds > 0:
            self.on_compile(self.compile_seconds, self)
        if exc_type is None and self.write:
            self.ledger.record_compute(self.run_id, self.stage, self.first, self.last,
                                       self.seconds, self.device.kind, self.device.count,
                                       self.rate, seq=self.seq)
