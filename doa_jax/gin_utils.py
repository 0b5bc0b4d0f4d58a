"""gin at the entry points only: flag parsing (t5x's), configurable registration, run records.

Library modules never import gin. This module registers their plain functions in gin's module
`doa_jax` (`doa_jax.train`, `doa_jax.get_model_config`, `doa_jax.make_optimizer`, ...) so t5x-style
gin files can bind them next to t5x's own `train` and `infer`, and turns `--gin.X=Y` flags into gin
bindings as t5x does.

It also checks the configuration before anything runs: a `--gin.NAME=` flag that names nothing in
the loaded files, a `%gin.REQUIRED` macro left unset, a gin file that does not exist, or an entry
configurable that no file binds is a `ConfigError` that says where (flag, file:line) and how to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import shlex
import sys
from typing import Any, Callable, Sequence

import gin
import jax

from doa_jax import callbacks as callbacks_lib
from doa_jax import losses, optimizers, partitioning, run_identity, trainer
from doa_jax.models import config as config_lib
from doa_jax.models.config import T5Config, get_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RECORDED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'seqio', 'tensorflow',
                      'gin-config', 'clu', 'numpy')


def get_model_config(name: str, dropout_rate: float = 0.0, activation_dtype: str = 'bfloat16',
                     scan_layers: bool = False, remat_policy: str | None = None,
                     attention_impl: str = 'auto', matmul_impl: str = 'auto') -> T5Config:
    """A named T5 config with the run's overrides (gin: MODEL_CONFIG via get_model_config.*).

    attention_impl / matmul_impl: the op backends (see `doa_jax.ops`); 'auto' picks per platform.
    """
    dtype = config_lib.activation_dtype(activation_dtype, 'get_model_config.activation_dtype')
    return get_config(name, dropout_rate=dropout_rate, dtype=dtype,
                      scan_layers=scan_layers, remat_policy=remat_policy,
                      attention_impl=attention_impl, matmul_impl=matmul_impl)


def import_task_modules(module: str | Sequence[str] | None = 'tasks',
                        vocabulary: str | None = None) -> None:
    """Imports the module(s) that register seqio tasks (gin: MIXTURE_OR_TASK_MODULE).

    `vocabulary` (gin: VOCABULARY) is a sentencepiece model path or 'byte'; it becomes the default
    vocabulary of tasks registered by those modules, so it is set before they are imported.
    """
    if vocabulary is not None:
        from doa_jax.data.vocabulary import set_default_vocabulary
        set_default_vocabulary(vocabulary)
    names = [module] if isinstance(module, str) else list(module or ())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f'MIXTURE_OR_TASK_MODULE={name!r} cannot be imported ({e}); set it to '
                             'a module on PYTHONPATH that registers your tasks.') from e


class RunRecord(callbacks_lib.TrainerCallback):
    """Writes what reproduces the run into MODEL_DIR (process 0): the operative gin config, the
    command line and the package versions."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def on_train_start(self, *, model_dir: str, start_step: int, mesh) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(model_dir, exist_ok=True)
        suffix = '' if start_step == 0 else f'.resume_{start_step}'
        with open(os.path.join(model_dir, f'config{suffix}.gin'), 'w') as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(model_dir, f'command_line{suffix}.txt'), 'w') as f:
            f.write(shlex.join([sys.executable] + self.argv) + '\n')
        with open(os.path.join(model_dir, f'versions{suffix}.txt'), 'w') as f:
            f.write(f'python=={sys.version.split()[0]}\n')
            for pkg in _RECORDED_PACKAGES:
                try:
                    f.write(f'{pkg}=={importlib.metadata.version(pkg)}\n')
                except importlib.metadata.PackageNotFoundError:
                    pass
            f.write(f'devices={jax.device_count()}x{jax.devices()[0].device_kind}\n')


def ledger_spent_usd(ledger_dir: str, run_id: str | None = None,
                     stage: str | None = None) -> tuple[float, str] | None:
    """($ billed, ledger file) from the cost ledger in `ledger_dir`: the run's (or, with `stage`,
    that stage's range-keyed compute); None when there is no ledger there (the run is unmetered)."""
    from doa_jax.cost import Ledger
    from doa_jax.cost.ledger import ledger_path
    path = ledger_path(ledger_dir)
    if not os.path.isfile(path):
        return None
    ledger = Ledger(path, readonly=True)
    try:
        if stage is None:
            return ledger.spent_usd(run_id), path
        return sum(e['usd'] for e in ledger.compute_entries(run_id, stage)), path
    finally:
        ledger.close()


class RunSummary(callbacks_lib.TrainerCallback):
    """Remembers where a training run started, for the one-line summary the entry point logs."""

    def __init__(self):
        self.model_dir: str | None = None
        self.start_step: int | None = None
        self.usd_before: float | None = None

    def on_train_start(self, *, model_dir: str, start_step: int, mesh) -> None:
        self.model_dir, self.start_step = model_dir, start_step
        spent = self._spent()
        self.usd_before = spent[0] if spent else None

    def _spent(self) -> tuple[float, str] | None:
        """The cost meter's ledger: CostCallback.ledger if gin binds a path, else MODEL_DIR's."""
        ledger, run_id = self.model_dir, None
        for key, attr in (('CostCallback.ledger', 'ledger'), ('CostCallback.run_id', 'run_id')):
            try:
                value = gin.query_parameter(key)
            except ValueError:
                continue
            while _is_macro_ref(value):
                value = value.scoped_configurable_fn()
            if isinstance(value, str):
                ledger, run_id = (value, run_id) if attr == 'ledger' else (ledger, value)
        run_id = run_id or run_identity.run_id_or_name(self.model_dir)
        return ledger_spent_usd(ledger, run_id)

    def line(self, result: trainer.TrainResult) -> str:
        """`train: done at step 60 (ran 60 steps from step 0); cost $...; checkpoints ...`."""
        if self.model_dir is None:
            return f'train: {result.reason} at step {result.step}.'
        ran = result.step - self.start_step
        why = {'done': 'done', 'stopped': 'stopped early by a callback (BUDGET_USD cap or '
                                          'StopAtStep)'}.get(result.reason, result.reason)
        text = f'train: {why} at step {result.step} (ran {ran} steps from step {self.start_step})'
        if ran == 0 and result.reason == 'done':
            text += '; the checkpoint in MODEL_DIR had already reached TRAIN_STEPS'
        spent = self._spent()
        if spent is None:
            text += '; cost not metered (no ledger; bind train.callbacks = [@CostCallback()])'
        else:
            usd, path = spent
            this = usd - (self.usd_before or 0.0)
            text += f'; cost ${this:.4f}' + (f' (run total ${usd:.4f})' if this != usd else '')
            text += f' in {path}'
        record = 'config.gin' if self.start_step == 0 else f'config.resume_{self.start_step}.gin'
        text += (f'; checkpoints {os.path.join(self.model_dir, "checkpoints")}, run record '
                 f'{os.path.join(self.model_dir, record)}.')
        return text


CONFIGURABLE: dict[str, object] = {}
GIN_MODULE = 'doa_jax'   # the gin module of doa_jax's configurables: `doa_jax.train`, ...


def register_configurables() -> None:
    """Makes the library's functions bindable from gin under t5x-like names in the `doa_jax`
    module (`doa_jax.train`, `doa_jax.get_model_config`, ...; idempotent). doa_jax's gin files
    write them in full, so they parse in a process where t5x has registered its own `train` and
    `infer`; a short name (`train.model_dir`) still works where doa_jax's are the only ones."""
    if CONFIGURABLE:
        return

    def register(fn, name: str):
        return gin.external_configurable(fn, name, module=GIN_MODULE)

    CONFIGURABLE['train'] = register(trainer.train, 'train')
    register(get_model_config, 'get_model_config')
    CONFIGURABLE['import_task_modules'] = register(import_task_modules, 'import_task_modules')
    register(optimizers.make_optimizer, 'make_optimizer')
    register(losses.cross_entropy_loss, 'cross_entropy_loss')
    register(partitioning.MeshConfig, 'MeshConfig')
    register(callbacks_lib.StopAtStep, 'StopAtStep')
    try:    # the cost meter, bindable as `doa_jax.train.callbacks = [@doa_jax.CostCallback()]`
        from doa_jax.cost import CostCallback
    except ImportError:
        pass
    else:
        register(CostCallback, 'CostCallback')


# Parameters that choose how a run executes, not what it trains: a resume may change them.
_EXECUTION_PARAMS = frozenset({'activation_dtype', 'attention_impl', 'matmul_impl',
                               'remat_policy'})


def _describe_bound(value: Any, depth: int = 0) -> Any:
    """A bound gin value as plain data: macros resolved, a `@configurable()` reference as
    {'configurable': name, param: value, ...} of its bindings. A parameter bound to a macro a
    resume may change (run_identity.RESUMABLE_CHANGES, e.g. make_optimizer.total_steps =
    %TRAIN_STEPS) is left out (returns `_SKIP`)."""
    while _is_macro_ref(value):
        if value.configurable.selector == 'gin.macro' and \
                '/'.join(value.scopes) in run_identity.RESUMABLE_CHANGES:
            return _SKIP
        value = _macro_value(value)
    if isinstance(value, gin.config.ConfigurableReference) and depth < 4:
        selector = value.configurable.selector
        params: dict[str, Any] = dict(_bindings().get(('', selector), {}))
        for i in range(len(value.scopes)):
            params.update(_bindings().get(('/'.join(value.scopes[:i + 1]), selector), {}))
        out = {'configurable': selector.rpartition('.')[2]}    # the same with or without t5x
        for name in sorted(params):
            if name in _EXECUTION_PARAMS:
                continue
            described = _describe_bound(params[name], depth + 1)
            if described is not _SKIP:
                out[name] = described
        return out
    if isinstance(value, (list, tuple)):
        return [v for v in (_describe_bound(x, depth + 1) for x in value) if v is not _SKIP]
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _describe_bound(x, depth + 1)) for k, x in value.items())
                if v is not _SKIP}
    return run_identity.describe(value)


_SKIP = object()


def _macro_value(ref: Any) -> Any:
    """What a macro is bound to, unevaluated (`%M` bound to `@f()` gives the reference, where
    calling the macro would call f)."""
    if ref.configurable.selector == 'gin.macro':
        return gin.query_parameter(f'{"/".join(ref.scopes)}/gin.macro.value')
    return ref.scoped_configurable_fn()


def training_description() -> dict[str, Any]:
    """What gin knows of a run that the trainer cannot see in its arguments: the optimizer's and
    the loss's bindings (they reach `train` as opaque functions), the model's name, and how a
    generated task is made (e.g. @pseudo_labeled_task() with its INFER_OUTPUT_DIR)."""
    out = {}
    for param, key in (('optimizer', 'optimizer'), ('loss_fn', 'loss'),
                       ('model_config', 'model_config'), ('mixture_or_task_name', 'task_source')):
        try:
            value = gin.query_parameter(f'train.{param}')
        except ValueError:
            continue
        if key == 'task_source':    # only a task made by a configurable; a name is typed
            while _is_macro_ref(value):
                value = _macro_value(value)
            if not isinstance(value, gin.config.ConfigurableReference):
                continue
        described = _describe_bound(value)
        if described is not _SKIP:
            out[key] = described
    return out


def run_configured_training(argv: Sequence[str],
                            summary: RunSummary | None = None) -> trainer.TrainResult:
    """Imports the task module(s), then calls the gin-configured `train`, adding a RunRecord (and
    `summary`, which then knows the run's start step and directory) and the run's description
    for its fingerprint (`training_description`)."""
    CONFIGURABLE['import_task_modules']()
    extra = [RunRecord(argv)] + ([summary] if summary is not None else [])
    return CONFIGURABLE['train'](extra_callbacks=extra, run_fingerprint=training_description())


def parse_flags(argv: Sequence[str], prog: str = 'python -m doa_jax.train',
                example: str = 'gin_configs/runs/finetune.gin',
                description: str = 'Fine-tune or distill a T5 model (t5x-style gin).'
                ) -> argparse.Namespace:
    """t5x flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_bindings, --gin_search_paths,
    plus the multi-process flags for jax.distributed. `prog` and `example` (a gin file of that
    entry point) go into the usage error when no --gin_file is given."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith('--gin.'):
            bindings.append(arg[len('--gin.'):])
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('--gin_file', action='append', default=[],
                        help='gin file; repeat to layer overlays (later files win).')
    parser.add_argument('--gin_bindings', action='append', default=[],
                        help="a gin binding, e.g. \"TRAIN_STEPS=100\"; same as --gin.TRAIN_STEPS=100.")
    parser.add_argument('--gin_search_paths', default=None,
                        help='comma-separated directories where gin files and includes are found '
                             '(default: the current directory and the repository root).')
    parser.add_argument('--coordinator_address', default=None,
                        help='host:port of process 0, for multi-process runs (jax.distributed).')
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    args = parser.parse_args(rest)
    args.gin_bindings = list(args.gin_bindings) + bindings
    if not args.gin_file:
        parser.error(f'give at least one --gin_file, e.g. --gin_file={example}')
    empty = [i for i, f in enumerate(args.gin_file) if not f.strip()]
    if empty:
        parser.error(f'--gin_file number {empty[0] + 1} is empty; give a gin file path, e.g. '
                     f'--gin_file={example}')
    return args


class ConfigError(ValueError):
    """A mistake in the gin files or flags: the message says what, where (flag or file:line) and
    how to fix it. Raised before anything runs; `run_cli` prints it without a traceback."""


_KEY_RE = re.compile(r'\s*([A-Za-z_][\w./]*)\s*=(?!=)')     # the key of `KEY = value`
_INCLUDE_RE = re.compile(r"""include\s+['"]([^'"]+)['"]""")
_INTERNAL_SELECTORS = ('gin.macro', 'gin.constant', 'gin.singleton')


def binding_key(binding: str) -> str | None:
    """'TRAIN_STEPS' for 'TRAIN_STEPS = 5', 'train.train_steps' for 'train.train_steps=5';
    None for anything else (include/import statements, continuation lines)."""
    m = _KEY_RE.match(binding)
    return m.group(1) if m else None


def _display(path: str) -> str:
    """A path as the user would type it: relative when it is under the working directory."""
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


@dataclasses.dataclass
class GinSources:
    """Where the configuration came from, so that an error can name the flag or file:line."""

    files: list[str]
    bindings: list[str]
    prefixes: list[str]    # gin's search order for files: as given, then each search path

    def resolve(self, path: str) -> str | None:
        """The file gin opens for `path` (the first search prefix where it exists), or None."""
        for prefix in ([''] if os.path.isabs(path) else self.prefixes):
            if os.path.isfile(os.path.join(prefix, path)):
                return os.path.join(prefix, path)
        return None

    def where(self, key: str) -> str | None:
        """The flag or `file:line` that set `key` (a macro or `[scope/]configurable.param`) last."""
        for binding in reversed(self.bindings):
            if binding_key(binding) == key:
                return f'--gin.{binding.strip()}'
        found = None
        for path in self.files:
            found = self._where_in_file(path, key, depth=0) or found
        return found

    def _where_in_file(self, path: str, key: str, depth: int) -> str | None:
        full = self.resolve(path)
        if full is None or depth > 8:
            return None
        found = None
        with open(full) as f:
            for n, line in enumerate(f, 1):
                include = _INCLUDE_RE.match(line)
                if include:
                    found = self._where_in_file(include.group(1), key, depth + 1) or found
                elif binding_key(line) == key and not line[:1].isspace():
                    found = f'{_display(full)}:{n}'
        return found

    def files_flag(self) -> str:
        return ' '.join(f'--gin_file={f}' for f in self.files)

    def overlay_hint(self) -> str:
        """' X_tiny.gin is a tiny overlay: give its base first ...' when X.gin is missing."""
        for path in self.files:
            base = re.sub(r'_tiny\.gin$', '.gin', path)
            if base != path and base not in self.files and self.resolve(base):
                return (f' {path} is a tiny overlay: give its base run file first, '
                        f'--gin_file={base} --gin_file={path}.')
        return ''


# gin keeps its bindings in `gin.config._CONFIG` ({(scope, selector): {param: value}}) and its
# configurables in `gin.config._REGISTRY`; it has no public way to list them, which the checks need.
def _bindings() -> dict[tuple[str, str], dict[str, Any]]:
    return gin.config._CONFIG   # pylint: disable=protected-access


def _registry():
    return gin.config._REGISTRY   # pylint: disable=protected-access


def _is_macro_ref(value: Any) -> bool:
    return (isinstance(value, gin.config.ConfigurableReference) and value.evaluate
            and value.configurable.selector in ('gin.macro', 'gin.constant'))


def _macro_names() -> set[str]:
    """Macros the loaded config defines (`NAME = ...`) or uses (`%NAME`)."""
    names = {scope for scope, selector in _bindings() if selector == 'gin.macro'}
    for ref in gin.config.iterate_references(_bindings()):
        if _is_macro_ref(ref) and ref.configurable.selector == 'gin.macro':
            names.add('/'.join(ref.scopes))
    return names


def _configurable_names() -> list[str]:
    registry = _registry()
    return sorted({registry.minimal_selector(s) for s, _ in registry.items()
                   if s not in _INTERNAL_SELECTORS})


def _parameters(configurable) -> list[str] | None:
    """The parameter names gin may bind on a configurable; None when it takes **kwargs."""
    try:
        params = inspect.signature(configurable.wrapped).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _did_you_mean(name: str, candidates: Sequence[str],
                  shown: Callable[[str], str] = lambda c: f'--gin.{c}') -> str:
    """' Did you mean --gin.X?' for the closest candidates (difflib), or '' when none is close."""
    options = sorted(set(candidates))
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6) or \
        difflib.get_close_matches(name.lower(), options, n=3, cutoff=0.6)
    return ' Did you mean ' + ' or '.join(map(shown, close)) + '?' if close else ''


def _check_flag_binding(binding: str, sources: GinSources, macros: set[str],
                        flag_macros: set[str]) -> None:
    """A `--gin.KEY=...` flag must name a macro or a configurable parameter of the loaded files."""
    key = binding_key(binding)
    if key is None:
        return    # an include or import statement: gin reports its own errors
    flag = f'--gin.{binding.strip()}'
    files = ', '.join(sources.files)
    scoped_selector, dot, param = key.rpartition('.')
    if not dot:   # a macro, e.g. TRAIN_STEPS
        if key in macros or key in flag_macros:
            return
        bound = [f'{"/".join(filter(None, [scope, _registry().minimal_selector(sel)]))}.{p}'
                 for (scope, sel), params in _bindings().items()
                 if sel not in _INTERNAL_SELECTORS for p in params]
        fix = sources.overlay_hint() or _did_you_mean(key, [*macros, *bound]) or (
                f' The macros these files define: '
                f'{", ".join(sorted(m for m in macros if m.isupper()))}.')
        raise ConfigError(f'{flag}: {key} is not a macro (or configurable) of {files}, so this '
                          f'flag would set nothing.{fix}')
    selector = scoped_selector.rpartition('/')[2]
    matches = _registry().matching_selectors(selector)
    if not matches:
        fix = _did_you_mean(selector, _configurable_names(), str) or \
            f' Bindable names: {", ".join(_configurable_names())}.'
        raise ConfigError(f'{flag}: no configurable named {selector!r} is registered (the loaded '
                          f'files are {files}).{fix}')
    if len(matches) > 1:
        raise ConfigError(f'{flag}: {selector!r} matches several configurables ({matches}); '
                          f'write the one you mean in full.')
    params = _parameters(_registry()[matches[0]])
    if params is not None and param not in params:
        fix = _did_you_mean(param, params, lambda p: f'--gin.{scoped_selector}.{p}') or \
            f' Its parameters: {", ".join(params)}.'
        raise ConfigError(f'{flag}: {selector} has no parameter {param!r}.{fix}')


def _required_value(value: Any) -> bool:
    return (isinstance(value, gin.config.ConfigurableReference) and value.evaluate
            and value.configurable.selector == 'gin.constant'
            and value.scoped_configurable_fn() is gin.REQUIRED)


def _example_value(name: str) -> str:
    if name.endswith(('_DIR', '_PATH', '_CHECKPOINT', 'VOCABULARY')):
        return "\"'/path/to/it'\""
    if name.endswith('_NAME') or name.endswith('_TASK'):
        return "\"'name'\""
    return '<value>'


def _check_required(sources: GinSources) -> None:
    """Every `%gin.REQUIRED` left in the config is named with where it is required."""
    missing = []
    for (scope, selector), params in sorted(_bindings().items()):
        for param, value in params.items():
            if _required_value(value):
                name = scope if selector == 'gin.macro' else \
                    '/'.join(filter(None, [scope, _registry().minimal_selector(selector)])) + \
                    f'.{param}'
                missing.append((name, sources.where(name)))
    if missing:
        lines = [f'  {name} (required at {where or "the gin files"}): set it with '
                 f'--gin.{name}={_example_value(name)}' for name, where in missing]
        raise ConfigError('the gin files leave required values unset:\n' + '\n'.join(lines))


def _check_files(sources: GinSources) -> None:
    for path in sources.files:
        if sources.resolve(path) is not None:
            continue
        candidates = []
        for prefix in sources.prefixes:
            folder = os.path.join(prefix, os.path.dirname(path))
            if os.path.isdir(folder):
                candidates += [os.path.join(os.path.dirname(path), f)
                               for f in os.listdir(folder) if f.endswith('.gin')]
        configs = os.path.join(REPO_ROOT, 'gin_configs')
        for root, _, names in os.walk(configs):
            candidates += [os.path.relpath(os.path.join(root, n), REPO_ROOT) for n in names
                           if n.endswith('.gin')]
        searched = ', '.join(dict.fromkeys(repr(p or '.') for p in sources.prefixes))
        raise ConfigError(f'--gin_file={path}: no such file (searched {searched}; add a '
                          f'directory with --gin_search_paths).'
                          f'{_did_you_mean(path, candidates, lambda c: f"--gin_file={c}")}')


def _parse_flag_binding(binding: str) -> None:
    try:
        gin.parse_config([binding])
    except SyntaxError as e:
        key = binding_key(binding) or binding
        value = binding.partition('=')[2].strip()
        hint = (f' A string needs quotes inside the flag: --gin.{key}="\'{value}\'".'
                if value and value[0] not in '\'"[{(%@' else '')
        raise ConfigError(f'--gin.{binding.strip()}: the value is not a Python literal or gin '
                          f'reference ({str(e).splitlines()[0]}).{hint}') from e


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] | None = None,
              check_required: bool = True) -> GinSources:
    """Parses gin files, then the flag bindings, checking each (see ConfigError); files are looked
    up as given, then in the search paths (default: the current directory and the repo root).
    Returns where the configuration came from, for the entry point's own checks.
    `check_required=False` leaves `%gin.REQUIRED` values unset (the memory gate reads a recipe
    without its paths)."""
    register_configurables()
    paths = list(search_paths) if search_paths else ['.', REPO_ROOT]
    for path in paths:
        if path not in gin.config._LOCATION_PREFIXES:   # pylint: disable=protected-access
            gin.add_config_file_search_path(path)
    sources = GinSources(list(gin_files), list(bindings), ['', *paths])
    _check_files(sources)
    gin.parse_config_files_and_bindings(sources.files, [], finalize_config=False)
    macros = _macro_names()
    # A macro a flag defines is known if another flag uses it: --gin.N=5 --gin.TRAIN_STEPS=%N.
    flag_macros = {m for b in sources.bindings for m in re.findall(r'%([A-Za-z_][\w/]*)', b)}
    for binding in sources.bindings:
        _check_flag_binding(binding, sources, macros, flag_macros)
        _parse_flag_binding(binding)
    if check_required:
        _check_required(sources)
    return sources


@dataclasses.dataclass(frozen=True)
class Bound:
    """A parameter's bound value, with the name a user sets it by (the macro, if it is one)."""

    name: str
    value: Any
    where: str | None


def bound_value(key: str, sources: GinSources) -> Bound | None:
    """The value bound to `configurable.param` (macros resolved), or None when it is unbound."""
    try:
        value = gin.query_parameter(key)
    except ValueError:
        return None
    name = key
    while _is_macro_ref(value):
        if value.configurable.selector == 'gin.macro':
            name = '/'.join(value.scopes)
        value = value.scoped_configurable_fn()
    return Bound(name, value, sources.where(name))


def check_entry_bindings(entry: str, sources: GinSources, passed: Sequence[str] = ()) -> None:
    """The entry configurable's required parameters are bound (else: which file to add)."""
    configurable = _registry().get_match(entry)
    bound = _bindings().get(('', configurable.selector), {})
    params = inspect.signature(configurable.wrapped).parameters.values()
    missing = [p.name for p in params if p.default is inspect.Parameter.empty
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.name not in bound and p.name not in passed]
    if not missing:
        return
    fix = sources.overlay_hint() or (
            f' Give the run file that binds {entry} with --gin_file, or bind them, e.g. '
            f'--gin.{entry}.{missing[0]}=...')
    raise ConfigError(f'{sources.files_flag()}: nothing binds {entry}.{", ".join(missing)} '
                      f'(required).{fix}')


def check_path(key: str, sources: GinSources) -> None:
    """A bound path (MODEL_DIR, INFER_OUTPUT_DIR, ...) is a non-empty string."""
    b = bound_value(key, sources)
    if b is not None and not (isinstance(b.value, str) and b.value.strip()):
        raise ConfigError(f'{b.name}={b.value!r} (set at {b.where or "the gin files"}) must be a '
                          f'path; set it with --gin.{b.name}="\'/path/to/dir\'".')


def setup_logging() -> None:
    """INFO lines on the console. `force`: libraries imported earlier (orbax, through absl's
    `logging.vlog`) already called `logging.basicConfig()` with a WARNING-level root logger,
    which turns a plain basicConfig into a no-op. absl's logger (orbax logs each checkpoint
    save in dozens of INFO lines through it) stays at WARNING."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                        force=True)
    logging.getLogger('absl').setLevel(logging.WARNING)


def run_cli(main: Callable[[Sequence[str] | None], int], prog: str,
            argv: Sequence[str] | None = None) -> int:
    """Runs an entry point's main; a ConfigError, or a RunConfigError (an output directory that
    holds another configuration's work), is printed as a usage error (exit status 2)."""
    try:
        return main(argv)
    except (ConfigError, run_identity.RunConfigError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2


def macro_value(name: str, default: Any = None) -> Any:
    """The value of the gin macro `name` (as the loaded files and flags set it), else `default`."""
    try:
        return gin.query_parameter(f'{name}/macro.value')
    except ValueError:
        return default
