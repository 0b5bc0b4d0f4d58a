"""Device mesh and the one table that maps t5x logical axis names to mesh axes.

The model names every parameter and activation dimension with t5x's logical names (batch, embed,
mlp, heads, kv, joined_kv, vocab, relpos_buckets, length, layers). This module is the only place that
decides how those names land on the (data, model) mesh, so changing a parallelism strategy never
touches the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DATA_AXIS = 'data'
MODEL_AXIS = 'model'

# t5x's standard rules (1-D model parallelism over heads/mlp/vocab, data parallelism over batch).
STANDARD_RULES: Rules = (
    ('batch', DATA_AXIS),
    ('vocab', MODEL_AXIS),
    ('embed', None),
    ('mlp', MODEL_AXIS),
    ('heads', MODEL_AXIS),
    ('kv', None),
    ('joined_kv', MODEL_AXIS),
    ('relpos_buckets', None),
    ('length', None),
    ('layers', None),
)


def param_rules(fsdp: bool = False) -> Rules:
    """Rules for parameters and optimizer state; FSDP also shards `embed` over the data axis.

    Activations always use STANDARD_RULES (their `embed` dim stays replicated); with FSDP, XLA
    all-gathers each weight before its matmul, as in ZeRO-3.
    """
    if not fsdp:
        return STANDARD_RULES
    return tuple((name, DATA_AXIS) if name == 'embed' else (name, axis)
                 for name, axis in STANDARD_RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 for `data` means 'all devices not used by model parallelism'."""

    data: int = -1
    model: int = 1
    fsdp: bool = False


def make_mesh(config: MeshConfig = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over all devices (every host's), model axis innermost."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    model = config.model
    if model < 1 or n % model:
        raise ValueError(f'Mesh model axis {model} does not divide the {n} available devices; '
                         'set MeshConfig.model (gin: MESH_MODEL) to a divisor of the device count.')
    data = n // model if config.data == -1 else config.data
    if data * model != n:
        raise ValueError(f'Mesh data={data} x model={model} = {data * model} devices, but '
                         f'{n} are available; set MESH_DATA=-1 to use all remaining devices.')
    # Order devices by (process, id) so each host's devices form contiguous data rows.
    devices.sort(key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a tree of logical PartitionSpecs (or None leaves) to NamedShardings on `mesh`."""

    def one(spec):
        if spec is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))

    return jax.tree.map(one, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
                        or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (batch, length) input: batch over the data axis, length replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'BATCH_SIZE') -> None:
    """Fails early, naming both numbers, when the data axis cannot split the global batch."""
    data = mesh.shape[DATA_AXIS]
    if batch_size % data:
        raise ValueError(f'{what}={batch_size} is not divisible by the mesh data axis size {data}; '
                         f'choose a batch size that is a multiple of {data}, or change MESH_MODEL.')
    if batch_size % jax.process_count():
        raise ValueError(f'{what}={batch_size} is not divisible by the number of processes '
                         f'{jax.process_count()}; each host must load an equal share.')
