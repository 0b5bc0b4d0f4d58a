"""The study runner: the quickstart's tiny overlay end to end, resume, budgeted pseudo-labels."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import gin
import matplotlib.image as mpimg
import pytest

from doa_jax import pseudo_label as pl
from doa_jax.cost import Ledger, default_prices
from doa_jax.cost.cost_model import ComputeCostModel
from doa_jax.data import synthetic
from doa_jax.metrics.wlp import parse_entities
from doa_jax.models.config import get_config
from doa_jax.study import runner
from doa_jax.study.__main__ import main as study_main
from doa_jax.study.report import write_report
from doa_jax.study.results import load_results, save_results

QUICKSTART = ['--gin_file=gin_configs/studies/quickstart.gin',
              '--gin_file=gin_configs/studies/quickstart_tiny.gin']


def _run_quickstart(study_dir, cache, *flags: str) -> int:
    """The tiny overlay with its pretrained checkpoint looked up in `cache` (_cached_tiny_start)."""
    import jax

    from doa_jax import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    gin.clear_config()
    try:
        return study_main(QUICKSTART + [f"--gin.STUDY_DIR='{study_dir}'",
                                        f"--gin.PRETRAIN_CACHE_DIR='{cache}'", *flags])
    finally:
        gin.clear_config()
        compilation_cache.configure(before or '', None)    # later tests: the cache as before


@contextlib.contextmanager
def _clocks_ten_times_fast():
    """Every clock the code can read (time.time, perf_counter, monotonic) runs ten times fast, as
    a loaded or ten times slower machine would measure its work."""
    saved = {name: getattr(time, name) for name in ('time', 'perf_counter', 'monotonic')}
    starts = {name: real() for name, real in saved.items()}
    for name, real in saved.items():
        setattr(time, name, lambda real=real, t0=starts[name]: t0 + 10 * (real() - t0))
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(time, name, real)


PRETRAINING_RUN = 'the_pretraining_run'


def _cached_tiny_start(cache) -> str:
    """Puts the overlay's pretrained checkpoint (t5_1_1_tiny, 20 steps: teacher and student) in
    the cache, as a finished pretraining run leaves it, with a ledger that charges the run $1,000.
    Its weights are the tiny model's seed-0 initialisation, so the study's numbers are those of a
    start from scratch and no pretraining runs in CI; tests/test_pretraining.py checks that a
    stage starts from the checkpoint's weights, and that the cache builds once."""
    import jax
    import numpy as np
    from flax.core.meta import unbox

    from doa_jax.checkpoints import save_params
    from doa_jax.models.t5 import T5
    from doa_jax.study import pretrained

    def build(model, p, model_dir):
        t5 = T5(get_config(model, dtype='float32'))
        ones = np.ones((1, 8), np.int32)
        save_params(jax.device_get(unbox(t5.init(jax.random.PRNGKey(0), ones, ones)['params'])),
                    os.path.join(model_dir, 'checkpoints', str(p.steps), 'state'))
        ledger = Ledger(model_dir)
        a = ledger.begin_attempt(PRETRAINING_RUN, 'train', start_step=0)
        ledger.record_steps(PRETRAINING_RUN, 'train', a, 1, p.steps, seconds=3600.0,
                            device_count=1, device_kind='cpu', usd_per_device_hour=1000.0)
        ledger.end_attempt(PRETRAINING_RUN, 'train', a, p.steps, 'done')
        ledger.close()
    return pretrained.ensure_pretrained(
            't5_1_1_tiny', pretrained.Pretraining(steps=20, cache_dir=str(cache)), build=build)


def _no_pretraining(*args, **kwargs):
    raise AssertionError('the pretrained checkpoint is cached: nothing may pretrain')


# Where the fixture's study is SIGKILLed: while the last point's student saves its final
# checkpoint (its steps recorded in its ledger; orbax has written the files into a temporary
# directory and not yet renamed it into place). By then every other stage of every point has run:
# three points recorded, the teacher trained and scored, the pseudo-labels its budget buys written
# and priced. The rerun must keep all of that (nothing redone, nothing lost) and redo only the
# student, whose killed steps then count as redone, not twice.
KILLED_POINT = 'distill_N32_B4e-05'
REPO = pathlib.Path(__file__).resolve().parents[1]


def _kill_while_saving(model_dir: str) -> None:
    """Test hook (this process only): SIGKILL while orbax commits a checkpoint of `model_dir`,
    i.e. after writing its files, before renaming the step directory into place."""
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.on_commit_callback
    target = os.path.realpath(os.path.join(model_dir, 'checkpoints'))

    async def on_commit_callback(tmp_dir, **kwargs):
        if os.path.realpath(os.path.dirname(str(tmp_dir.get_final()))) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(tmp_dir, **kwargs)
    atomicity.on_commit_callback = on_commit_callback


def _killed_quickstart(study_dir: str, cache: str) -> int:
    """`python tests/test_study_runner.py STUDY_DIR CACHE`: the fixture's study, as the fixture
    runs it, SIGKILLed at KILLED_POINT's student's checkpoint save. Returns only if no kill came."""
    from doa_jax.study import pretrained
    _kill_while_saving(os.path.join(study_dir, 'points', KILLED_POINT, 'student'))
    with _clocks_ten_times_fast(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, '_run', _no_pretraining)
        _run_quickstart(study_dir, cache)
    print('the study finished: the kill never came', file=sys.stderr)
    return 1


@pytest.fixture(scope='module')
def quickstart_run(tmp_path_factory):
    """One run of the quickstart's tiny overlay (the tests that change it work on a copy), on
    clocks that run ten times fast: the study's costs and answer must not see it (issue 20).
    Its pretrained start comes from the cache; pretraining itself would fail.

    The run is SIGKILLed once, in a subprocess, mid-save (KILLED_POINT), then rerun to the end in
    this process: the tests assert what an uninterrupted run gives, so the kill changed nothing.
    The last item says what the kill left: the killed process's pid and the records it wrote."""
    from doa_jax.study import pretrained
    root = tmp_path_factory.mktemp('quickstart')
    study_dir, cache = root / 'study', root / 'cache'
    start = _cached_tiny_start(cache)
    proc = subprocess.Popen([sys.executable, __file__, str(study_dir), str(cache)], cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, log[-5000:]
    ckpts = study_dir / 'points' / KILLED_POINT / 'student' / 'checkpoints'
    assert [p.name for p in ckpts.iterdir() if 'tmp' in p.name] and \
        not [p for p in ckpts.iterdir() if p.name.isdigit()], 'the save was not cut short'
    killed = {'pid': proc.pid, 'records': load_results(str(study_dir))}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), _clocks_ten_times_fast(), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, '_run', _no_pretraining)
        t0 = time.perf_counter()
        assert _run_quickstart(study_dir, cache) == 0
        assert time.perf_counter() - t0 > 10, 'the clocks did not run fast'
    yield study_dir, out.getvalue(), cache, start, killed


@pytest.mark.slow
@pytest.mark.fault_injection
def test_quickstart_tiny_overlay_report_and_resume(quickstart_run, monkeypatch):
    """The fixture's study (killed once mid-run, then rerun) gives the points, costs and
    recommendation of an uninterrupted run of its seed."""
    study_dir, out, cache, start, _ = quickstart_run
    records = load_results(str(study_dir))
    assert sorted(records) == ['annotate_N32_B3e-05', 'annotate_N32_B4e-05',
                               'distill_N32_B3e-05', 'distill_N32_B4e-05']
    assert {pid: r['status'] for pid, r in records.items()} == {
            'annotate_N32_B3e-05': 'done', 'annotate_N32_B4e-05': 'done',
            'distill_N32_B3e-05': 'infeasible', 'distill_N32_B4e-05': 'done'}
    for r in records.values():
        assert r['total_usd'] <= r['budget_usd'] * (1 + 1e-9), r   # no point overspends
        assert r['cost_model'] == 'flops(cpu, train 0.15, decode 0.1)'
        if r['status'] == 'done':
            assert 0.0 < r['metric'] < 100.0 and r['metric_name'] == 'micro_f1'
    # $3e-05 pays for annotate's three labels (3.0000000000000004e-05 in floating point) and not
    # for the teacher; at $4e-05 the seed's tiny models score alike and annotate is cheaper.
    assert _chosen(records) == ['annotate', 'annotate']
    # Every model trains by epochs over its own data (tiny overlay: students 5, at most 16 steps).
    for pid, labels in (('annotate_N32_B3e-05', 35), ('annotate_N32_B4e-05', 36)):
        assert records[pid]['n_labels'] == labels
        assert records[pid]['usd_labels'] == pytest.approx((labels - 32) * 0.00001)
        assert records[pid]['student_steps'] == -(-5 * labels // 16)    # ceil(5 epochs)
    # Compute is priced by its FLOPs, known before anything runs (the tiny teacher's 20 steps),
    # whatever the clocks said while the study ran.
    teacher_usd = ComputeCostModel(device_kind='cpu').train_usd(
            default_prices(), get_config('t5_1_1_tiny'), 20, 16, {'inputs': 72, 'targets': 88})
    none = records['distill_N32_B3e-05']
    assert none['status'] == 'infeasible' and none['metric'] is None
    assert none['usd_teacher'] == pytest.approx(teacher_usd) and teacher_usd > 0.00003
    assert 'the teacher alone costs' in none['why']
    some = records['distill_N32_B4e-05']      # the rest of $0.00004 buys a prefix of chunks
    assert some['status'] == 'done' and some['usd_teacher'] == pytest.approx(teacher_usd)
    assert 0 < some['n_pseudo'] < 256 and some['n_pseudo'] % 32 == 0
    assert some['student_steps'] == min(16, -(-5 * some['n_pseudo'] // 16))
    assert some['usd_pseudo_label'] == pytest.approx(some['n_pseudo'] * ComputeCostModel(
            device_kind='cpu').decode_usd(default_prices(), get_config('t5_1_1_tiny'), 1, 72, 87))
    assert some['usd_student'] > 0 and some['usd_student_measured'] > 0
    assert some['total_usd'] == pytest.approx(some['usd_teacher'] + some['usd_pseudo_label'])
    rows = (study_dir / 'points' / some['point_id'] / 'train.jsonl').read_text().splitlines()
    assert len(rows) == some['n_pseudo']
    png = study_dir / 'cost_metric.png'
    img = mpimg.imread(png)
    assert png.stat().st_size > 2000 and img.std() > 0.01
    assert (study_dir / 'budget_bars.png').stat().st_size > 2000
    report = (study_dir / 'report.md').read_text()
    assert report.count('- N=32, budget $') == 2 and '## Pareto frontier' in report
    assert '## Infeasible points' in report and none['why'] in report
    assert "Compute cost model: flops: FLOPs (doa_jax.flops)" in report
    assert 'Recommendation per budget' in out
    assert report.count('**annotate**') == 2

    # Both models started from the cached pretrained checkpoint, and said so; its $1,000 run is
    # in no ledger of the study (every point's costs above are the study's own stages').
    for r in records.values():
        assert r['student_initial_checkpoint'] == start
        assert r.get('teacher_initial_checkpoint', start) == start
    assert records['distill_N32_B4e-05']['teacher_initial_checkpoint'] == start
    assert 'teacher_initial_checkpoint' not in records['annotate_N32_B4e-05']
    ledgers = sorted(study_dir.rglob('cost_ledger.sqlite'))
    assert len(ledgers) >= 3
    for path in ledgers:
        ledger = Ledger(str(path.parent), readonly=True)
        assert PRETRAINING_RUN not in {run for run, _ in ledger.runs()}, path
        ledger.close()
    assert f'Teacher and student started from {start}' in report

    # A rerun skips every finished point: no stage may run again.
    def fail(*a, **k):
        raise AssertionError('a finished point ran again')
    monkeypatch.setattr(runner, 'run_point', fail)
    from doa_jax.study import pretrained
    monkeypatch.setattr(pretrained, '_run', _no_pretraining)
    assert _run_quickstart(study_dir, cache) == 0
    assert load_results(str(study_dir)) == records


@pytest.mark.slow
@pytest.mark.fault_injection
def test_the_killed_study_lost_nothing_and_counted_nothing_twice(quickstart_run):
    """After the fixture's kill (KILLED_POINT's student, mid-save) and rerun: each point is
    recorded once; what the killed process finished (three points, the teacher, the
    pseudo-labels) was kept, not redone; the student's killed steps are redone work, billed
    once as work and once as crash overhead, and its work cost, which prices the point, is what
    an uninterrupted run's is."""
    import json
    study_dir, _, _, _, killed = quickstart_run
    by_killed, by_rerun = f':{killed["pid"]}', f':{os.getpid()}'
    rows = json.loads((study_dir / 'results.json').read_text())
    assert sorted(r['point_id'] for r in rows) == sorted({r['point_id'] for r in rows})
    assert len(rows) == 4 and len((study_dir / 'results.csv').read_text().splitlines()) == 5
    records = load_results(str(study_dir))
    assert sorted(killed['records']) == sorted(set(records) - {KILLED_POINT})
    for pid, rec in killed['records'].items():       # kept as the killed process wrote them
        assert records[pid] == rec and rec.get('usd_crash_overhead_measured', 0.0) == 0.0, pid
    point = records[KILLED_POINT]

    # Nothing the killed process finished ran again: every ledger but the killed point's holds
    # its rows only (the teacher's, its pseudo-labels', the other points' students').
    ledgers = [p.parent for p in study_dir.rglob('cost_ledger.sqlite')
               if KILLED_POINT not in p.parts]
    assert len(ledgers) >= 3
    for path in ledgers:
        ledger = Ledger(str(path), readonly=True)
        hosts = ledger._rows('SELECT host FROM entries UNION SELECT host FROM attempts')
        assert {h['host'].rpartition(':')[2] for h in hosts} == {str(killed['pid'])}, path
        ledger.close()
    # The teacher and its pseudo-labels: each pool example labeled and billed once.
    (teacher_dir,) = (study_dir / 'teachers').iterdir()
    teacher = Ledger(str(teacher_dir), readonly=True)
    t = teacher.stage_summary(teacher_dir.name, 'train')
    assert t.attempts == 1 and t.end_reason == 'done' and t.redone_usd == 0
    assert teacher.crash_overhead_usd() == 0.0
    chunks = teacher.compute_entries('pseudo_labels', 'pseudo_label')
    assert [x for c in chunks for x in range(c['first'], c['last'] + 1)] == \
        list(range(point['n_pseudo']))
    teacher.close()
    assert point['usd_teacher_measured'] == pytest.approx(
            json.loads((teacher_dir / 'teacher.json').read_text())['usd_measured'])
    labeled = [r['index'] for r in pl.read_chunks(str(teacher_dir / 'pseudo_labels'))]
    assert sorted(labeled) == list(range(point['n_pseudo']))

    # The student: attempt 1 (killed) ran all 16 steps; attempt 2 (the rerun) ran them again.
    student = Ledger(str(study_dir / 'points' / KILLED_POINT / 'student'), readonly=True)
    ((run, _),) = student.runs()
    s = student.stage_summary(run, 'train')
    steps = point['student_steps']
    assert s.attempts == 2 and s.end_reason == 'done' and s.pending_usd == 0
    attempts = student._rows('SELECT attempt, start_step, end_step, end_reason, host FROM '
                             'attempts ORDER BY attempt')
    assert [(a['start_step'], a['end_step'], a['end_reason']) for a in attempts] == [
            (0, steps, 'crashed'), (0, steps, 'done')]
    assert attempts[0]['host'].endswith(by_killed) and attempts[1]['host'].endswith(by_rerun)
    counted = student.counted_step_intervals(run, 'train')
    assert [x for f, l, _ in counted for x in range(f, l + 1)] == list(range(1, steps + 1))
    entries = student._rows('SELECT attempt, category, usd FROM entries WHERE billable=1')
    first = [e for e in entries if e['attempt'] == 1]
    assert s.redone_usd == pytest.approx(math.fsum(e['usd'] for e in first
                                                   if e['category'] == 'steps'), rel=1e-9)
    # Spent = work + crash overhead (the killed attempt: its redone steps, compile, host time).
    crash = student.crash_overhead_usd()
    assert crash == pytest.approx(math.fsum(e['usd'] for e in first), rel=1e-9) and crash > 0
    assert student.spent_usd() == pytest.approx(s.total_usd, rel=1e-12)
    work = math.fsum(e['usd'] for e in entries if e['attempt'] == 2)
    assert student.spent_usd() - crash == pytest.approx(work, rel=1e-9)
    student.close()
    assert point['usd_student_measured'] == pytest.approx(work, rel=1e-9)
    assert point['usd_crash_overhead_measured'] == pytest.approx(crash, rel=1e-9)
    report = (study_dir / 'report.md').read_text()
    assert '## Crash overhead' in report and f'- {KILLED_POINT}: $' in report

    # What prices the point did not move: the student's cost is its FLOPs at its steps (as in an
    # uninterrupted run; the teacher and pseudo-label costs are checked in the test above).
    assert point['usd_student'] == pytest.approx(ComputeCostModel(device_kind='cpu').train_usd(
            default_prices(), get_config('t5_1_1_tiny'), steps, 16, {'inputs': 72, 'targets': 88}))


@pytest.mark.slow
@pytest.mark.fault_injection
def test_rerun_of_a_lost_record_reuses_the_teacher(quickstart_run, tmp_path, monkeypatch):
    """A study killed after a point's stages but before its record resumes without retraining."""
    import shutil
    study_dir = tmp_path / 'study'
    shutil.copytree(quickstart_run[0], study_dir)
    from doa_jax.study import pretrained
    monkeypatch.setattr(pretrained, '_run', _no_pretraining)
    records = load_results(str(study_dir))
    lost = records.pop('distill_N32_B4e-05')
    assert lost['status'] == 'done' and lost['n_pseudo'] > 0
    save_results(str(study_dir), records)
    def no_training(*args, **kwargs):
        raise AssertionError('no model should train again')
    monkeypatch.setattr(runner, '_train', no_training)
    assert _run_quickstart(study_dir, quickstart_run[2]) == 0
    again = load_results(str(study_dir))[lost['point_id']]
    assert again['metric'] == lost['metric'] and again['total_usd'] == pytest.approx(lost['total_usd'])


def _chosen(records) -> list[str]:
    """The strategy recommended at each budget, in budget order."""
    from doa_jax.study.report import recommendations
    return [line.split('**')[1] if '**' in line else line
            for line in recommendations(list(records.values()))]


def test_changed_settings_refuse_to_mix(tmp_path):
    study_dir = tmp_path / 's'
    runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 0})
    runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 0})
    with pytest.raises(ValueError, match='seed'):
        runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 1})


def test_labels_bought_at_the_paper_price():
    task = next(iter(default_prices().annotation))
    per = float(default_prices().usd_per_label(task))
    assert runner.labels_bought(10 * per, per, 1000) == 10
    assert runner.labels_bought(10 * per - 1e-6, per, 1000) == 9     # a part label buys none
    assert runner.labels_bought(0.008, 0.0001, 1000) == 80            # 0.008 // 0.0001 is 79.0
    assert runner.labels_bought(10 * per, per, 4) == 4                 # only the pool's rows
    assert runner.labels_bought(10.0, 0.0, 1000) == 0                  # no price: no labels


def test_strategies_and_grid():
    assert runner.parse_strategy('mixed:0.25') == runner.Strategy('mixed', 0.25)
    for bad in ('mixed:1.5', 'distil', 'mixed:x'):
        with pytest.raises(ValueError, match='annotate'):
            runner.parse_strategy(bad)
    pts = runner.study_points(['distill', 'annotate'], [100], [20, 10])
    assert [p['point_id'] for p in pts] == ['distill_N100_B10', 'annotate_N100_B10',
                                            'distill_N100_B20', 'annotate_N100_B20']
    with pytest.raises(ValueError, match='budgets_usd'):
        runner.study_points(['annotate'], [100], [-1])


def test_stage_steps():
    st = runner.StageConfig(epochs=20, batch_size=32, min_steps=10, max_steps=500)
    assert st.steps(64) == 40 and st.steps(1) == 10 and st.steps(10**6) == 500


def test_a_student_on_the_same_data_is_trained_once(tmp_path, monkeypatch):
    """Points whose students would train on identical data (e.g. budgets that all buy the whole
    pool) share one trained student; each is still charged its cost. Other data trains anew."""
    import types

    from doa_jax.study.data import synthetic_wlp
    data = synthetic_wlp(train_size=40, eval_size=4)
    s = runner.StudySettings(study_dir=str(tmp_path), data=data, teacher=runner.StageConfig(),
                             student=runner.StageConfig(model='t5_1_1_tiny', epochs=2,
                                                        batch_size=4),
                             task_feature_lengths={'inputs': 72, 'targets': 88},
                             prices=default_prices(),
                             cost_model=ComputeCostModel(device_kind='cpu'))
    trained = []

    def fake_train(s_, stage, model_dir, task, num_examples, loss_fn=None):
        trained.append((model_dir, num_examples))
        return types.SimpleNamespace(state=types.SimpleNamespace(params=len(trained)))

    def fake_evaluate(s_, stage, params, task, cache):
        runner._json_dump(cache, {'task/micro_f1': 10.0 * params})
        return {'task/micro_f1': 10.0 * params}
    monkeypatch.setattr(runner, '_train', fake_train)
    monkeypatch.setattr(runner, '_evaluate', fake_evaluate)
    point = lambda pid: {'point_id': pid}
    first = runner._train_student(s, point('distill_N4_B1'), data.train[:8], None)
    again = runner._train_student(s, point('distill_N4_B2'), data.train[:8], None)
    other = runner._train_student(s, point('distill_N4_B3'), data.train[:12], None)
    assert [n for _, n in trained] == [8, 12]
    assert again['student_of'] == 'distill_N4_B1' and again['metric'] == first['metric'] == 10.0
    assert again['usd_student'] == first['usd_student'] > 0 and first['student_steps'] == 4
    assert 'student_of' not in other and other['metric'] == 20.0
    # A rerun of the reusing point reads its own copy of the scores and still names the twin.
    assert runner._train_student(s, point('distill_N4_B2'), data.train[:8], None) == again
    assert len(trained) == 2


@pytest.mark.parametrize('kind', ['flops', 'measured'])
def test_run_point_prices_by_the_study_cost_model(kind, tmp_path, monkeypatch):
    """'flops' prices the teacher before it trains (an unaffordable one never trains) and buys
    modelled chunks; 'measured' trains first and buys the chunks its ledger priced."""
    from doa_jax.study.data import synthetic_wlp
    data = synthetic_wlp(train_size=200, eval_size=4)
    model = ComputeCostModel(kind=kind, device_kind='cpu')
    s = runner.StudySettings(study_dir=str(tmp_path), data=data,
                             teacher=runner.StageConfig(model='t5_1_1_mini', epochs=75,
                                                        batch_size=16),
                             student=runner.StageConfig(model='t5_1_1_tiny', epochs=2,
                                                        batch_size=16),
                             task_feature_lengths={'inputs': 72, 'targets': 88},
                             prices=default_prices().with_overrides(
                                     annotation={data.price_key: 1.0}),
                             chunk_size=10, cost_model=model, pool_size=100, pool_start=20)
    mini = get_config('t5_1_1_mini')
    teacher_usd = model.train_usd(s.prices, mini, s.teacher.steps(20), 16,
                                  s.task_feature_lengths) if kind == 'flops' else 0.002
    # A chunk of 10 pool examples: decoded at the maximum lengths, or as the fake ledger says.
    per_chunk = model.decode_usd(s.prices, mini, 10, 72, 87) if kind == 'flops' else 0.0001
    calls = []

    def train(self, order):
        calls.append('train')
        return teacher_usd

    def pseudo_label(self, order, max_usd=None, limit=None):
        calls.append(('label', max_usd, limit))
    measured_chunks = [{'first': f, 'last': f + 9, 'usd': 0.0001} for f in range(0, 100, 10)]
    monkeypatch.setattr(runner._Teacher, 'train', train)
    monkeypatch.setattr(runner._Teacher, 'pseudo_label', pseudo_label)
    monkeypatch.setattr(runner._Teacher, 'chunk_costs', lambda self: measured_chunks)
    monkeypatch.setattr(runner._Teacher, 'usd_measured', lambda self: None)
    monkeypatch.setattr(runner._Teacher, 'pseudo_labels',
                        lambda self, n: [{'source': 'x', 'target': 'y'}] * n)
    monkeypatch.setattr(runner, '_train_student',
                        lambda s_, point, rows, teacher: {'metric': float(len(rows)),
                                                          'usd_student': 0.0})
    order = data.order(0)
    point = lambda b: {'point_id': f'distill_N20_B{b}', 'strategy': 'distill', 'n_start': 20,
                       'budget_usd': b}
    poor = runner.run_point(s, point(teacher_usd * 0.9), order)
    assert poor['status'] == 'infeasible' and poor['usd_teacher'] == pytest.approx(teacher_usd)
    assert calls == ([] if kind == 'flops' else ['train'])   # flops: the teacher never trained
    calls.clear()
    rich = runner.run_point(s, point(teacher_usd + 3.5 * per_chunk), order)
    if kind == 'flops':       # labels exactly the 3 chunks it bought
        assert calls == ['train', ('label', None, 30)]
    else:                     # labels until its measured spending reaches what is left
        assert calls == ['train', ('label', pytest.approx(3.5 * per_chunk), None)]
    assert rich['status'] == 'done' and rich['n_pseudo'] == 30 == rich['metric']
    assert rich['usd_pseudo_label'] == pytest.approx(3 * per_chunk)
    assert rich['usd_compute'] == pytest.approx(teacher_usd + 3 * per_chunk)


def test_budgeted_pseudo_labeling_stops_and_extends(tmp_path):
    """A cap stops at a chunk boundary; a larger cap later extends the same run; each chunk is
    priced once, and a budget buys the longest affordable prefix of chunks."""
    pool = [(f'id{i}', f'x{i}') for i in range(10)]
    ledger = Ledger(tmp_path)
    out = tmp_path / 'pseudo_labels'

    def meter(first, last):
        class M:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                ledger.record_compute('pseudo_labels', 'pseudo_label', first, last,
                                      3600.0 * (last - first + 1), 'cpu', 1, 1.0)
        return M()

    label = lambda xs: [{'prediction': x.upper(), 'score': 0.0} for x in xs]
    cap = lambda usd: (lambda _: pl._fits_budget(ledger, 'pseudo_labels', 3, usd))
    r = pl.pseudo_label_shard(pool, label, str(out), chunk_size=3, meter_factory=meter,
                              keep_going=cap(6.5))                    # $1 per example
    assert r.stopped_by_budget and r.chunks_written == 2 and len(pl.read_chunks(str(out))) == 6
    r = pl.pseudo_label_shard(pool, label, str(out), chunk_size=3, meter_factory=meter,
                              keep_going=cap(100.0))
    assert not r.stopped_by_budget and r.chunks_skipped == 2 and r.chunks_written == 2
    chunks = ledger.compute_entries('pseudo_labels', 'pseudo_label')
    assert [(c['first'], c['last']) for c in chunks] == [(0, 2), (3, 5), (6, 8), (9, 9)]
    assert runner._affordable_prefix(chunks, 6.99) == (6, pytest.approx(6.0))
    assert runner._affordable_prefix(chunks, 2.5) == (0, 0.0)
    assert runner._affordable_prefix(chunks, 10) == (10, pytest.approx(10.0))


def test_synthetic_task_is_deterministic_wlp_format():
    a, b = synthetic.examples('train', 50), synthetic.examples('train', 200)
    assert a == b[:50] and a != synthetic.examples('validation', 50)
    for ex in b:
        ents = parse_entities(ex['target'])
        assert ents and all(label.capitalize() in synthetic.LABELS or label in synthetic.LABELS
                            for _, label in ents), ex
        assert all(text in ex['source'] for text, _ in ents), ex


def test_report_from_hand_made_results(tmp_path):
    recs = {}
    for s, bonus in (('annotate', 0.0), ('distill', 5.0)):
        for i, b in enumerate((10, 30, 100, 300)):
            pid = f'{s}_N100_B{b}'
            recs[pid] = {'point_id': pid, 'strategy': s, 'n_start': 100, 'budget_usd': b,
                         'total_usd': b * (0.9 if s == 'distill' else 1.0), 'metric_name': 'f1',
                         'metric': 60 + 5 * i + bonus, 'status': 'done'}
    recs['distill_N100_B1'] = {'point_id': 'distill_N100_B1', 'strategy': 'distill', 'n_start': 100,
                               'budget_usd': 1, 'total_usd': 0.0, 'metric': None,
                               'status': 'infeasible', 'why': 'the teacher alone costs $2.00',
                               'why_short': 'the teacher costs more than the budget'}
    save_results(str(tmp_path), recs)
    out = write_report(str(tmp_path))
    text = (tmp_path / 'report.md').read_text()
    assert 'infeasible' in text and '| distill_N100_B300 |' in text
    assert '## Infeasible points' in text
    assert ('- distill_N100_B1 (distill, N=100, budget $1.00): the teacher alone costs '
            '$2.00.') in text
    assert any('budget $300: **distill**' in line for line in out['recommendations'])
    assert any('budget $1.00: no recommendation' in line for line in out['recommendations'])
    for key in ('cost_metric', 'budget_bars'):
        assert mpimg.imread(out[key]).std() > 0.01
    csv = (tmp_path / 'results.csv').read_text().splitlines()
    assert csv[0].startswith('point_id,strategy,n_start,budget_usd') and len(csv) == 10


def test_infeasible_points_are_drawn(tmp_path):
    """Both figures mark an infeasible point (at its budget, with its reason); a study whose
    points are all infeasible still gets figures."""
    import numpy as np

    from doa_jax.study.frontier import Point
    from doa_jax.study.plots import plot_budget_bars, plot_cost_metric
    done = [{'point_id': f'annotate_B{b}', 'strategy': 'annotate', 'n_start': 10,
             'budget_usd': b, 'total_usd': b, 'metric': 50.0 + b, 'status': 'done'}
            for b in (1, 2, 4)]
    bad = {'point_id': 'distill_B1', 'strategy': 'distill', 'n_start': 10, 'budget_usd': 1,
           'total_usd': 0.0, 'metric': None, 'status': 'infeasible',
           'why_short': 'the teacher costs more than the budget'}
    pts = [Point('annotate', r['total_usd'], r['metric'], r) for r in done]

    def image(name, *args, **kwargs):
        fn = plot_cost_metric if name.startswith('cost') else plot_budget_bars
        return mpimg.imread(fn(*args, str(tmp_path / name), **kwargs))
    assert not np.array_equal(image('cost_a.png', pts), image('cost_b.png', pts, infeasible=[bad]))
    assert not np.array_equal(image('bars_a.png', done), image('bars_b.png', done + [bad]))
    assert image('cost_c.png', [], infeasible=[bad]).std() > 0.01
    assert image('bars_c.png', [bad]).std() > 0.01


def test_planner_notes_in_the_report_not_warnings(tmp_path):
    """Three budgets give a curve but no band: the report says so, the console stays quiet."""
    import warnings
    recs = {}
    for s, bonus in (('annotate', 0.0), ('distill', 5.0)):
        for i, b in enumerate((10, 30, 100)):
            pid = f'{s}_N100_B{b}'
            recs[pid] = {'point_id': pid, 'strategy': s, 'n_start': 100, 'budget_usd': b,
                         'total_usd': b, 'metric_name': 'f1', 'metric': 60 + 5 * i + bonus - i * i,
                         'status': 'done'}
    save_results(str(tmp_path), recs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        write_report(str(tmp_path))
    assert not [w for w in caught if 'Covariance' in str(w.message) or
                w.category.__module__.startswith('scipy')], [str(w.message) for w in caught]
    text = (tmp_path / 'report.md').read_text()
    assert '## Learning curves' in text
    assert 'No learning curve for annotate: too few budgets for a band' in text
    assert 'No learning curve for distill: too few budgets for a band' in text


def test_paper_dataset_from_real_files(data_dir):
    from doa_jax.study.data import paper_dataset
    wlp = paper_dataset('wlp', data_dir=str(data_dir), vocabulary='byte', eval_size=50)
    assert len(wlp.train) == 14271 and len(wlp.eval) == 50 and wlp.metric == 'micro_f1'
    assert wlp.prefix == 'wlp: ' and wlp.price_key == 'wlp'
    fever = paper_dataset('fever', vocabulary='byte',
                          train_file=str(data_dir / 'fever' / 'fever_dev_all.json'),
                          eval_fraction=0.1)
    assert len(fever.train) + len(fever.eval) == 10444 and len(fever.eval) == 1044
    again = paper_dataset('fever', vocabulary='byte',
                          train_file=str(data_dir / 'fever' / 'fever_dev_all.json'),
                          eval_fraction=0.1)
    assert again.eval == fever.eval       # the held-out set never moves between runs
    with pytest.raises(ValueError, match='eval_fraction'):
        paper_dataset('fever', vocabulary='byte',
                      train_file=str(data_dir / 'fever' / 'fever_dev_all.json'), eval_fraction=1.5)


@pytest.mark.slow
def test_llm_strategies_against_a_served_model(tmp_path):
    """'llm' and 'human+llm' points label the pool through a real Chat Completions server on
    127.0.0.1 (a tiny random model: garbage labels, real plumbing), priced per token. Two
    points: at $1 'llm' pays the server for a few labels; at $100 'human+llm' buys the whole
    pool, the first point's answers from the study's cache (charged again: its own ledger prices
    every label it uses) and the rest from the server."""
    import seqio

    from doa_jax.models.config import get_config
    from doa_jax.serving import Batcher, ChatServer, load_params, make_generate_fn
    from doa_jax.study.data import synthetic_wlp

    cfg = get_config('t5_1_1_tiny')
    generate = make_generate_fn(cfg, load_params('random', cfg), seqio.ByteVocabulary(),
                                max_input_length=512, max_decode_length=8)
    server = ChatServer(Batcher(generate, max_batch=8, wait_ms=5), 'doa-local').start()
    prices = tmp_path / 'prices.yaml'
    prices.write_text('llm:\n  doa-local:\n    usd_per_1k_input: 1.0\n    usd_per_1k_output: 2.0\n')
    data = synthetic_wlp(train_size=96, eval_size=8)
    stage = runner.StageConfig(model='t5_1_1_tiny', epochs=0, batch_size=8, min_steps=4,
                               max_steps=4, learning_rate=1e-3, activation_dtype='float32',
                               dropout_rate=0.0)
    s = runner.StudySettings(
            study_dir=str(tmp_path / 'study'), data=data, teacher=stage, student=stage,
            task_feature_lengths={'inputs': 72, 'targets': 88},
            prices=runner.load_prices_for(data, str(prices), usd_per_label=0.01), pool_size=24,
            eval_batch_size=8, show_progress=False,
            llm=runner.LLMAnnotator(base_url=server.url, model='doa-local', shots=2,
                                    max_tokens=8, concurrency=2))
    try:
        ran = runner.run_study(s, ['llm'], [16], [1.0])[0]
        ran += runner.run_study(s, ['human+llm'], [16], [100.0])[0]
    finally:
        server.close()
    recs = load_results(s.study_dir)
    assert sorted(ran) == sorted(recs) and len(recs) == 2
    small, big = recs['llm_N16_B1'], recs['human_llm_N16_B100']
    assert 0 < small['n_llm'] < big['n_llm'] == 24          # $1 buys a few labels, $100 all 24
    for r in recs.values():
        assert r['status'] == 'done' and 0 < r['usd_llm'] <= r['budget_usd']
        assert r['total_usd'] == pytest.approx(r['usd_llm'])
        rows = (tmp_path / 'study' / 'points' / r['point_id'] / 'train.jsonl').read_text()
        gold = 16 if r['strategy'] == 'human+llm' else 0
        assert len(rows.splitlines()) == gold + r['n_llm']
    ledger = Ledger(tmp_path / 'study' / 'points' / 'human_llm_N16_B100', readonly=True)
    assert ledger.spent_usd('human_llm_N16_B100') == pytest.approx(big['usd_llm'])


# ---- one vocabulary: a study stage and a runs/*.gin run -----------------------------------------
# StageConfig fields that have no run-file macro of their name (the model is a run's models/*.gin;
# the epochs rule replaces TRAIN_STEPS), and finetune.gin's macros a stage does not take: where
# the run goes and what it is told to stop at, the task (the study makes its own), the study's
# own seed, and settings the study fixes (one checkpoint kept, no periodic evaluation).
# `pretraining` makes the stage's INITIAL_CHECKPOINT_PATH (a cached pretraining run).
STUDY_ONLY = {'model', 'epochs', 'min_steps', 'max_steps', 'pretraining'}
RUN_ONLY = {'MODEL_DIR', 'MIXTURE_OR_TASK_NAME', 'MIXTURE_OR_TASK_MODULE', 'VOCABULARY',
            'DEFAULT_FEATURE_LENGTHS', 'COMPILATION_CACHE_DIR', 'TRAIN_STEPS', 'EVAL_PERIOD',
            'RANDOM_SEED', 'KEEP_CHECKPOINTS', 'CPU_PEAK_FLOPS', 'BUDGET_USD',
            'ALLOW_CONFIG_CHANGE'}


def test_stage_config_fields_are_the_run_files_knobs():
    """Every StageConfig field is a finetune.gin macro in lower case or a model setting of
    get_model_config; every finetune.gin macro that says how a model trains is a field."""
    import dataclasses
    import inspect
    import pathlib
    import re

    from doa_jax.gin_utils import get_model_config
    text = (pathlib.Path(__file__).resolve().parents[1] / 'gin_configs/runs/finetune.gin'
            ).read_text()
    macros = set(re.findall(r'^([A-Z][A-Z0-9_]*)\s*=', text, flags=re.M))
    model = set(inspect.signature(get_model_config).parameters) - {'name'}
    fields = {f.name for f in dataclasses.fields(runner.StageConfig)} - STUDY_ONLY
    assert {f for f in fields if f.upper() not in macros} <= model
    assert {f for f in fields if f.upper() not in macros} == model - {'dropout_rate',
                                                                       'activation_dtype'}
    assert macros - RUN_ONLY == {f.upper() for f in fields if f.upper() in macros}


def _run_train_kwargs(bindings) -> dict:
    """trainer.train's arguments as `python -m doa_jax.train` binds them from finetune.gin."""
    import inspect

    from doa_jax import gin_utils, trainer
    from doa_jax.benchmark.recipe import _value
    gin.clear_config()
    try:
        sources = gin_utils.parse_gin(['gin_configs/runs/finetune.gin',
                                       'gin_configs/models/t5_1_1_tiny.gin'], bindings)
        return {p: _value(f'train.{p}', sources) for p in inspect.signature(trainer.train).parameters
                if p != 'callbacks' and gin_utils.bound_value(f'train.{p}', sources) is not None}
    finally:
        gin.clear_config()


def _same_optimizer(a, b) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    params = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), 'b': jnp.ones((4,))}
    sa, sb = a.init(params), b.init(params)
    for i in range(4):
        grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), params)
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(grads, sb, params)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)


def test_a_stage_and_finetune_gin_with_the_same_settings_call_train_identically(tmp_path,
                                                                                monkeypatch):
    """The study's teacher/student training (runner._train) calls trainer.train with the
    arguments python -m doa_jax.train gives it for runs/finetune.gin with the same settings:
    model config (remat, scan), optimizer, loss, lengths, packing, microbatches and mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from doa_jax import trainer
    from doa_jax.study.data import synthetic_wlp
    stage = runner.StageConfig(
            model='t5_1_1_tiny', epochs=3, batch_size=8, learning_rate=1e-3,
            optimizer='adafactor', schedule='linear', warmup_steps=2, activation_dtype='float32',
            dropout_rate=0.05, z_loss=1e-3, label_smoothing=0.1, loss_normalizing_factor=512.0,
            initial_checkpoint_path='/ckpt/tiny', mesh_data=-1, mesh_model=1, fsdp=True,
            log_period=5, checkpoint_period=20, remat_policy='minimal', scan_layers=True,
            num_microbatches=2, task_feature_lengths={'inputs': 64, 'targets': 24}, pack=True,
            overlong='drop')
    steps = stage.steps(40)
    run = _run_train_kwargs([
            f"MODEL_DIR='{tmp_path / 'teacher'}'", "MIXTURE_OR_TASK_NAME='doa_toy'",
            f'TRAIN_STEPS={steps}', 'RANDOM_SEED=3', 'KEEP_CHECKPOINTS=1', 'EVAL_PERIOD=0',
            'BATCH_SIZE=8', 'LEARNING_RATE=1e-3', "OPTIMIZER='adafactor'", "SCHEDULE='linear'",
            'WARMUP_STEPS=2', "ACTIVATION_DTYPE='float32'", 'DROPOUT_RATE=0.05', 'Z_LOSS=1e-3',
            'LABEL_SMOOTHING=0.1', 'LOSS_NORMALIZING_FACTOR=512.0',
            "INITIAL_CHECKPOINT_PATH='/ckpt/tiny'", 'MESH_DATA=-1', 'MESH_MODEL=1', 'FSDP=True',
            'LOG_PERIOD=5', 'CHECKPOINT_PERIOD=20', 'NUM_MICROBATCHES=2',
            "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 24}", 'PACK=True',
            "OVERLONG='drop'", "doa_jax.get_model_config.remat_policy='minimal'",
            'doa_jax.get_model_config.scan_layers=True'])
    calls = []
    monkeypatch.setattr(trainer, 'train', lambda **kw: calls.append(kw))
    s = runner.StudySettings(study_dir=str(tmp_path), data=synthetic_wlp(train_size=8, eval_size=2),
                             teacher=stage, student=stage, seed=3,
                             task_feature_lengths={'inputs': 72, 'targets': 88},
                             prices=default_prices(), show_progress=False)
    runner._train(s, stage, str(tmp_path / 'teacher'), 'doa_toy', 40)
    study = calls[0]
    assert study['model_config'] == run['model_config']
    assert study['model_config'].remat_policy == 'minimal' and study['model_config'].scan_layers
    assert study['num_microbatches'] == 2 and study['pack'] is True
    assert study['task_feature_lengths'] == {'inputs': 64, 'targets': 24}   # the stage's own
    # Everything else the study gives equals the run's, the optimizer and loss by what they do.
    opaque = {'optimizer', 'loss_fn', 'callbacks', 'show_progress'}
    assert {k: v for k, v in study.items() if k not in opaque} == \
        {k: run[k] for k in study if k not in opaque}
    _same_optimizer(study['optimizer'], run['optimizer'])
    logits = jnp.linspace(-3.0, 3.0, 2 * 5 * 16).reshape(2, 5, 16)
    batch = {'decoder_target_tokens': jnp.array([[3, 4, 1, 0, 0], [5, 1, 0, 0, 0]]),
             'loss_weights': jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)}
    jax.tree.map(np.testing.assert_array_equal, study['loss_fn'](logits, batch),
                 run['loss_fn'](logits, batch))


def test_pseudo_labeling_uses_the_teachers_lengths_and_mesh():
    teacher = runner.StageConfig(model='t5_1_1_tiny', mesh_model=2, mesh_data=1, fsdp=True,
                                 scan_layers=True, remat_policy='full',
                                 task_feature_lengths={'inputs': 40, 'targets': 12})
    s = runner.StudySettings(study_dir='', data=None, teacher=teacher,
                             student=runner.StageConfig(),
                             task_feature_lengths={'inputs': 72, 'targets': 88}, prices=None,
                             infer_batch_size=16, chunk_size=64)
    kw = runner.pseudo_label_kwargs(s)
    assert (kw['max_input_length'], kw['max_decode_length']) == (40, 11)   # + EOS fits
    assert (kw['batch_size'], kw['chunk_size']) == (16, 64)
    assert (kw['mesh_config'].data, kw['mesh_config'].model, kw['mesh_config'].fsdp) == (1, 2,
                                                                                          False)
    assert kw['model_config'] == get_config('t5_1_1_tiny', dropout_rate=0.0)   # as decoding runs
    assert s.student.lengths(s.task_feature_lengths) == {'inputs': 72, 'targets': 88}


if __name__ == '__main__':
    sys.exit(_killed_quickstart(*sys.argv[1:3]))
