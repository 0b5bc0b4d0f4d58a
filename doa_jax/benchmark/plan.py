"""`python -m doa_jax.benchmark plan`: per-device memory of the real train step and of the greedy
decode step (the one pseudo-labeling runs) on a mesh, both compiled against abstract shapes on fake
CPU devices (no weights are allocated).

Train: parameters and optimizer state by `partitioning.param_rules(--fsdp)`, batch over `data`.
Decode: `doa_jax.decoding.generate` jitted as `pseudo_label.TeacherLabeler` runs it, with the
teacher by STANDARD_RULES (heads/mlp/vocab over `model`, replicated over `data`: FSDP is
train-only), so without --fsdp both steps hold the same parameter bytes per device.
CPU memory analysis approximates GPU/TPU (different fusion and layouts); treat it as an estimate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from doa_jax.benchmark import parse_mesh, write_json

NOTE = 'memory_analysis on the CPU backend approximates GPU/TPU; keep a margin.'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='t5_1_1_small', help='a NAMED_CONFIGS name')
    parser.add_argument('--mesh', default='data:1,model:1', help='e.g. data:2,model:4')
    parser.add_argument('--fsdp', action='store_true', help='shard params/optimizer over data too')
    parser.add_argument('--device_memory_gb', type=float, default=40.0)
    parser.add_argument('--margin', type=float, default=0.1, help='fraction kept free')
    parser.add_argument('--batch', type=int, default=8, help='global train batch')
    parser.add_argument('--decode_batch', type=int, default=None,
                        help='global decode batch (default: --batch)')
    parser.add_argument('--input_len', type=int, default=512, help='train and decode input length')
    parser.add_argument('--target_len', type=int, default=128,
                        help='train target length and max decode length')
    parser.add_argument('--optimizer', default='adafactor', choices=['adafactor', 'adamw'])
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--remat', default=None, choices=['full', 'minimal', 'save_dots'])
    parser.add_argument('--json', default=None, help='also write the result as JSON here')


def _sharded_bytes(shapes, shardings) -> int:
    import jax
    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        local = sh.shard_shape(s.shape) if s.shape else ()
        total += math.prod(local) * s.dtype.itemsize
    return total


def _with_shardings(shapes, shardings):
    import jax
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def _temp_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    return int(getattr(mem, 'temp_size_in_bytes', 0)) if mem is not None else 0


def _train_plan(model, opt, mesh, shapes, shardings, args) -> dict[str, Any]:
    """Compiles the train step (donated state) and reads its per-device bytes."""
    import jax
    import jax.numpy as jnp

    from doa_jax import losses, partitioning
    from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics

    partitioning.check_batch_size(args.batch, mesh, '--batch')
    bs = partitioning.batch_sharding(mesh)
    b, s, t = args.batch, args.input_len, args.target_len
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs) for k, shape in {
        'encoder_input_tokens': (b, s), 'decoder_target_tokens': (b, t),
        'decoder_input_tokens': (b, t), 'decoder_loss_weights': (b, t)}.items()}
    rep = partitioning.replicated(mesh)
    metrics = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                           zero_metrics())
    step = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, mesh,
                           partitioning.STANDARD_RULES, shardings, use_dropout=False)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(_with_shardings(shapes, shardings), batch, metrics).compile()
    params = _sharded_bytes(shapes.params, shardings.params)
    opt_bytes = _sharded_bytes(shapes.opt_state, shardings.opt_state)
    temp = _temp_bytes(compiled)
    return {'param_bytes_per_device': params, 'optimizer_bytes_per_device': opt_bytes,
            'temp_bytes_per_device': temp, 'total_bytes_per_device': params + opt_bytes + temp,
            'compile_seconds': round(time.perf_counter() - t0, 2)}


CACHE_AXES = ('batch', 'length', 'heads', 'kv')   # the decode caches' logical axes


def _kv_cache_bytes(config, param_shapes, mesh, batch: int, input_len: int,
                    max_decode_length: int) -> int:
    """Per-device bytes of the decode cache as the model declares it: self-attention K/V buffers
    of `max_decode_length` and cross-attention K/V of the encoder outputs, batch over data and
    heads over model (STANDARD_RULES) where the sizes divide. Traced with eval_shape: no memory."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from doa_jax import partitioning
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import fit_spec

    def first_step(params, encoded, tokens):
        start = jnp.zeros((batch, 1), jnp.int32)
        _, variables = T5(config).apply({'params': params}, encoded, tokens, start, decode=True,
                                        max_decode_length=max_decode_length, mutable=['cache'],
                                        method=T5.decode)
        return variables['cache']

    encoded = jax.ShapeDtypeStruct((batch, input_len, config.emb_dim), config.dtype)
    tokens = jax.ShapeDtypeStruct((batch, input_len), jnp.int32)
    total = 0
    for leaf in jax.tree.leaves(jax.eval_shape(first_step, param_shapes, encoded, tokens)):
        local = leaf.shape
        if leaf.ndim == len(CACHE_AXES):      # not the decode-position counter
            spec = nn.logical_to_mesh_axes(CACHE_AXES, partitioning.STANDARD_RULES)
            local = NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)).shard_shape(leaf.shape)
        total += math.prod(local) * leaf.dtype.itemsize
    return total


def _decode_plan(config, mesh, args) -> dict[str, Any]:
    """Compiles greedy decoding through `decoding.Decoder` as pseudo-labeling runs it
    (`TeacherLabeler`): the teacher laid out by STANDARD_RULES (weights over model, replicated
    over data; FSDP is train-only), the batch over data."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from doa_jax import decoding, partitioning
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_params

    b = args.decode_batch or args.batch
    s, t = args.input_len, args.target_len
    partitioning.check_batch_size(b, mesh, '--decode_batch')
    config = config.replace(remat_policy=None, scan_layers=False)
    rules = partitioning.STANDARD_RULES
    dummy = jnp.ones((1, 1), jnp.int32)
    shapes, shardings = abstract_params(lambda r: T5(config).init(r, dummy, dummy)['params'],
                                        mesh, rules, jax.random.PRNGKey(0))
    matrix = partitioning.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=matrix)

    decoder = decoding.Decoder(config, max_decode_length=t, batch_size=b,
                               length_buckets=(s,), method='greedy', jit_kwargs={
                                       'out_shardings': (matrix, NamedSharding(
                                               mesh, PartitionSpec(partitioning.DATA_AXIS)))})
    weights = jax.eval_shape(decoder.prepare, _with_shardings(shapes, shardings))
    weights['params'] = _with_shardings(shapes, shardings)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = decoder.lower(weights, tokens).compile()
    compile_s = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    params = _sharded_bytes(shapes, shardings)
    temp = _temp_bytes(compiled)
    # Inputs (this device's rows) and outputs (tokens and scores).
    io = b // mesh.shape[partitioning.DATA_AXIS] * s * 4
    io += int(getattr(mem, 'output_size_in_bytes', 0)) if mem is not None else 0
    return {'batch': b, 'input_len': s, 'max_decode_length': t, 'method': 'greedy',
            'param_rules': 'standard (as pseudo-labeling places the teacher)',
            'param_bytes_per_device': params,
            'kv_cache_bytes_per_device': _kv_cache_bytes(config, shapes, mesh, b, s, t),
            'temp_bytes_per_device': temp, 'io_bytes_per_device': io,
            'total_bytes_per_device': params + temp + io, 'compile_seconds': compile_s}


def plan(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from doa_jax import optimizers, partitioning
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_train_state

    data, model_axis = parse_mesh(args.mesh, default_data=1)
    cfg = get_config(args.model, dtype=getattr(jnp, args.dtype), remat_policy=args.remat)
    model = T5(cfg)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=data, model=model_axis, fsdp=args.fsdp),
                                  jax.devices()[:data * model_axis])
    rules = partitioning.param_rules(args.fsdp)
    opt = optimizers.make_optimizer(args.optimizer, 1e-3)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, args.input_len), jnp.int32),
                          jnp.ones((1, args.target_len), jnp.int32))['params']

    with jax.set_mesh(mesh):
        shapes, shardings = abstract_train_state(init_params, opt, mesh, rules, jax.random.PRNGKey(0))
    train = _train_plan(model, opt, mesh, shapes, shardings, args)
    decode = _decode_plan(cfg, mesh, args)
    budget = args.device_memory_gb * 1e9 * (1 - args.margin)
    train_fits = train['total_bytes_per_device'] <= budget
    decode['fits'] = decode['total_bytes_per_device'] <= budget
    param_total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes.params))
    return {'model': args.model, 'mesh': {'data': data, 'model': model_axis}, 'fsdp': args.fsdp,
            'batch': args.batch, 'input_len': args.input_len, 'target_len': args.target_len,
            'optimizer': args.optimizer, 'dtype': args.dtype, 'param_bytes_total': param_total,
            **train, 'device_memory_gb': args.device_memory_gb, 'margin': args.margin,
            'train_fits': train_fits, 'decode': decode, 'fits': train_fits and decode['fits'],
            'note': NOTE}


def _human(n: int) -> str:
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= scale:
            return f'{n / scale:.3f} {unit}'
    return f'{n} B'


def _print(result: dict, args: argparse.Namespace) -> None:
    dec = result['decode']
    mesh = result['mesh']
    print(f"plan {result['model']} mesh data:{mesh['data']},model:{mesh['model']} "
          f"fsdp={result['fsdp']} dtype={result['dtype']}")
    print(f"  {'per device':<16} {'train':>12} {'decode':>12}")
    print(f"  {'':<16} {'batch ' + str(result['batch']):>12} {'batch ' + str(dec['batch']):>12}")
    rows = [('parameters', result['param_bytes_per_device'], dec['param_bytes_per_device']),
            ('optimizer', result['optimizer_bytes_per_device'], None),
            ('temporaries', result['temp_bytes_per_device'], dec['temp_bytes_per_device']),
            ('  of which KV', None, dec['kv_cache_bytes_per_device']),
            ('inputs/outputs', None, dec['io_bytes_per_device']),
            ('total', result['total_bytes_per_device'], dec['total_bytes_per_device'])]
    for name, train, decode in rows:
        cell = lambda x: _human(x) if x is not None else '-'
        print(f'  {name:<16} {cell(train):>12} {cell(decode):>12}')
    print(f"  fits in {args.device_memory_gb} GB (margin {args.margin:.0%}): "
          f"train {result['train_fits']}, decode {dec['fits']}")
    print(f"  lengths: {result['input_len']} input, {result['target_len']} target / max decode; "
          f"compile {result['compile_seconds']} s train, {dec['compile_seconds']} s decode")
    print(f"  note: {result['note']}")


def run(args: argparse.Namespace) -> dict:
    data, model_axis = parse_mesh(args.mesh, default_data=1)
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
    _print(result, args)
    write_json(args.json, result, indent=2)
    return result
