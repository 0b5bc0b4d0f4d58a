"""Import from and export to HF `transformers` T5 directories, without building a torch model.

Reads `config.json` plus `model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`; writes `config.json` + `model.safetensors` that
`T5ForConditionalGeneration.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from doa_jax.checkpoints.hf_mapping import (config_from_hf, hf_config_dict,
                                            hf_state_dict_from_params, params_from_hf_state_dict)
from doa_jax.models.config import T5Config

SUPPORTED_MODEL_TYPES = ('t5', 'mt5')
SUPPORTED_ARCHITECTURES = ('T5ForConditionalGeneration', 'MT5ForConditionalGeneration',
                           'T5WithLMHeadModel')


class UnsupportedCheckpointError(ValueError):
    """The directory holds a model doa_jax cannot load (another architecture, missing files)."""


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / 'config.json').is_file()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    config_file = path / 'config.json'
    if not config_file.is_file():
        raise UnsupportedCheckpointError(f'{path} has no config.json; an HF T5 directory holds '
                                         'config.json and model.safetensors or pytorch_model.bin.')
    with open(config_file) as f:
        hf = json.load(f)
    model_type = hf.get('model_type')
    archs = hf.get('architectures') or []
    if model_type not in SUPPORTED_MODEL_TYPES or (
            archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)):
        raise UnsupportedCheckpointError(
                f'{config_file} describes model_type={model_type!r}, architectures={archs}; '
                f'doa_jax loads T5 encoder-decoders (model_type in {SUPPORTED_MODEL_TYPES}, '
                f'architectures {SUPPORTED_ARCHITECTURES}).')
    return hf


def _read_safetensors(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    state: dict[str, np.ndarray] = {}
    for file in files:
        # framework='pt' handles bf16 tensors, which numpy cannot represent natively.
        with safe_open(str(file), framework='pt') as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).float().numpy()
    return state


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory as float32 numpy arrays."""
    path = pathlib.Path(path)
    single = path / 'model.safetensors'
    index = path / 'model.safetensors.index.json'
    binary = path / 'pytorch_model.bin'
    if single.is_file():
        return _read_safetensors([single])
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UnsupportedCheckpointError(f'{index} lists shards that are missing: {missing}.')
        return _read_safetensors([path / s for s in shards])
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location='cpu', weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise UnsupportedCheckpointError(
            f'{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin.')


def load_hf(path: str | os.PathLike, config: T5Config | None = None,
            **config_overrides) -> tuple[dict, T5Config]:
    """Loads an HF T5 directory as (t5x-named params, config).

    With `config` given (e.g. from gin), the checkpoint must match it; otherwise the config comes
    from config.json with `config_overrides` applied (e.g. dtype=jnp.float32).
    """
    hf = read_hf_config(path)
    if config is None:
        config = config_from_hf(hf, **config_overrides)
    state = read_hf_state_dict(path)
    return params_from_hf_state_dict(state, config), config


def save_hf(params: Mapping, config: T5Config, path: str | os.PathLike) -> None:
    """Writes config.json + model.safetensors for `T5ForConditionalGeneration.from_pretrained`."""
    from safetensors.numpy import save_file

    from doa_jax.models.scan import unscan_params

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = unscan_params(params, config)
    state = hf_state_dict_from_params(params, config)
    # safetensors refuses aliased tensors; transformers re-ties the embeddings on load.
    for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
        state.pop(alias, None)
    if config.logits_via_embedding:
        state.pop('lm_head.weight', None)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
              str(path / 'model.safetensors'), metadata={'format': 'pt'})
    with open(path / 'config.json', 'w') as f:
        json.dump(hf_config_dict(config), f, indent=2, sort_keys=True)
