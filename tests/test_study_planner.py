import numpy as np

from doa_jax.study.planner import fit_curve, power_curve


def test_planner_recovers_synthetic_curve():
    rng = np.random.default_rng(0)
    truth = (0.9, 0.8, 0.4)
    x = np.geomspace(10, 20000, 12)
    y = power_curve(x, *truth) + rng.normal(0, 0.003, x.shape)
    fit = fit_curve(x, y)
    assert np.allclose(fit.params, truth, rtol=0.15)
    xq = np.array([50000.0, 100.0])
    mean, lo, hi = fit.predict(xq)
    true_y = power_curve(xq, *truth)
    assert np.all(lo <= true_y) and np.all(true_y <= hi)
