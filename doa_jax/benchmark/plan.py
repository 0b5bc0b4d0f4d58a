"""`python -m doa_jax.benchmark plan`: per-device memory of the real train step and of the greedy
decode step on a mesh, compiled against abstract shapes on fake CPU devices (no weights are
allocated), and the same steps lowered for GPU and TPU.

The gate, `plan --gin_file=<recipe> [--gin.X=...]` (or `--recipe=a.gin,b.gin`, repeatable): reads
the recipe as its entry point does (`benchmark.recipe`: model, remat, scan, batch, lengths,
packing, optimizer, microbatches, mesh, an online KD teacher; or a pseudo-labeling job; or a
study's stages: the teacher's training and evaluation, its pseudo-labeling, the student's training
and evaluation), on as many fake devices as its `# target: 4x A100-80GB` header names, and
- compiles the train step (a training recipe) or the pseudo-labeling decode (an infer recipe) on
  the CPU backend and reads its memory; a training recipe's evaluation decodes with the train
  state resident, so that is planned too (`eval decode`);
- checks each total per device against the target's memory (doa_jax/cost/prices.yaml
  `memory_gb`) less a margin (10%);
- lowers the same steps for `cuda` and `tpu` (`jit(...).trace(...).lower(lowering_platforms=)`),
  the op backends set as a run on that platform resolves 'auto' (CPU kernels are never in them).
It exits with status 1 when a check fails. `--scale=t5_1_1_small` plans the recipe with every
model's architecture replaced (CI runs the gate that way on 8 fake devices); `--skip_memory`
only lowers.

The flag form (`plan --model=... --mesh=... --batch=...`) plans a train step and the greedy
decode pseudo-labeling runs without a recipe: parameters and optimizer state by
`partitioning.param_rules(--fsdp)`, the teacher by STANDARD_RULES (FSDP is train-only).
CPU memory analysis approximates GPU/TPU (different fusion and layouts; bf16 arithmetic that the
CPU widens to float32): treat it as an estimate and keep the margin.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Sequence

from doa_jax.benchmark import parse_mesh, write_json

NOTE = 'memory_analysis on the CPU backend approximates GPU/TPU; keep a margin.'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='t5_1_1_small', help='a NAMED_CONFIGS name')
    parser.add_argument('--mesh', default='data:1,model:1', help='e.g. data:2,model:4')
    parser.add_argument('--fsdp', action='store_true', help='shard params/optimizer over data too')
    parser.add_argument('--device_memory_gb', type=float, default=None,
                        help='flag form: memory per device (default 40); a recipe takes its '
                             'target\'s from the device catalog')
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
    gate = parser.add_argument_group('recipe gate (plan a gin run file; --gin.X=Y binds)')
    gate.add_argument('--gin_file', action='append', default=[],
                      help='a recipe gin file; repeat to layer overlays (later files win)')
    gate.add_argument('--recipe', action='append', default=[],
                      help='comma-separated gin files of one recipe; repeat to gate several')
    gate.add_argument('--gin_search_paths', default=None, help='as for python -m doa_jax.train')
    gate.add_argument('--target', default=None,
                      help='e.g. "4x A100-40GB": overrides the recipe\'s # target: header')
    gate.add_argument('--scale', default=None,
                      help='a NAMED_CONFIGS name that replaces every model\'s architecture')
    gate.add_argument('--devices', type=int, default=None,
                      help='fake devices to plan on (default: the target\'s count)')
    gate.add_argument('--platforms', default='cuda,tpu',
                      help="platforms to lower for, comma-separated ('' for none)")
    gate.add_argument('--skip_memory', action='store_true',
                      help='only lower (no CPU compile, no memory check)')


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


def _decode_step(config, mesh, rules, batch: int, input_len: int, max_decode_length: int,
                 method: str = 'greedy', num_beams: int = 4, labeler: bool = True):
    """(decoder, args, weight bytes per device) of decoding through `decoding.Decoder` with the
    weights laid out by `rules` and prepared as decoding holds them (unscanned, matmul weights in
    the compute dtype). `labeler`: jitted as `pseudo_label.TeacherLabeler` jits it (explicit in/out
    shardings); else as the trainer's evaluation does (shardings from its arguments)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from doa_jax import decoding, partitioning
    from doa_jax.models.t5 import T5
    from doa_jax.ops import PREPARED
    from doa_jax.train_state import abstract_params

    partitioning.check_batch_size(batch, mesh, 'the decode batch')
    config = decoding.decode_config(config)
    dummy = jnp.ones((1, 1), jnp.int32)
    shapes, shardings = abstract_params(lambda r: T5(config).init(r, dummy, dummy)['params'],
                                        mesh, rules, jax.random.PRNGKey(0))
    matrix = partitioning.batch_sharding(mesh)
    rows = NamedSharding(mesh, PartitionSpec(partitioning.DATA_AXIS))
    tokens = jax.ShapeDtypeStruct((batch, input_len), jnp.int32, sharding=matrix)
    kwargs = {'num_beams': num_beams} if method == 'beam' else {}
    jit_kwargs = (lambda weights: {'in_shardings': (jax.tree.map(lambda x: x.sharding, weights),
                                                    matrix, None),
                                   'out_shardings': (matrix, rows)}) if labeler else None
    decoder = decoding.Decoder(config, max_decode_length=max_decode_length, batch_size=batch,
                               length_buckets=(input_len,), method=method, jit_kwargs=jit_kwargs,
                               **kwargs)
    weights = jax.eval_shape(decoder.prepare, _with_shardings(shapes, shardings))
    prepared = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), weights['params'])
    weights['params'] = _with_shardings(prepared, shardings)
    rep = partitioning.replicated(mesh)
    weights[PREPARED] = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), weights[PREPARED])
    weight_bytes = _sharded_bytes(prepared, shardings) + _sharded_bytes(
            weights[PREPARED], jax.tree.map(lambda _: rep, weights[PREPARED]))
    return decoder, (weights, tokens, jax.random.PRNGKey(0)), weight_bytes


def _decode_memory(decoder, args, mesh, rules) -> tuple[int, int, float]:
    """(temporary bytes, input/output bytes, compile seconds) of the decode on the CPU backend."""
    import flax.linen as nn
    import jax

    from doa_jax import partitioning
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = decoder.trace(*args).lower().compile()
    mem = compiled.memory_analysis()
    batch, length = args[1].shape
    io = batch // mesh.shape[partitioning.DATA_AXIS] * length * 4     # this device's input rows
    io += int(getattr(mem, 'output_size_in_bytes', 0)) if mem is not None else 0
    return _temp_bytes(compiled), io, round(time.perf_counter() - t0, 2)


def _decode_plan(config, mesh, args) -> dict[str, Any]:
    """Compiles greedy decoding through `decoding.Decoder` as pseudo-labeling runs it
    (`TeacherLabeler`): the teacher laid out by STANDARD_RULES (weights over model, replicated
    over data; FSDP is train-only) and held in the compute dtype, the batch over data."""
    from doa_jax import partitioning

    b = args.decode_batch or args.batch
    s, t = args.input_len, args.target_len
    rules = partitioning.STANDARD_RULES
    decoder, dargs, params = _decode_step(config, mesh, rules, b, s, t)
    temp, io, compile_s = _decode_memory(decoder, dargs, mesh, rules)
    return {'batch': b, 'input_len': s, 'max_decode_length': t, 'method': 'greedy',
            'param_rules': 'standard (as pseudo-labeling places the teacher)',
            'param_bytes_per_device': params,
            'kv_cache_bytes_per_device': _kv_cache_bytes(
                    config.replace(remat_policy=None, scan_layers=False),
                    dargs[0]['params'], mesh, b, s, t),
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
    if args.device_memory_gb is None:
        args.device_memory_gb = 40.0
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


# The op backends a run on each platform resolves 'auto' to (doa_jax.ops.for_config). A CPU host
# would resolve 'auto' for itself, so lowering for another platform sets them explicitly.
PLATFORM_IMPLS = {'cpu': ('xla', 'xla'), 'cuda': ('dot_product_attention', 'xla'),
                  'tpu': ('xla', 'xla')}


def for_platform(config, platform: str):
    """`config` with 'auto' op backends resolved as a run on `platform` resolves them."""
    attention, matmul = PLATFORM_IMPLS[platform]
    return config.replace(
            attention_impl=attention if config.attention_impl == 'auto' else config.attention_impl,
            matmul_impl=matmul if config.matmul_impl == 'auto' else config.matmul_impl)


def _train_step(recipe, mesh, platform: str):
    """(jitted train step, its abstract arguments, bytes per device of what the step's arguments
    hold: parameters, optimizer state, the online teacher) for a training recipe."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from doa_jax import distill_losses, partitioning
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_train_state
    from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics

    b, s, t = recipe.batch_size, recipe.lengths['inputs'], recipe.lengths['targets']
    partitioning.check_batch_size(b, mesh)
    data, m = mesh.shape[partitioning.DATA_AXIS], recipe.num_microbatches
    if m < 1 or b % m or (b // m) % data:
        raise ValueError(f'NUM_MICROBATCHES={m} must divide BATCH_SIZE={b} into microbatches '
                         f'that the mesh data axis ({data}) divides.')
    config = for_platform(recipe.model, platform)
    model = T5(config)
    rules = partitioning.param_rules(recipe.mesh_config.fsdp)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, s), jnp.int32), jnp.ones((1, t), jnp.int32))['params']

    with jax.set_mesh(mesh):
        shapes, shardings = abstract_train_state(init_params, recipe.optimizer, mesh, rules,
                                                 jax.random.PRNGKey(0))
    loss_fn, teacher_args, teacher_bytes = recipe.loss_fn, None, 0
    if recipe.teacher is not None:
        teacher = distill_losses.OnlineTeacher(for_platform(recipe.teacher, platform))
        loss_fn = distill_losses.OnlineTeacherKDLoss(teacher, **recipe.kd)
        t_shapes, t_shardings = teacher.abstract(mesh, rules)
        teacher_args = _with_shardings(t_shapes, t_shardings)
        teacher_bytes = _sharded_bytes(t_shapes, t_shardings)
    step = make_train_step(model_apply_fn(model), loss_fn, recipe.optimizer, mesh,
                           partitioning.STANDARD_RULES, shardings,
                           loss_normalizing_factor=recipe.loss_normalizing_factor,
                           num_microbatches=m, use_dropout=config.dropout_rate > 0)
    features = {'encoder_input_tokens': s, 'decoder_target_tokens': t,
                'decoder_input_tokens': t, 'decoder_loss_weights': t}
    if recipe.pack:
        features.update({'encoder_segment_ids': s, 'decoder_segment_ids': t})
    bs = partitioning.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=bs) for k, n in features.items()}
    if recipe.stored_topk:     # offline token KD: the teacher's stored top-k per target token
        rows = NamedSharding(mesh, PartitionSpec(partitioning.DATA_AXIS, None, None))
        k = recipe.stored_topk
        batch['teacher_topk_ids'] = jax.ShapeDtypeStruct((b, t, k), jnp.int32, sharding=rows)
        batch['teacher_topk_logprobs'] = jax.ShapeDtypeStruct((b, t, k), jnp.float32,
                                                              sharding=rows)
    rep = partitioning.replicated(mesh)
    metrics = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                           zero_metrics())
    held = {'param_bytes_per_device': _sharded_bytes(shapes.params, shardings.params),
            'optimizer_bytes_per_device': _sharded_bytes(shapes.opt_state, shardings.opt_state),
            **({'teacher_bytes_per_device': teacher_bytes} if teacher_args else {})}
    return step, (_with_shardings(shapes, shardings), batch, metrics, teacher_args), held


def _decode_of(recipe, mesh, platform: str):
    """The decode a recipe runs: pseudo-labeling's (an infer recipe), or the trainer's
    evaluation (greedy, at the train batch, over the train state's parameter layout)."""
    from doa_jax import partitioning
    if recipe.kind == 'infer':
        rules = partitioning.STANDARD_RULES
        return rules, _decode_step(for_platform(recipe.model, platform), mesh, rules,
                                   recipe.batch_size, recipe.max_input_length,
                                   recipe.max_decode_length, recipe.method, recipe.num_beams)
    from doa_jax.decoding import DEFAULT_BUCKETS
    inputs = recipe.lengths['inputs']
    bucket = next((n for n in DEFAULT_BUCKETS if n >= inputs), None)
    if bucket is None:
        raise ValueError(f'The trainer evaluates by decoding inputs of {inputs} tokens, longer '
                         f'than the largest decode bucket {DEFAULT_BUCKETS[-1]}; lower '
                         'TASK_FEATURE_LENGTHS["inputs"] or set EVAL_PERIOD = 0.')
    rules = partitioning.param_rules(recipe.mesh_config.fsdp)
    return rules, _decode_step(for_platform(recipe.model, platform), mesh, rules,
                               recipe.eval_batch_size or recipe.batch_size, bucket,
                               recipe.max_decode_length, labeler=False)


def _lower(build, mesh, platform: str) -> dict[str, Any]:
    """Builds a step for `platform` (`build() -> (jitted, args, logical rules)`), traces it and
    lowers it for `platform`; what went wrong, if anything."""
    import re

    import flax.linen as nn
    import jax
    t0 = time.perf_counter()
    try:
        fn, args, rules = build()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except Exception as e:   # reported, and the gate fails
        return {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:2000]}',
                'seconds': round(time.perf_counter() - t0, 2)}
    targets = set(re.findall(r'custom_call @([\w.$-]+)', text))
    targets |= set(re.findall(r'call_target_name = "([^"]+)"', text))
    cpu_only = sorted(x for x in targets if x.startswith('doa_'))
    return {'ok': not cpu_only, 'custom_calls': sorted(targets),
            **({'error': f'CPU kernels {cpu_only} in a {platform} program'} if cpu_only else {}),
            'seconds': round(time.perf_counter() - t0, 2)}


def _describe(recipe, mesh) -> dict[str, Any]:
    from doa_jax import partitioning
    import jax.numpy as jnp

    cfg = recipe.model
    out = {'kind': recipe.kind, 'model': _model_name(cfg), 'dtype': jnp.dtype(cfg.dtype).name,
           'mesh': {'data': mesh.shape[partitioning.DATA_AXIS],
                    'model': mesh.shape[partitioning.MODEL_AXIS]},
           'fsdp': bool(recipe.mesh_config.fsdp), 'batch': recipe.batch_size,
           'remat': cfg.remat_policy, 'scan_layers': cfg.scan_layers}
    if recipe.kind == 'train':
        out.update({'lengths': recipe.lengths, 'lengths_source': recipe.lengths_source,
                    'pack': recipe.pack, 'optimizer': recipe.optimizer_name,
                    'microbatches': recipe.num_microbatches,
                    'teacher': None if recipe.teacher is None else _model_name(recipe.teacher),
                    'stored_topk': recipe.stored_topk,
                    'eval_decode': recipe.eval_decode,
                    'eval_batch': recipe.eval_batch_size or recipe.batch_size})
    else:
        out.update({'lengths': {'inputs': recipe.max_input_length,
                                'targets': recipe.max_decode_length},
                    'method': recipe.method, 'top_k': recipe.top_k})
    return out


def _model_name(config) -> str:
    from doa_jax.models.config import NAMED_CONFIGS
    keep = ('dtype', 'dropout_rate', 'scan_layers', 'remat_policy', 'attention_impl',
            'matmul_impl')
    for name, named in NAMED_CONFIGS.items():
        if named == config.replace(**{k: getattr(named, k) for k in keep}):
            return name
    return 'custom'


def gate_recipe(files: Sequence[str], bindings: Sequence[str], args: argparse.Namespace
                ) -> list[dict[str, Any]]:
    """Plans one recipe: memory per device against its target, and lowering per platform. A
    run file gives one result; a study one per stage (teacher, pseudo_label, student), each
    with its 'stage'."""
    from doa_jax.benchmark import recipe as recipe_lib

    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    prefixes = recipe_lib.search_prefixes(search)
    target = (recipe_lib.parse_target(args.target, '--target') if args.target
              else recipe_lib.find_target(files, prefixes))
    if target is None:
        raise recipe_lib.RecipeError(
                f'{" ".join(files)} states no target: add a header line such as '
                '"# target: 4x A100-80GB" to the recipe, or pass --target.')
    recipe = recipe_lib.read_recipe(files, bindings, search, args.scale)
    head = {'recipe': list(files), 'bindings': list(bindings), 'scale': args.scale,
            'target': target.label(), 'target_where': target.where,
            'device_memory_gb': target.memory_bytes / 1e9, 'margin': args.margin,
            'devices': args.devices or target.count}
    if recipe.kind != 'study':
        return [{**head, **_gate_one(recipe, head, args)}]
    out = []
    for name, stage, key in recipe.stages:
        # The same stage of another study file (paper_main.gin includes wlp_gpu.gin, and
        # wlp_gpu_40gb.gin shares its pseudo-labeling and student) on the same devices plans the
        # same programs: planned once per run of the gate, its memory checked against each
        # file's target.
        key = repr((key, head['devices'], args.platforms, args.skip_memory))
        if key not in _STAGES_PLANNED:
            try:
                result = _gate_one(stage, head, args)
            except ValueError as e:   # this stage cannot run as configured; the others are planned
                result = {'ok': False, 'error': str(e)}
            _STAGES_PLANNED[key] = (list(files), result)
        first, result = _STAGES_PLANNED[key]
        out.append({**head, 'stage': name, **_checked_against(result, head, args.margin),
                    **({'same_as': first} if first != list(files) else {})})
    return out


_STAGES_PLANNED: dict[str, tuple[list[str], dict[str, Any]]] = {}


def _checked_against(result: dict[str, Any], head: dict[str, Any], margin: float
                     ) -> dict[str, Any]:
    """A stage's plan with its memory checked against `head`'s target (the bytes a program
    needs per device do not depend on the target it is checked against)."""
    import copy
    if 'checks' not in result:
        return result
    result = copy.deepcopy(result)
    budget = head['device_memory_gb'] * 1e9 * (1 - margin)
    for part in ('train', 'decode'):
        if part in result:
            result[part]['fits'] = result['checks'][f'{part} fits'] = \
                result[part]['total_bytes_per_device'] <= budget
    result['ok'] = all(result['checks'].values())
    return result


def _gate_one(recipe, head: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Plans one train or decode recipe on head['devices'] against head's target."""
    import jax

    from doa_jax import partitioning

    n = head['devices']
    mesh = partitioning.make_mesh(recipe.mesh_config, jax.devices()[:n])
    out = _describe(recipe, mesh)
    budget = head['device_memory_gb'] * 1e9 * (1 - args.margin)
    checks: dict[str, bool] = {}
    if not args.skip_memory:
        out.update(_gate_memory(recipe, mesh))
        for part in ('train', 'decode'):
            if part in out:
                out[part]['fits'] = checks[f'{part} fits'] = \
                    out[part]['total_bytes_per_device'] <= budget
    platforms = [p for p in args.platforms.split(',') if p]
    out['lowered'] = {}
    for platform in platforms:
        if platform not in PLATFORM_IMPLS:
            raise SystemExit(f'--platforms: unknown platform {platform!r}; choose from '
                             f'{sorted(PLATFORM_IMPLS)}.')
        lowered = out['lowered'][platform] = {}

        def train(platform=platform):
            step, step_args, _ = _train_step(recipe, mesh, platform)
            return step, step_args, partitioning.STANDARD_RULES

        def decode(platform=platform):
            rules, (decoder, dargs, _) = _decode_of(recipe, mesh, platform)
            return decoder, dargs, rules

        if recipe.kind == 'train':
            lowered['train'] = _lower(train, mesh, platform)
        if recipe.kind == 'infer' or recipe.eval_decode:
            lowered['decode'] = _decoded(('lower', platform), recipe, mesh,
                                         lambda: _lower(decode, mesh, platform))
        for part, result in lowered.items():
            checks[f'{platform} {part} lowers'] = result['ok']
    out['checks'] = checks
    out['ok'] = all(checks.values())
    out['note'] = NOTE
    return out


def _gate_memory(recipe, mesh) -> dict[str, Any]:
    """Per-device bytes of the recipe's steps compiled on the CPU backend."""
    import jax

    from doa_jax import partitioning
    out: dict[str, Any] = {}
    held = {}
    if recipe.kind == 'train':
        step, step_args, held = _train_step(recipe, mesh, 'cpu')
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step.trace(*step_args).lower().compile()
        temp = _temp_bytes(compiled)
        out['train'] = {**held, 'temp_bytes_per_device': temp,
                        'total_bytes_per_device': sum(held.values()) + temp,
                        'compile_seconds': round(time.perf_counter() - t0, 2)}
    if recipe.kind == 'infer' or recipe.eval_decode:
        def compiled() -> dict[str, Any]:
            rules, (decoder, dargs, weights) = _decode_of(recipe, mesh, 'cpu')
            temp, io, seconds = _decode_memory(decoder, dargs, mesh, rules)
            return {'weight_bytes_per_device': weights,
                    'kv_cache_bytes_per_device': _kv_cache_bytes(
                            decoder.config, dargs[0]['params'], mesh, dargs[1].shape[0],
                            dargs[1].shape[1], decoder.max_decode_length),
                    'temp_bytes_per_device': temp, 'io_bytes_per_device': io,
                    'compile_seconds': seconds}
        dec = dict(_decoded(('memory',), recipe, mesh, compiled))
        # A training run's evaluation decodes with its train state (and teacher) resident.
        resident = sum(held.values()) if recipe.kind == 'train' else None
        # A scanned model's evaluation unscans a cast copy beside the cast one it prepares.
        weights = dec['weight_bytes_per_device']
        unscan = weights if recipe.kind == 'train' and recipe.model.scan_layers else 0
        out['decode'] = {'resident_bytes_per_device': resident, **dec,
                         'total_bytes_per_device': (resident or 0) + weights + max(
                                 dec['temp_bytes_per_device'] + dec['io_bytes_per_device'],
                                 unscan)}
    return out


_DECODES: dict[str, dict[str, Any]] = {}


def _decoded(what: tuple, recipe, mesh, plan) -> dict[str, Any]:
    """`plan()`'s result for the recipe's decode, once per decode program: two stages whose models
    decode alike (e.g. two study teachers that differ in their optimizer only) share it."""
    if recipe.kind == 'infer':
        program = ('infer', recipe.model, recipe.batch_size, recipe.max_input_length,
                   recipe.max_decode_length, recipe.method, recipe.num_beams)
    else:
        program = ('eval', recipe.model, bool(recipe.mesh_config.fsdp),
                   recipe.eval_batch_size or recipe.batch_size, recipe.lengths['inputs'],
                   recipe.max_decode_length)
    key = repr((what, program, dict(mesh.shape)))
    if key not in _DECODES:
        _DECODES[key] = plan()
    return _DECODES[key]


def _print_gate(result: dict) -> None:
    stage = f" [{result['stage']}]" if result.get('stage') else ''
    if 'error' in result:
        print(f"gate {' '.join(result['recipe'])}{stage}: ERROR {result['error']}")
        print('  gate: FAIL')
        return
    if result.get('same_as'):
        print(f"gate {' + '.join(result['recipe'])}{stage}: the same stage as "
              f"{' + '.join(result['same_as'])}, planned above; target {result['target']} "
              f"({result['target_where']})")
        _print_fits(result)
        print(f"  gate: {'PASS' if result['ok'] else 'FAIL'}")
        return
    mesh = result['mesh']
    lengths = result['lengths']
    scale = f" scaled to {result['scale']}" if result['scale'] else ''
    print(f"gate {' + '.join(result['recipe'])}{stage}{scale}: {result['kind']} {result['model']}"
          + (f" with teacher {result['teacher']}" if result.get('teacher') else '')
          + f"; target {result['target']} ({result['target_where']}), "
          f"{result['devices']} devices")
    print(f"  mesh data:{mesh['data']},model:{mesh['model']} fsdp={result['fsdp']}; batch "
          f"{result['batch']}, lengths {lengths['inputs']}/{lengths['targets']}"
          + (f" ({result['lengths_source']}), pack={result['pack']}, {result['optimizer']}, "
             f"microbatches {result['microbatches']}"
             + (f", eval batch {result['eval_batch']}"
                if result['eval_batch'] != result['batch'] else '')
             if result['kind'] == 'train' else
             f", {result['method']}")
          + f", remat {result['remat']}, scan {result['scan_layers']}, {result['dtype']}")
    train, dec = result.get('train'), result.get('decode')
    if train or dec:
        head = 'eval decode' if result['kind'] == 'train' else 'decode'
        print(f"  {'per device':<22} {'train':>12} {head:>12}")
        rows = [('parameters', 'param_bytes_per_device', None),
                ('optimizer', 'optimizer_bytes_per_device', None),
                ('online teacher', 'teacher_bytes_per_device', None),
                ('train state resident', None, 'resident_bytes_per_device'),
                ('decode weights', None, 'weight_bytes_per_device'),
                ('temporaries', 'temp_bytes_per_device', 'temp_bytes_per_device'),
                ('  of which KV', None, 'kv_cache_bytes_per_device'),
                ('inputs/outputs', None, 'io_bytes_per_device'),
                ('total', 'total_bytes_per_device', 'total_bytes_per_device')]
        for name, tk, dk in rows:
            tv = train.get(tk) if train and tk else None
            dv = dec.get(dk) if dec and dk else None
            if tv is None and dv is None:
                continue
            cell = lambda x: _human(x) if x is not None else '-'
            print(f'  {name:<22} {cell(tv):>12} {cell(dv):>12}')
        _print_fits(result)
    for platform, parts in result['lowered'].items():
        print(f'  lowered for {platform}: ' + ', '.join(
                f"{part} {'ok' if r['ok'] else 'FAILED: ' + r['error']} ({r['seconds']} s)"
                for part, r in parts.items()))
    print(f"  gate: {'PASS' if result['ok'] else 'FAIL'}")


def _print_fits(result: dict) -> None:
    train, dec = result.get('train'), result.get('decode')
    if not (train or dec):
        return
    usable = result['device_memory_gb'] * (1 - result['margin'])
    print(f"  fits in {usable:.1f} GB ({result['device_memory_gb']:g} GB less "
          f"{result['margin']:.0%}): " + ', '.join(
                  f'{k} {v["fits"]}' for k, v in (('train', train), ('decode', dec)) if v))


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


def _recipes(args: argparse.Namespace) -> list[list[str]]:
    recipes = [[f for f in r.split(',') if f] for r in args.recipe]
    return recipes + ([list(args.gin_file)] if args.gin_file else [])


def _device_count(args: argparse.Namespace, recipes: list[list[str]]) -> int:
    """Fake devices to start: the flag form's mesh, else --devices or the largest target."""
    if not recipes:
        data, model_axis = parse_mesh(args.mesh, default_data=1)
        return data * model_axis
    if args.devices:
        return args.devices
    from doa_jax.benchmark import recipe as recipe_lib
    prefixes = recipe_lib.search_prefixes(
            args.gin_search_paths.split(',') if args.gin_search_paths else None)
    counts = [recipe_lib.parse_target(args.target, '--target').count] if args.target else []
    for files in recipes:
        target = recipe_lib.find_target(files, prefixes)
        counts.append(target.count if target else 1)
    return max(counts)


def run(args: argparse.Namespace) -> dict | list:
    recipes = _recipes(args)
    n = _device_count(args, recipes)
    flag = f'--xla_force_host_platform_device_count={n}'
    if 'jax' not in sys.modules and flag not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import jax
    if len(jax.devices()) < n:  # jax was imported before the flag: re-exec with it set
        env = {**os.environ, 'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip(),
               'JAX_PLATFORMS': 'cpu'}
        os.execve(sys.executable, [sys.executable, '-m', 'doa_jax.benchmark', 'plan', *sys.argv[2:]], env)
    if not recipes:
        result = plan(args)
        _print(result, args)
        write_json(args.json, result, indent=2)
        return result
    from doa_jax import gin_utils
    from doa_jax.benchmark.recipe import RecipeError
    results = []
    for files in recipes:
        try:
            gated = gate_recipe(files, getattr(args, 'gin_bindings', []), args)
        except (RecipeError, gin_utils.ConfigError, ValueError) as e:
            gated = [{'recipe': files, 'ok': False, 'error': str(e)}]
        for result in gated:
            _print_gate(result)
        results.extend(gated)
    write_json(args.json, results if len(results) > 1 else results[0], indent=2)
    if not all(r['ok'] for r in results):
        raise SystemExit(1)
    return results
