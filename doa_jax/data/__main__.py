"""`python -m doa_jax.data download|prepare`: fetch the paper's files, build TFDS records."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from doa_jax.data import download as download_lib
from doa_jax.data import paper


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.data', description=__doc__)
    parser.add_argument('command', choices=['download', 'prepare'])
    parser.add_argument('--tasks', default='all',
                        help=f'comma-separated datasets from {sorted(paper.DATASETS)}, or all')
    parser.add_argument('--data_dir', default=None,
                        help='JSONL folder (default: $DOA_DATA_DIR or ~/.cache/doa_jax/...)')
    parser.add_argument('--url_base', default=paper.REPO_URL,
                        help='where the files are served (a mirror, or file:///path/ offline)')
    parser.add_argument('--include_unverified', action='store_true',
                        help='also fetch files with no recorded checksum (recorded on first fetch)')
    parser.add_argument('--tfds_dir', default=None, help='TFDS output (default: <data_dir>/tfds)')
    args = parser.parse_args(argv)
    data_dir = paper.data_dir(args.data_dir)
    datasets = [t.strip() for t in args.tasks.split(',') if t.strip()]
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


if __name__ == '__main__':
    sys.exit(main())
