"""`python -m doa_jax.benchmark train`: train-step throughput and MFU, optionally against HF PyTorch.

Times the trainer's own jitted step (same partitioning, loss and optimizer code) on synthetic
token batches of fixed shape, so only the step is measured: no input pipeline, no checkpointing.
Each step is timed separately to show whether the speed holds over many steps (on CPU, values
turning denormal can slow fp32 training down). `--hf` runs HF PyTorch T5 on the same config,
batch, lengths, optimizer and thread count, in fp32 and bf16 autocast, and prints the ratios.

The batch is synthetic (every token real) unless `--task` names a seqio task: then it is that
task's first training batch at --source_len/--target_len, packed with `--pack` as the run configs
train. Either way the result reports `nonpad_token_share`, the share of the batch's input and
target positions that hold real tokens (the rest is padding the step computes for nothing).

Also runnable as `python -m doa_jax.benchmark.train ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence

from doa_jax.benchmark import (add_impl_arguments, add_price_arguments, impl_labels,
                               price, standalone_main, torch_device_kind,
                               write_json)

DTYPES = ('float32', 'bfloat16')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', default='t5_1_1_small', help='named model config (models/config.py)')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--source_len', type=int, default=128)
    parser.add_argument('--target_len', type=int, default=32)
    parser.add_argument('--steps', type=int, default=10, help='timed steps (after warm-up)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
    parser.add_argument('--optimizer', default='adamw', choices=('adamw', 'adafactor'))
    parser.add_argument('--learning_rate', type=float, default=3e-5)
    parser.add_argument('--dtype', default='bfloat16', choices=DTYPES, help='activation dtype')
    add_impl_arguments(parser)
    parser.add_argument('--mesh_model', type=int, default=1, help='model-parallel axis size')
    parser.add_argument('--fsdp', action='store_true')
    parser.add_argument('--remat', default=None, choices=(None, 'full', 'minimal'))
    parser.add_argument('--peak_flops', type=float, default=None,
                        help='peak FLOP/s per device for MFU (default: by device kind; CPU 0.35e12)')
    parser.add_argument('--hf', '--compare_hf', dest='hf', action='store_true',
                        help='also time HF PyTorch T5 (fp32 and bf16 autocast) and print ratios')
    parser.add_argument('--hf_dtypes', default=','.join(DTYPES),
                        help="comma-separated precisions HF runs in with --hf (default: both; "
                             "'bfloat16' is autocast)")
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for PyTorch (default: os.cpu_count())')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--task', default=None,
                        help='time a batch of this seqio task (its train split) instead of '
                             'synthetic tokens')
    parser.add_argument('--task_module', default='tasks', help='module that registers --task')
    parser.add_argument('--vocabulary', default=None,
                        help="--task's vocabulary: 'byte' or a SentencePiece model path")
    parser.add_argument('--pack', action='store_true',
                        help='pack several --task examples per row (as the run configs train)')
    add_price_arguments(parser)


def nonpad_token_share(batch) -> float:
    """Real (non-padding) tokens over all positions, inputs and targets together."""
    import numpy as np
    enc, dec = np.asarray(batch['encoder_input_tokens']), np.asarray(batch['decoder_target_tokens'])
    return float(((enc > 0).sum() + (dec > 0).sum()) / (enc.size + dec.size))


def _task_batch(args: argparse.Namespace) -> dict:
    """The first training batch of `args.task` (numpy), packed with `args.pack`."""
    import importlib

    from doa_jax import train_data
    from doa_jax.data.vocabulary import set_default_vocabulary
    if args.vocabulary:
        set_default_vocabulary(args.vocabulary)
    importlib.import_module(args.task_module)
    lengths = {'inputs': args.source_len, 'targets': args.target_len}
    ds = train_data.host_dataset(args.task, lengths, 'train', args.batch_size, seed=0,
                                 pack=args.pack)
    return next(train_data.numpy_batches(ds))


def _summary(times: list[float]) -> dict[str, float]:
    k = max(1, len(times) // 5)
    return {'median_s': statistics.median(times), 'first_s': statistics.mean(times[:k]),
            'last_s': statistics.mean(times[-k:]), 'steps': len(times)}


def bench_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from doa_jax import flops, losses, optimizers, partitioning
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_train_state, init_train_state
    from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics

    cfg = get_config(args.config, dtype=getattr(jnp, args.dtype), remat_policy=args.remat,
                     attention_impl=args.attention_impl, matmul_impl=args.matmul_impl)
    model = T5(cfg)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(model=args.mesh_model, fsdp=args.fsdp))
    partitioning.check_batch_size(args.batch_size, mesh, '--batch_size')
    rules = partitioning.param_rules(args.fsdp)
    opt = optimizers.make_optimizer(args.optimizer, args.learning_rate)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, args.source_len), jnp.int32),
                          jnp.ones((1, args.target_len), jnp.int32))['params']

    with jax.set_mesh(mesh):
        _, shardings = abstract_train_state(init_params, opt, mesh, rules, jax.random.PRNGKey(0))
        state = init_train_state(init_params, opt, shardings, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b, s, t = args.batch_size, args.source_len, args.target_len
    if args.task:
        host = _task_batch(args)
    else:
        if args.pack:
            raise SystemExit('--pack packs the examples of a --task; synthetic rows are full.')
        targets = rng.integers(2, cfg.vocab_size, size=(b, t), dtype=np.int32)
        host = {'encoder_input_tokens': rng.integers(2, cfg.vocab_size, size=(b, s),
                                                     dtype=np.int32),
                'decoder_target_tokens': targets,
                'decoder_input_tokens': np.concatenate([np.zeros((b, 1), np.int32),
                                                        targets[:, :-1]], 1),
                'decoder_loss_weights': np.ones((b, t), np.int32)}
    batch = jax.device_put(host, partitioning.batch_sharding(mesh))
    step = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, mesh,
                           partitioning.STANDARD_RULES, shardings, use_dropout=False)
    metrics = jax.device_put(zero_metrics(), partitioning.replicated(mesh))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, metrics).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch, metrics)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, metrics)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    flops_step = b * flops.train_flops_per_sequence(cfg, s, t)
    peak = args.peak_flops or flops.peak_flops_per_device()
    out = _summary(times)
    med = out['median_s']
    out.update({'impl': f'doa_jax {args.dtype}', **impl_labels(cfg), 'compile_s': compile_s,
                'target_tokens_per_s': b * t / med, 'tokens_per_s': b * (s + t) / med,
                'tflops_per_s': flops_step / med / 1e12,
                'mfu': flops.mfu(flops_step, med, mesh.size, peak),
                'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}',
                'batch_source': f'task {args.task}' if args.task else 'synthetic',
                'packed': bool(args.pack), 'nonpad_token_share': nonpad_token_share(host),
                'final_loss': float(metrics['loss']) / max(float(metrics['num_steps']), 1)})
    return price(out, device_kind=jax.devices()[0].device_kind, device_count=mesh.size, batch=b,
                 args=args)


def bench_hf(args: argparse.Namespace, precision: str) -> dict:
    import torch
    import transformers

    from doa_jax.checkpoints.hf_mapping import hf_config_dict
    from doa_jax.models.config import get_config

    torch.set_num_threads(args.threads or os.cpu_count())
    cfg = get_config(args.config)
    fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ('architectures', 'model_type')}
    fields['dropout_rate'] = 0.0
    hf_config = transformers.T5Config(**fields)
    hf_config.tie_word_embeddings = cfg.logits_via_embedding
    torch.manual_seed(0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = transformers.T5ForConditionalGeneration(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    g = torch.Generator().manual_seed(0)
    b, s, t = args.batch_size, args.source_len, args.target_len
    enc = torch.randint(2, cfg.vocab_size, (b, s), generator=g).to(device)
    labels = torch.randint(2, cfg.vocab_size, (b, t), generator=g).to(device)

    def one_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bfloat16'):
            loss = model(input_ids=enc, labels=labels).loss
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == 'cuda':
            torch.cuda.synchronize()
        return loss.item()

    for _ in range(args.warmup):
        one_step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    out = _summary(times)
    out.update({'impl': f'HF PyTorch {precision}', 'target_tokens_per_s': b * t / out['median_s'],
                'tokens_per_s': b * (s + t) / out['median_s'], 'threads': torch.get_num_threads()})
    kind, count = torch_device_kind()
    return price(out, device_kind=kind, device_count=count, batch=b, args=args)


def run(args: argparse.Namespace) -> list[dict]:
    from doa_jax.cost.prices import format_usd

    results = [bench_jax(args)]
    if args.hf:
        precisions = [p.strip() for p in args.hf_dtypes.split(',') if p.strip()]
        unknown = sorted(set(precisions) - set(DTYPES))
        if unknown or not precisions:
            raise SystemExit(f'--hf_dtypes={args.hf_dtypes!r}: choose from {", ".join(DTYPES)}')
        for precision in precisions:
            results.append(bench_hf(args, precision))
    ours = results[0]['median_s']
    print(f'\n{args.config}: batch {args.batch_size}, {args.source_len}+{args.target_len} tokens, '
          f'{args.optimizer}, {results[0]["device"]}')
    print(f'{"implementation":<22} {"s/step (median)":>16} {"first":>8} {"last":>8} '
          f'{"seqs/s":>8} {"tokens/s":>10} {"MFU":>7} {"$/1M tokens":>12} {"time/ours":>9}')
    for r in results:
        mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') is not None else '-'   # None: no peak
        print(f'{r["impl"]:<22} {r["median_s"]:>16.4f} {r["first_s"]:>8.3f} {r["last_s"]:>8.3f} '
              f'{r["seqs_per_s"]:>8.2f} {r["tokens_per_s"]:>10.0f} {mfu:>7} '
              f'{format_usd(r["usd_per_1m_tokens"]):>12} {r["median_s"] / ours:>9.2f}')
    print(f'$/1M tokens: (source + target) tokens at the price table\'s $/device-hour for each '
          f'device kind ({", ".join(sorted({r["device_kind"] for r in results}))}).')
    print(f'non-padding tokens: {100 * results[0]["nonpad_token_share"]:.1f}% of the '
          f'{results[0]["batch_source"]} batch{" (packed)" if args.pack else ""}')
    if 'compile_s' in results[0]:
        print(f'compilation: {results[0]["compile_s"]:.1f} s')
    write_json(args.json, {'args': vars(args), 'results': results})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main('python -m doa_jax.benchmark train', __doc__, add_arguments, run, argv)


if __name__ == '__main__':
    sys.exit(main())
