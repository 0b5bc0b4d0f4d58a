"""A gin run file read as its entry point reads it, for the memory gate
(`python -m doa_jax.benchmark plan --gin_file=<recipe>`).

A recipe is a training run (`train.*`: model with its remat and scan, batch, feature lengths,
packing, optimizer, microbatches, mesh, loss, with the online KD teacher when the loss has one)
or a pseudo-labeling job (`infer.*`: teacher, batch, lengths, decode method, mesh), or a study
(`study.*`, gin_configs/studies/*.gin): its stages, each read as the study runs it, from the same
settings (`StageConfig.train_kwargs`, `runner.pseudo_label_kwargs`, at the lengths
`runner.stage_lengths` resolves): the teacher's training (and its evaluation), the teacher's
pseudo-labeling, the student's training (and its evaluation).

Its target hardware is a header line of the gin file, `# target: 4x A100-80GB`: a device count
and a device kind the device catalog (doa_jax/cost/prices.yaml `devices`, `memory_gb`) knows.
Of several files given, the last that states a target wins (an overlay such as
runs/finetune_teacher_40gb.gin retargets its base); a file that states none inherits the target
of the files it includes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

TARGET_RE = re.compile(r'^#\s*target:(.*)$', re.IGNORECASE)
_COUNT_KIND = re.compile(r'^\s*(\d+)\s*x\s*(\S.*?)\s*$', re.IGNORECASE)
_INCLUDE_RE = re.compile(r"""^include\s+['"]([^'"]+)['"]""")
STORED_TOPK = 10   # the k offline token KD is planned with (distill_kd_offline.gin: --gin.TOP_K=10)


class RecipeError(ValueError):
    """A recipe the gate cannot read; the message names the file or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Target:
    """The hardware a recipe is written for: `count` devices of `kind`, each `memory_bytes`."""

    count: int
    kind: str
    memory_bytes: float
    where: str   # file:line, or the flag

    def label(self) -> str:
        return f'{self.count}x {self.kind}'


def parse_target(text: str, where: str, prices: Any = None) -> Target:
    """'4x A100-80GB' -> Target(4, 'A100-80GB', 80e9, where); the memory is the catalog's."""
    from doa_jax.cost.prices import load_prices

    m = _COUNT_KIND.match(text)
    if not m or int(m.group(1)) < 1:
        raise RecipeError(f'{where}: target {text.strip()!r} is not "<count>x <device kind>"; '
                          'write e.g. "# target: 4x A100-80GB".')
    table = prices if prices is not None else load_prices()
    entry = table.match_device(m.group(2))
    if entry is None or entry.memory_bytes is None:
        known = ', '.join(d.name for d in table.devices if d.memory_bytes)
        why = 'matches no entry of' if entry is None else f'matches {entry.name!r}, which has ' \
            'no memory_gb in'
        raise RecipeError(f'{where}: target device {m.group(2)!r} {why} the device catalog '
                          f'({table.origin}); name one of {known}, or add its memory_gb there.')
    return Target(int(m.group(1)), m.group(2), entry.memory_bytes, where)


def _resolve(path: str, prefixes: Sequence[str]) -> str | None:
    for prefix in [''] if os.path.isabs(path) else prefixes:
        if os.path.isfile(os.path.join(prefix, path)):
            return os.path.join(prefix, path)
    return None


def _file_target(path: str, prefixes: Sequence[str], depth: int = 0) -> tuple[str, str] | None:
    """(target text, file:line) that `path` states, else the last of its includes' targets."""
    full = _resolve(path, prefixes)
    if full is None or depth > 8:
        return None
    own, inherited = None, None
    with open(full) as f:
        for n, line in enumerate(f, 1):
            m = TARGET_RE.match(line)
            if m and own is None:
                own = (m.group(1), f'{os.path.relpath(full)}:{n}')
            include = _INCLUDE_RE.match(line)
            if include:
                inherited = _file_target(include.group(1), prefixes, depth + 1) or inherited
    return own or inherited


def find_target(gin_files: Sequence[str], prefixes: Sequence[str], prices: Any = None
                ) -> Target | None:
    """The target the files state (text only: no gin, no jax), or None."""
    for path in reversed(list(gin_files)):
        found = _file_target(path, prefixes)
        if found is not None:
            return parse_target(found[0], found[1], prices)
    return None


def search_prefixes(search_paths: Sequence[str] | None) -> list[str]:
    """Where gin files are looked up, as `gin_utils.parse_gin` looks them up."""
    from doa_jax.gin_utils import REPO_ROOT
    return ['', *(list(search_paths) if search_paths else ['.', REPO_ROOT])]


@dataclasses.dataclass
class TrainRecipe:
    """What a `train.*` recipe asks of each device."""

    model: Any                      # T5Config
    batch_size: int
    lengths: dict[str, int]
    lengths_source: str
    pack: bool
    optimizer: Any                  # optax.GradientTransformation
    optimizer_name: str
    num_microbatches: int
    mesh_config: Any                # partitioning.MeshConfig
    loss_fn: Any
    loss_normalizing_factor: Any
    teacher: Any | None             # T5Config of an online KD teacher
    kd: dict[str, float]            # its temperature, alpha, z_loss
    eval_decode: bool               # the trainer decodes its eval split with the train state
    max_decode_length: int
    stored_topk: int = 0            # offline token KD: the k of the batch's stored teacher top-k
    eval_batch_size: int | None = None   # the evaluation's decode batch (None: batch_size)
    kind: str = 'train'


@dataclasses.dataclass
class InferRecipe:
    """What an `infer.*` (pseudo-labeling) recipe asks of each device."""

    model: Any
    batch_size: int
    max_input_length: int
    max_decode_length: int
    method: str
    num_beams: int
    top_k: int
    mesh_config: Any
    kind: str = 'infer'


@dataclasses.dataclass
class StudyRecipe:
    """A study's stages, in the order it runs them: (name, TrainRecipe | InferRecipe, key); equal
    keys (two study files with the same stage settings) plan the same programs."""

    stages: list[tuple[str, Any, str]]
    kind: str = 'study'


def _value(key: str, sources, default: Any = None, evaluate: bool = True) -> Any:
    """The bound value of `configurable.param` (macros resolved, `@f()` called), or `default`."""
    import gin

    from doa_jax import gin_utils
    bound = gin_utils.bound_value(key, sources)
    if bound is None:
        return default
    value = bound.value
    if evaluate and isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value


def scaled(config: Any, name: str | None) -> Any:
    """`config`'s architecture replaced by the named config's; dtype, dropout, remat, scan and
    op backends kept (the gate's CI runs recipes at small sizes)."""
    if name is None:
        return config
    from doa_jax.models.config import get_config
    return get_config(name).replace(
            dtype=config.dtype, dropout_rate=config.dropout_rate, scan_layers=config.scan_layers,
            remat_policy=config.remat_policy, attention_impl=config.attention_impl,
            matmul_impl=config.matmul_impl)


def _train_recipe(sources, scale: str | None) -> TrainRecipe:
    import gin

    from doa_jax import losses
    from doa_jax.models.config import get_config

    model = scaled(_value('train.model_config', sources), scale)
    lengths = _value('train.task_feature_lengths', sources)
    source = 'TASK_FEATURE_LENGTHS'
    if lengths is None:
        lengths = _value('train.default_feature_lengths', sources)
        source = 'DEFAULT_FEATURE_LENGTHS'   # a task with measured lengths runs with its own
    if not lengths:
        raise RecipeError(f'{sources.files_flag()}: no feature lengths to plan for; set '
                          "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': N, 'targets': M}\".")
    optimizer = _value('train.optimizer', sources)
    name = _value('make_optimizer.name', sources, 'adafactor')
    ref = _value('train.loss_fn', sources, evaluate=False)
    teacher, kd, loss_fn = None, {}, None
    if isinstance(ref, gin.config.ConfigurableReference) and \
            ref.configurable.name == 'teacher_kd_loss':
        # The online teacher's checkpoint is not read: its shapes are the named config's.
        teacher_name = _value('teacher_kd_loss.teacher_model', sources)
        teacher = scaled(get_config(teacher_name, dropout_rate=0.0), scale).replace(
                dtype=model.dtype)
        kd = {k: float(_value(f'teacher_kd_loss.{k}', sources, d))
              for k, d in (('temperature', 2.0), ('alpha', 0.0), ('z_loss', 0.0))}
    elif ref is None:
        loss_fn = losses.cross_entropy_loss()
    else:
        loss_fn = ref.scoped_configurable_fn() if isinstance(
                ref, gin.config.ConfigurableReference) else ref
    # Offline token KD reads the teacher's stored top-k, whose k pseudo-labeling chose (its
    # TOP_K); the batch grows by batch x targets x k x 8 bytes, planned at k = STORED_TOPK.
    stored_topk = STORED_TOPK if _value('pseudo_labeled_task.with_topk', sources, False) else 0
    eval_period = _value('train.eval_period', sources, 0) or 0
    tgt = int(lengths['targets'])
    return TrainRecipe(
            model=model, batch_size=int(_value('train.batch_size', sources)),
            lengths={'inputs': int(lengths['inputs']), 'targets': tgt}, lengths_source=source,
            pack=bool(_value('train.pack', sources, False)), optimizer=optimizer,
            optimizer_name=str(name),
            num_microbatches=int(_value('train.num_microbatches', sources, 1)),
            mesh_config=_value('train.mesh_config', sources),
            loss_fn=loss_fn,
            loss_normalizing_factor=_value('train.loss_normalizing_factor', sources),
            teacher=teacher, kd=kd,
            eval_decode=eval_period > 0 and bool(_value('train.decode_metrics', sources, True)),
            max_decode_length=int(_value('train.max_decode_length', sources) or tgt),
            stored_topk=stored_topk)


def _infer_recipe(sources, scale: str | None) -> InferRecipe:
    from doa_jax import partitioning
    return InferRecipe(
            model=scaled(_value('infer.model_config', sources), scale),
            batch_size=int(_value('infer.batch_size', sources, 32)),
            max_input_length=int(_value('infer.max_input_length', sources, 512)),
            max_decode_length=int(_value('infer.max_decode_length', sources, 128)),
            method=str(_value('infer.method', sources, 'greedy')),
            num_beams=int(_value('infer.num_beams', sources, 4)),
            top_k=int(_value('infer.top_k', sources, 0)),
            mesh_config=_value('infer.mesh_config', sources) or partitioning.MeshConfig())


def stage_train_recipe(kwargs: dict, scale: str | None, *, lengths_source: str,
                       optimizer_name: str, eval_batch_size: int | None,
                       teacher: Any = None, kd: dict | None = None) -> TrainRecipe:
    """The TrainRecipe of `trainer.train(**kwargs)` as a study stage calls it (evaluated once
    after training, by decoding at `eval_batch_size`); `teacher`/`kd`: the online KD teacher's
    config and loss settings (its parameters are not read)."""
    lengths = kwargs['task_feature_lengths']
    return TrainRecipe(
            model=scaled(kwargs['model_config'], scale), batch_size=int(kwargs['batch_size']),
            lengths=dict(lengths), lengths_source=lengths_source, pack=bool(kwargs['pack']),
            optimizer=kwargs['optimizer'], optimizer_name=optimizer_name,
            num_microbatches=int(kwargs['num_microbatches']),
            mesh_config=kwargs['mesh_config'],
            loss_fn=None if teacher is not None else kwargs['loss_fn'],
            loss_normalizing_factor=kwargs['loss_normalizing_factor'],
            teacher=scaled(teacher, scale) if teacher is not None else None, kd=dict(kd or {}),
            eval_decode=True, max_decode_length=int(lengths['targets']),
            eval_batch_size=eval_batch_size)


def _study_lengths_task(sources) -> tuple[str | None, Any, str]:
    """(the task whose measured lengths the study's tasks take, the study's vocabulary, why none)
    as the study's data source would set them, without reading its data: a paper dataset
    (`paper_dataset`) takes those of doa_<dataset> under VOCABULARY."""
    import gin

    ref = _value('study.data', sources, evaluate=False)
    if not (isinstance(ref, gin.config.ConfigurableReference) and
            ref.configurable.name == 'paper_dataset'):
        return None, None, 'its data records no measured lengths'
    spec = _value('paper_dataset.vocabulary', sources)
    if spec is None or spec is gin.REQUIRED:
        return None, None, ('VOCABULARY unset: give --gin.VOCABULARY to plan the lengths '
                            'measured for it')
    import tasks  # noqa: F401  (registers the paper tasks, recording their measured lengths)

    from doa_jax.data.vocabulary import vocabulary_from_spec
    from doa_jax.study.data import paper_lengths_task
    try:
        vocabulary = vocabulary_from_spec(spec)
    except OSError as e:     # a SentencePiece model that is not on this machine
        raise RecipeError(f'{sources.files_flag()}: VOCABULARY={spec!r}: {e}') from None
    return paper_lengths_task(_value('paper_dataset.dataset', sources)), vocabulary, ''


def _study_recipe(sources, scale: str | None) -> StudyRecipe:
    """The stages of a study as `doa_jax.study.runner` runs them, each at the feature lengths it
    resolves (`runner.stage_lengths`); the study's data (and any path it names) is not read."""
    import inspect

    from doa_jax.gin_utils import configurables
    from doa_jax.study import runner

    defaults = {k: p.default for k, p in
                inspect.signature(configurables.study).parameters.items()}

    def setting(name: str) -> Any:
        return _value(f'study.{name}', sources, defaults.get(name))

    stages = {}
    for name in ('teacher', 'student'):
        stage = setting(name)
        if not isinstance(stage, runner.StageConfig):
            raise RecipeError(f'{sources.files_flag()}: study.{name} is {stage!r}, not a '
                              f'StageConfig; bind it to @{name}/doa_jax.StageConfig().')
        stages[name] = stage
    plain = lambda x: None if x is None else {k: int(v) for k, v in x.items()}
    s = runner.StudySettings(
            study_dir='', data=None, teacher=stages['teacher'], student=stages['student'],
            task_feature_lengths=plain(setting('task_feature_lengths')),
            default_feature_lengths=plain(setting('default_feature_lengths')), prices=None,
            chunk_size=int(setting('chunk_size')),
            infer_batch_size=int(setting('infer_batch_size')),
            eval_batch_size=int(setting('eval_batch_size')),
            student_loss=str(setting('student_loss')))
    task, vocabulary, why = _study_lengths_task(sources)
    resolved = {}
    for name, stage in stages.items():
        try:
            lengths, where = runner.stage_lengths(s, stage, task, vocabulary)
        except ValueError as e:
            raise RecipeError(f'{sources.files_flag()}: the {name} stage has no feature lengths '
                              f'to plan ({why or e}); set TASK_FEATURE_LENGTHS or '
                              'DEFAULT_FEATURE_LENGTHS.') from None
        if where == 'DEFAULT_FEATURE_LENGTHS' and why:
            where += f' ({why})'
        elif where == 'StageConfig.task_feature_lengths':
            where = f'{name}/{where}'
        resolved[name] = lengths, where
    out = []
    for name, stage in stages.items():
        teacher, kd = None, None
        if name == 'student' and s.student_loss == 'token':   # the online teacher's forward
            teacher, kd = s.teacher.model_config(inference=True), runner.kd_settings(s)
        lengths, where = resolved[name]
        kwargs = stage.train_kwargs(model_dir='', task='', steps=max(stage.min_steps, 1000),
                                    study_lengths=lengths, random_seed=s.seed)
        key = (name, stage, lengths, s.eval_batch_size, s.teacher
               if teacher is not None else None, kd, scale)
        out.append((name, stage_train_recipe(kwargs, scale, lengths_source=where,
                                             optimizer_name=stage.optimizer,
                                             eval_batch_size=s.eval_batch_size,
                                             teacher=teacher, kd=kd), repr(key)))
        if name == 'teacher':
            pl = runner.pseudo_label_kwargs(s, lengths)
            out.append(('pseudo_label', InferRecipe(
                    model=scaled(pl['model_config'], scale), batch_size=int(pl['batch_size']),
                    max_input_length=int(pl['max_input_length']),
                    max_decode_length=int(pl['max_decode_length']), method='greedy',
                    num_beams=4, top_k=0, mesh_config=pl['mesh_config']),
                        repr(('pseudo_label', pl, scale))))
    return StudyRecipe(out)


def read_recipe(gin_files: Sequence[str], bindings: Sequence[str] = (),
                search_paths: Sequence[str] | None = None, scale: str | None = None
                ) -> TrainRecipe | InferRecipe | StudyRecipe:
    """The recipe the gin files and `--gin.X` bindings describe; `%gin.REQUIRED` paths may stay
    unset (nothing is read from them). `scale` names a model config that replaces every model's
    architecture (student and teacher), keeping everything else."""
    import gin

    from doa_jax import gin_utils

    gin.clear_config()
    sources = gin_utils.parse_gin(gin_files, bindings, search_paths, check_required=False)
    if gin_utils.bound_value('train.model_config', sources) is not None:
        return _train_recipe(sources, scale)
    if gin_utils.bound_value('infer.model_config', sources) is not None:
        return _infer_recipe(sources, scale)
    if gin_utils.bound_value('study.teacher', sources) is not None:
        return _study_recipe(sources, scale)
    raise RecipeError(f'{sources.files_flag()} binds none of train.model_config, '
                      'infer.model_config and study.teacher: give a runs/*.gin recipe (a '
                      'training run or a pseudo-labeling job) or a studies/*.gin study.')
