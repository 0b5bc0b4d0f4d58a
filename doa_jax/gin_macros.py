"""`--list_macros`: what a run's gin macros are, and where each is set, without running anything.

    python -m doa_jax.train --gin_file=gin_configs/runs/finetune.gin \
        --gin_file=gin_configs/runs/finetune_tiny.gin --gin.TRAIN_STEPS=5 --list_macros

prints every macro the files (and flags) define or use, with its value and where it is bound last
(the file:line, or the --gin.NAME= flag), marks the `%gin.REQUIRED` ones still unset, and exits 0.
`python -m doa_jax.infer` and `python -m doa_jax.study` take the same flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import gin

FLAG = '--list_macros'
REQUIRED = 'REQUIRED, unset'
UNBOUND = 'unbound'


@dataclasses.dataclass(frozen=True)
class Macro:
    """A macro as the loaded files and flags leave it."""

    name: str
    value: str            # as a gin file would write it; REQUIRED or UNBOUND when it has none
    where: str | None     # 'file:line' or '--gin.NAME=...' of its last binding
    required: bool        # `%gin.REQUIRED`, not set by any later file or flag

    @property
    def on_command_line(self) -> bool:
        return bool(self.where) and self.where.startswith('--gin')


def _config() -> dict:
    return gin.config._CONFIG   # pylint: disable=protected-access  (gin lists no bindings)


def _macro_ref(value: Any) -> bool:
    return (isinstance(value, gin.config.ConfigurableReference) and value.evaluate
            and value.configurable.selector in ('gin.macro', 'gin.constant'))


def _is_required(value: Any) -> bool:
    return (_macro_ref(value) and value.configurable.selector == 'gin.constant'
            and value.scoped_configurable_fn() is gin.REQUIRED)


def _names() -> list[str]:
    """Macros the config binds (`NAME = ...`) or uses (`%NAME`), in gin's scope/name form."""
    config = _config()
    names = {scope for scope, selector in config if selector == 'gin.macro'}
    for ref in gin.config.iterate_references(config):
        if _macro_ref(ref) and ref.configurable.selector == 'gin.macro':
            names.add('/'.join(ref.scopes))
    return sorted(names)


def _format(value: Any) -> str:
    if _is_required(value):
        return REQUIRED
    text = repr(value)   # gin's own syntax for literals, `@f()` and `%NAME`
    seen = set()
    while _macro_ref(value) and value.configurable.selector == 'gin.macro':
        name = '/'.join(value.scopes)
        bound = _config().get((name, 'gin.macro'), {})
        if name in seen or 'value' not in bound:
            break
        seen.add(name)
        value = bound['value']
    if value is not None and text != repr(value):
        text += f'  (= {REQUIRED if _is_required(value) else repr(value)})'
    return text


def macros(sources) -> list[Macro]:
    """Every macro of the parsed config (`sources`: gin_utils.parse_gin's GinSources), by name."""
    out = []
    for name in _names():
        bound = _config().get((name, 'gin.macro'), {})
        if 'value' in bound:
            value = bound['value']
            out.append(Macro(name, _format(value), sources.where(name), _is_required(value)))
        else:
            out.append(Macro(name, UNBOUND, None, False))
    return out


def format_macros(found: Sequence[Macro], files: Sequence[str]) -> str:
    """The listing `--list_macros` prints."""
    width = max((len(m.name) for m in found), default=0)
    vwidth = min(max((len(m.value) for m in found), default=0), 48)
    lines = [f'Macros of {" ".join(files)} (set any with --gin.NAME=VALUE; the last binding wins):']
    for m in found:
        where = m.where or ('used, bound nowhere' if m.value == UNBOUND else '?')
        if m.on_command_line:
            where = f'command line: {where}'
        lines.append(f'  {m.name:<{width}} = {m.value:<{vwidth}}  # {where}')
    missing = [m.name for m in found if m.required or m.value == UNBOUND]
    if missing:
        lines.append(f'Required, unset: {", ".join(missing)} (a run needs each, e.g. '
                     f'--gin.{missing[0]}=...).')
    else:
        lines.append('Every required macro is set.')
    return '\n'.join(lines)


def strip_flag(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether --list_macros was given, argv without it)."""
    return FLAG in argv, [a for a in argv if a != FLAG]


def list_macros(argv: Sequence[str], *, register: Callable[[], None] | None = None,
                **parse_flags_kwargs) -> int:
    """An entry point's `--list_macros`: parses its flags and gin files as a run would (a mistake
    is the same ConfigError), leaves `%gin.REQUIRED` macros unset instead of failing, prints the
    listing and returns 0. `register` adds the entry point's own configurables first."""
    from doa_jax import gin_utils
    _, argv = strip_flag(argv)
    args = gin_utils.parse_flags(argv, **parse_flags_kwargs)
    if register is not None:
        register()
    search = args.gin_search_paths.split(',') if args.gin_search_paths else None
    sources = gin_utils.parse_gin(args.gin_file, args.gin_bindings, search, check_required=False)
    print(format_macros(macros(sources), args.gin_file))
    return 0
