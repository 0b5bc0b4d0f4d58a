"""Entry point: `python -m doa_jax.train --gin_file=gin_configs/runs/finetune.gin --gin.MODEL_DIR=...`.

The only place (besides the other entry points) where gin binds; the logic is `doa_jax.trainer`.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from doa_jax import compilation_cache, distributed, gin_utils

PROG = 'python -m doa_jax.train'


def check_bindings(sources: gin_utils.GinSources) -> None:
    """What the trainer would accept but do nothing useful with: fails before anything runs."""
    gin_utils.check_entry_bindings('train', sources)
    gin_utils.check_path('train.model_dir', sources)
    steps = gin_utils.bound_value('train.train_steps', sources)
    value = steps.value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise gin_utils.ConfigError(
                f'{steps.name}={value!r} (set at {steps.where or "the gin files"}): training '
                f'needs a positive whole number of steps, or it would end at once with no '
                f'checkpoint. Set e.g. --gin.{steps.name}=1000.')


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = gin_utils.parse_flags(argv, prog=PROG)
    gin_utils.setup_logging()
    gin_utils.hide_gpus_from_tensorflow()
    # Flags, the local launcher, GKE, SLURM or a TPU pod slice; a no-op for one process.
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    sources = gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    check_bindings(sources)
    # Before anything compiles: sibling runs share <MODEL_DIR>/../compilation_cache by default.
    compilation_cache.configure(gin_utils.macro_value('COMPILATION_CACHE_DIR'),
                                gin_utils.bound_value('train.model_dir', sources).value)
    summary = gin_utils.RunSummary()
    result = gin_utils.run_configured_training(['-m', 'doa_jax.train', *argv], summary)
    logging.info(summary.line(result))
    return 0


if __name__ == '__main__':
    sys.exit(gin_utils.run_cli(main, PROG))
