"""Entry point: `python -m doa_jax.train --gin_file=gin_configs/runs/finetune.gin --gin.MODEL_DIR=...`.

The only place (besides the other entry points) where gin binds; the logic is `doa_jax.trainer`.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from doa_jax import distributed, gin_utils


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = gin_utils.parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    gin_utils.hide_gpus_from_tensorflow()
    # Flags, the local launcher, GKE, SLURM or a TPU pod slice; a no-op for one process.
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    result = gin_utils.run_configured_training(['-m', 'doa_jax.train', *argv])
    logging.info('Training ended at step %d (%s).', result.step, result.reason)
    return 0


if __name__ == '__main__':
    sys.exit(main())
