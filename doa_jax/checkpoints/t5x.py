"""t5x checkpoints: the legacy msgpack + tensorstore (zarr) format, and t5x's Orbax format.

Legacy layout: `checkpoint_<step>/checkpoint` is a msgpack'd state dict
`{'version': 3, 'optimizer': {'target': params, 'state': {...}}}` (older) or
`{'target': params, 'state': {...}}` (newer). Small leaves are inline arrays; large leaves are
tensorstore spec dicts (driver 'zarr') whose kvstore path is relative to the checkpoint directory
and names the parameter with '.' for '/' (e.g. `target.encoder.layers_0.attention.query.kernel`).

`t5x.train` restores a checkpoint only when `state` holds the optimizer state its model's
optimizer expects (the train state's whole tree, not just the parameters). The T5 v1.1 gin files
use t5x's Adafactor, so `write_t5x_legacy` writes that state (`state/param_states`, zeros: a fresh
optimizer, as t5x initialises one) next to the parameters.
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


def t5x_step(path: str | os.PathLike) -> int | None:
    """The step of a t5x checkpoint (legacy or Orbax): `path` named `checkpoint_<step>`, or the
    latest such directory in it; None for anything else (no such path, HF, doa_jax runs)."""
    path = pathlib.Path(path)
    match = _STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    if not path.is_dir():
        return None
    steps = [int(m.group(1)) for child in path.iterdir()
             if child.is_dir() and (m := _STEP_DIR.match(child.name))]
    return max(steps) if steps else None


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


# t5x's Adafactor factors the second moment of a parameter with at least two dimensions of size
# >= 128 (its `min_dim_size_to_factor`); T5 parameters have at most two dimensions, for which it
# uses this heuristic whatever its logical factor rules say.
ADAFACTOR_MIN_DIM_TO_FACTOR = 128
_CHUNK_BYTES = 64 << 20     # the zarr chunk size t5x aims for


def adafactor_state(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The zero state t5x's Adafactor (factored, no momentum) keeps for a parameter of `shape`:
    `v_row`/`v_col` (the factored second moment) or `v` (unfactored), and a placeholder `m`; an
    unused slot is a float32 zero of shape (1,)."""
    state = {k: np.zeros((1,), np.float32) for k in ('v_row', 'v_col', 'v', 'm')}
    order = np.argsort(shape) if len(shape) >= 2 else None
    if order is None or shape[order[-2]] < ADAFACTOR_MIN_DIM_TO_FACTOR:
        state['v'] = np.zeros(shape, np.float32)
        return state
    row, col = int(order[-2]), int(order[-1])
    state['v_row'] = np.zeros(np.delete(shape, col), np.float32)
    state['v_col'] = np.zeros(np.delete(shape, row), np.float32)
    return state


def _chunks(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """Whole-array chunks, halving the largest dimension until a chunk is at most 64 MiB."""
    chunks = [max(int(d), 1) for d in shape]
    while chunks and int(np.prod(chunks)) * itemsize > _CHUNK_BYTES:
        i = int(np.argmax(chunks))
        chunks[i] = (chunks[i] + 1) // 2
    return chunks


def write_t5x_legacy(params: Mapping, directory: str | os.PathLike, step: int,
                     optimizer_state: bool = True, inline_below: int = 0) -> pathlib.Path:
    """Writes `params` as t5x's legacy format: msgpack `checkpoint` + one zarr array per parameter.

    The layout is what t5x's own Checkpointer writes for T5 with its default Adafactor:
    `{'version': 3, 'optimizer': {'target': params, 'state': {'step', 'param_states'}}}`, the
    parameters and full-size second moments as zarr arrays, the factored moments and the step
    inline. `t5x.train` restores it as INITIAL_CHECKPOINT_PATH with its default finetune.gin (no
    assignment_map, no fallback_to_scratch); t5x.eval and t5x.infer read it too. With
    `optimizer_state=False` only `target` and `state/step` are written (enough for eval and infer,
    not for t5x.train). Leaves with fewer than `inline_below` elements go inline. Returns the
    `checkpoint_<step>` directory.
    """
    import tensorstore as ts
    from flax import serialization

    ckpt_dir = pathlib.Path(directory) / f'checkpoint_{step}'
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def write(array: np.ndarray, name: str):
        if array.size < inline_below:
            return array
        metadata = {'shape': list(array.shape), 'chunks': _chunks(array.shape, array.itemsize),
                    'dtype': array.dtype.str, 'compressor': {'id': 'gzip'}}
        spec = {'driver': 'zarr', 'dtype': array.dtype.name,
                'kvstore': {'driver': 'file', 'path': str(ckpt_dir / name)},
                'metadata': metadata}
        ts.open(spec, create=True, delete_existing=True).result().write(array).result()
        spec['kvstore']['path'] = name     # relative, as t5x writes it
        return spec

    def store(node, prefix):
        if isinstance(node, Mapping):
            return {k: store(v, f'{prefix}/{k}') for k, v in node.items()}
        return write(np.asarray(node, np.float32), prefix.replace('/', '.'))

    def moments(node, prefix):
        if isinstance(node, Mapping):
            return {k: moments(v, f'{prefix}/{k}') for k, v in node.items()}
        out = {}
        for slot, zeros in adafactor_state(_shape(node)).items():
            # Only a full-size `v` is partitioned in t5x (a zarr array); the rest is inline.
            full = slot == 'v' and zeros.shape != (1,)
            out[slot] = write(zeros, f'{prefix}/{slot}'.replace('/', '.')) if full else zeros
        return out

    state: dict[str, Any] = {'step': np.asarray(step, np.int32)}
    if optimizer_state:
        state['param_states'] = moments(params, 'state/param_states')
    contents = {'version': 3, 'optimizer': {'target': store(params, 'target'), 'state': state}}
    with open(ckpt_dir / 'checkpoint', 'wb') as f:
        f.write(serialization.msgpack_serialize(contents))
    return ckpt_dir


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def _layer_count(stack: Mapping) -> tuple[int, bool]:
    """(number of layers, scanned?) of an encoder or decoder subtree."""
    if 'layers' in stack:
        kernel = stack['layers']['attention' if 'attention' in stack['layers']
                                 else 'self_attention']['query']['kernel']
        return int(_shape(kernel)[0]), True
    return sum(1 for k in stack if re.fullmatch(r'layers_\d+', k)), False


def config_from_params(params: Mapping):
    """The T5Config a t5x-named parameter tree was made with, read from its shapes.

    Gated MLPs (`wi_0`/`wi_1`) are taken as T5 v1.1's gated GELU, a single `wi` as the original
    T5's ReLU; a tree without `decoder/logits_dense` ties the LM head to the embedding. The
    relative-position max distance (128) cannot be read from shapes and keeps its default.
    Scanned trees (`layers` with a leading layer axis) are read as well; the config returned is
    unscanned, the layout t5x and HF checkpoints use (`load_checkpoint` unscans).
    """
    from doa_jax.models.config import T5Config

    def get(*path):
        node = params
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f'cannot infer the model config: the checkpoint has no '
                                 f'{"/".join(path)} (a T5 tree in t5x names is expected; found '
                                 f'top-level keys {sorted(params)}). Pass --model NAME.')
            node = node[key]
        return node

    vocab_size, emb_dim = _shape(get('token_embedder', 'embedding'))
    num_heads, buckets = _shape(get('encoder', 'relpos_bias', 'rel_embedding'))
    enc_layers, scanned = _layer_count(get('encoder'))
    dec_layers, _ = _layer_count(get('decoder'))
    first = get('encoder', 'layers') if scanned else get('encoder', 'layers_0')
    lead = 1 if scanned else 0
    heads_x_dim = _shape(first['attention']['query']['kernel'])[lead + 1]
    mlp = first['mlp']
    gated = 'wi_0' in mlp
    mlp_dim = _shape(mlp['wi_0' if gated else 'wi']['kernel'])[lead + 1]
    if heads_x_dim % num_heads:
        raise ValueError(f'cannot infer the model config: query width {heads_x_dim} is not a '
                         f'multiple of the {num_heads} relative-attention heads. Pass --model.')
    return T5Config(vocab_size=int(vocab_size), emb_dim=int(emb_dim), num_heads=int(num_heads),
                    num_encoder_layers=enc_layers, num_decoder_layers=dec_layers,
                    head_dim=int(heads_x_dim // num_heads), mlp_dim=int(mlp_dim),
                    mlp_activations=('gelu', 'linear') if gated else ('relu',),
                    logits_via_embedding='logits_dense' not in get('decoder'),
                    relative_attention_num_buckets=int(buckets))
