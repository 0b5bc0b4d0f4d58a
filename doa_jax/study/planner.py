"""Saturating learning curves metric = a - b * x^(-c) fit per strategy, with an uncertainty band."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit


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
        draws = rng.multivariate_normal(self.params, self.cov, size=n_samples)
        ys = np.stack([power_curve(x, *d) for d in draws])
        sd = np.nanstd(ys, axis=0)
        return mean, mean - z * sd, mean + z * sd


def fit_curve(cost_usd, metric) -> CurveFit:
    """Fit metric vs $; needs at least 3 points with distinct positive costs."""
    x = np.asarray(cost_usd, dtype=float)
    y = np.asarray(metric, dtype=float)
    if len(np.unique(x)) < 3 or np.any(x <= 0):
        raise ValueError(f'fit_curve needs >=3 distinct positive costs, got {list(x)}; '
                         'run more budgets for this strategy before planning')
    p0 = [y.max() + 1e-3, max(y.max() - y.min(), 1e-3) * x.min() ** 0.5, 0.5]
    params, cov = curve_fit(power_curve, x, y, p0=p0, maxfev=20000,
                            bounds=([-np.inf, 0, 1e-4], [np.inf, np.inf, 5]))
    if not np.all(np.isfinite(cov)):
        raise ValueError(f'the curve through {len(np.unique(x))} costs has no uncertainty estimate '
                         '(3 parameters fit 3 points exactly); run a 4th budget for a band')
    return CurveFit(params, cov)
