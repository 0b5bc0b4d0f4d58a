"""`python -m doa_jax.benchmark gpu_check --out DIR`: the whole GPU proof in one prepared run.

Steps, each a subprocess (so JAX and PyTorch never hold the device at once) with its output
appended to DIR/gpu_check.log, and every result gathered into DIR/gpu_check.json:
1. the accelerator test tier (`tests/test_accelerator.py`: HF parity in fp32 and bf16, greedy
   tokens, every attention backend against the xla reference, a 20-step training run whose loss
   falls, one decoder compile per bucket);
2. `benchmark train` for t5_1_1_small and t5_1_1_base at batch 32, 512+128 tokens, bf16, beside
   HF PyTorch eager (bf16 autocast) on the same device;
3. `benchmark decode` for t5_1_1_small, greedy and beam 4, batch 64, beside HF `generate`;
4. while time is left: `benchmark train` for t5_1_1_large.
Each step gets what is left of `--budget_s` (default 420 s, 7 minutes); a step that would start
with under a minute left is skipped and recorded as such. `--dry_run` runs the same steps with
tiny models on whatever device is here (a CPU machine included), so the script, its imports and
its flags are checked before any device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from doa_jax.benchmark import standalone_main

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', required=True, help='directory for gpu_check.json and .log')
    parser.add_argument('--budget_s', type=float, default=420.0,
                        help='wall-clock budget for all steps (default 7 minutes)')
    parser.add_argument('--dry_run', action='store_true',
                        help='tiny models, few steps, on any device: checks the script itself')


def plan(dry_run: bool) -> list[tuple[str, list[str]]]:
    """(name, argv after `python`) for each step, in order."""
    bench = ['-m', 'doa_jax.benchmark']
    if dry_run:
        train = lambda model: [*bench, 'train', f'--config={model}', '--batch_size=4',
                               '--source_len=16', '--target_len=8', '--steps=2', '--warmup=1',
                               '--hf', '--hf_dtypes=bfloat16']
        decode = lambda method: [*bench, 'decode', '--model=t5_1_1_tiny', '--batch=4',
                                 '--input_len=16', '--new_tokens=4', '--dtype=bfloat16',
                                 f'--method={method}', '--num_beams=4', '--repeats=1', '--hf']
        sizes = {'small': 't5_1_1_tiny', 'base': 't5_1_1_mini', 'large': 't5_1_1_tiny'}
    else:
        train = lambda model: [*bench, 'train', f'--config={model}', '--batch_size=32',
                               '--source_len=512', '--target_len=128', '--steps=10',
                               '--warmup=2', '--dtype=bfloat16', '--hf', '--hf_dtypes=bfloat16']
        decode = lambda method: [*bench, 'decode', '--model=t5_1_1_small', '--batch=64',
                                 '--input_len=128', '--new_tokens=32', '--dtype=bfloat16',
                                 f'--method={method}', '--num_beams=4', '--repeats=3', '--hf']
        sizes = {'small': 't5_1_1_small', 'base': 't5_1_1_base', 'large': 't5_1_1_large'}
    return [('accelerator_tests', ['-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                                   'tests/test_accelerator.py']),
            ('train_small', train(sizes['small'])),
            ('train_base', train(sizes['base'])),
            ('decode_greedy', decode('greedy')),
            ('decode_beam4', decode('beam')),
            ('train_large', train(sizes['large']))]


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path, json_path = out / 'gpu_check.log', out / 'gpu_check.json'
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false', PYTHONUNBUFFERED='1')
    if args.dry_run:
        env['DOA_ACCELERATOR_TESTS_ON_CPU'] = '1'
    report = {'dry_run': args.dry_run, 'budget_s': args.budget_s, 'steps': {}}
    start = time.monotonic()
    with open(log_path, 'a') as log:
        for name, argv in plan(args.dry_run):
            left = args.budget_s - (time.monotonic() - start)
            if left < 60 and not args.dry_run:
                report['steps'][name] = {'status': 'skipped', 'why': f'{left:.0f} s left'}
                continue
            step_json = out / f'{name}.json'
            if argv[:2] == ['-m', 'doa_jax.benchmark']:
                argv = [*argv, f'--json={step_json}']
            log.write(f'\n=== {name}: python {" ".join(argv)}\n')
            log.flush()
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=max(left, 60))
                status = 'ok' if proc.returncode == 0 else f'failed (exit {proc.returncode})'
            except subprocess.TimeoutExpired:
                status = 'timed out'
            entry = {'status': status, 'wall_s': round(time.monotonic() - t0, 1)}
            if step_json.exists():
                entry['results'] = json.loads(step_json.read_text())['results']
            report['steps'][name] = entry
            print(f'{name}: {status} in {entry["wall_s"]} s', flush=True)
            json_path.write_text(json.dumps(report, indent=1))   # partial results survive a kill
    report['wall_s'] = round(time.monotonic() - start, 1)
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    report['versions'] = _versions()   # after the steps: this process never held the device
    json_path.write_text(json.dumps(report, indent=1))
    failed = [n for n, s in report['steps'].items() if s['status'] not in ('ok', 'skipped')]
    print(f'gpu_check: {json_path} and {log_path}; ' +
          (f'FAILED: {", ".join(failed)}' if failed else 'every step passed'))
    if failed:
        raise SystemExit(1)
    return report


def _versions() -> dict:
    import jax
    versions = {'jax': jax.__version__, 'backend': jax.default_backend(),
                'devices': [d.device_kind for d in jax.devices()]}
    try:
        import torch
        import transformers
        versions.update(torch=torch.__version__, transformers=transformers.__version__,
                        torch_cuda=torch.cuda.is_available())
    except ImportError as e:
        versions['torch'] = f'unavailable: {e}'
    return versions


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main('python -m doa_jax.benchmark gpu_check', __doc__, add_arguments, run,
                           argv)


if __name__ == '__main__':
    sys.exit(main())
