"""`python -m doa_jax.benchmark plan`: per-device memory of the real train step on a mesh, compiled
against abstract shapes on fake CPU devices (no weights are allocated).

CPU memory analysis approximates GPU/TPU (different fusion and layouts); treat it as an estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='t5_1_1_small', help='a NAMED_CONFIGS name')
    parser.add_argument('--mesh', default='data:1,model:1', help='e.g. data:2,model:4')
    parser.add_argument('--fsdp', action='store_true', help='shard params/optimizer over data too')
    parser.add_argument('--device_memory_gb', type=float, default=40.0)
    parser.add_argument('--margin', type=float, default=0.1, help='fraction kept free')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--input_len', type=int, default=512)
    parser.add_argument('--target_len', type=int, default=128)
    parser.add_argument('--optimizer', default='adafactor', choices=['adafactor', 'adamw'])
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--remat', default=None, choices=['full', 'minimal', 'save_dots'])
    parser.add_argument('--json', default=None, help='also write the result as JSON here')


def _mesh(text: str) -> tuple[int, int]:
    try:
        axes = dict(kv.split(':') for kv in text.split(','))
        return int(axes.get('data', 1)), int(axes.get('model', 1))
    except ValueError:
        raise SystemExit(f'--mesh={text!r} is malformed; write it as data:2,model:4.') from None


def _sharded_bytes(shapes, shardings) -> int:
    import jax
    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        local = sh.shard_shape(s.shape) if s.shape else ()
        total += math.prod(local) * s.dtype.itemsize
    return total


def plan(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from doa_jax import losses, optimizers, partitioning
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_train_state
    from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics

    data, model_axis = _mesh(args.mesh)
    cfg = get_config(args.model, dtype=getattr(jnp, args.dtype), remat_policy=args.remat)
    model = T5(cfg)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=data, model=model_axis, fsdp=args.fsdp),
                                  jax.devices()[:data * model_axis])
    partitioning.check_batch_size(args.batch, mesh, '--batch')
    rules = partitioning.param_rules(args.fsdp)
    opt = optimizers.make_optimizer(args.optimizer, 1e-3)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, args.input_len), jnp.int32),
                          jnp.ones((1, args.target_len), jnp.int32))['params']

    with jax.set_mesh(mesh):
        shapes, shardings = abstract_train_state(init_params, opt, mesh, rules, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
    bs = partitioning.batch_sharding(mesh)
    b, s, t = args.batch, args.input_len, args.target_len
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs) for k, shape in {
        'encoder_input_tokens': (b, s), 'decoder_target_tokens': (b, t),
        'decoder_input_tokens': (b, t), 'decoder_loss_weights': (b, t)}.items()}
    rep = partitioning.replicated(mesh)
    metrics = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), zero_metrics())
    step = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, mesh,
                           partitioning.STANDARD_RULES, shardings, use_dropout=False)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, metrics).compile()
    mem = compiled.memory_analysis()
    param_total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes.params))
    params = _sharded_bytes(shapes.params, shardings.params)
    opt_bytes = _sharded_bytes(shapes.opt_state, shardings.opt_state)
    temp = int(getattr(mem, 'temp_size_in_bytes', 0)) if mem is not None else 0
    total = params + opt_bytes + temp
    budget = args.device_memory_gb * 1e9 * (1 - args.margin)
    return {'model': args.model, 'mesh': {'data': data, 'model': model_axis}, 'fsdp': args.fsdp,
            'batch': b, 'input_len': s, 'target_len': t, 'optimizer': args.optimizer,
            'param_bytes_total': param_total, 'param_bytes_per_device': params,
            'optimizer_bytes_per_device': opt_bytes, 'temp_bytes_per_device': temp,
            'total_bytes_per_device': total, 'device_memory_gb': args.device_memory_gb,
            'fits': total <= budget,
            'note': 'memory_analysis on the CPU backend approximates GPU/TPU; keep a margin.'}


def run(args: argparse.Namespace) -> dict:
    data, model_axis = _mesh(args.mesh)
    n = data * model_axis
    flag = f'--xla_force_host_platform_device_count={n}'
    if 'jax' not in sys.modules and flag not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import jax
    if len(jax.devices()) < n:  # jax was imported before the flag: re-exec with it set
        env = {**os.environ, 'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip(),
               'JAX_PLATFORMS': 'cpu'}
        os.execve(sys.executable, [sys.executable, '-m', 'doa_jax.benchmark', 'plan', *sys.argv[2:]], env)
    result = plan(args)
    gb = lambda x: f'{x / 1e9:.3f} GB'
    print(f"plan {result['model']} mesh data:{data},model:{model_axis} fsdp={args.fsdp}")
    for k in ('param_bytes_per_device', 'optimizer_bytes_per_device', 'temp_bytes_per_device',
              'total_bytes_per_device'):
        print(f'  {k:<30} {gb(result[k])}')
    print(f"  fits in {args.device_memory_gb} GB (margin {args.margin:.0%}): {result['fits']}")
    print(f"  note: {result['note']}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result
