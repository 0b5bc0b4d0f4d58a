"""Saturating learning curves metric = a - b * x^(-c) fit per strategy, with an uncertainty band.

A fit that the points cannot support raises ValueError with a sentence (the report prints it),
never a warning on the console.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


def power_curve(x, a, b, c):
    return a - b * np.power(x, -c)


@dataclass
class CurveFit:
    params: np.ndarray
    cov: np.ndarray

    def predict(self, x, n_samples: int = 2000, z: float = 2.0, seed: int = 0):
        """Mean and (lo, hi) band from sampling parameters from the fit covariance."""
        x = np.asarray(x, dtype=float)
        mean = power_curve(x, *self.params)
        rng = np.random.default_rng(seed)
        with np.errstate(all='ignore'):    # draws far in the tails may overflow: they are NaN
            draws = rng.multivariate_normal(self.params, self.cov, size=n_samples,
                                            check_valid='ignore')
            ys = np.stack([power_curve(x, *d) for d in draws])
            sd = np.nanstd(ys, axis=0)
        return mean, mean - z * sd, mean + z * sd


def fit_curve(cost_usd, metric) -> CurveFit:
    """Fit metric vs $; needs at least 3 points with distinct positive costs (4 for a band)."""
    x = np.asarray(cost_usd, dtype=float)
    y = np.asarray(metric, dtype=float)
    if np.any(x <= 0):
        raise ValueError(f'costs must be positive to fit a curve on a log scale, got {list(x)}')
    distinct = len(np.unique(x))
    if distinct < 3:
        raise ValueError(f'too few budgets for a curve: {distinct} distinct cost(s), a curve '
                         'needs 3 and its band 4 or more; run more budgets for this strategy')
    p0 = [y.max() + 1e-3, max(y.max() - y.min(), 1e-3) * x.min() ** 0.5, 0.5]
    with warnings.catch_warnings(), np.errstate(all='ignore'):
        # 3 parameters through 3 points: scipy warns that the covariance is unknown; said below.
        warnings.simplefilter('ignore', OptimizeWarning)
        params, cov = curve_fit(power_curve, x, y, p0=p0, maxfev=20000,
                                bounds=([-np.inf, 0, 1e-4], [np.inf, np.inf, 5]))
    if not np.all(np.isfinite(cov)):
        raise ValueError(f'too few budgets for a band: the curve fits the {distinct} distinct '
                         'costs exactly, so it has no uncertainty estimate; run a 4th budget')
    return CurveFit(params, cov)
