"""Flags and gin files into checked bindings: t5x's flags, the configuration checks, the values.

`parse_flags` reads t5x's flags (--gin_file, --gin.NAME=VALUE, --gin_bindings, --gin_search_paths)
and the multi-process ones; `parse_gin` parses the files, then the flag bindings, and checks the
configuration before anything runs: a `--gin.NAME=` flag that names nothing in the loaded files, a
`%gin.REQUIRED` macro left unset, or a gin file that does not exist is a `ConfigError` that says
where (flag, file:line) and how to fix it; `check_entry_bindings` does the same for an entry
configurable that no file binds. `bound_value` and `macro_value` read the values back.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

import gin

from doa_jax import run_identity
from doa_jax.gin_utils.configurables import register_configurables

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    parser.add_argument('--list_macros', action='store_true',
                        help='print every macro, its value and the file:line or flag that sets '
                             'it last (doa_jax.gin_macros), then exit without running.')
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
