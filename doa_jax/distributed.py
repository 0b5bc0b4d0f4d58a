"""jax.distributed setup from the environment, so one command runs on a laptop, SLURM, TPU or GKE.

Entry points call `initialize()` once, before any other JAX call. Resolution order:
explicit arguments > DOA_* variables (set by `launch/local.py`) > GKE Indexed Job
(JOB_COMPLETION_INDEX + DOA_COORDINATOR_ADDRESS) > jax's own cluster detection (SLURM, Cloud TPU,
MPI), which `jax.distributed.initialize()` performs when given no arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

DEFAULT_PORT = 8476


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """What `jax.distributed.initialize` gets; `auto` means let jax detect the cluster."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str
    auto: bool = False


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'Environment variable {name}={value!r} is not an integer; set it to the '
                         'process count/index (e.g. 0).') from None


def _with_port(address: str) -> str:
    return address if ':' in address.rsplit(']', 1)[-1] else f'{address}:{DEFAULT_PORT}'


def detect(env: Mapping[str, str] | None = None, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None) -> DistributedSpec | None:
    """Returns how this process should join the cluster, or None for a single-process run."""
    env = os.environ if env is None else env
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(f'--coordinator_address={coordinator_address} needs --num_processes and '
                             '--process_id too (e.g. --num_processes=2 --process_id=0).')
        return DistributedSpec(_with_port(coordinator_address), num_processes, process_id, 'flags')
    if env.get('DOA_COORDINATOR_ADDRESS') and 'DOA_PROCESS_ID' in env:
        return DistributedSpec(_with_port(env['DOA_COORDINATOR_ADDRESS']),
                               _int(env, 'DOA_NUM_PROCESSES'), _int(env, 'DOA_PROCESS_ID'), 'doa-env')
    if 'JOB_COMPLETION_INDEX' in env:
        if not env.get('DOA_COORDINATOR_ADDRESS') or 'DOA_NUM_PROCESSES' not in env:
            raise ValueError('GKE Indexed Job detected (JOB_COMPLETION_INDEX is set) but '
                             'DOA_COORDINATOR_ADDRESS or DOA_NUM_PROCESSES is missing; set them in the '
                             'manifest (see launch/gke_jobset.yaml).')
        return DistributedSpec(_with_port(env['DOA_COORDINATOR_ADDRESS']),
                               _int(env, 'DOA_NUM_PROCESSES'), _int(env, 'JOB_COMPLETION_INDEX'), 'gke')
    if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        return DistributedSpec(None, None, None, 'slurm', auto=True)
    if env.get('TPU_WORKER_HOSTNAMES') and ',' in env['TPU_WORKER_HOSTNAMES']:
        return DistributedSpec(None, None, None, 'tpu', auto=True)
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """Joins the cluster described by flags/environment; a no-op for single-process runs."""
    spec = detect(env, coordinator_address, num_processes, process_id)
    if spec is None:
        return None
    if jax.config.jax_platforms in (None, '', 'cpu') or (env or os.environ).get('JAX_PLATFORMS') == 'cpu':
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU multi-process collectives
    logging.info('jax.distributed from %s: %s', spec.source, spec)
    if spec.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=spec.coordinator_address,
                                   num_processes=spec.num_processes, process_id=spec.process_id)
    return spec


_TF_GPUS_HIDDEN = False


def hide_gpus_from_tensorflow() -> None:
    """TF (seqio and TFDS input pipelines import it) must not grab accelerator memory JAX needs.

    Every doa_jax module that imports TF or seqio calls this when it is imported, so a library
    user's `trainer.train` on a GPU host is covered, not only the entry points. Once per process;
    if TF already initialized its devices (the user touched TF first), it warns instead.
    """
    global _TF_GPUS_HIDDEN
    if _TF_GPUS_HIDDEN:
        return
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as e:   # TF's devices are already initialized
        if tf.config.get_visible_devices('GPU'):
            logging.warning('TensorFlow already initialized its GPUs (%s), so it may hold '
                            'accelerator memory JAX needs. Import doa_jax before using TF, or call '
                            "tf.config.set_visible_devices([], 'GPU') first.", e)
    _TF_GPUS_HIDDEN = True
