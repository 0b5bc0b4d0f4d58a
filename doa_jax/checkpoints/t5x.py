"""t5x checkpoints: the legacy msgpack + tensorstore (zarr) format, and t5x's Orbax format.

Legacy layout: `checkpoint_<step>/checkpoint` is a msgpack'd state dict
`{'version': 3, 'optimizer': {'target': params, 'state': {...}}}` (older) or
`{'target': params, 'state': {...}}` (newer). Small leaves are inline arrays; large leaves are
tensorstore spec dicts (driver 'zarr') whose kvstore path is relative to the checkpoint directory
and names the parameter with '.' for '/' (e.g. `target.encoder.layers_0.attention.query.kernel`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and {'driver', 'kvstore'} <= set(value)


def latest_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """`path` itself if it is a `checkpoint_<step>` dir, else its latest `checkpoint_<step>` child."""
    path = pathlib.Path(path)
    if (path / 'checkpoint').is_file() or _STEP_DIR.match(path.name):
        return path
    steps = sorted((int(m.group(1)), child) for child in path.iterdir()
                   if child.is_dir() and (m := _STEP_DIR.match(child.name)))
    if not steps:
        raise FileNotFoundError(f'{path} holds no t5x checkpoint_<step> directory.')
    return steps[-1][1]


def is_t5x_legacy(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    if not path.is_dir():
        return False
    try:
        return (latest_checkpoint_dir(path) / 'checkpoint').is_file()
    except FileNotFoundError:
        return False


def _read_spec(ckpt_dir: pathlib.Path, spec: Mapping[str, Any]) -> np.ndarray:
    import tensorstore as ts

    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    kvstore = spec['kvstore']
    # Written on GCS, read from a local copy: t5x keeps the path relative either way.
    relative = kvstore.pop('path', None) or spec.pop('path', None)
    if relative is None:
        raise ValueError(f'tensorstore spec without a path in {ckpt_dir}/checkpoint: {spec}')
    spec['kvstore'] = {'driver': 'file', 'path': str(ckpt_dir / relative)}
    spec.pop('path', None)
    array = ts.open(spec, open=True, read=True).result().read().result()
    return np.asarray(array, dtype=np.float32)


def read_t5x_legacy(path: str | os.PathLike) -> dict:
    """Reads the parameter (`target`) tree of a legacy t5x checkpoint as float32 numpy arrays."""
    from flax import serialization

    ckpt_dir = latest_checkpoint_dir(path)
    with open(ckpt_dir / 'checkpoint', 'rb') as f:
        contents = serialization.msgpack_restore(f.read())
    state = contents.get('optimizer', contents)
    if 'target' not in state:
        raise ValueError(f'{ckpt_dir}/checkpoint has no parameter tree (`target` or '
                         f'`optimizer/target`); top-level keys: {sorted(contents)}.')

    def load(node):
        if _is_spec(node):
            return _read_spec(ckpt_dir, node)
        if isinstance(node, Mapping):
            return {k: load(v) for k, v in node.items()}
        return np.asarray(node, dtype=np.float32)

    return load(state['target'])


def write_t5x_legacy(params: Mapping, directory: str | os.PathLike, step: int,
                     inline_below: int = 1 << 10) -> pathlib.Path:
    """Writes `params` as t5x's legacy format: msgpack `checkpoint` + one zarr array per parameter.

    Leaves with fewer than `inline_below` elements are stored inline in the msgpack file, as t5x
    does for small arrays. Returns the `checkpoint_<step>` directory.
    """
    import tensorstore as ts
    from flax import serialization

    ckpt_dir = pathlib.Path(directory) / f'checkpoint_{step}'
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def store(node, prefix):
        if isinstance(node, Mapping):
            return {k: store(v, f'{prefix}/{k}') for k, v in node.items()}
        array = np.asarray(node)
        if array.size < inline_below:
            return array
        name = prefix.replace('/', '.')
        metadata = {'shape': list(array.shape), 'chunks': list(array.shape),
                    'dtype': array.dtype.str, 'compressor': {'id': 'gzip'}}
        spec = {'driver': 'zarr', 'dtype': array.dtype.name,
                'kvstore': {'driver': 'file', 'path': str(ckpt_dir / name)},
                'metadata': metadata}
        ts.open(spec, create=True, delete_existing=True).result().write(array).result()
        spec['kvstore']['path'] = name     # relative, as t5x writes it
        return spec

    contents = {'version': 3,
                'optimizer': {'target': store(params, 'target'),
                              'state': {'step': np.asarray(step, np.int32)}}}
    with open(ckpt_dir / 'checkpoint', 'wb') as f:
        f.write(serialization.msgpack_serialize(contents))
    return ckpt_dir
