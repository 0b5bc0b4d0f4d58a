"""`python -m doa_jax.data download|prepare|lengths`: fetch the paper's files, build TFDS records,
measure a task's feature lengths (tokens per input and target, for the task registry)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from doa_jax.data import download as download_lib
from doa_jax.data import paper


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.data', description=__doc__)
    parser.add_argument('command', choices=['download', 'prepare', 'lengths'])
    parser.add_argument('--tasks', default='all',
                        help=f'comma-separated datasets from {sorted(paper.DATASETS)}, or all; '
                             'lengths also takes registered seqio task names')
    parser.add_argument('--data_dir', default=None,
                        help='JSONL folder (default: $DOA_DATA_DIR or ~/.cache/doa_jax/...)')
    parser.add_argument('--url_base', default=paper.REPO_URL,
                        help='where the files are served (a mirror, or file:///path/ offline)')
    parser.add_argument('--include_unverified', action='store_true',
                        help='also fetch files with no recorded checksum (recorded on first fetch)')
    parser.add_argument('--tfds_dir', default=None,
                        help='TFDS output (default: <data_dir>/tfds, where the paper tasks look '
                             'for it; elsewhere, point DOA_TFDS_DIR at it)')
    parser.add_argument('--vocabulary', default=None,
                        help="lengths: 'byte' or a SentencePiece model path (default: as the "
                             'runs pick it: $DOA_VOCAB, else the T5 model)')
    parser.add_argument('--module', default='tasks',
                        help='lengths: the module that registers the tasks')
    parser.add_argument('--splits', default='train,validation',
                        help='lengths: the splits measured (those a task has)')
    parser.add_argument('--percentile', type=float, default=99.9,
                        help='lengths: the percentile recorded (rounded up to a multiple of 8)')
    args = parser.parse_args(argv)
    data_dir = paper.data_dir(args.data_dir)
    datasets = [t.strip() for t in args.tasks.split(',') if t.strip()]
    if args.command == 'lengths':
        return _lengths(args, datasets, data_dir)
    if args.command == 'download':
        status = download_lib.download(datasets, data_dir, url_base=args.url_base,
                                       public_only=not args.include_unverified)
        for rel, what in status.items():
            print(f'{data_dir / rel}: {what}')
        return 0
    from doa_jax.data import tfds_builder  # TFDS is heavy; only prepare needs it.
    names = list(paper.DATASETS) if datasets == ['all'] else datasets
    counts = tfds_builder.prepare(names, str(data_dir), args.tfds_dir or str(data_dir / 'tfds'))
    for name, splits in counts.items():
        print(f'{name}: ' + ', '.join(f'{s}={n}' for s, n in sorted(splits.items())))
    return 0


def _lengths(args: argparse.Namespace, names: list[str], data_dir) -> int:
    """Prints one `'task': {'inputs': N, 'targets': M},` line per task (to paste into the
    registry) followed by its statistics as a comment, and the vocabulary key."""
    from doa_jax.data import lengths as lengths_lib
    from doa_jax.data.vocabulary import set_default_vocabulary
    os.environ['DOA_DATA_DIR'] = str(data_dir)
    if args.vocabulary:
        set_default_vocabulary(args.vocabulary)
    importlib.import_module(args.module)
    names = [f'doa_{d}' for d in paper.DATASETS] if names == ['all'] else [
            f'doa_{n}' if n in paper.DATASETS else n for n in names]
    splits = [s.strip() for s in args.splits.split(',') if s.strip()]
    keys = set()
    for name in names:
        stats = lengths_lib.measure(name, splits, args.percentile)
        keys.add(stats['vocabulary'])
        summary = {k: stats[k] for k in ('splits', 'examples', 'inputs', 'targets')}
        print(f"'{name}': {stats['lengths']},  # {json.dumps(summary)}")
    print(f'# vocabulary key: {", ".join(sorted(keys))}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
