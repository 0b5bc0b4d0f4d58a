"""Entry point: `python -m doa_jax.train --gin_file=gin_configs/runs/finetune.gin --gin.MODEL_DIR=...`.

The only place (besides the other entry points) where gin binds; the logic is `doa_jax.trainer`.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from doa_jax import compilation_cache, distributed, gin_macros, gin_utils

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


def check_initial_step(sources: gin_utils.GinSources) -> None:
    """TRAIN_STEPS counts this run's steps. t5x counts from the initial checkpoint's step, so a
    t5x user's TRAIN_STEPS (checkpoint_1000000 plus 20,000 fine-tuning steps = 1,020,000) would
    train a million steps here: with a t5x checkpoint at step S as INITIAL_CHECKPOINT_PATH, a
    TRAIN_STEPS above S (more fine-tuning than the checkpoint's own training) is refused."""
    from doa_jax.checkpoints.t5x import t5x_step

    init = gin_utils.bound_value('train.initial_checkpoint_path', sources)
    if init is None or not isinstance(init.value, str) or not init.value.strip():
        return
    start = t5x_step(init.value)
    steps = gin_utils.bound_value('train.train_steps', sources)
    if not start or steps.value <= start:
        return
    raise gin_utils.ConfigError(
            f'{steps.name}={steps.value} (set at {steps.where or "the gin files"}) with '
            f'{init.name}={init.value!r}, a t5x checkpoint at step {start}: doa_jax counts '
            f'{steps.name} from the start of this run, so it would train {steps.value:,} steps; '
            f't5x counts from the checkpoint\'s step, where the same number means '
            f'{steps.value - start:,} steps. For {steps.value - start:,} fine-tuning steps set '
            f'--gin.{steps.name}={steps.value - start}. To train {steps.value:,} steps from it '
            f'anyway, convert it to a step-less checkpoint first (python -m doa_jax.checkpoints '
            f'convert --from t5x {init.value} --to DIR) and start from DIR.')


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if gin_macros.FLAG in argv:   # the macros, their values and where each is set; no training
        return gin_macros.list_macros(argv, prog=PROG)
    args = gin_utils.parse_flags(argv, prog=PROG)
    gin_utils.setup_logging()
    distributed.hide_gpus_from_tensorflow()
    # Flags, the local launcher, GKE, SLURM or a TPU pod slice; a no-op for one process.
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    sources = gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    check_bindings(sources)
    check_initial_step(sources)
    # Before anything compiles: sibling runs share <MODEL_DIR>/../compilation_cache by default.
    compilation_cache.configure(gin_utils.macro_value('COMPILATION_CACHE_DIR'),
                                gin_utils.bound_value('train.model_dir', sources).value)
    summary = gin_utils.RunSummary()
    result = gin_utils.run_configured_training(['-m', 'doa_jax.train', *argv], summary)
    logging.info(summary.line(result))
    return 0


if __name__ == '__main__':
    sys.exit(gin_utils.run_cli(main, PROG))
