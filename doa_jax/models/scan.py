"""Conversion between the unscanned (`layers_{i}`) and scanned (`layers`, leading layer axis) trees.

Checkpoints from HF and t5x are unscanned; training large models is faster to compile scanned.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from doa_jax.models.config import T5Config


def _stack_sizes(cfg: T5Config) -> dict[str, int]:
    return {'encoder': cfg.num_encoder_layers, 'decoder': cfg.num_decoder_layers}


def scan_params(params: Mapping[str, Any], cfg: T5Config) -> dict:
    """`encoder/layers_{i}/...` -> `encoder/layers/...` with the layer index as axis 0."""
    out = dict(params)
    for stack, n in _stack_sizes(cfg).items():
        sub = dict(params[stack])
        if 'layers' in sub:
            continue  # already scanned
        missing = [f'{stack}/layers_{i}' for i in range(n) if f'layers_{i}' not in sub]
        if missing:
            raise ValueError(f'Cannot scan parameters: missing {missing[:5]} for a config with '
                             f'{n} {stack} layers.')
        layers = [sub.pop(f'layers_{i}') for i in range(n)]
        sub['layers'] = jax.tree_util.tree_map(lambda *xs: _stack(xs), *layers)
        out[stack] = sub
    return out


def unscan_params(params: Mapping[str, Any], cfg: T5Config) -> dict:
    """`encoder/layers/...` (layer axis 0) -> `encoder/layers_{i}/...`."""
    out = dict(params)
    for stack, n in _stack_sizes(cfg).items():
        sub = dict(params[stack])
        if 'layers' not in sub:
            continue  # already unscanned
        stacked = sub.pop('layers')
        leading = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
        if leading != {n}:
            raise ValueError(f'Scanned {stack} parameters have leading sizes {sorted(leading)}, '
                             f'but the config has {n} {stack} layers.')
        for i in range(n):
            sub[f'layers_{i}'] = jax.tree_util.tree_map(lambda x: x[i], stacked)
        out[stack] = sub
    return out


def _stack(xs):
    if isinstance(xs[0], np.ndarray):
        return np.stack(xs)
    return jax.numpy.stack(xs)
