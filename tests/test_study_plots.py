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
