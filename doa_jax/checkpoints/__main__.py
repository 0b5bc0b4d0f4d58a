"""Convert checkpoints.

  python -m doa_jax.checkpoints convert --from hf  SRC --to DST [--model NAME]
  python -m doa_jax.checkpoints convert --from t5x SRC --to DST --model t5_1_1_small
  python -m doa_jax.checkpoints export-hf SRC --to DST --model NAME

`convert` writes an Orbax checkpoint (`{'params': ...}`) that INITIAL_CHECKPOINT_PATH accepts;
`export-hf` writes config.json + model.safetensors for `transformers`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _config(name: str | None, required_for: str):
    from doa_jax.models.config import get_config

    if name is None:
        raise SystemExit(f'--model is required for {required_for} (a named config such as '
                         't5_1_1_small; see doa_jax/models/config.py).')
    return get_config(name)


def convert(args: argparse.Namespace) -> None:
    from doa_jax import checkpoints
    from doa_jax.checkpoints.hf import load_hf

    if args.source_format == 'hf':
        if args.model:
            params = checkpoints.load_checkpoint(args.src, _config(args.model, ''))
        else:
            params, cfg = load_hf(args.src)
            print(f'config from {args.src}/config.json: {cfg}')
    else:
        params = checkpoints.load_checkpoint(args.src, _config(args.model, '--from t5x'))
    checkpoints.save_params(params, args.dst)
    print(f'wrote Orbax checkpoint {args.dst}')


def export_hf(args: argparse.Namespace) -> None:
    from doa_jax import checkpoints

    cfg = _config(args.model, 'export-hf')
    params = checkpoints.load_checkpoint(args.src, cfg)
    checkpoints.save_hf(params, cfg, args.dst)
    print(f'wrote HF directory {args.dst} (config.json, model.safetensors)')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.checkpoints', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('convert', help='HF or t5x checkpoint -> Orbax params checkpoint')
    p.add_argument('--from', dest='source_format', choices=('hf', 't5x'), required=True)
    p.add_argument('src')
    p.add_argument('--to', dest='dst', required=True)
    p.add_argument('--model', default=None, help='named config; required for t5x sources')
    p.set_defaults(fn=convert)
    p = sub.add_parser('export-hf', help='any checkpoint doa_jax reads -> HF directory')
    p.add_argument('src')
    p.add_argument('--to', dest='dst', required=True)
    p.add_argument('--model', required=True, help='named config of the checkpoint')
    p.set_defaults(fn=export_hf)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
