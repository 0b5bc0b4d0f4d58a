"""Entry point: `python -m doa_jax.infer --gin_file=gin_configs/runs/pseudo_label.gin
--gin.CHECKPOINT_PATH=... --gin.INFER_OUTPUT_DIR=...` pseudo-labels an unlabeled pool.

The only place where gin binds the pseudo-labeling job; the logic is `doa_jax.pseudo_label`.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

import gin

from doa_jax import distributed, gin_utils, pseudo_label


_REGISTERED: list[object] = []


def register_configurables() -> None:
    """Makes `infer` (the pseudo-labeling job) bindable from gin (idempotent)."""
    gin_utils.register_configurables()
    if not _REGISTERED:
        _REGISTERED.append(gin.external_configurable(pseudo_label.run_pseudo_labeling, 'infer'))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = gin_utils.parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    gin_utils.hide_gpus_from_tensorflow()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    register_configurables()
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    gin_utils.CONFIGURABLE['import_task_modules']()
    result = _REGISTERED[0]()
    logging.info('Pseudo-labeling shard %d: %d chunks written, %d skipped, %d examples.',
                 result.shard_id, result.chunks_written, result.chunks_skipped,
                 result.examples_written)
    return 0


if __name__ == '__main__':
    sys.exit(main())
