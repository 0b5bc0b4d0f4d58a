"""Entry point: `python -m doa_jax.infer --gin_file=gin_configs/runs/pseudo_label.gin
--gin.CHECKPOINT_PATH=... --gin.INFER_OUTPUT_DIR=...` pseudo-labels an unlabeled pool.

gin binds the pseudo-labeling job as `doa_jax.infer` (doa_jax.gin_utils.configurables); the logic
is `doa_jax.pseudo_label`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from doa_jax import (compilation_cache, distributed, gin_macros, gin_utils, pseudo_label,
                     pseudo_label_manifest, run_identity)

PROG = 'python -m doa_jax.infer'


def check_bindings(sources: gin_utils.GinSources) -> None:
    """Fails before anything runs on an unbound job or a path that is not a string."""
    gin_utils.check_entry_bindings('infer', sources)
    gin_utils.check_path('infer.checkpoint_path', sources)
    gin_utils.check_path('infer.output_dir', sources)


def summary_line(result: pseudo_label.ShardResult, sources: gin_utils.GinSources) -> str:
    """`infer: shard 0 done: ... examples; cost $...; output DIR`. The ledger is where
    run_pseudo_labeling prices chunks: infer.cost_ledger_dir, else beside the output directory,
    under the run id the directory records (else its name)."""
    output_dir = os.path.abspath(gin_utils.bound_value('infer.output_dir', sources).value)
    ledger = gin_utils.bound_value('infer.cost_ledger_dir', sources)
    ledger_dir = ledger.value if ledger and ledger.value else os.path.dirname(output_dir)
    why = 'stopped at the budget (infer.max_usd)' if result.stopped_by_budget else 'done'
    text = (f'infer: shard {result.shard_id} {why}: {result.chunks_written} chunks written, '
            f'{result.chunks_skipped} already complete, {result.examples_written} examples')
    run_id = run_identity.run_id_or_name(output_dir, pseudo_label_manifest.MANIFEST)
    spent = gin_utils.ledger_spent_usd(ledger_dir, run_id, 'pseudo_label')
    text += '; cost not metered (no ledger)' if spent is None else \
        f'; cost ${spent[0]:.4f} in {spent[1]}'
    return text + f'; output {output_dir}.'


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --overwrite: replace the labels of another teacher or settings in INFER_OUTPUT_DIR.
    overwrite = [a for a in argv if a == '--overwrite']
    argv = [a for a in argv if a != '--overwrite'] + \
        (['--gin.infer.overwrite=True'] if overwrite else [])
    if gin_macros.FLAG in argv:   # the macros, their values and where each is set; no labeling
        return gin_macros.list_macros(argv, prog=PROG,
                                      example='gin_configs/runs/pseudo_label.gin')
    args = gin_utils.parse_flags(argv, prog=PROG, example='gin_configs/runs/pseudo_label.gin',
                                 description='Pseudo-label an unlabeled pool with a teacher '
                                             '(--overwrite replaces the labels INFER_OUTPUT_DIR '
                                             'holds from another teacher or settings).')
    gin_utils.setup_logging()
    distributed.hide_gpus_from_tensorflow()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    sources = gin_utils.parse_gin(args.gin_file, args.gin_bindings, search)
    check_bindings(sources)
    # Before anything compiles: <INFER_OUTPUT_DIR>/../compilation_cache by default.
    compilation_cache.configure(gin_utils.macro_value('COMPILATION_CACHE_DIR'),
                                gin_utils.bound_value('infer.output_dir', sources).value)
    gin_utils.CONFIGURABLE['import_task_modules']()
    result = gin_utils.CONFIGURABLE['infer']()
    logging.info(summary_line(result, sources))
    return 0


if __name__ == '__main__':
    sys.exit(gin_utils.run_cli(main, PROG))
