"""Discoverable gin: `--list_macros` at the entry points, the run files' "Required / Commonly
overridden" headers, and `_tiny` overlays that only shrink sizes."""

from __future__ import annotations

import ast
import pathlib
import re

import gin
import pytest

from doa_jax import gin_utils, infer, train
from doa_jax.study import __main__ as study_main

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE_TINY = ['--gin_file=gin_configs/runs/finetune.gin',
                 '--gin_file=gin_configs/runs/finetune_tiny.gin']


pytestmark = pytest.mark.usefixtures('gin_at_repo_root')


def _line_of(path: str, key: str) -> str:
    """'path:N' of the line that binds `key` at the start of a line (the file's text, not gin)."""
    lines = (REPO / path).read_text().splitlines()
    binds = re.compile(rf'{key}\s*=')
    return f'{path}:{next(i for i, line in enumerate(lines, 1) if binds.match(line))}'


def _listing(main, argv, capsys) -> tuple[dict[str, tuple[str, str]], str]:
    """{macro: (value, where)} and the whole text printed by `main(argv + ['--list_macros'])`."""
    assert main(argv + ['--list_macros']) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r'  (\S+)\s+= (.*?)\s+# (.*)$', line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows, out


# ---- --list_macros -----------------------------------------------------------------------------
def test_list_macros_shows_values_and_the_file_and_line_that_set_them(tmp_path, capsys):
    rows, out = _listing(train.main, FINETUNE_TINY + ['--gin.TRAIN_STEPS=5'], capsys)
    # The overlay's sizes override the base file's; the base file's own values stay.
    assert rows['BATCH_SIZE'] == ('8', _line_of('gin_configs/runs/tiny.gin', 'BATCH_SIZE'))
    assert rows['MIXTURE_OR_TASK_NAME'] == (
            "'doa_toy'", _line_of('gin_configs/runs/finetune_tiny.gin', 'MIXTURE_OR_TASK_NAME'))
    assert rows['OPTIMIZER'] == ("'adamw'", _line_of('gin_configs/runs/finetune.gin', 'OPTIMIZER'))
    assert rows['TASK_FEATURE_LENGTHS'] == ("{'inputs': 48, 'targets': 8}",
                                            _line_of('gin_configs/runs/tiny.gin',
                                                     'TASK_FEATURE_LENGTHS'))
    # A flag wins over both files, and says so.
    assert rows['TRAIN_STEPS'] == ('5', 'command line: --gin.TRAIN_STEPS=5')
    # The required macro nobody set is listed as such, where it is required.
    assert rows['MODEL_DIR'] == ('REQUIRED, unset',
                                 _line_of('gin_configs/runs/finetune.gin', 'MODEL_DIR'))
    assert out.rstrip().splitlines()[-1].startswith('Required, unset: MODEL_DIR ')
    # Every macro finetune.gin declares is listed, and nothing else.
    declared = set(re.findall(r'^([A-Z][A-Z0-9_]*)\s*=', (REPO / 'gin_configs/runs/finetune.gin')
                              .read_text(), flags=re.M))
    assert set(rows) == declared


def test_list_macros_with_every_required_macro_set_runs_nothing(tmp_path, capsys):
    model_dir = tmp_path / 'run'
    rows, out = _listing(train.main, FINETUNE_TINY + [f"--gin.MODEL_DIR='{model_dir}'"], capsys)
    assert rows['MODEL_DIR'] == (repr(str(model_dir)),
                                 f"command line: --gin.MODEL_DIR='{model_dir}'")
    assert out.rstrip().endswith('Every required macro is set.')
    assert not model_dir.exists()   # listed, not trained


def test_list_macros_reports_the_same_mistakes_as_a_run(capsys):
    with pytest.raises(gin_utils.ConfigError, match='Did you mean --gin.TRAIN_STEPS'):
        train.main(FINETUNE_TINY + ['--gin.TRAIN_STEP=5', '--list_macros'])


def test_list_macros_shows_a_configurable_reference_unevaluated(capsys):
    rows, _ = _listing(train.main, ['--gin_file=gin_configs/runs/distill_seq.gin',
                                    '--gin_file=gin_configs/runs/distill_seq_tiny.gin'], capsys)
    assert rows['MIXTURE_OR_TASK_NAME'] == (
            '@doa_jax.pseudo_labeled_task()',
            _line_of('gin_configs/runs/distill_seq.gin', 'MIXTURE_OR_TASK_NAME'))
    assert rows['INFER_OUTPUT_DIR'][0] == 'REQUIRED, unset'
    assert rows['EVAL_TASK'] == ("'doa_toy'", _line_of('gin_configs/runs/distill_seq_tiny.gin',
                                                       'EVAL_TASK'))


def test_infer_and_study_list_their_macros(capsys):
    rows, out = _listing(infer.main, ['--gin_file=gin_configs/runs/pseudo_label.gin',
                                      '--gin_file=gin_configs/runs/pseudo_label_tiny.gin',
                                      '--gin.TOP_K=4'], capsys)
    assert rows['MAX_DECODE_LENGTH'] == (
            '8', _line_of('gin_configs/runs/pseudo_label_tiny.gin', 'MAX_DECODE_LENGTH'))
    assert rows['TOP_K'] == ('4', 'command line: --gin.TOP_K=4')
    assert 'Required, unset: CHECKPOINT_PATH, INFER_OUTPUT_DIR ' in out
    gin.clear_config()
    rows, out = _listing(study_main.main, ['--gin_file=gin_configs/studies/quickstart.gin',
                                           '--gin_file=gin_configs/studies/quickstart_tiny.gin'],
                         capsys)
    assert rows['SHOW_PROGRESS'] == (
            'False', _line_of('gin_configs/studies/quickstart_tiny.gin', 'SHOW_PROGRESS'))
    assert rows['STUDENT_MODEL'] == (
            "'t5_1_1_tiny'", _line_of('gin_configs/studies/quickstart.gin', 'STUDENT_MODEL'))
    assert 'Required, unset: STUDY_DIR ' in out


# ---- headers -----------------------------------------------------------------------------------
# Run files, study files and their overlays; the models/ files hold a model only.
HEADED = sorted(str(p.relative_to(REPO)) for d in ('runs', 'studies', 't5x/runs')
                for p in (REPO / 'gin_configs' / d).glob('*.gin'))
# The run file an overlay is given after; the generic tiny overlays go with any run file.
BASE = {'gin_configs/runs/finetune_teacher_40gb.gin': 'gin_configs/runs/finetune_teacher.gin',
        'gin_configs/runs/tiny.gin': None, 'gin_configs/t5x/runs/tiny.gin': None}
_INCLUDE = re.compile(r"""^include\s+['"]([^'"]+)['"]""")
_MACRO = re.compile(r'^([A-Za-z_]\w*)\s*=\s*(.*)$')


def _base(path: str) -> str | None:
    if path in BASE:
        return BASE[path]
    base = re.sub(r'_tiny\.gin$', '.gin', path)
    return base if base != path else None


def _macros(paths, bound=None, used=None) -> tuple[dict[str, str], set[str]]:
    """{macro: the text of its last binding} and the macros used (%NAME), read from the files'
    text and their includes in gin's order: independent of gin and of doa_jax's listing."""
    bound = {} if bound is None else bound
    used = set() if used is None else used
    for path in paths:
        for line in (REPO / path).read_text().splitlines():
            code = line.split('#', 1)[0].rstrip()
            include = _INCLUDE.match(code)
            if include:
                _macros([include.group(1)], bound, used)
                continue
            m = _MACRO.match(code)
            if m:
                bound[m.group(1)] = m.group(2).strip()
            used |= set(re.findall(r'%([A-Za-z_]\w*)(?![\w.])', code))
    return bound, used


def _required(paths) -> set[str]:
    bound, used = _macros(paths)
    return {n for n, v in bound.items() if v == '%gin.REQUIRED'} | (used - set(bound))


def _header(path: str) -> dict[str, list[str]]:
    """The macros the opening comment lists under 'Required' and 'Commonly overridden'."""
    lines = (REPO / path).read_text().splitlines()
    opening = lines[:next(i for i, l in enumerate(lines) if l.strip() and not l.startswith('#'))]
    sections, current = {}, None
    for line in opening:
        for title in ('Required', 'Commonly overridden'):
            if line.startswith(f'# {title}'):
                current = sections.setdefault(title, [])
        if line.strip() == '#':
            current = None
        m = re.match(r'#   ([A-Z][A-Z0-9_]*(?:, [A-Z][A-Z0-9_]*)*)\s', line)
        if current is not None and m:
            current.extend(m.group(1).split(', '))
    return sections


def test_every_run_and_study_file_is_headed():
    assert len(HEADED) >= 25 and 'gin_configs/runs/finetune.gin' in HEADED


@pytest.mark.parametrize('path', HEADED)
def test_header_lists_what_the_file_really_requires_and_binds(path):
    sections = _header(path)
    assert set(sections) == {'Required', 'Commonly overridden'}, \
        f'{path}: its opening comment needs "# Required" and "# Commonly overridden" sections'
    if path in BASE and BASE[path] is None:   # a generic overlay: its run file's
        files = [path]
        assert not sections['Required']
    else:
        files = [f for f in (_base(path), path) if f]
        assert sorted(sections['Required']) == sorted(_required(files)), path
    bound, _ = _macros([_base(path) or path, path] if _base(path) else [path])
    assert set(sections['Commonly overridden']) <= set(bound), \
        f'{path} lists macros it does not bind: {set(sections["Commonly overridden"]) - set(bound)}'
    assert sections['Commonly overridden'], path


# ---- _tiny overlays: sizes only ----------------------------------------------------------------
OVERLAYS = sorted(str(p.relative_to(REPO)) for p in (REPO / 'gin_configs').rglob('*_tiny.gin')
                  if 'models' not in p.parts) + ['gin_configs/runs/tiny.gin']


def test_the_eight_overlays_and_their_shared_sizes_are_checked():
    assert len(OVERLAYS) == 9


@pytest.mark.parametrize('path', OVERLAYS)
def test_overlay_sets_only_plain_values_of_its_base_files_macros(path):
    """No import, no configurable binding, no reference (@f(), %M), no other run's overlay: plain
    values of macros the base file declares, and the tiny model and shared sizes files."""
    base = _base(path) or 'gin_configs/runs/finetune.gin'
    declared, _ = _macros([base])
    for n, line in enumerate((REPO / path).read_text().splitlines(), 1):
        code = line.split('#', 1)[0].strip()
        if not code:
            continue
        include = _INCLUDE.match(code)
        if include:
            assert include.group(1) in ('gin_configs/models/t5_1_1_tiny.gin',
                                        'gin_configs/runs/tiny.gin'), f'{path}:{n}: {code}'
            continue
        m = _MACRO.match(code)
        assert m and m.group(1).isupper(), f'{path}:{n}: not a macro binding: {code}'
        assert m.group(1) in declared, f'{path}:{n}: {m.group(1)} is not a macro of {base}'
        ast.literal_eval(m.group(2))   # a plain value, no @reference or %macro


def _wiring() -> dict[str, str]:
    """Every configurable binding's value as written, and each macro bound to a configurable
    reference (the pipeline's wiring: which functions run, and what they are given)."""
    out = {}
    for (scope, selector), params in gin.config._CONFIG.items():   # pylint: disable=protected-access
        for param, value in params.items():
            if selector == 'gin.macro':
                if isinstance(value, gin.config.ConfigurableReference) and \
                        value.configurable.selector not in ('gin.macro', 'gin.constant'):
                    out[scope] = repr(value)
            elif not (selector.endswith('get_model_config') and param == 'name'):
                out[f'{scope}/{selector}.{param}'] = repr(value)
    return out


@pytest.mark.parametrize('path', [p for p in OVERLAYS if _base(p)])
def test_overlay_leaves_its_base_files_wiring_alone(path):
    """The base file alone and with the overlay bind the same functions to the same parameters;
    only macro values (and the model's name) differ."""
    gin_utils.register_configurables()
    gin.add_config_file_search_path(str(REPO))
    wiring = []
    for files in ([_base(path)], [_base(path), path]):
        gin.clear_config()
        gin.parse_config_files_and_bindings(files, [], finalize_config=False)
        wiring.append(_wiring())
    assert wiring[0] == wiring[1]
