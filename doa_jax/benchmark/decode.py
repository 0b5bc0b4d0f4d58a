"""`python -m doa_jax.benchmark decode`: decoding throughput, optionally against HF `generate`.

Both sides decode the same random-weight model (ours is converted from the HF model's weights when
`--hf` is given), the same batch of random inputs, exactly `--new_tokens` new tokens per row (EOS is
disabled, so no row stops early), with the same CPU thread count. Compilation is timed separately
and excluded from tokens/s, and so is each side's one-time weight preparation (HF: the model in
the dtype; ours: `decoding.Decoder` preparing its weights).
Also runnable as `python -m doa_jax.benchmark.decode ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence

from doa_jax.benchmark import (add_impl_arguments, add_price_arguments, impl_labels, price,
                               standalone_main, torch_device_kind, write_json)

DTYPES = ('float32', 'bfloat16')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='t5_1_1_small', help='named model config')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--input_len', type=int, default=128)
    parser.add_argument('--new_tokens', type=int, default=32)
    parser.add_argument('--dtype', default='float32', choices=DTYPES,
                        help='activation dtype (HF: the whole model in this dtype)')
    add_impl_arguments(parser)
    parser.add_argument('--method', default='greedy', choices=('greedy', 'beam'))
    parser.add_argument('--num_beams', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3, help='timed runs (after one warm-up)')
    parser.add_argument('--hf', '--compare_hf', dest='hf', action='store_true',
                        help='also time HF PyTorch generate')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for PyTorch (default: os.cpu_count())')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    add_price_arguments(parser)


def _inputs(args, vocab_size: int):
    import numpy as np

    rng = np.random.RandomState(0)
    return rng.randint(2, vocab_size, (args.batch, args.input_len)).astype(np.int32)


def _hf_model(args):
    import torch
    import transformers

    from doa_jax.checkpoints.hf_mapping import hf_config_dict
    from doa_jax.models.config import get_config

    cfg = get_config(args.model)
    fields = hf_config_dict(cfg)
    fields.pop('architectures'), fields.pop('model_type')
    hf_config = transformers.T5Config(**fields)
    hf_config.tie_word_embeddings = cfg.logits_via_embedding
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    return model


def bench_ours(args, params=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from doa_jax import decoding
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5

    cfg = get_config(args.model, dtype=jnp.float32 if args.dtype == 'float32' else jnp.bfloat16,
                     attention_impl=args.attention_impl, matmul_impl=args.matmul_impl)
    enc = _inputs(args, cfg.vocab_size)
    if params is None:
        tokens = jnp.ones((1, 4), jnp.int32)
        params = jax.jit(lambda r: T5(cfg).init(r, tokens, tokens)['params'])(
                jax.random.PRNGKey(0))
    # The project's one decode path; its weights are prepared once before timing (cast to the
    # compute dtype, laid out for the matmul backend), as the HF side converts its model to the
    # dtype before timing. eos_id=-1: no row ever ends, so exactly `new_tokens` come out.
    decoder = decoding.Decoder(cfg, params, max_decode_length=args.new_tokens,
                               batch_size=args.batch, length_buckets=(args.input_len,),
                               method=args.method, num_beams=args.num_beams, eos_id=-1)
    weights, rng = jax.block_until_ready(decoder.weights), jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = decoder.lower(weights, enc, rng).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(weights, enc, rng))   # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out, _ = jax.block_until_ready(compiled(weights, enc, rng))
        times.append(time.perf_counter() - t0)
    assert np.asarray(out).shape == (args.batch, args.new_tokens)
    median = statistics.median(times)
    out = {'impl': f'doa_jax {args.dtype}', **impl_labels(cfg), 'median_s': median, 'compile_s': compile_s,
           'tokens_per_s': args.batch * args.new_tokens / median,
           'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}'}
    return price(out, device_kind=jax.devices()[0].device_kind, device_count=1, batch=args.batch,
                 args=args)


def bench_hf(args, model) -> dict:
    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    dtype = torch.float32 if args.dtype == 'float32' else torch.bfloat16
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = model.to(device=device, dtype=dtype)
    enc = torch.tensor(_inputs(args, model.config.vocab_size), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    kwargs = dict(input_ids=enc, attention_mask=torch.ones_like(enc),
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  num_beams=args.num_beams if args.method == 'beam' else 1)
    with torch.no_grad():
        model.generate(**kwargs)   # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = model.generate(**kwargs)
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == args.new_tokens + 1
    median = statistics.median(times)
    out = {'impl': f'HF PyTorch {args.dtype}', 'median_s': median,
           'tokens_per_s': args.batch * args.new_tokens / median, 'threads': threads}
    kind, count = torch_device_kind()
    return price(out, device_kind=kind, device_count=count, batch=args.batch, args=args)


def run(args: argparse.Namespace) -> list[dict]:
    from doa_jax.cost.prices import format_usd

    params = hf = None
    if args.hf:
        import jax.numpy as jnp

        from doa_jax.checkpoints.hf_mapping import params_from_hf_state_dict
        from doa_jax.models.config import get_config

        hf = _hf_model(args)
        state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
        params = params_from_hf_state_dict(state, get_config(args.model, dtype=jnp.float32))
    results = [bench_ours(args, params)]
    if hf is not None:
        results.append(bench_hf(args, hf))
    ours = results[0]['tokens_per_s']
    print(f'\n{args.model}: {args.method}, batch {args.batch}, {args.input_len} input tokens, '
          f'{args.new_tokens} new tokens, {results[0]["device"]}')
    print(f'{"implementation":<22} {"s/batch (median)":>17} {"seqs/s":>8} {"tokens/s":>10} '
          f'{"$/1M tokens":>12} {"ours/this":>10}')
    for r in results:
        print(f'{r["impl"]:<22} {r["median_s"]:>17.3f} {r["seqs_per_s"]:>8.2f} '
              f'{r["tokens_per_s"]:>10.0f} {format_usd(r["usd_per_1m_tokens"]):>12} '
              f'{ours / r["tokens_per_s"]:>10.2f}')
    print('$/1M tokens: new tokens at the price table\'s $/device-hour for each device kind.')
    print(f'compilation (excluded): {results[0]["compile_s"]:.1f} s')
    write_json(args.json, {'args': vars(args), 'results': results})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main('python -m doa_jax.benchmark decode', __doc__, add_arguments, run, argv)


if __name__ == '__main__':
    sys.exit(main())
