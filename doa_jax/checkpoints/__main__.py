"""Convert checkpoints.

  python -m doa_jax.checkpoints convert --from hf  SRC --to DST [--model NAME]
  python -m doa_jax.checkpoints convert --from t5x SRC --to DST [--model NAME]
  python -m doa_jax.checkpoints export-hf SRC --to DST --model NAME
  python -m doa_jax.checkpoints export-t5x RUN_DIR --to DIR [--step N] [--model NAME]

`convert` writes an Orbax checkpoint (`{'params': ...}`) that INITIAL_CHECKPOINT_PATH accepts;
without --model, the config comes from HF's config.json or from the t5x checkpoint's shapes.
`export-hf` writes config.json + model.safetensors for `transformers`. `export-t5x` writes
DIR/checkpoint_<step> in t5x's format with t5x's Adafactor state, which `python -m t5x.train`
restores as INITIAL_CHECKPOINT_PATH (and t5x.eval / t5x.infer as CHECKPOINT_PATH).
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


def describe_config(config) -> str:
    """The named config `config` equals (dtype and backends aside), else its sizes."""
    from doa_jax.models.config import NAMED_CONFIGS

    for name, named in NAMED_CONFIGS.items():
        if named.replace(dtype=config.dtype, scan_layers=config.scan_layers) == config:
            return name
    fields = ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'num_encoder_layers',
              'num_decoder_layers', 'mlp_dim', 'mlp_activations', 'logits_via_embedding')
    return 'T5Config(' + ', '.join(f'{f}={getattr(config, f)!r}' for f in fields) + ')'


def _t5x_params(args: argparse.Namespace):
    """A t5x checkpoint's parameters, for --model or else the config its shapes imply."""
    from doa_jax import checkpoints

    params, fmt, _ = checkpoints.read_params(args.src)
    if args.model:
        config = _config(args.model, '')
    else:
        try:
            config = checkpoints.config_from_params(params)
        except ValueError as e:
            raise SystemExit(f'{args.src}: {e}') from None
        print(f"config from the checkpoint's shapes: {describe_config(config)}")
    return checkpoints.fit_params(params, config, f'{fmt} checkpoint {args.src}')


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
        params = _t5x_params(args)
    checkpoints.save_params(params, args.dst)
    print(f'wrote Orbax checkpoint {args.dst}')


def export_hf(args: argparse.Namespace) -> None:
    from doa_jax import checkpoints

    cfg = _config(args.model, 'export-hf')
    params = checkpoints.load_checkpoint(args.src, cfg)
    checkpoints.save_hf(params, cfg, args.dst)
    print(f'wrote HF directory {args.dst} (config.json, model.safetensors)')


def export_t5x(args: argparse.Namespace) -> None:
    from doa_jax import checkpoints

    config = _config(args.model, '') if args.model else None
    out, config = checkpoints.export_t5x(args.src, args.dst, args.step, config)
    step = out.name.removeprefix('checkpoint_')
    print(f"wrote t5x checkpoint {out} ({describe_config(config)}, step {step}, with t5x's "
          f"Adafactor state); use it as INITIAL_CHECKPOINT_PATH=\"'{out}'\"")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.checkpoints', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('convert', help='HF or t5x checkpoint -> Orbax params checkpoint')
    p.add_argument('--from', dest='source_format', choices=('hf', 't5x'), required=True)
    p.add_argument('src')
    p.add_argument('--to', dest='dst', required=True)
    p.add_argument('--model', default=None,
                   help="named config; default: HF's config.json or the t5x checkpoint's shapes")
    p.set_defaults(fn=convert)
    p = sub.add_parser('export-hf', help='any checkpoint doa_jax reads -> HF directory')
    p.add_argument('src')
    p.add_argument('--to', dest='dst', required=True)
    p.add_argument('--model', required=True, help='named config of the checkpoint')
    p.set_defaults(fn=export_hf)
    p = sub.add_parser('export-t5x', help='any checkpoint doa_jax reads (a MODEL_DIR: its latest '
                                          'step) -> t5x checkpoint_<step> for t5x.train')
    p.add_argument('src', metavar='RUN_DIR')
    p.add_argument('--to', dest='dst', required=True,
                   help='directory to write checkpoint_<step> into')
    p.add_argument('--step', type=int, default=None,
                   help="step to record (t5x counts TRAIN_STEPS from it); default: the run's")
    p.add_argument('--model', default=None, help="named config; default: the checkpoint's shapes")
    p.set_defaults(fn=export_t5x)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
