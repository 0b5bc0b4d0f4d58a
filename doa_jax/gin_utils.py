"""gin at the entry points only: flag parsing (t5x's), configurable registration, run records.

Library modules never import gin. This module registers their plain functions under short names
(`train`, `get_model_config`, `make_optimizer`, `cross_entropy_loss`, `MeshConfig`, ...) so t5x-style
gin files can bind them, and turns `--gin.X=Y` flags into gin bindings as t5x does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shlex
import sys
from typing import Sequence

import gin
import jax
import jax.numpy as jnp

from doa_jax import callbacks as callbacks_lib
from doa_jax import losses, optimizers, partitioning, trainer
from doa_jax.models.config import T5Config, get_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}
_RECORDED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'seqio', 'tensorflow',
                      'gin-config', 'clu', 'numpy')


def get_model_config(name: str, dropout_rate: float = 0.0, activation_dtype: str = 'bfloat16',
                     scan_layers: bool = False, remat_policy: str | None = None,
                     cpu_matmul: str = 'auto') -> T5Config:
    """A named T5 config with the run's overrides (gin: MODEL_CONFIG via get_model_config.*).

    cpu_matmul: 'auto' (doa_jax's CPU kernels on a single CPU device that runs them: AMX, else
      AVX512-BF16), 'amx', 'avx512_bf16', or 'xla'.
    """
    if activation_dtype not in _DTYPES:
        raise ValueError(f'get_model_config.activation_dtype={activation_dtype!r}; choose one of '
                         f'{sorted(_DTYPES)}.')
    return get_config(name, dropout_rate=dropout_rate, dtype=_DTYPES[activation_dtype],
                      scan_layers=scan_layers, remat_policy=remat_policy, cpu_matmul=cpu_matmul)


def import_task_modules(module: str | Sequence[str] | None = 'tasks',
                        vocabulary: str | None = None) -> None:
    """Imports the module(s) that register seqio tasks (gin: MIXTURE_OR_TASK_MODULE).

    `vocabulary` (gin: VOCABULARY) is a sentencepiece model path or 'byte'; it becomes the default
    vocabulary of tasks registered by those modules, so it is set before they are imported.
    """
    if vocabulary is not None:
        from doa_jax.data.vocabulary import set_default_vocabulary
        set_default_vocabulary(vocabulary)
    names = [module] if isinstance(module, str) else list(module or ())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f'MIXTURE_OR_TASK_MODULE={name!r} cannot be imported ({e}); set it to '
                             'a module on PYTHONPATH that registers your tasks.') from e


class RunRecord(callbacks_lib.TrainerCallback):
    """Writes what reproduces the run into MODEL_DIR (process 0): the operative gin config, the
    command line and the package versions."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def on_train_start(self, *, model_dir: str, start_step: int, mesh) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(model_dir, exist_ok=True)
        suffix = '' if start_step == 0 else f'.resume_{start_step}'
        with open(os.path.join(model_dir, f'config{suffix}.gin'), 'w') as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(model_dir, f'command_line{suffix}.txt'), 'w') as f:
            f.write(shlex.join([sys.executable] + self.argv) + '\n')
        with open(os.path.join(model_dir, f'versions{suffix}.txt'), 'w') as f:
            f.write(f'python=={sys.version.split()[0]}\n')
            for pkg in _RECORDED_PACKAGES:
                try:
                    f.write(f'{pkg}=={importlib.metadata.version(pkg)}\n')
                except importlib.metadata.PackageNotFoundError:
                    pass
            f.write(f'devices={jax.device_count()}x{jax.devices()[0].device_kind}\n')


CONFIGURABLE: dict[str, object] = {}


def register_configurables() -> None:
    """Makes the library's functions bindable from gin under t5x-like names (idempotent)."""
    if CONFIGURABLE:
        return
    CONFIGURABLE['train'] = gin.external_configurable(trainer.train, 'train')
    gin.external_configurable(get_model_config, 'get_model_config')
    CONFIGURABLE['import_task_modules'] = gin.external_configurable(import_task_modules,
                                                                    'import_task_modules')
    gin.external_configurable(optimizers.make_optimizer, 'make_optimizer')
    gin.external_configurable(losses.cross_entropy_loss, 'cross_entropy_loss')
    gin.external_configurable(partitioning.MeshConfig, 'MeshConfig')
    gin.external_configurable(callbacks_lib.StopAtStep, 'StopAtStep')
    try:    # the cost meter, bindable as `train.callbacks = [@CostCallback()]`
        from doa_jax.cost import CostCallback
    except ImportError:
        pass
    else:
        gin.external_configurable(CostCallback, 'CostCallback')


def run_configured_training(argv: Sequence[str]) -> trainer.TrainResult:
    """Imports the task module(s), then calls the gin-configured `train`, adding a RunRecord."""
    CONFIGURABLE['import_task_modules']()
    return CONFIGURABLE['train'](extra_callbacks=[RunRecord(argv)])


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """t5x flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_bindings, --gin_search_paths,
    plus the multi-process flags for jax.distributed."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith('--gin.'):
            bindings.append(arg[len('--gin.'):])
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(prog='python -m doa_jax.train',
                                     description='Fine-tune or distill a T5 model (t5x-style gin).')
    parser.add_argument('--gin_file', action='append', default=[],
                        help='gin file; repeat to layer overlays (later files win).')
    parser.add_argument('--gin_bindings', action='append', default=[],
                        help="a gin binding, e.g. \"TRAIN_STEPS=100\"; same as --gin.TRAIN_STEPS=100.")
    parser.add_argument('--gin_search_paths', default=None,
                        help='comma-separated directories where gin files and includes are found '
                             '(default: the current directory and the repository root).')
    parser.add_argument('--coordinator_address', default=None,
                        help='host:port of process 0, for multi-process runs (jax.distributed).')
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    args = parser.parse_args(rest)
    args.gin_bindings = list(args.gin_bindings) + bindings
    if not args.gin_file:
        parser.error('give at least one --gin_file, e.g. --gin_file=gin_configs/runs/finetune.gin')
    return args


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] | None = None) -> None:
    """Parses gin files and bindings; files are looked up in the search paths."""
    register_configurables()
    paths = list(search_paths) if search_paths else ['.', REPO_ROOT]
    for path in paths:
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)


def hide_gpus_from_tensorflow() -> None:
    """seqio imports TensorFlow; it must not reserve accelerator memory that JAX needs."""
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')
