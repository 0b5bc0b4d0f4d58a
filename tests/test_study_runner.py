"""The study runner: the quickstart's tiny overlay end to end, resume, budgeted pseudo-labels."""

from __future__ import annotations

import gin
import matplotlib.image as mpimg
import pytest

from doa_jax import pseudo_label as pl
from doa_jax.cost import Ledger
from doa_jax.data import synthetic
from doa_jax.metrics.wlp import parse_entities
from doa_jax.study import runner
from doa_jax.study.__main__ import main as study_main
from doa_jax.study.report import write_report
from doa_jax.study.results import load_results, save_results

QUICKSTART = ['--gin_file=gin_configs/studies/quickstart.gin',
              '--gin_file=gin_configs/studies/quickstart_tiny.gin']


def _run_quickstart(study_dir) -> int:
    gin.clear_config()
    try:
        return study_main(QUICKSTART + [f"--gin.STUDY_DIR='{study_dir}'"])
    finally:
        gin.clear_config()


@pytest.fixture(scope='module')
def quickstart_run(tmp_path_factory):
    """One run of the quickstart's tiny overlay (the tests that change it work on a copy)."""
    import contextlib
    import io
    study_dir = tmp_path_factory.mktemp('quickstart') / 'study'
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _run_quickstart(study_dir) == 0
    return study_dir, out.getvalue()


def test_quickstart_tiny_overlay_report_and_resume(quickstart_run, monkeypatch):
    study_dir, out = quickstart_run
    records = load_results(str(study_dir))
    assert sorted(records) == ['annotate_N32_B0.004', 'annotate_N32_B0.008',
                               'distill_N32_B0.004', 'distill_N32_B0.008']
    for r in records.values():
        assert r['status'] in ('done', 'infeasible'), r
        assert r['total_usd'] <= r['budget_usd'] + 1e-9, r       # no point overspends its budget
        if r['status'] == 'done':
            assert 0.0 <= r['metric'] <= 100.0 and r['metric_name'] == 'micro_f1'
    ann = records['annotate_N32_B0.008']
    assert ann['status'] == 'done' and ann['n_labels'] == 32 + int(0.008 / 0.0001 + 1e-9)
    assert ann['usd_labels'] == pytest.approx((ann['n_labels'] - 32) * 0.0001)
    # The tiny teacher costs ~$0.001: $0.008 always leaves money for pseudo-labels.
    assert records['distill_N32_B0.008']['status'] == 'done'
    for pid in ('distill_N32_B0.004', 'distill_N32_B0.008'):
        d = records[pid]
        if d['status'] == 'done':    # pseudo-labels bought with what the teacher left over
            assert d['n_pseudo'] > 0 and d['usd_teacher'] > 0 and d['usd_pseudo_label'] > 0
            assert d['total_usd'] == pytest.approx(d['usd_teacher'] + d['usd_pseudo_label'])
            rows = (study_dir / 'points' / pid / 'train.jsonl').read_text().splitlines()
            assert len(rows) == d['n_pseudo']
    png = study_dir / 'cost_metric.png'
    img = mpimg.imread(png)
    assert png.stat().st_size > 2000 and img.std() > 0.01
    assert (study_dir / 'budget_bars.png').stat().st_size > 2000
    report = (study_dir / 'report.md').read_text()
    assert report.count('- N=32, budget $0.00') == 2 and '## Pareto frontier' in report
    assert 'Recommendation per budget' in out
    assert '**annotate**' in report or '**distill**' in report

    # A rerun skips every finished point: no stage may run again.
    def fail(*a, **k):
        raise AssertionError('a finished point ran again')
    monkeypatch.setattr(runner, 'run_point', fail)
    assert _run_quickstart(study_dir) == 0
    assert load_results(str(study_dir)) == records


def test_rerun_of_a_lost_record_reuses_the_teacher(quickstart_run, tmp_path, monkeypatch):
    """A study killed after a point's stages but before its record resumes without retraining."""
    import shutil
    study_dir = tmp_path / 'study'
    shutil.copytree(quickstart_run[0], study_dir)
    records = load_results(str(study_dir))
    lost = records.pop('distill_N32_B0.008')
    assert lost['status'] == 'done' and lost['n_pseudo'] > 0
    save_results(str(study_dir), records)
    def no_training(*args, **kwargs):
        raise AssertionError('no model should train again')
    monkeypatch.setattr(runner, '_train', no_training)
    assert _run_quickstart(study_dir) == 0
    again = load_results(str(study_dir))[lost['point_id']]
    assert again['metric'] == lost['metric'] and again['total_usd'] == pytest.approx(lost['total_usd'])


def test_changed_settings_refuse_to_mix(tmp_path):
    study_dir = tmp_path / 's'
    runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 0})
    runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 0})
    with pytest.raises(ValueError, match='seed'):
        runner._check_same_study(str(study_dir), {'data': 'synthetic_wlp', 'seed': 1})


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
                               'status': 'infeasible'}
    save_results(str(tmp_path), recs)
    out = write_report(str(tmp_path))
    text = (tmp_path / 'report.md').read_text()
    assert 'infeasible' in text and '| distill_N100_B300 |' in text
    assert any('budget $300: **distill**' in line for line in out['recommendations'])
    assert any('budget $1.00: no recommendation' in line for line in out['recommendations'])
    for key in ('cost_metric', 'budget_bars'):
        assert mpimg.imread(out[key]).std() > 0.01
    csv = (tmp_path / 'results.csv').read_text().splitlines()
    assert csv[0].startswith('point_id,strategy,n_start,budget_usd') and len(csv) == 10


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


def test_llm_strategies_against_a_served_model(tmp_path):
    """'llm' and 'human+llm' points label the pool through a real Chat Completions server on
    127.0.0.1 (a tiny random model: garbage labels, real plumbing), priced per token."""
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
        ran, _ = runner.run_study(s, ['llm', 'human+llm'], [16], [1.0, 100.0])
    finally:
        server.close()
    recs = load_results(s.study_dir)
    assert sorted(ran) == sorted(recs) and len(recs) == 4
    small, big = recs['llm_N16_B1'], recs['llm_N16_B100']
    assert 0 < small['n_llm'] < big['n_llm'] == 24          # $1 buys a few labels, $100 all 24
    for r in recs.values():
        assert r['status'] == 'done' and 0 < r['usd_llm'] <= r['budget_usd']
        assert r['total_usd'] == pytest.approx(r['usd_llm'])
        rows = (tmp_path / 'study' / 'points' / r['point_id'] / 'train.jsonl').read_text()
        gold = 16 if r['strategy'] == 'human+llm' else 0
        assert len(rows.splitlines()) == gold + r['n_llm']
    ledger = Ledger(tmp_path / 'study' / 'points' / 'llm_N16_B100', readonly=True)
    assert ledger.spent_usd('llm_N16_B100') == pytest.approx(big['usd_llm'])
