"""A study's feature lengths and packing: each stage resolves its task's measured lengths as a
run does, and a packed stage's epochs rule counts the rows the trainer's packing makes. Unit
tests: tasks over hand-made files, no training run, no study."""

from __future__ import annotations

import json
import math
import types

import gin
import pytest
import seqio

import tasks  # noqa: F401  registers the paper tasks and records their measured lengths
from doa_jax.cost import default_prices
from doa_jax.cost.cost_model import ComputeCostModel
from doa_jax.study import data as data_lib
from doa_jax.study import runner
from doa_jax.study.report import length_lines
from tasks.paper_tasks import FEATURE_LENGTHS

# Six examples of one size. Byte vocabulary: a token per UTF-8 byte, plus EOS. Inputs are
# 'toy: ' + a 3-letter source = 8 bytes + EOS = 9 tokens; targets 'xy' + EOS = 3 tokens.
SOURCES = ['abc', 'bcd', 'cde', 'def', 'efg', 'fgh']
INPUT_TOKENS, TARGET_TOKENS = 9, 3


def _data(lengths_task: str | None = None) -> data_lib.StudyData:
    rows = [{'source': s, 'target': 'xy'} for s in SOURCES]
    return data_lib.StudyData(name='hand', prefix='toy: ', train=rows, eval=rows[:2],
                              metric_fns=[], metric='micro_f1',
                              vocabulary=seqio.ByteVocabulary(), price_key='hand',
                              lengths_task=lengths_task)


def _settings(tmp_path, data, stage, lengths=None, default=None) -> runner.StudySettings:
    return runner.StudySettings(study_dir=str(tmp_path), data=data, teacher=stage, student=stage,
                                task_feature_lengths=lengths, default_feature_lengths=default,
                                prices=default_prices(), seed=0, show_progress=False,
                                cost_model=ComputeCostModel(device_kind='cpu'))


def _task(tmp_path, data, name='doa_test_study_lengths') -> str:
    path = data_lib.write_jsonl(str(tmp_path / 'train.jsonl'), data.train)
    return data_lib.register_train_task(name, data, path, path)


@pytest.mark.parametrize('inputs, per_row', [(20, 2), (27, 3)])
def test_packed_steps_count_the_rows_the_trainer_packs(tmp_path, inputs, per_row):
    """Rows counted by hand: a row holds as many 9-token inputs as `inputs` takes (2 in 20, 3 in
    27; the 3-token targets fit 12 either way), so 6 examples make 3 or 2 rows, and 2 epochs at
    batch 4 are ceil(2 x rows / 4) steps; unpacked, ceil(2 x 6 / 4) = 3."""
    lengths = {'inputs': inputs, 'targets': 12}
    assert per_row == inputs // INPUT_TOKENS and per_row * TARGET_TOKENS <= 12
    rows = math.ceil(len(SOURCES) / per_row)
    packed = runner.StageConfig(epochs=2, batch_size=4, pack=True, task_feature_lengths=lengths)
    data = _data()
    s = _settings(tmp_path, data, packed)
    task = _task(tmp_path, data)
    assert runner.train_rows(s, packed, task, lengths, len(SOURCES)) == rows
    assert packed.steps(rows) == math.ceil(2 * rows / 4)
    unpacked = runner.StageConfig(epochs=2, batch_size=4, task_feature_lengths=lengths)
    assert runner.train_rows(s, unpacked, task, lengths, len(SOURCES)) == len(SOURCES)
    assert unpacked.steps(len(SOURCES)) == 3


def test_a_packed_student_trains_the_stated_epochs(tmp_path, monkeypatch):
    """The study hands the trainer ceil(epochs x packed rows / batch) steps and records them."""
    lengths = {'inputs': 20, 'targets': 8}
    stage = runner.StageConfig(epochs=2, batch_size=4, pack=True, task_feature_lengths=lengths)
    data = _data()
    s = _settings(tmp_path, data, stage)
    calls = []

    def train(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(state=types.SimpleNamespace(params=None))
    from doa_jax import trainer
    monkeypatch.setattr(trainer, 'train', train)
    monkeypatch.setattr(runner, '_evaluate', lambda s_, stage, params, task, cache:
                        {'task/micro_f1': 50.0})
    rec = runner._train_student(s, {'point_id': 'annotate_N6_B1'}, data.train, None)
    assert calls[0]['train_steps'] == rec['student_steps'] == math.ceil(2 * 3 / 4)
    assert calls[0]['pack'] is True and calls[0]['task_feature_lengths'] == lengths
    assert rec['student_rows_per_epoch'] == 3 and rec['student_pack'] is True
    stage_json = json.loads((tmp_path / 'points' / 'annotate_N6_B1' / 'student' /
                             'stage.json').read_text())
    assert (stage_json['rows_per_epoch'], stage_json['train_steps']) == (3, 2)


def test_a_stage_without_lengths_takes_the_measured_ones(tmp_path, monkeypatch):
    """TASK_FEATURE_LENGTHS None: a study task over a paper dataset's data resolves the lengths
    recorded for that dataset (WLP, byte vocabulary) through lengths.resolve, as a run on it
    would; a stage's own or the study's lengths override them; a task with none recorded takes
    DEFAULT_FEATURE_LENGTHS, and without a default the error names the fix."""
    wlp = FEATURE_LENGTHS['byte']['wlp']
    default = {'inputs': 256, 'targets': 256}
    data = _data(lengths_task=data_lib.paper_lengths_task('wlp'))
    stage = runner.StageConfig()
    s = _settings(tmp_path, data, stage, default=default)
    task = _task(tmp_path, data)
    assert runner.stage_lengths(s, stage, task) == (wlp, f'measured for {task} (byte)')
    calls = []
    from doa_jax import trainer
    monkeypatch.setattr(trainer, 'train', lambda **kw: calls.append(kw))
    runner._train(s, stage, str(tmp_path / 'teacher'), task, 6)
    assert calls[0]['task_feature_lengths'] == wlp
    recorded = json.loads((tmp_path / 'teacher' / 'stage.json').read_text())
    assert recorded['task_feature_lengths'] == wlp
    assert recorded['lengths_source'].startswith('measured for')
    # The teacher pseudo-labels with them too.
    kwargs = runner.pseudo_label_kwargs(s, runner.stage_lengths(s, stage, task)[0])
    assert (kwargs['max_input_length'], kwargs['max_decode_length']) == (
            wlp['inputs'], wlp['targets'] - 1)

    own = {'inputs': 64, 'targets': 16}
    assert runner.stage_lengths(s, runner.StageConfig(task_feature_lengths=own), task) == (
            own, 'StageConfig.task_feature_lengths')
    study = _settings(tmp_path, data, stage, lengths={'inputs': 32, 'targets': 8})
    assert runner.stage_lengths(study, stage, task) == ({'inputs': 32, 'targets': 8},
                                                        'TASK_FEATURE_LENGTHS')
    plain = _task(tmp_path, _data(), name='doa_test_study_no_lengths')
    assert runner.stage_lengths(s, stage, plain) == (default, 'DEFAULT_FEATURE_LENGTHS')
    with pytest.raises(ValueError, match='python -m doa_jax.data lengths'):
        runner.stage_lengths(_settings(tmp_path, _data(), stage), stage, plain)


def _stages(files, *bindings) -> dict:
    from doa_jax.benchmark.recipe import read_recipe
    try:
        recipe = read_recipe(files, list(bindings))
    finally:
        gin.clear_config()
    return {name: stage for name, stage, _ in recipe.stages}


def test_the_gate_plans_the_lengths_a_study_resolves():
    """The memory gate reads wlp_gpu.gin's stages at the lengths the study resolves: with
    VOCABULARY given, those measured for its dataset; unset (the shipped command), the study's
    DEFAULT_FEATURE_LENGTHS, saying why. Its stages pack."""
    wlp = FEATURE_LENGTHS['byte']['wlp']
    stages = _stages(['gin_configs/studies/wlp_gpu.gin'], "VOCABULARY='byte'")
    for name in ('teacher', 'student'):
        assert stages[name].lengths == wlp and stages[name].pack
        assert stages[name].lengths_source == 'measured for doa_wlp (byte)'
    assert (stages['pseudo_label'].max_input_length,
            stages['pseudo_label'].max_decode_length) == (wlp['inputs'], wlp['targets'] - 1)
    stages = _stages(['gin_configs/studies/wlp_gpu_40gb.gin'])
    assert stages['teacher'].lengths == {'inputs': 256, 'targets': 256}
    assert stages['teacher'].lengths_source.startswith('DEFAULT_FEATURE_LENGTHS (VOCABULARY unset')
    assert stages['teacher'].optimizer_name == 'adafactor' and stages['student'].pack


def test_the_report_names_each_stages_lengths_and_packing():
    records = [{'teacher_feature_lengths': {'inputs': 480, 'targets': 784},
                'teacher_lengths_source': 'measured for doa_study_teacher_M1000 (byte)',
                'teacher_pack': True, 'student_feature_lengths': {'inputs': 72, 'targets': 88},
                'student_lengths_source': 'TASK_FEATURE_LENGTHS', 'student_pack': False}] * 2
    assert length_lines(records) == [
            '- Teachers trained with 480 input / 784 target tokens (measured for '
            'doa_study_teacher_M1000 (byte)), packed rows.',
            '- Students trained with 72 input / 88 target tokens (TASK_FEATURE_LENGTHS), one '
            'example per row.']
