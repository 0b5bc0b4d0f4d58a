import matplotlib.image as mpimg

from doa_jax.study.__main__ import main
from doa_jax.study.results import run_points


def test_report_writes_nonblank_png(tmp_path):
    pts = [{'point_id': f'{s}{i}', 'strategy': s} for s in ('annotate', 'distill') for i in range(3)]

    def runner(p):
        i = int(p['point_id'][-1])
        return {'usd_labels': 10.0 * 3 ** i, 'metric': 0.5 + 0.1 * i + (0.05 if p['strategy'] == 'distill' else 0)}

    run_points(str(tmp_path), pts, runner)
    assert main(['report', str(tmp_path)]) == 0
    img = mpimg.imread(tmp_path / 'cost_metric.png')
    assert img.size > 0 and img.std() > 0.01


def test_plan_cli(tmp_path, capsys):
    import numpy as np
    from doa_jax.study.planner import power_curve
    pts = [{'point_id': f'a{i}', 'strategy': 'annotate', 'x': x} for i, x in enumerate(np.geomspace(10, 5000, 6))]
    run_points(str(tmp_path), pts, lambda p: {'usd_labels': p['x'], 'metric': power_curve(p['x'], 0.9, 0.8, 0.4)})
    assert main(['plan', f'--results={tmp_path / "results.json"}', '--budgets', '20000']) == 0
    assert '$20,000: annotate expected' in capsys.readouterr().out
