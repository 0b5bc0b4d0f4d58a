"""Checkpoints: a run's own (save and resume), and interop with HF directories and t5x (legacy and
Orbax).

`RunCheckpointer` (checkpoints/run.py) saves and restores a training run's sharded state and data
position under MODEL_DIR/checkpoints/. `load_checkpoint(path, config)` reads any of the formats:
it detects the format and returns a plain parameter tree with t5x names in the layout `config`
asks for (scanned or not), after checking every name and shape.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from doa_jax.checkpoints.errors import CheckpointMismatchError
from doa_jax.checkpoints.hf import load_hf, save_hf
from doa_jax.checkpoints.run import RunCheckpointer
from doa_jax.checkpoints.t5x import config_from_params, read_t5x_legacy, write_t5x_legacy
from doa_jax.models.config import T5Config

__all__ = ['CheckpointMismatchError', 'RunCheckpointer', 'checkpoint_step', 'config_from_params',
           'detect_format', 'export_t5x', 'fit_params', 'load_checkpoint', 'load_hf',
           'read_params', 'save_hf', 'read_t5x_legacy', 'write_t5x_legacy', 'save_params',
           'check_params', 'partial_saves']


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f'{prefix}/{k}' if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_params(params: Mapping, config: T5Config, source: str) -> None:
    """Raises CheckpointMismatchError unless `params` has exactly the unscanned tree of `config`."""
    from doa_jax.checkpoints.hf_mapping import expected_shapes

    want = expected_shapes(config)
    have = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    bad = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or bad:
        raise CheckpointMismatchError.build(source, missing, unexpected, bad)


def _complete_item(path: pathlib.Path) -> pathlib.Path | None:
    """The Orbax PyTree directory of a finished save at `path` (a step dir or the item itself)."""
    if (path / '_METADATA').is_file() or (path / '_CHECKPOINT_METADATA').is_file() and not (
            path / 'state').is_dir():
        return path
    if (path / 'state' / '_METADATA').is_file():
        return path / 'state'                       # doa_jax step dir
    return None


def _step_dirs(parent: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """`<step>` (doa_jax) and `checkpoint_<step>` (t5x) directories, newest first."""
    steps = []
    for p in parent.iterdir():
        name = p.name.removeprefix('checkpoint_')
        if p.is_dir() and name.isdigit():
            steps.append((int(name), p))
    return sorted(steps, key=lambda s: s[0], reverse=True)


def _orbax_item_dir(path: pathlib.Path) -> pathlib.Path | None:
    """Finds the Orbax PyTree directory in a run dir, a checkpoints dir, or a step dir.

    In a run or checkpoints dir the newest *complete* step wins: a step a killed run left
    half-written (no metadata) is skipped, as Orbax's own resume skips it.
    """
    item = _complete_item(path)
    if item is not None:
        return item
    for parent in (path / 'checkpoints', path):
        if parent.is_dir():
            for _, step_dir in _step_dirs(parent):
                item = _complete_item(step_dir)
                if item is not None:
                    return item
    return None


def partial_saves(path: str | os.PathLike) -> list[str]:
    """Saves a killed run left unfinished under `path` (Orbax temp dirs, steps without metadata)."""
    path = pathlib.Path(path)
    found = []
    for parent in (path, path / 'checkpoints'):
        if not parent.is_dir():
            continue
        for p in sorted(parent.iterdir()):
            if '.orbax-checkpoint-tmp' in p.name:
                found.append(str(p))
        found += [str(p) for _, p in _step_dirs(parent) if _complete_item(p) is None]
    if not found and path.is_dir() and path.name.isdigit() and _complete_item(path) is None:
        found.append(str(path))
    return found


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 't5x' (legacy msgpack + zarr) or 'orbax'; raises FileNotFoundError otherwise."""
    from doa_jax.checkpoints.hf import is_hf_dir
    from doa_jax.checkpoints.t5x import is_t5x_legacy

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f'Checkpoint path {path} does not exist (check '
                                'INITIAL_CHECKPOINT_PATH / CHECKPOINT_PATH).')
    if is_hf_dir(path):
        return 'hf'
    if is_t5x_legacy(path):
        return 't5x'
    if _orbax_item_dir(path) is not None:
        return 'orbax'
    partial = partial_saves(path)
    if partial:
        raise FileNotFoundError(
                f'{path} holds only a partial save ({", ".join(partial[:3])}): a run killed while '
                'writing a checkpoint. Point the path at a completed step, or rerun the job that '
                'writes it (it resumes from its last complete checkpoint).')
    raise FileNotFoundError(
            f'{path} is not a checkpoint doa_jax recognises: expected an HF directory '
            '(config.json + model.safetensors / pytorch_model.bin), a t5x checkpoint_<step> '
            'directory (msgpack `checkpoint` file, or Orbax), or a doa_jax MODEL_DIR.')


def _read_orbax(path: pathlib.Path) -> dict:
    """The T5 parameters of an Orbax checkpoint, as host numpy arrays.

    Only the parameter subtree (`params` in doa_jax, `target` in t5x) is read, never the optimizer
    state, and onto the host rather than the devices it was saved from: any process of a
    multi-host job (which does not own the saving process's devices) can read it.
    """
    import jax
    import orbax.checkpoint as ocp

    item = _orbax_item_dir(path)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(str(item)).item_metadata
    tree = dict(getattr(meta, 'tree', meta) or {})
    key = next((k for k in ('params', 'target') if isinstance(tree.get(k), Mapping)), None)
    if key is None and 'encoder' not in tree:
        raise CheckpointMismatchError(
                f'Orbax checkpoint {item} has no T5 parameter tree (looked for `params`, '
                f'`target`, or `encoder` at the top); found keys {sorted(tree)}.')
    wanted = {key: tree[key]} if key else tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = checkpointer.restore(str(item), args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    params = restored[key] if key else restored
    return {k: (_to_numpy(v)) for k, v in params.items()}


def _to_numpy(node):
    if isinstance(node, Mapping):
        return {k: _to_numpy(v) for k, v in node.items()}
    return np.asarray(node, dtype=np.float32)


def read_params(path: str | os.PathLike) -> tuple[dict, str, T5Config | None]:
    """(parameter tree as stored, format, config) without checking it against a config; the
    config is known only for HF directories (their config.json)."""
    fmt = detect_format(path)
    if fmt == 'hf':
        params, config = load_hf(path)
        return params, fmt, config
    if fmt == 't5x':
        return read_t5x_legacy(path), fmt, None
    return _read_orbax(pathlib.Path(path)), fmt, None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step a checkpoint carries: a t5x `checkpoint_<step>` (the path or its latest
    such child), or a doa_jax run's latest complete step; None for step-less parameter saves (HF
    directories, `convert` output)."""
    path = pathlib.Path(path)
    match = re.fullmatch(r'checkpoint_(\d+)', path.name)
    if match:
        return int(match.group(1))
    for parent in (path / 'checkpoints', path):
        if parent.is_dir():
            for step, step_dir in _step_dirs(parent):
                if _complete_item(step_dir) is not None or (step_dir / 'checkpoint').is_file():
                    return step
    if path.name.isdigit() and _complete_item(path) is not None:
        return int(path.name)
    return None


def export_t5x(src: str | os.PathLike, dst: str | os.PathLike, step: int | None = None,
               config: T5Config | None = None) -> tuple[pathlib.Path, T5Config]:
    """Writes the parameters of any checkpoint doa_jax reads (a MODEL_DIR: its latest complete
    step) as a t5x checkpoint `dst/checkpoint_<step>` that `t5x.train` restores (see
    `write_t5x_legacy`). `step` defaults to the checkpoint's own step (0 when it has none);
    `config` to the one its shapes imply. Returns the directory written and the config."""
    params, fmt, known = read_params(src)
    config = (config or known or config_from_params(params)).replace(scan_layers=False)
    params = fit_params(params, config, f'{fmt} checkpoint {src}')
    if step is None:
        step = checkpoint_step(src) or 0
    return write_t5x_legacy(params, dst, step), config


def fit_params(params: dict, config: T5Config, source: str) -> dict:
    """`params` in the layout `config` asks for (scanned or not), checked name by name."""
    from doa_jax.models.scan import scan_params, unscan_params

    if any('layers' in params.get(stack, {}) for stack in ('encoder', 'decoder')):
        params = unscan_params(params, config)
    check_params(params, config, source)
    return scan_params(params, config) if config.scan_layers else params


def load_checkpoint(path: str | os.PathLike, config: T5Config) -> dict:
    """Loads HF / t5x legacy / Orbax (t5x or doa_jax) parameters, checked against `config`."""
    fmt = detect_format(path)
    if fmt == 'hf':
        params, _ = load_hf(path, config.replace(scan_layers=False))
    elif fmt == 't5x':
        params = read_t5x_legacy(path)
    else:
        params = _read_orbax(pathlib.Path(path))
    return fit_params(params, config, f'{fmt} checkpoint {path}')


def save_params(params: Mapping, path: str | os.PathLike) -> None:
    """Writes a parameter tree as an Orbax PyTree checkpoint that `load_checkpoint` reads."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    ocp.PyTreeCheckpointer().save(str(path), {'params': params})
