"""`python -m doa_jax.benchmark pseudo_label`: pseudo-labels per second and $ per 1K pseudo-labels.

Runs the real pseudo-labeling path (`pseudo_label.TeacherLabeler` on a (data, model) mesh of this
host's devices, then `pseudo_label_shard` writing fsynced JSONL chunks with markers) on a pool of
`--num_examples` random inputs of exactly `--input_len` tokens. The first batch compiles and is
not timed; the rest is timed end to end: tokenizing, decoding, the optional top-k pass, writing.

Without `--checkpoint` the teacher has random weights and its EOS logit is pinned to 0 (it is never
the argmax among tens of thousands of random logits), so every row decodes `--new_tokens` tokens:
the worst case. With `--checkpoint`, a trained teacher stops early as it would in a real run.
Dollars come from the price table for this device kind (`--prices`, `--device_price_fallback`),
times the devices in the mesh. Also runnable as `python -m doa_jax.benchmark.pseudo_label ...`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Sequence

from doa_jax.benchmark import add_price_arguments, parse_mesh, standalone_main, write_json

EOS_ID = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='t5_1_1_small', help='named model config (the teacher)')
    parser.add_argument('--checkpoint', default=None,
                        help='teacher checkpoint (doa_jax run dir, HF or t5x); default random init')
    parser.add_argument('--mesh', default='data:-1,model:1',
                        help='this host\'s devices as data:D,model:M (data -1: all the rest)')
    parser.add_argument('--batch', type=int, default=32, help='decode batch (global on the mesh)')
    parser.add_argument('--input_len', type=int, default=128, help='input tokens per example')
    parser.add_argument('--new_tokens', type=int, default=32, help='max decoded tokens')
    parser.add_argument('--num_examples', type=int, default=256, help='timed pool size')
    parser.add_argument('--chunk_size', type=int, default=64)
    parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'),
                        help='activation dtype')
    parser.add_argument('--method', default='greedy', choices=('greedy', 'beam'))
    parser.add_argument('--num_beams', type=int, default=4)
    parser.add_argument('--top_k', type=int, default=0, help='also store top-k log-probs')
    parser.add_argument('--output_dir', default=None, help='keep the chunks here (default: temp)')
    parser.add_argument('--json', default=None, help='also write the result to this JSON file')
    add_price_arguments(parser)


def _pool(args, vocab_size: int) -> list[tuple[str, str]]:
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(2, vocab_size, (args.batch + args.num_examples, args.input_len - 1))
    return [(f'bench:{i}', ' '.join(map(str, row))) for i, row in enumerate(ids)]


def _teacher(args, config):
    import jax
    import jax.numpy as jnp

    from doa_jax.models.t5 import T5
    from doa_jax.pseudo_label import load_teacher

    if args.checkpoint:
        return load_teacher(args.checkpoint, config)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = jax.jit(lambda r: T5(config).init(r, tokens, tokens)['params'])(jax.random.PRNGKey(0))
    from flax import linen as nn
    params = nn.unbox(params)
    if config.logits_via_embedding:     # tied: logits = x @ embedding.T
        emb = params['token_embedder']['embedding']
        params['token_embedder']['embedding'] = emb.at[EOS_ID].set(0.0)
    else:
        head = params['decoder']['logits_dense']['kernel']
        params['decoder']['logits_dense']['kernel'] = head.at[..., EOS_ID].set(0.0)
    return params


def bench(args: argparse.Namespace) -> dict:
    import jax.numpy as jnp

    from doa_jax import cost, partitioning
    from doa_jax import pseudo_label as pl
    from doa_jax.models.config import get_config

    data, model = parse_mesh(args.mesh)
    mesh = pl.teacher_mesh(partitioning.MeshConfig(data=data, model=model))
    config = get_config(args.model, dropout_rate=0.0,
                        dtype=jnp.float32 if args.dtype == 'float32' else jnp.bfloat16)
    pool = _pool(args, config.vocab_size)
    encode = lambda text: [int(t) for t in text.split()]
    decode = lambda ids: ' '.join(map(str, ids))
    label = pl.model_label_batch(_teacher(args, config), config, encode, decode,
                                 max_input_length=args.input_len,
                                 max_decode_length=args.new_tokens, method=args.method,
                                 num_beams=args.num_beams, top_k=args.top_k, eos_id=EOS_ID,
                                 batch_size=args.batch, mesh=mesh)
    t0 = time.perf_counter()
    label([text for _, text in pool[:args.batch]])      # compiles decode (and top-k)
    compile_s = time.perf_counter() - t0
    timed = pool[args.batch:]
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        t0 = time.perf_counter()
        result = pl.pseudo_label_shard(timed, label, out_dir, chunk_size=args.chunk_size,
                                       batch_size=args.batch)
        seconds = time.perf_counter() - t0
        records = pl.read_chunks(out_dir)
    if result.chunks_skipped:
        raise SystemExit(f'--output_dir={args.output_dir!r} already holds completed chunks; '
                         'point it at an empty directory so every example is timed.')
    assert len(records) == len(timed), (len(records), len(timed))
    # Body tokens plus the EOS, unless the row was cut off at --new_tokens without one.
    new_tokens = sum(min(len(r['prediction'].split()) + 1, args.new_tokens) for r in records)
    prices = cost.load_prices(args.prices)
    kind = str(mesh.devices.flat[0].device_kind)
    usd_hour = float(prices.usd_per_device_hour(kind, args.device_price_fallback))
    per_s = len(records) / seconds
    usd_per_1k = cost.device_cost_usd(1000.0 / per_s, mesh.size, usd_hour)
    return {'model': args.model, 'mesh': dict(mesh.shape), 'devices': f'{mesh.size}x {kind}',
            'dtype': args.dtype, 'method': args.method, 'batch': args.batch,
            'input_len': args.input_len, 'max_new_tokens': args.new_tokens,
            'examples': len(records), 'seconds': seconds, 'compile_s': compile_s,
            'pseudo_labels_per_s': per_s, 'new_tokens_per_s': new_tokens / seconds,
            'mean_new_tokens': new_tokens / len(records), 'usd_per_device_hour': usd_hour,
            'usd_per_1k_pseudo_labels': usd_per_1k, 'prices': prices.origin,
            'random_weights': not args.checkpoint}


def run(args: argparse.Namespace) -> dict:
    from doa_jax.cost.prices import format_usd

    r = bench(args)
    weights = 'random weights, full length' if r['random_weights'] else args.checkpoint
    print(f'\n{r["model"]} teacher ({weights}), {r["method"]}, {r["dtype"]}, mesh {r["mesh"]} '
          f'on {r["devices"]}; batch {r["batch"]}, {r["input_len"]} input tokens, '
          f'<= {r["max_new_tokens"]} new tokens')
    print(f'{"examples":>9} {"seconds":>9} {"labels/s":>10} {"tokens/s":>10} '
          f'{"$/device-h":>11} {"$/1K labels":>12}')
    print(f'{r["examples"]:>9} {r["seconds"]:>9.2f} {r["pseudo_labels_per_s"]:>10.2f} '
          f'{r["new_tokens_per_s"]:>10.0f} {r["usd_per_device_hour"]:>11.3f} '
          f'{format_usd(r["usd_per_1k_pseudo_labels"]):>12}')
    print(f'compilation (excluded): {r["compile_s"]:.1f} s; prices: {r["prices"]}')
    write_json(args.json, {'args': vars(args), 'result': r})
    return r


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main('python -m doa_jax.benchmark pseudo_label', __doc__, add_arguments,
                           run, argv)


if __name__ == '__main__':
    sys.exit(main())
