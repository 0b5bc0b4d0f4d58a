"""Mistakes at the entry points fail before anything runs, saying what, where and how to fix it;
runs end with a one-line summary on the console."""

from __future__ import annotations

import logging
import os
import pathlib
import sqlite3
import sys
import time

import gin
import pytest

from doa_jax import gin_utils, infer, pseudo_label, train, trainer
from doa_jax.cost import Ledger, LedgerError
from doa_jax.study import __main__ as study_main

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE = ['gin_configs/runs/finetune.gin', 'gin_configs/runs/finetune_tiny.gin']
TRAIN_FLAGS = [f'--gin_file={f}' for f in FINETUNE]
PSEUDO_LABEL = ['gin_configs/runs/pseudo_label.gin', 'gin_configs/runs/pseudo_label_tiny.gin']


pytestmark = pytest.mark.usefixtures('gin_at_repo_root')


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    absl_level = logging.getLogger('absl').level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger('absl').setLevel(absl_level)


def _line_of(path: str, text: str) -> int:
    lines = (REPO / path).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(text))


# ---- 1. a --gin.NAME flag must name something in the loaded config ----------------------------
def test_misspelled_macro_flag_fails_before_training_and_suggests_the_macro(tmp_path):
    run = tmp_path / 'run'
    with pytest.raises(gin_utils.ConfigError) as e:
        train.main(TRAIN_FLAGS + [f"--gin.MODEL_DIR='{run}'", '--gin.TRAIN_STEP=5'])
    assert str(e.value).startswith('--gin.TRAIN_STEP=5: TRAIN_STEP is not a macro')
    assert 'Did you mean --gin.TRAIN_STEPS?' in str(e.value)
    assert not run.exists()


@pytest.mark.parametrize('binding,suggestion', [
    ('train.trian_steps=5', 'Did you mean --gin.train.train_steps'),
    ('trian.train_steps=5', 'Did you mean train?'),
    ('train_steps=5', 'Did you mean --gin.train.train_steps?'),
    ('LEARNING_RTE=0.1', 'Did you mean --gin.LEARNING_RATE?'),
])
def test_misspelled_flag_names_suggest_the_closest_names(binding, suggestion):
    with pytest.raises(gin_utils.ConfigError) as e:
        gin_utils.parse_gin(FINETUNE, ["MODEL_DIR='/tmp/unused'", binding])
    assert str(e.value).startswith(f'--gin.{binding}:')
    assert suggestion in str(e.value)


def test_gin_bindings_flag_is_checked_like_gin_dot():
    args = gin_utils.parse_flags(TRAIN_FLAGS + ['--gin_bindings=TRAIN_STEP=5'])
    with pytest.raises(gin_utils.ConfigError, match='Did you mean --gin.TRAIN_STEPS'):
        gin_utils.parse_gin(args.gin_file, args.gin_bindings)


def test_macro_defined_by_one_flag_and_used_by_another_is_accepted():
    sources = gin_utils.parse_gin(FINETUNE, ["MODEL_DIR='/tmp/unused'", 'N_STEPS=7',
                                             'TRAIN_STEPS=%N_STEPS', 'train.eval_steps=2'])
    assert gin_utils.bound_value('train.train_steps', sources).value == 7
    assert gin.query_parameter('train.eval_steps') == 2


def test_unquoted_string_flag_says_how_to_quote_it():
    with pytest.raises(gin_utils.ConfigError) as e:
        gin_utils.parse_gin(FINETUNE, ['MODEL_DIR=/tmp/run'])
    assert str(e.value).startswith('--gin.MODEL_DIR=/tmp/run: the value is not a Python literal')
    assert '--gin.MODEL_DIR="\'/tmp/run\'"' in str(e.value)


def test_overlay_without_its_base_says_which_file_to_add():
    with pytest.raises(gin_utils.ConfigError) as e:
        gin_utils.parse_gin(FINETUNE[1:], ["MODEL_DIR='/tmp/unused'"])
    assert ('--gin_file=gin_configs/runs/finetune.gin '
            '--gin_file=gin_configs/runs/finetune_tiny.gin') in str(e.value)
    gin.clear_config()
    sources = gin_utils.parse_gin(FINETUNE[1:], [])
    with pytest.raises(gin_utils.ConfigError, match=r'nothing binds train\.model_dir, '
                                                    r'model_config.*finetune\.gin --gin_file'):
        gin_utils.check_entry_bindings('train', sources)


# ---- 2. TRAIN_STEPS must be positive ----------------------------------------------------------
@pytest.mark.parametrize('steps', [0, -5])
def test_non_positive_train_steps_fails_before_training(tmp_path, steps):
    run = tmp_path / 'run'
    with pytest.raises(gin_utils.ConfigError) as e:
        train.main(TRAIN_FLAGS + [f"--gin.MODEL_DIR='{run}'", f'--gin.TRAIN_STEPS={steps}'])
    assert str(e.value).startswith(f'TRAIN_STEPS={steps} (set at --gin.TRAIN_STEPS={steps})')
    assert 'positive whole number of steps' in str(e.value)
    assert '--gin.TRAIN_STEPS=1000' in str(e.value)
    assert not run.exists()


def test_train_steps_error_names_the_gin_file_line_that_set_it(tmp_path):
    overlay = tmp_path / 'zero_steps.gin'
    overlay.write_text('# an overlay with a bad value\nTRAIN_STEPS = 0\n')
    sources = gin_utils.parse_gin([*FINETUNE, str(overlay)], ["MODEL_DIR='/tmp/unused'"])
    with pytest.raises(gin_utils.ConfigError, match=f'TRAIN_STEPS=0 \\(set at {overlay}:2\\)'):
        train.check_bindings(sources)
    gin.clear_config()
    train.check_bindings(gin_utils.parse_gin(FINETUNE, ["MODEL_DIR='/tmp/unused'",
                                                        'TRAIN_STEPS=1']))


# ---- 3. missing gin files and required values -------------------------------------------------
@pytest.mark.parametrize('main,prog,example,flags', [
    (train.main, 'python -m doa_jax.train', 'gin_configs/runs/finetune.gin',
     ["--gin.MODEL_DIR='/tmp/unused'"]),
    (infer.main, 'python -m doa_jax.infer', 'gin_configs/runs/pseudo_label.gin',
     ["--gin.CHECKPOINT_PATH='/tmp/unused'"]),
    (study_main.main, 'python -m doa_jax.study', 'gin_configs/studies/quickstart.gin',
     ["--gin.STUDY_DIR='/tmp/unused'"]),
])
def test_no_gin_file_is_a_usage_error_of_that_entry_point(capsys, main, prog, example, flags):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f'{prog}: error: give at least one --gin_file, e.g. --gin_file={example}' in err


def test_gin_file_that_does_not_exist_suggests_the_closest_file():
    with pytest.raises(gin_utils.ConfigError) as e:
        gin_utils.parse_gin(['gin_configs/runs/finetun.gin'], [])
    assert str(e.value).startswith('--gin_file=gin_configs/runs/finetun.gin: no such file')
    assert 'Did you mean --gin_file=gin_configs/runs/finetune.gin' in str(e.value)


def test_unset_required_macro_is_named_with_its_file_line_for_each_entry_point():
    line = _line_of('gin_configs/runs/finetune.gin', 'MODEL_DIR = %gin.REQUIRED')
    with pytest.raises(gin_utils.ConfigError) as e:
        train.main(TRAIN_FLAGS)
    assert f'MODEL_DIR (required at gin_configs/runs/finetune.gin:{line})' in str(e.value)
    assert '--gin.MODEL_DIR="\'/path/to/it\'"' in str(e.value)

    gin.clear_config()
    with pytest.raises(gin_utils.ConfigError) as e:
        infer.main([f'--gin_file={f}' for f in PSEUDO_LABEL])
    assert 'CHECKPOINT_PATH (required at gin_configs/runs/pseudo_label.gin:' in str(e.value)
    assert 'INFER_OUTPUT_DIR (required at gin_configs/runs/pseudo_label.gin:' in str(e.value)

    gin.clear_config()
    with pytest.raises(gin_utils.ConfigError, match=r'STUDY_DIR \(required at gin_configs/'
                                                    r'studies/quickstart.gin:\d+\)'):
        study_main.main(['--gin_file=gin_configs/studies/quickstart.gin'])


def test_model_dir_none_is_named_instead_of_a_type_error(tmp_path):
    with pytest.raises(gin_utils.ConfigError, match=r"MODEL_DIR=None \(set at "
                                                    r"--gin.MODEL_DIR=None\) must be a path"):
        train.main(TRAIN_FLAGS + ['--gin.MODEL_DIR=None'])


def test_command_line_prints_config_errors_without_a_traceback(capsys):
    code = gin_utils.run_cli(train.main, train.PROG, TRAIN_FLAGS + ['--gin.TRAIN_STEP=5'])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('python -m doa_jax.train: error: --gin.TRAIN_STEP=5: ')
    assert 'Traceback' not in err


# ---- 4. an unwritable ledger names its file and the fix ---------------------------------------
def test_read_only_ledger_names_the_file_and_how_to_fix(tmp_path, monkeypatch):
    Ledger(tmp_path).begin_attempt('run', 'train', 0)
    path = str(tmp_path / 'cost_ledger.sqlite')
    connect = sqlite3.connect

    def read_only(database, *args, uri=False, **kwargs):   # what a chmod a-w file gives
        return connect(f'file:{database}?mode=ro', *args, uri=True, **kwargs)

    monkeypatch.setattr(sqlite3, 'connect', read_only)
    ledger = Ledger(tmp_path, timeout_s=120)
    t0 = time.monotonic()
    with pytest.raises(LedgerError) as e:
        ledger.begin_attempt('run', 'train', 0)
    assert time.monotonic() - t0 < 30      # no retrying for the lock timeout: it will not change
    assert f"cannot write the cost ledger '{path}'" in str(e.value)
    assert 'readonly' in str(e.value)
    assert f'chmod u+w {path} {path}-wal {path}-shm {tmp_path}' in str(e.value)
    assert 'MODEL_DIR' in str(e.value)


# ---- 5. INFO reaches the console; the runs end with a summary ---------------------------------
def test_setup_logging_wins_over_a_library_s_earlier_basic_config(capsys, restore_logging):
    root = logging.getLogger()
    # What importing orbax does (absl's vlog calls logging.basicConfig()): a WARNING root logger
    # with a handler already, so a plain basicConfig(level=INFO) changes nothing.
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    root.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO)
    logging.info('lost before the fix')
    gin_utils.setup_logging()
    logging.info('summary line')
    logging.getLogger('absl').info('orbax checkpoint chatter')
    err = capsys.readouterr().err
    assert 'INFO summary line' in err
    assert 'lost before the fix' not in err and 'chatter' not in err


def _record_steps(model_dir, first, last, usd):
    ledger = Ledger(model_dir)
    attempt = ledger.begin_attempt(os.path.basename(model_dir), 'train', first - 1)
    ledger.record_steps(os.path.basename(model_dir), 'train', attempt, first, last,
                        seconds=usd * 3600, device_kind='cpu', device_count=1,
                        usd_per_device_hour=1.0)
    ledger.close()


def test_train_main_logs_steps_stop_reason_cost_and_outputs(tmp_path, monkeypatch, capsys,
                                                            restore_logging):
    run = tmp_path / 'run'

    def fake_training(argv, summary):   # the trainer's hooks, without the minutes of training
        run.mkdir()
        summary.on_train_start(model_dir=str(run), start_step=0, mesh=None)
        _record_steps(str(run), 1, 60, usd=0.01)
        return trainer.TrainResult(step=60, reason='done', state=None, history=[])

    monkeypatch.setattr(gin_utils, 'run_configured_training', fake_training)
    assert train.main(TRAIN_FLAGS + [f"--gin.MODEL_DIR='{run}'"]) == 0
    err = capsys.readouterr().err
    assert (f'INFO train: done at step 60 (ran 60 steps from step 0); cost $0.0100 in '
            f'{run}/cost_ledger.sqlite; checkpoints {run}/checkpoints, run record '
            f'{run}/config.gin.') in err


def test_train_summary_of_a_resumed_stopped_and_an_unmetered_run(tmp_path):
    run = tmp_path / 'run'
    _record_steps(str(run), 1, 30, usd=0.02)
    summary = gin_utils.RunSummary()
    summary.on_train_start(model_dir=str(run), start_step=30, mesh=None)
    _record_steps(str(run), 31, 40, usd=0.01)
    line = summary.line(trainer.TrainResult(step=40, reason='stopped', state=None, history=[]))
    assert line.startswith('train: stopped early by a callback (BUDGET_USD cap or StopAtStep) '
                           'at step 40 (ran 10 steps from step 30); cost $0.0100 (run total '
                           '$0.0300)')
    assert line.endswith(f'run record {run}/config.resume_30.gin.')

    summary.on_train_start(model_dir=str(run), start_step=40, mesh=None)
    line = summary.line(trainer.TrainResult(step=40, reason='done', state=None, history=[]))
    assert 'ran 0 steps from step 40); the checkpoint in MODEL_DIR had already reached ' \
           'TRAIN_STEPS' in line

    unmetered = gin_utils.RunSummary()
    unmetered.on_train_start(model_dir=str(tmp_path / 'other'), start_step=0, mesh=None)
    line = unmetered.line(trainer.TrainResult(step=5, reason='done', state=None, history=[]))
    assert 'cost not metered (no ledger; bind train.callbacks = [@CostCallback()])' in line


def test_infer_summary_names_chunks_cost_and_output(tmp_path):
    out = tmp_path / 'pl'
    sources = gin_utils.parse_gin(PSEUDO_LABEL, [f"CHECKPOINT_PATH='{tmp_path / 'teacher'}'",
                                                 f"INFER_OUTPUT_DIR='{out}'"])
    assert 'cost not metered' in infer.summary_line(pseudo_label.ShardResult(0, 0, 0, 0), sources)
    ledger = Ledger(tmp_path)
    ledger.record_compute('pl', 'pseudo_label', 0, 7, seconds=36.0, device_kind='cpu',
                          device_count=1, usd_per_device_hour=1.0)
    ledger.close()
    line = infer.summary_line(pseudo_label.ShardResult(0, 1, 2, 8), sources)
    assert line == (f'infer: shard 0 done: 1 chunks written, 2 already complete, 8 examples; '
                    f'cost $0.0100 in {tmp_path}/cost_ledger.sqlite; output {out}.')
    line = infer.summary_line(pseudo_label.ShardResult(0, 1, 0, 8, stopped_by_budget=True),
                              sources)
    assert line.startswith('infer: shard 0 stopped at the budget (infer.max_usd): ')
