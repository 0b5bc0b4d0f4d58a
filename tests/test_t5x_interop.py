"""Running the study under real t5x, checked without t5x (it is not on PyPI): the t5x gin files
parse against stand-ins that take exactly the parameters t5x's configurables take; doa_jax's and
t5x's gin names coexist in one process; `export-t5x` writes the layout t5x's restore expects;
the cost action prices and stops a run; TRAIN_STEPS is refused where it reads like t5x's."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import shlex
import sys
import types

import gin
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

from doa_jax import checkpoints, gin_utils, train
from doa_jax.cost import Ledger
from doa_jax.cost.budget import BudgetExceededError
from doa_jax.cost.meter import DeviceInfo
from doa_jax.cost.prices import load_prices
from doa_jax.cost.t5x_action import CostAction, cost_actions
from doa_jax.models import get_config
from doa_jax.models.config import T5Config

REPO = pathlib.Path(__file__).resolve().parents[1]
T5X = REPO / 'gin_configs' / 't5x'
MODELS = ('small', 'base', 'large', 'xl', 'xxl', 'tiny')


# ---- stand-ins for t5x: the parameter names of t5x's configurables ------------------------------
def _fn(name: str, params: str):
    """A function `name(*, p1=None, ...)` that returns its arguments."""
    src = f'def {name}(*, {", ".join(f"{p}=None" for p in params.split())}): return dict(locals())'
    scope: dict = {}
    exec(src, scope)   # pylint: disable=exec-used
    return scope[name]


def _cls(name: str, params: str):
    return dataclasses.make_dataclass(name, [(p, object, None) for p in params.split()])


T5X_API = {
    't5x.utils': dict(
        DatasetConfig=_cls('DatasetConfig', 'mixture_or_task_name task_feature_lengths split '
                           'batch_size shuffle seed use_cached pack use_custom_packing_ops module '
                           'use_memory_cache trim_output_features runtime_preprocessors '
                           'num_prefetch_threads num_workers'),
        CheckpointConfig=_cls('CheckpointConfig', 'save restore'),
        RestoreCheckpointConfig=_cls('RestoreCheckpointConfig', 'path mode assignment_map strict '
                                     'fallback_to_scratch dtype restore_dataset checkpointer_cls '
                                     'state_transformation_fns checkpoint_manager_cls'),
        SaveCheckpointConfig=_cls('SaveCheckpointConfig', 'dtype period checkpoint_steps keep '
                                  'keep_dataset_checkpoints save_dataset checkpointer_cls '
                                  'state_transformation_fns checkpoint_manager_cls'),
        create_learning_rate_scheduler=_fn('create_learning_rate_scheduler', 'factors '
                                           'base_learning_rate warmup_steps decay_factor '
                                           'steps_per_decay steps_per_cycle step_offset '
                                           'min_learning_rate')),
    't5x.partitioning': dict(
        PjitPartitioner=_cls('PjitPartitioner', 'num_partitions model_parallel_submesh '
                             'params_on_devices backend ici_mesh_shape dcn_mesh_shape '
                             'logical_axis_rules'),
        standard_logical_axis_rules=_fn('standard_logical_axis_rules', 'activation_partitioning_'
                                        'dims parameter_partitioning_dims additional_rules')),
    't5x.trainer': dict(Trainer=_cls('Trainer', 'model train_state partitioner eval_names '
                                     'summary_dir train_state_axes rng learning_rate_fn '
                                     'num_microbatches weight_metrics_computer')),
    't5x.gin_utils': dict(summarize_gin_config=_fn('summarize_gin_config',
                                                   'model_dir summary_writer step')),
    't5x.optimizers': dict(adamw=_fn('adamw', 'learning_rate b1 b2 eps eps_root mu_dtype '
                                     'weight_decay mask nesterov')),
    't5x.models': dict(EncoderDecoderModel=_cls('EncoderDecoderModel', 'module input_vocabulary '
                                                'output_vocabulary optimizer_def decode_fn '
                                                'feature_converter_cls label_smoothing z_loss '
                                                'loss_normalizing_factor default_decoder_params')),
    't5x.examples.t5.network': dict(
        T5Config=_cls('T5Config', 'vocab_size dtype emb_dim num_heads num_encoder_layers '
                      'num_decoder_layers head_dim mlp_dim mlp_activations dropout_rate '
                      'logits_via_embedding float32_attention_logits'),
        Transformer=_cls('Transformer', 'config parent name')),
    '__main__': dict(
        train=_fn('train', 'model train_dataset_cfg train_eval_dataset_cfg infer_eval_dataset_cfg '
                  'checkpoint_cfg partitioner trainer_cls model_dir total_steps eval_steps '
                  'eval_period relative_steps stats_period random_seed use_hardware_rng '
                  'summarize_config_fn inference_evaluator_cls get_dataset_fn concurrent_metrics '
                  'actions train_eval_get_dataset_fn run_eval_before_training '
                  'train_state_initializer_cls use_orbax verify_matching_vocabs_fn gc_period'),
        infer=_fn('infer', 'mode model dataset_cfg restore_checkpoint_cfg partitioner output_dir '
                  'checkpoint_period shard_id num_shards merge_chunked_results write_fn '
                  'checkpoint_ds_iter train_state_initializer_cls fallback_init_rng merge_fn '
                  'summarize_config_fn verify_matching_vocabs_fn output_vocab_feature_name '
                  'file_extension keep_aux_as_numpy use_orbax'),
        evaluate=_fn('evaluate', 'model dataset_cfg restore_checkpoint_cfg partitioner output_dir '
                     'inference_evaluator_cls training_evaluator_cls summarize_config_fn '
                     'train_state_initializer_cls train_eval_get_dataset_fn fallback_init_rng '
                     'use_orbax'),
        write_inferences_to_file=_fn('write_inferences_to_file', 'path inferences task_ds mode '
                                     'vocabulary json_encoder_cls include_all_inputs '
                                     'input_fields_to_include output_ids')),
}


@pytest.fixture
def t5x_stubs(monkeypatch, tmp_path):
    """t5x's modules as stand-ins; gin's registry restored afterwards (dynamic registration adds
    what the files import). doa_jax's own configurables are registered first, as they would be."""
    from tests.test_gin_configs import _register_all_entry_points
    _register_all_entry_points()
    monkeypatch.setattr(gin.config, '_REGISTRY', copy.deepcopy(gin.config._REGISTRY))
    monkeypatch.setattr(gin.config, '_INVERSE_REGISTRY', dict(gin.config._INVERSE_REGISTRY))
    for name, attrs in T5X_API.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    for name in ('t5x', 't5x.examples', 't5x.examples.t5'):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name in T5X_API:
        parent, _, child = name.rpartition('.')
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    monkeypatch.setenv('DOA_VOCAB', 'byte')
    monkeypatch.chdir(REPO)
    gin.clear_config()
    yield
    gin.clear_config()


def _parse(*files: str, bindings=()) -> None:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)


def _macro(name: str):
    value = gin.query_parameter(f'{name}/macro.value')
    return value.scoped_configurable_fn() if isinstance(value, gin.config.ConfigurableReference) \
        else value


def _include_depth(path: pathlib.Path) -> int:
    includes = re.findall(r"^include\s+'([^']+)'", path.read_text(), flags=re.M)
    return max([1 + _include_depth(REPO / inc) for inc in includes], default=0)


@pytest.mark.parametrize('size', MODELS)
def test_t5x_model_files_build_the_same_model_as_doa_jax(t5x_stubs, size):
    path = f'gin_configs/t5x/models/t5_1_1_{size}.gin'
    _parse(path, bindings=['DROPOUT_RATE = 0.1'])
    assert _include_depth(REPO / path) <= 2
    model = _macro('MODEL')
    ours = get_config(f't5_1_1_{size}')
    for field in ('vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers',
                  'num_decoder_layers', 'head_dim', 'mlp_dim', 'logits_via_embedding'):
        assert getattr(model.module.config, field) == getattr(ours, field), field
    assert tuple(model.module.config.mlp_activations) == tuple(ours.mlp_activations)
    assert model.module.config.dropout_rate == 0.1
    # The model's vocabulary is the tasks' own (t5x refuses a model and task that disagree).
    import seqio
    assert model.input_vocabulary == model.output_vocabulary == seqio.ByteVocabulary()


@pytest.mark.parametrize('run', ['finetune', 'finetune_teacher'])
def test_t5x_train_runs_bind_the_papers_settings_and_the_cost_action(t5x_stubs, tmp_path, run):
    files = ['gin_configs/t5x/models/t5_1_1_small.gin', f'gin_configs/t5x/runs/{run}.gin']
    _parse(*files, bindings=[f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = 'doa_wlp'",
                             'INITIAL_CHECKPOINT_PATH = None', 'TRAIN_STEPS = 1020000',
                             'BUDGET_USD = 5000.0'])
    args = gin.get_configurable(sys.modules['__main__'].train)()
    assert args['total_steps'] == 1020000 and args['concurrent_metrics'] is False
    assert args['use_orbax'] is False
    dataset = args['train_dataset_cfg']
    assert (dataset.batch_size, dataset.pack, dataset.use_cached, dataset.module) == \
        (32, False, False, 'tasks')
    optimizer = args['model'].optimizer_def
    assert (optimizer['learning_rate'], optimizer['weight_decay']) == (3e-5, 0.0)
    assert args['partitioner'].num_partitions == (4 if run == 'finetune_teacher' else 1)
    restore = args['checkpoint_cfg'].restore
    assert restore.fallback_to_scratch and restore.assignment_map == (
            (r'state/param_states.*', None),)
    (action,) = args['actions']['TRAIN']
    assert isinstance(action, CostAction)
    assert args['actions'] == {'TRAIN': [action], 'TRAIN_EVAL': [action], 'INFER_EVAL': [action]}
    assert (action.budget_usd, action.planned_steps) == (5000.0, 1020000)
    assert (action.eval_period, action.checkpoint_period, action.stats_period) == (1000, 1000, 100)
    assert action.ledger.path == str(tmp_path / 'cost_ledger.sqlite')
    # Its lower bound: T5-Small's FLOPs for 1,020,000 steps of 32 x (512 + 128) tokens from
    # scratch, at the CPU catalog's peak (doa_jax.flops: the formula doa_jax's trainer uses).
    assert action.lower_bound.steps == 1020000
    # A $5 cap cannot pay for that: gin's call of t5x's train, before anything compiles, fails.
    gin.clear_config()
    _parse(*files, bindings=[f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = 'doa_wlp'",
                             'INITIAL_CHECKPOINT_PATH = None', 'TRAIN_STEPS = 1020000',
                             'BUDGET_USD = 5.0'])
    with pytest.raises(BudgetExceededError, match=r'before t5x compiles \(TRAIN_STEPS=1020000 '
                       r'from step 0 \(from scratch\), batch 32'):
        gin.get_configurable(sys.modules['__main__'].train)()


@pytest.mark.parametrize('files,entry', [
    (['runs/finetune_student.gin'], 'train'),
    (['runs/pseudo_label.gin'], 'infer'),
    (['runs/eval.gin'], 'evaluate'),
])
def test_every_t5x_run_file_parses_with_its_tiny_overlay(t5x_stubs, files, entry):
    paths = ['gin_configs/t5x/models/t5_1_1_tiny.gin'] + [f'gin_configs/t5x/{f}' for f in files]
    _parse(*paths, 'gin_configs/t5x/runs/tiny.gin')
    for path in paths:
        assert _include_depth(REPO / path) <= 2
    entry_fn = getattr(sys.modules['__main__'], entry)
    assert gin.config._inverse_lookup(entry_fn) is not None   # the file binds t5x's entry
    assert _macro('TASK_FEATURE_LENGTHS') == {'inputs': 96, 'targets': 96}
    if entry == 'infer':
        write = gin.query_parameter('infer_script.write_inferences_to_file.input_fields_to_include')
        assert 'id' in write and 'inputs_pretokenized' in write
    if entry == 'train':
        made = gin.query_parameter('MIXTURE_OR_TASK_NAME/macro.value')
        assert made.configurable.wrapped.__name__ == 'pseudo_labeled_task'


# ---- the commands of docs/t5x.md ---------------------------------------------------------------
DOCS = REPO / 'docs' / 't5x.md'
T5X_ENTRIES = ('t5x.train', 't5x.infer', 't5x.eval')


def _doc_blocks() -> dict[str, list[list[str]]]:
    """docs/t5x.md's bash blocks that run t5x, by their index among the file's bash blocks: each
    a list of commands (the words after `python -m`)."""
    blocks = {}
    for i, block in enumerate(re.findall(r'```bash\n(.*?)```', DOCS.read_text(), flags=re.S)):
        commands = [shlex.split(line)[2:] for line in block.replace('\\\n', ' ').splitlines()
                    if line.startswith('python -m ')]
        if any(c[0] in T5X_ENTRIES for c in commands):
            blocks[f'block{i}'] = commands
    return blocks


DOC_BLOCKS = _doc_blocks()
TINY_MODEL = 'gin_configs/t5x/models/t5_1_1_tiny.gin'


def _flags(command: list[str]) -> tuple[list[str], list[str]]:
    files = [a.split('=', 1)[1] for a in command if a.startswith('--gin_file=')]
    return files, [a[len('--gin.'):] for a in command if a.startswith('--gin.')]


# t5x.train / .infer / .eval register their entry point as `__main__.<name>` before they read the
# gin files, and doa_jax's configurables are not registered there: in their flags, `infer.x` and
# `__main__.infer.x` name t5x's; the run files' aliases do not resolve (checked with t5x cc342d4:
# "No configurable matching 'infer_script.infer'"). The stand-ins are registered under the
# aliases, next to doa_jax's, so a flag is read here by its alias.
T5X_FLAG_NAMES = {'train': 'train_script.train', 'infer': 'infer_script.infer',
                  'evaluate': 'eval_script.evaluate'}


def _t5x_binding(binding: str) -> str:
    selector = binding.split('=', 1)[0].strip()
    assert not selector.startswith(('train_script.', 'infer_script.', 'eval_script.')), \
        f'--gin.{binding}: t5x does not know the run files\' aliases in flags'
    name = selector.removeprefix('__main__.').split('.')[0]
    if name in T5X_FLAG_NAMES and '.' in selector.removeprefix('__main__.'):
        rest = binding.removeprefix('__main__.')[len(name):]
        return T5X_FLAG_NAMES[name] + rest
    return binding


def _step(path: str) -> int:
    match = re.fullmatch(r'.*/checkpoint_(\d+)', path)
    assert match, f'{path!r} is not a t5x checkpoint_<step>'
    return int(match.group(1))


@pytest.mark.parametrize('name', sorted(DOC_BLOCKS))
def test_the_docs_t5x_commands_chain_stage_to_stage(t5x_stubs, name):
    """Every t5x command of docs/t5x.md parses with its flags, and the stages chain: infer and
    eval read a checkpoint that an earlier command of the block writes (t5x.train: MODEL_DIR/
    checkpoint_<TRAIN_STEPS>; export-t5x: --to/checkpoint_<the doa_jax run's TRAIN_STEPS>) with
    the model file that wrote it, the student reads the pseudo-labels' folder, and a t5x.train
    from a checkpoint stops past its step (t5x's TRAIN_STEPS is absolute). Commands with the tiny
    model keep runs/tiny.gin's sizes: gin flags come after every file in t5x, so a
    full-size command's TRAIN_STEPS or INITIAL_CHECKPOINT_PATH would override it."""
    written: dict[str, str] = {}      # checkpoint path -> the model file that wrote it
    written_dirs: set[str] = set()    # the folders they go to: MODEL_DIRs, --to folders
    doa_runs: dict[str, int] = {}     # doa_jax MODEL_DIR -> its last step
    label_dirs: set[str] = set()

    def read_checkpoint(path, model_file):
        folder = path.rsplit('/', 1)[0]
        if folder in written_dirs:    # from this block: a checkpoint it writes, same model
            assert path in written, f'{path} is not written by an earlier command: {written}'
            assert written[path] in (model_file, None), (path, written[path], model_file)

    for command in DOC_BLOCKS[name]:
        gin.clear_config()
        entry = command[0]
        if entry == 'doa_jax.train':
            files, bindings = _flags(command)
            _parse(*files, bindings=bindings)
            doa_runs[_macro('MODEL_DIR')] = _macro('TRAIN_STEPS')
            continue
        if entry == 'doa_jax.checkpoints':
            assert command[1] == 'export-t5x' and command[3] == '--to', command
            step = doa_runs[command[2]]
            written[f'{command[4]}/checkpoint_{step}'] = None   # doa_jax's own model config
            written_dirs.add(command[4])
            continue
        assert entry in T5X_ENTRIES, command
        files, bindings = _flags(command)
        bindings = [_t5x_binding(b) for b in bindings]
        model_file = files[0]
        assert model_file.startswith('gin_configs/t5x/models/'), command
        tiny = model_file == TINY_MODEL
        if tiny:
            assert files[-1] == 'gin_configs/t5x/runs/tiny.gin', command
        _parse(*files, bindings=bindings)
        if entry == 't5x.train':
            model_dir, steps = _macro('MODEL_DIR'), _macro('TRAIN_STEPS')
            restore = _macro('INITIAL_CHECKPOINT_PATH')
            if restore is not None:
                read_checkpoint(restore, model_file)
                assert _step(restore) < steps, f'TRAIN_STEPS={steps} trains nothing from {restore}'
            if 'finetune_student.gin' in ' '.join(files):
                assert _macro('INFER_OUTPUT_DIR') in label_dirs, command
            if tiny:
                assert steps - (_step(restore) if restore else 0) <= 20, command
                assert _macro('NUM_PARTITIONS') == 1 and _macro('BATCH_SIZE') == 8
            written[f'{model_dir}/checkpoint_{steps}'] = model_file
            written_dirs.add(model_dir)
        else:
            read_checkpoint(_macro('CHECKPOINT_PATH'), model_file)
            if entry == 't5x.infer':
                label_dirs.add(_macro('INFER_OUTPUT_DIR'))
                if tiny:   # a slice of the pool, shard 0
                    assert gin.query_parameter('infer_script.infer.num_shards') > 1
                    assert gin.query_parameter('infer_script.infer.shard_id') == 0
        if tiny:
            assert _macro('TASK_FEATURE_LENGTHS') == {'inputs': 96, 'targets': 96}
    assert written, 'no command of the block writes a checkpoint'


@pytest.fixture
def t5x_names(t5x_stubs):
    """t5x's own `train` and `infer` registered, as t5x.train and t5x.infer register them."""
    for run in ('finetune', 'pseudo_label'):
        gin.clear_config()
        _parse('gin_configs/t5x/models/t5_1_1_tiny.gin', f'gin_configs/t5x/runs/{run}.gin',
               'gin_configs/t5x/runs/tiny.gin')
    gin.clear_config()
    main = sys.modules['__main__']
    assert gin.config._inverse_lookup(main.train) and gin.config._inverse_lookup(main.infer)


DOA_GIN_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / 'gin_configs').rglob('*.gin')
                       if not p.is_relative_to(T5X))


@pytest.mark.parametrize('gin_file', DOA_GIN_FILES)
def test_every_doa_jax_gin_file_parses_next_to_t5xs_train_and_infer(t5x_names, gin_file):
    """doa_jax's gin files name doa_jax's configurables in full (`doa_jax.train`), so they mean
    the same in a process where t5x registered its own `train` and `infer`."""
    _parse(gin_file)


def test_doa_jax_runs_bind_their_own_entry_points_next_to_t5xs(t5x_names):
    for files, key, value in (
            (['runs/finetune.gin', 'runs/finetune_tiny.gin'], 'doa_jax.train.batch_size', 8),
            (['runs/pseudo_label.gin', 'runs/pseudo_label_tiny.gin'], 'doa_jax.infer.split',
             'train'),
            (['runs/distill_seq.gin', 'runs/distill_seq_tiny.gin'],
             'doa_jax.sequence_kd_loss.label_smoothing', 0.0)):
        gin.clear_config()
        _parse(*[f'gin_configs/{f}' for f in files], bindings=["MODEL_DIR = '/tmp/x'"])
        value_of = gin.query_parameter(key)
        while isinstance(value_of, gin.config.ConfigurableReference):
            value_of = value_of.scoped_configurable_fn()
        assert value_of == value
    with pytest.raises((KeyError, ValueError), match='Ambiguous selector'):
        gin.query_parameter('infer.split')     # the short name is t5x's too now


# ---- export-t5x --------------------------------------------------------------------------------
# Large enough for t5x's Adafactor to factor some second moments (two dimensions >= 128).
WIDE = T5Config(vocab_size=512, emb_dim=128, num_heads=2, num_encoder_layers=1,
                num_decoder_layers=1, head_dim=64, mlp_dim=256, dtype=jnp.float32)


def _params(config: T5Config, seed: int = 0) -> dict:
    """Random float32 parameters of `config`'s tree (t5x names), without initialising a model."""
    from doa_jax.checkpoints.hf_mapping import expected_shapes

    rng, params = np.random.RandomState(seed), {}
    for name, shape in expected_shapes(config).items():
        *parents, leaf = name.split('/')
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    return params


def _run_dir(tmp_path: pathlib.Path, config: T5Config, step: int) -> tuple[pathlib.Path, dict]:
    """A doa_jax MODEL_DIR with one checkpoint of random parameters of `config`'s shapes."""
    from doa_jax.checkpoints import RunCheckpointer
    from doa_jax.train_state import TrainState

    params = _params(config, seed=step)
    ckpt = RunCheckpointer(str(tmp_path / 'run'), keep=2)
    ckpt.save(step, TrainState(step=jnp.int32(step), params=params, opt_state={}),
              {'step': step, 'batches_consumed': step})
    ckpt.close()
    return tmp_path / 'run', params


def test_export_t5x_writes_the_train_state_t5x_restores(tmp_path, capsys):
    import tensorstore as ts
    from flax import serialization

    from doa_jax.checkpoints.__main__ import main

    run, params = _run_dir(tmp_path, WIDE, step=7)
    assert main(['export-t5x', str(run), '--to', str(tmp_path / 't5x')]) == 0
    assert 'step 7' in capsys.readouterr().out
    ckpt = tmp_path / 't5x' / 'checkpoint_7'
    contents = msgpack.unpackb((ckpt / 'checkpoint').read_bytes(), raw=False,
                               strict_map_key=False)
    assert contents['version'] == 3 and set(contents['optimizer']) == {'target', 'state'}
    state = serialization.msgpack_restore((ckpt / 'checkpoint').read_bytes())['optimizer']
    assert int(state['state']['step']) == 7

    def read(node):     # what t5x's restore does with a leaf: a zarr spec relative to ckpt
        if isinstance(node, dict) and node.get('driver') == 'zarr':
            assert not node['kvstore']['path'].startswith('/')
            spec = {**node, 'kvstore': {'driver': 'file',
                                        'path': str(ckpt / node['kvstore']['path'])}}
            return ts.open(spec, open=True, read=True).result().read().result()
        return np.asarray(node)

    # Parameters: every one a zarr array named with '.' for '/', equal to the run's.
    target = state['target']
    spec = target['encoder']['layers_0']['attention']['query']['kernel']
    assert spec['kvstore']['path'] == 'target.encoder.layers_0.attention.query.kernel'
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(read(a), b),
                           target, params, is_leaf=lambda x: isinstance(x, dict) and 'driver' in x)
    # Adafactor's moments as t5x keeps them: v_row/v_col drop the larger / the smaller of two
    # dimensions >= 128; a parameter without two such dimensions has a full-size v.
    moments = state['state']['param_states']
    expected = {  # parameter: (v_row, v_col, v)
        ('token_embedder', 'embedding'): ((128,), (512,), (1,)),           # (512, 128)
        ('encoder', 'layers_0', 'attention', 'query', 'kernel'): ((128,), (128,), (1,)),
        ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel'): ((128,), (256,), (1,)),  # (128, 256)
        ('encoder', 'relpos_bias', 'rel_embedding'): ((1,), (1,), (2, 32)),
        ('decoder', 'decoder_norm', 'scale'): ((1,), (1,), (128,)),
    }
    for path, shapes in expected.items():
        slot = moments
        for key in path:
            slot = slot[key]
        got = tuple(read(slot[k]).shape for k in ('v_row', 'v_col', 'v'))
        assert got == shapes, path
        assert not read(slot['v']).any() and read(slot['m']).shape == (1,)
    # The restore's key check (flax from_state_dict): every key of t5x's Adafactor train state.
    slots = {'v_row': 0, 'v_col': 0, 'v': 0, 'm': 0}
    t5x_state = {'target': params, 'state': {
            'step': 0, 'param_states': jax.tree_util.tree_map(lambda _: slots, params)}}
    serialization.from_state_dict(t5x_state, state)


def test_convert_from_t5x_reads_the_config_from_the_shapes(tmp_path, capsys):
    from doa_jax.checkpoints.__main__ import main

    run, params = _run_dir(tmp_path, WIDE, step=3)
    out, config = checkpoints.export_t5x(run, tmp_path / 't5x')
    assert config == WIDE.replace(dtype=config.dtype)
    assert main(['convert', '--from', 't5x', str(out), '--to', str(tmp_path / 'orbax')]) == 0
    assert 'vocab_size=512, emb_dim=128' in capsys.readouterr().out   # not a named config
    converted = checkpoints.load_checkpoint(tmp_path / 'orbax', WIDE)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
    # A tree of a named config's shapes is reported by that name.
    from doa_jax.checkpoints.__main__ import describe_config
    tiny = _params(get_config('t5_1_1_tiny'))
    assert describe_config(checkpoints.config_from_params(tiny)) == 't5_1_1_tiny'


# ---- the cost action ---------------------------------------------------------------------------
@pytest.fixture
def action_setup(tmp_path):
    price_file = tmp_path / 'prices.yaml'
    price_file.write_text('devices:\n  test chip:\n    usd_per_hour: 3.6\n')   # $0.001/device-s
    clock = {'now': 0.0}

    def make(**kw):
        return CostAction(str(tmp_path / 'run'), prices=load_prices(str(price_file)),
                          devices=DeviceInfo('test chip', 2), clock=lambda: clock['now'], **kw)
    return make, clock, tmp_path / 'run'


def _stretch(action, clock, now, step, seconds, steps_per_second=None):
    """One call as t5x makes it: train_state.step, and clu Scalars in metrics_by_task['train']."""
    clock['now'] = now
    metrics = {'timing/seconds': types.SimpleNamespace(value=np.float32(seconds))}
    if steps_per_second is not None:
        metrics['timing/steps_per_second'] = types.SimpleNamespace(value=steps_per_second)
    state = types.SimpleNamespace(step=jnp.asarray(step, jnp.int32))
    return action.run(state, metrics_by_task={'train': metrics})


def test_cost_action_prices_steps_and_other_time_and_stops_at_the_budget(action_setup):
    make, clock, run = action_setup
    action = make(budget_usd=0.5)
    # 10 steps in 20 s of a 100 s stretch (start-up, compile): 2 devices x $0.001/s.
    assert _stretch(action, clock, 100, 10, 20, steps_per_second=0.5) is False
    assert action.spent_usd() == pytest.approx(0.2)
    assert _stretch(action, clock, 150, 20, 40) is False                       # + $0.1
    assert _stretch(action, clock, 400, 30, 50) is True                        # + $0.5 >= 0.5
    summary = Ledger(run, readonly=True).stage_summary('run', 'train')
    assert (summary.first_step, summary.last_step, summary.end_reason) == (1, 30, 'stopped')
    assert summary.step_usd == pytest.approx(0.22) and summary.other_usd == pytest.approx(0.58)
    assert action.stopped_at == 30


def test_cost_action_preflight_and_resume(action_setup):
    make, clock, run = action_setup
    with pytest.raises(BudgetExceededError, match='CostAction.force=True') as e:
        # 2 s/step: 990 more steps x 2 devices x $0.001/s = $3.96 > the budget left.
        _stretch(make(budget_usd=1.0, planned_steps=1000), clock, 20, 10, 20, 0.5)
    assert '990 steps' in str(e.value)
    clock['now'] = 0
    forced = make(budget_usd=1.0, planned_steps=1000, force=True)
    assert _stretch(forced, clock, 20, 10, 20, 0.5) is False
    # A restart from checkpoint 5 (relative steps, as TRAIN_STEPS_RELATIVE): steps 6-10 redone.
    clock['now'] = 0
    resumed = make(relative_steps=10)
    assert _stretch(resumed, clock, 10, 10, 10, 0.5) is False
    assert resumed.planned_steps == 15
    summary = Ledger(run, readonly=True).stage_summary('run', 'train')
    # Redone: all of the refused attempt's steps, and steps 6-10 of the forced one.
    assert summary.attempts == 3 and summary.redone_usd == pytest.approx(0.04 + 0.02)


# A model small enough to count by hand (doa_jax.flops.train_flops_per_sequence), at 2 input and
# 2 target tokens: matmul parameters encoder 6, cross-attention K/V 2, decoder 8, LM head 1, so
# 6 x ((6 + 2) x 2 + (8 + 1) x 2) = 204 dense FLOPs and 12 x (1 x 2 x 2 + 1 x (2 x 2 / 2 + 2 x 2))
# = 120 of attention: 324 per sequence, 3,240 per step of 10. At a peak of 3,240 FLOP/s on
# each of 2 devices a step takes 0.5 s at least: 2 x $0.001/device-s x 0.5 s = $0.001 a step.
ONE_WIDE = types.SimpleNamespace(emb_dim=1, num_heads=1, head_dim=1, mlp_dim=1,
                                 mlp_activations=('relu',), num_encoder_layers=1,
                                 num_decoder_layers=1, vocab_size=1)


def test_cost_action_refuses_before_t5x_compiles(action_setup):
    make, clock, run = action_setup
    shape = dict(model_config=ONE_WIDE, batch_size=10, feature_lengths={'inputs': 2, 'targets': 2},
                 peak_flops=3240.0)
    # From scratch to TRAIN_STEPS=1000: 1,000 steps, $1.00 at the least, over a $0.99 cap.
    with pytest.raises(BudgetExceededError) as e:
        make(budget_usd=0.99, planned_steps=1000, **shape)
    message = str(e.value)
    assert message.startswith('CostAction, before t5x compiles (TRAIN_STEPS=1000 from step 0 '
                              "(from scratch), batch 10, lengths {'inputs': 2, 'targets': 2}): "
                              'Refusing to start: its lowest possible cost $1.00 = 0.5 s/step x '
                              '1000 steps x 2 device(s)')
    assert 'exceeds the remaining budget $0.990 (BUDGET_USD $0.990' in message
    assert 'Lower TRAIN_STEPS, BATCH_SIZE or the model, raise BUDGET_USD' in message
    assert '--gin.t5x_action.CostAction.force=True' in message
    assert not (run / 'cost_ledger.sqlite').exists() or \
        Ledger(run, readonly=True).spent_usd() == 0.0
    assert make(budget_usd=1.0, planned_steps=1000, **shape).lower_bound.usd == \
        pytest.approx(1.0)
    # The step the run starts from: INITIAL_CHECKPOINT_PATH's, or MODEL_DIR's latest, higher.
    assert make(budget_usd=0.99, planned_steps=1000, initial_checkpoint='/ckpt/checkpoint_500',
                **shape).lower_bound.usd == pytest.approx(0.5)
    (run / 'checkpoint_900').mkdir(parents=True)
    assert make(budget_usd=0.99, planned_steps=1000, initial_checkpoint='/ckpt/checkpoint_500',
                **shape).lower_bound.usd == pytest.approx(0.1)
    with pytest.raises(BudgetExceededError, match=r'TRAIN_STEPS_RELATIVE=2000.*\$2\.00'):
        make(budget_usd=0.99, planned_steps=1000, relative_steps=2000, **shape)
    assert make(budget_usd=0.99, relative_steps=2000, force=True, **shape).force
    # A start t5x alone knows (a checkpoint named otherwise): checked after the first stretch.
    (run / 'checkpoint_900').rmdir()
    assert make(budget_usd=0.99, planned_steps=1000, initial_checkpoint='/ckpt/pretrained',
                **shape).lower_bound is None


def test_cost_action_names_feature_lengths_without_targets(action_setup):
    make = action_setup[0]
    with pytest.raises(ValueError, match=r"lacks 'targets'.*TASK_FEATURE_LENGTHS = "):
        make(budget_usd=1.0, planned_steps=10, model_config=ONE_WIDE, batch_size=10,
             feature_lengths={'inputs': 2}, peak_flops=3240.0)


def _evaluated(action, clock, now, step):
    """A TRAIN_EVAL or INFER_EVAL call: the tasks' metrics, no 'train' key."""
    clock['now'] = now
    return action.run(types.SimpleNamespace(step=step), metrics_by_task={'doa_wlp': {}})


def test_cost_action_stops_before_an_evaluation_it_cannot_pay_for(action_setup):
    """t5x's schedule of tiny.gin: TRAIN_STEPS 20, an epoch of 10 steps (EVAL_PERIOD,
    CHECKPOINT_PERIOD), a call every 5 (STATS_PERIOD); 2 devices at $0.001/device-s."""
    make, clock, run = action_setup
    schedule = dict(planned_steps=20, eval_period=10, checkpoint_period=10, stats_period=5)
    action = make(budget_usd=0.35, **schedule)
    assert cost_actions(action) == {'TRAIN': [action], 'TRAIN_EVAL': [action],
                                    'INFER_EVAL': [action]}
    # Steps 1-5 in 10 s of 50 (start-up, compiling): $0.100. Ahead: 5 steps ($0.0200) to step
    # 10, where t5x evaluates whatever the action says; the first evaluation's cost is unknown.
    assert _stretch(action, clock, 50, 5, 10, steps_per_second=0.5) is False
    assert action.forecast(5).total_usd == pytest.approx(0.12)
    # Steps 6-10 in 10 s of 12: $0.124. The evaluation at step 10 runs now, whatever this call
    # says; then 5 steps ($0.0200), 2 s of host time ($0.00400), the save reserve ($0.00400).
    assert _stretch(action, clock, 62, 10, 10) is False
    assert action.forecast(10).total_usd == pytest.approx(0.152)
    # The checkpoint and the teacher-forced evaluation: 10 s, $0.0200.
    assert _evaluated(action, clock, 72, 10) is False
    # Decoding: 40 s, $0.0800; spent $0.224. Going on commits t5x to the final evaluation (a
    # stop in the last epoch still evaluates), measured now at 50 s, $0.100: with 5 steps, host
    # time and the save, $0.352 > $0.35. It stops here, before the last epoch: t5x breaks out
    # at its next epoch with checkpoint_10 saved, and runs no evaluation at step 20.
    assert _evaluated(action, clock, 112, 10) is True
    assert action.stopped_at == 10 and action.stop_reason == (
        'the BUDGET_USD cap: spent $0.224 + $0.100 for the final evaluation (t5x runs it at step '
        '15 if the run stops there) (the last one took 50 s) + $0.0200 for the next 5 step(s) '
        '(2 s/step, measured over the last 5) + $0.00400 for host time between checks (2 s, as '
        'in the last stretch) + $0.00400 for the final checkpoint save (2 s reserved, the '
        'longest host time measured between checks) = $0.352, more than BUDGET_USD $0.350')
    s = Ledger(run, readonly=True).stage_summary('run', 'train')
    assert (s.last_step, s.end_reason) == (10, 'stopped')
    assert s.eval_usd == pytest.approx(0.1) and s.total_usd == pytest.approx(0.224)

    # $0.36 pays for the next stretch and the final evaluation: it runs on to step 15, where
    # going on to 20 would cost $0.248 + $0.100 + $0.0200 + $0.00400 + $0.00400 = $0.376. It
    # stops at 15; t5x saves checkpoint_15 and runs the final evaluation ($0.100, $0.348 in all)
    # and calls again after it: the stop stands (t5x keeps the last call's answer).
    clock['now'] = 0.0
    action = make(budget_usd=0.36, run_id='to_15', **schedule)
    for now, step in ((50, 5), (62, 10)):
        assert _stretch(action, clock, now, step, 10, steps_per_second=0.5) is False
    assert _evaluated(action, clock, 72, 10) is False
    assert _evaluated(action, clock, 112, 10) is False
    assert _stretch(action, clock, 124, 15, 10) is True and action.stopped_at == 15
    assert action.forecast(15).total_usd == pytest.approx(0.376)
    assert _evaluated(action, clock, 134, 15) is True and _evaluated(action, clock, 174, 15) is True
    assert Ledger(run, readonly=True).spent_usd('to_15') == pytest.approx(0.348)


# ---- TRAIN_STEPS --------------------------------------------------------------------------------
def test_train_steps_beyond_a_t5x_checkpoints_step_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gin.clear_config()
    (tmp_path / 'ckpt' / 'checkpoint_1000000').mkdir(parents=True)
    flags = ["MODEL_DIR='/tmp/unused'", f"INITIAL_CHECKPOINT_PATH='{tmp_path / 'ckpt'}'"]
    files = ['gin_configs/runs/finetune.gin', 'gin_configs/runs/finetune_tiny.gin']
    try:
        sources = gin_utils.parse_gin(files, flags + ['TRAIN_STEPS=1020000'])
        with pytest.raises(gin_utils.ConfigError) as e:
            train.check_initial_step(sources)
        assert 'would train 1,020,000 steps' in str(e.value)
        assert '--gin.TRAIN_STEPS=20000' in str(e.value)
        gin.clear_config()
        train.check_initial_step(gin_utils.parse_gin(files, flags + ['TRAIN_STEPS=20000']))
    finally:
        gin.clear_config()


# ---- t5x.infer's output feeds the student; the vocabulary default offline ---------------------
def test_t5x_infer_output_is_a_pseudo_labeled_task(tmp_path):
    import json

    import seqio

    import tasks.toy  # noqa: F401  registers doa_toy
    from tasks.jsonl_task import read_pseudo_labels, register_pseudo_labeled_task

    out = tmp_path / 'pseudo_labels'
    out.mkdir()
    # As t5x.infer writes them with pseudo_label.gin's write_fn settings (the last line without
    # an id, as another setting would write it), next to files that are not shards.
    lines = [{'inputs': {'id': 'train:0', 'inputs_pretokenized': 'doa_toy: red cat'},
              'prediction': 'cat'},
             {'inputs': {'id': 'train:1', 'inputs_pretokenized': 'doa_toy: sun dog'},
              'prediction': ''},
             {'inputs': {'inputs_pretokenized': 'moon tree'}, 'prediction': 'tree'}]
    shard = out / 'doa_toy_pool-predict.jsonl-00000-of-00001'
    shard.write_text(''.join(json.dumps(x) + '\n' for x in lines))
    (out / 'config.gin').write_text('infer.mode = "predict"\n')
    (out / 'model-info.txt').write_text('params\n')
    ids, inputs, preds = read_pseudo_labels(str(out))
    assert ids == ['train:0', 'train:1', f'{shard.name}:3'] and preds == ['cat', '', 'tree']
    with pytest.raises(FileNotFoundError, match='.COMPLETED'):
        read_pseudo_labels(str(out), completed_only=True)
    (out / f'{shard.name}.COMPLETED').write_text('')
    task = register_pseudo_labeled_task('doa_t5x_pseudo', str(out), prefix='doa_toy: ',
                                        eval_task='doa_toy', completed_only=True,
                                        vocabulary=seqio.ByteVocabulary(), overwrite=True)
    rows = list(task.source.get_dataset('train', shuffle=False).as_numpy_iterator())
    assert [r['inputs'].decode() for r in rows] == ['doa_toy: red cat', 'doa_toy: sun dog',
                                                    'doa_toy: moon tree']
    assert [r['targets'].decode() for r in rows] == ['cat', '', 'tree']
    assert 'validation' in task.splits


def test_default_vocabulary_that_cannot_be_read_names_doa_vocab(monkeypatch, tmp_path):
    from doa_jax.data import vocabulary
    from doa_jax.data.vocabulary import VocabularyNotFoundError

    monkeypatch.delenv('DOA_VOCAB', raising=False)
    monkeypatch.setattr(vocabulary, '_default', None)
    # Offline, the public model on gs://t5-data cannot be read; a missing file fails the same way.
    monkeypatch.setattr(vocabulary, 'T5_SPM_PATH', str(tmp_path / 'sentencepiece.model'))
    vocab = vocabulary.default_vocabulary()
    with pytest.raises(VocabularyNotFoundError, match='DOA_VOCAB=/path/to/sentencepiece.model'):
        vocab.encode('red cat')
