from doa_jax.study.frontier import Point, best_within_budget, frontiers_by_strategy, pareto_frontier
from doa_jax.study.results import load_results, run_points


def test_frontier_dominated_ties_single():
    pts = [Point('a', 10, 0.5), Point('a', 20, 0.4), Point('b', 10, 0.5), Point('b', 30, 0.7)]
    f = pareto_frontier(pts)
    assert [(p.strategy, p.cost_usd) for p in f] == [('a', 10), ('b', 10), ('b', 30)]
    fr = frontiers_by_strategy(pts)
    assert [p.cost_usd for p in fr['a']] == [10]
    assert len(pareto_frontier([Point('x', 1, 0.1)])) == 1


def test_multipit_headline_distill_wins():
    # The paper's headline (docs/design.md, "The paper's study"): distill reaches 81.0 for $161;
    # annotation needs $1,980; the full set ($17,443) reaches 87.5.
    pts = [Point('distill', 161, 81.0), Point('annotate', 1980, 81.0),
           Point('annotate', 17443, 87.5), Point('annotate', 161, 70.0)]
    assert best_within_budget(pts, 200).strategy == 'distill'
    f = pareto_frontier(pts)
    assert Point('annotate', 1980, 81.0) not in f


def test_results_resume(tmp_path):
    calls = []

    def runner(p):
        calls.append(p['point_id'])
        return {'usd_labels': 1.0, 'usd_compute': 2.0, 'metric': 0.5}

    pts = [{'point_id': 'p1', 'strategy': 'annotate'}, {'point_id': 'p2', 'strategy': 'distill'}]
    ran, skipped = run_points(str(tmp_path), pts[:1], runner)
    assert ran == ['p1'] and skipped == []
    ran, skipped = run_points(str(tmp_path), pts, runner)
    assert ran == ['p2'] and skipped == ['p1'] and calls == ['p1', 'p2']
    recs = load_results(str(tmp_path))
    assert recs['p1']['total_usd'] == 3.0
    assert (tmp_path / 'results.csv').read_text().count('\n') == 3


def test_recommend_headline():
    from doa_jax.study.recommend import recommend
    pts = [Point('distill', 161, 81.0), Point('annotate', 1980, 81.0), Point('annotate', 161, 70.0)]
    r = recommend(pts, 200)
    assert r.strategy == 'distill' and r.expected_metric == 81.0 and 'annotate' in r.explanation


def test_a_point_that_spends_exactly_its_budget_fits_it():
    # Three labels at $0.00001 sum to 3.0000000000000004e-05 in floating point.
    cost = 0.00001 + 0.00001 + 0.00001
    assert cost > 3e-05
    pts = [Point('annotate', cost, 27.6), Point('distill', 3.1e-05, 30.0)]
    assert best_within_budget(pts, 3e-05) == pts[0]
    assert best_within_budget(pts, 2.99e-05) is None
