"""The train state and its shardings; parameters are created already sharded.

`create_train_state` traces the model's init with `jax.eval_shape` (no memory), derives every
leaf's NamedSharding from the logical axis names the model declares, then runs init under
`jax.jit(out_shardings=...)`, so no device ever holds a full copy of a parameter it should shard.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from doa_jax import partitioning

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: optax.OptState


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicates any dimension the mesh axis does not divide (e.g. a 3-head tiny model on model=2)."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is None:
            out.append(None)
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axis if dim % size == 0 else None)
    return PartitionSpec(*out)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_state_shardings(opt_shapes: Any, params_by_path: dict[tuple[str, ...], tuple[Any, PartitionSpec]],
                         mesh: Mesh) -> Any:
    """Optimizer-state leaves follow their parameter's spec; Adafactor's factored row/column
    statistics drop the reduced dimension's axis; scalars and counts are replicated."""

    def one(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = params_by_path.get(keys[start:])
            if hit is None:
                continue
            pshape, pspec = hit
            axes = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
            if leaf.shape == pshape:
                return NamedSharding(mesh, fit_spec(pspec, leaf.shape, mesh))
            if len(pshape) >= 2 and leaf.shape == pshape[:-1]:          # factored row statistic
                return NamedSharding(mesh, fit_spec(PartitionSpec(*axes[:-1]), leaf.shape, mesh))
            if len(pshape) >= 2 and leaf.shape == pshape[:-2] + pshape[-1:]:   # column statistic
                return NamedSharding(mesh, fit_spec(PartitionSpec(*(axes[:-2] + axes[-1:])),
                                                     leaf.shape, mesh))
            break
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, opt_shapes)


def abstract_params(init_params_fn: Callable[[jax.Array], Any], mesh: Mesh,
                    rules: partitioning.Rules, rng: jax.Array) -> tuple[Params, Params]:
    """(shapes, NamedShardings) of the parameters, traced with eval_shape (no memory allocated).

    `init_params_fn(rng)` returns the model's boxed params (with logical axis names); a dimension
    the mesh axis does not divide stays replicated.
    """
    boxed_shapes = jax.eval_shape(init_params_fn, rng)
    logical = nn.get_partition_spec(boxed_shapes)
    shapes = nn.unbox(boxed_shapes)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    mesh_specs = jax.tree.map(lambda spec: nn.logical_to_mesh_axes(spec, rules), logical,
                              is_leaf=is_spec)
    mesh_specs = jax.tree.map(lambda spec, s: fit_spec(spec, s.shape, mesh), mesh_specs, shapes,
                              is_leaf=is_spec)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs, is_leaf=is_spec)
    return shapes, shardings


def abstract_train_state(init_params_fn: Callable[[jax.Array], Any],
                         optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: partitioning.Rules, rng: jax.Array) -> tuple[TrainState, TrainState]:
    """(shapes, shardings) of the train state, traced with eval_shape: no memory is allocated.

    `init_params_fn(rng)` returns the model's boxed params (with logical axis names).
    """
    shapes, param_shardings = abstract_params(init_params_fn, mesh, rules, rng)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = [s.spec for s in jax.tree.leaves(param_shardings)]
    params_by_path = {_path_keys(p): (leaf.shape, spec) for (p, leaf), spec in zip(flat, flat_specs)}
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_shardings = _opt_state_shardings(opt_shapes, params_by_path, mesh)
    shardings = TrainState(step=NamedSharding(mesh, PartitionSpec()), params=param_shardings,
                           opt_state=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes,
                          opt_state=opt_shapes)
    return abstract, shardings


def init_train_state(init_params_fn: Callable[[jax.Array], Any],
                     optimizer: optax.GradientTransformation, shardings: TrainState,
                     rng: jax.Array, params: Params | None = None,
                     abstract: TrainState | None = None) -> TrainState:
    """Creates the state directly in its shardings; `params` (an imported checkpoint) are placed
    with the parameter shardings instead of being initialized."""

    def with_opt(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))

    if params is None:
        return jax.jit(lambda key: with_opt(nn.unbox(init_params_fn(key))),
                       out_shardings=shardings)(rng)
    if abstract is not None:
        _check_imported(params, abstract.params)
    placed = jax.device_put(params, shardings.params)
    return jax.jit(with_opt, out_shardings=shardings, donate_argnums=0)(placed)


def _check_imported(params: Params, shapes: Params) -> None:
    got = jax.tree.structure(params)
    want = jax.tree.structure(shapes)
    if got != want:
        raise ValueError('The parameters loaded from INITIAL_CHECKPOINT_PATH do not match the model '
                         'config: different parameter trees. Check the model gin file (MODEL_CONFIG) '
                         'against the checkpoint, or convert scanned/unscanned layouts with '
                         'doa_jax.models.scan.')
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shapes)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f'Parameter {"/".join(_path_keys(path))} from INITIAL_CHECKPOINT_PATH '
                             f'has shape {tuple(a.shape)}, the model expects {tuple(b.shape)}; '
                             'check the model gin file against the checkpoint.')
