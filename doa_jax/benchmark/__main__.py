"""`python -m doa_jax.benchmark <subcommand>`: throughput (train, decode, pseudo_label), the recipe
gate (plan) and the GPU proof (gpu_check)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# subcommand -> module with add_arguments(parser) and run(args)
SUBCOMMANDS = {
    'train': ('doa_jax.benchmark.train', 'train-step tokens/s and MFU (optionally vs HF PyTorch)'),
    'decode': ('doa_jax.benchmark.decode', 'greedy/beam decoding tokens/s (optionally vs HF generate)'),
    'pseudo_label': ('doa_jax.benchmark.pseudo_label',
                     'pseudo-labels/s and $ per 1K pseudo-labels for a teacher on a mesh'),
    'plan': ('doa_jax.benchmark.plan',
             'compile-and-fit gate of a gin recipe: memory per device against its target, '
             'lowering for GPU and TPU (fake CPU devices)'),
    'gpu_check': ('doa_jax.benchmark.gpu_check',
                  'the GPU proof in one run: accelerator tests, train and decode vs HF'),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m doa_jax.benchmark', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(sub.add_parser(name, help=help_text))
    argv = list(sys.argv[1:] if argv is None else argv)
    # `plan` reads gin recipes: --gin.X=Y flags bind as in python -m doa_jax.train.
    bindings = [a[len('--gin.'):] for a in argv if a.startswith('--gin.')]
    args = parser.parse_args([a for a in argv if not a.startswith('--gin.')])
    if bindings and args.command != 'plan':
        parser.error(f'--gin.{bindings[0]}: only `plan` takes gin bindings.')
    args.gin_bindings = bindings
    modules[args.command].run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
