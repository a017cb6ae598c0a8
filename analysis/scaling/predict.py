"""Prediction intervals for a new run, calibrated for extrapolation, and the held-out check.

A new run's log y scatters around the law for three reasons, added as variances in log space:

1. fit uncertainty: the spread of the bootstrap draws' predictions at its inputs;
2. run-to-run scatter: the fitted runs' own residuals (scaled so that the band holds 95 % of them);
3. extrapolation: beyond the fitted runs' largest compute, a law's error grows faster than (1) says, because the
   form itself is only approximately right. That growth is measured inside the data (a backtest): fit on the runs
   below a compute cut, predict the ones above, and fit growth^2 per decade^2 to their squared errors beyond (2).

The held-out check (``holdout_check``) is the test of all of it on the user's own runs: hold out the
largest-compute runs, refit on the rest, and report how far off they were (MAPE) and how many fell inside the band.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from analysis.scaling.bootstrap import LEVEL, Bootstrap, bootstrap_fit
from analysis.scaling.fit import Fit, fit_law
from analysis.scaling.forms import Form

BACKTEST_CUTS = (0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class Calibration:
    """How far a new run falls from the law.

    Attributes:
        scatter: standard deviation of a run's log y about the law (95th percentile of |residual| / 1.96).
        growth_per_decade: extra standard deviation of log y per decade of compute beyond the fitted runs.
        max_compute: the largest compute among the fitted runs (where extrapolation starts).
        backtest: one row per cut: fitted runs, predicted runs, their largest distance in decades, RMS log error.
    """

    scatter: float
    growth_per_decade: float
    max_compute: float
    backtest: list[dict[str, float]] = field(default_factory=list)


def _scatter(fit: Fit, level: float) -> float:
    return float(np.quantile(np.abs(fit.log_residuals()), level) / norm.ppf(0.5 + level / 2))


def calibrate(fit: Fit, cuts: tuple[float, ...] = BACKTEST_CUTS, level: float = LEVEL) -> Calibration:
    """Scatter and extrapolation growth of ``fit`` by backtesting inside its runs.

    Args:
        fit: the fit whose predictions are to be calibrated.
        cuts: compute quantiles to cut at: each backtest fits the runs at or below the cut and predicts the rest.
        level: the band level the scatter is scaled for.
    """
    scatter = _scatter(fit, level)
    compute = fit.form.compute(fit.x)
    distances, excess, rows = [], [], []
    for cut in cuts:
        below = compute <= np.quantile(compute, cut)
        if below.sum() < fit.form.min_points or below.all():
            continue
        part = fit_law(fit.form, fit.x[below], fit.y[below], delta=fit.delta)
        beyond = np.log10(compute[~below] / compute[below].max())
        error = np.log(fit.y[~below]) - part.log_predict(fit.x[~below])
        distances.append(beyond)
        excess.append(error**2 - scatter**2)
        rows.append({"cut": cut, "fitted": int(below.sum()), "predicted": int((~below).sum()),
                     "max_decades": float(beyond.max()), "rms_log_error": float(np.sqrt(np.mean(error**2)))})
    growth = 0.0
    if distances:
        d, e = np.concatenate(distances), np.concatenate(excess)
        growth = float(np.sqrt(max(0.0, np.sum(d**2 * e) / np.sum(d**4))))  # least squares of e on growth^2 d^2
    return Calibration(scatter=scatter, growth_per_decade=growth, max_compute=float(compute.max()), backtest=rows)


def prediction_interval(boot: Bootstrap, x_new: np.ndarray, calibration: Calibration,
                        level: float = LEVEL) -> dict[str, np.ndarray]:
    """The band a new run at inputs ``x_new`` falls in with probability ``level``.

    Args:
        boot: bootstrap of the fit (its draws give the fit uncertainty).
        x_new: (m, k) inputs of the new runs.
        calibration: scatter and extrapolation growth (``calibrate``).
        level: band level.

    Returns:
        {"y": the law, "lo", "hi"}: arrays (m,).
    """
    fit = boot.fit
    x_new = np.asarray(x_new, dtype=float).reshape(-1, fit.x.shape[1])
    center = fit.log_predict(x_new)
    fit_var = np.var(fit.log_predict(x_new, boot.theta), axis=0)
    decades = np.maximum(0.0, np.log10(fit.form.compute(x_new) / calibration.max_compute))
    sd = np.sqrt(fit_var + calibration.scatter**2 + (calibration.growth_per_decade * decades) ** 2)
    half = norm.ppf(0.5 + level / 2) * sd
    return {"y": np.exp(center), "lo": np.exp(center - half), "hi": np.exp(center + half)}


def naive_interval(boot: Bootstrap, x_new: np.ndarray, seed: int = 0, level: float = LEVEL) -> dict[str, np.ndarray]:
    """The usual band, for comparison: each bootstrap draw's prediction plus a resampled residual; no allowance
    for extrapolation.

    Args:
        boot: bootstrap of the fit.
        x_new: (m, k) inputs.
        seed: seed of the residual resampling.
        level: band level.
    """
    fit = boot.fit
    x_new = np.asarray(x_new, dtype=float).reshape(-1, fit.x.shape[1])
    residuals = np.random.default_rng(seed).choice(fit.log_residuals(), size=(len(boot.theta), len(x_new)))
    draws = fit.log_predict(x_new, boot.theta) + residuals
    tail = 100 * (1 - level) / 2
    return {"y": fit.predict(x_new), "lo": np.exp(np.percentile(draws, tail, axis=0)),
            "hi": np.exp(np.percentile(draws, 100 - tail, axis=0))}


def holdout_check(form: Form, x: np.ndarray, y: np.ndarray, *, holdout_above: float, draws: int = 200,
                  seed: int = 0, groups: np.ndarray | None = None, level: float = LEVEL) -> dict[str, float]:
    """Hold out the runs above a compute threshold, fit the rest, and score the predictions of the held-out ones.

    Args:
        form: the law.
        x: (n, k) inputs; y: (n,) observations.
        holdout_above: runs with compute (``form.compute``) above this are held out.
        draws: bootstrap resamples of the fit on the rest.
        seed: bootstrap seed.
        groups: optional group labels for the bootstrap (see ``bootstrap_fit``).
        level: band level.

    Returns:
        fitted and held-out counts, the held-out runs' largest distance in decades, their MAPE (mean |pred - y|/y),
        the fraction inside the calibrated band and inside the naive band, and the calibration's numbers.
    """
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    held = form.compute(x) > holdout_above
    if held.all() or not held.any():
        raise ValueError(f"holdout_above={holdout_above:g} must leave runs on both sides")
    fit = fit_law(form, x[~held], y[~held])
    boot = bootstrap_fit(fit, draws, seed, None if groups is None else np.asarray(groups)[~held])
    calibration = calibrate(fit, level=level)
    band = prediction_interval(boot, x[held], calibration, level)
    naive = naive_interval(boot, x[held], seed, level)
    truth = y[held]

    def inside(b: dict[str, np.ndarray]) -> float:
        return float(np.mean((b["lo"] <= truth) & (truth <= b["hi"])))

    return {"fitted": int((~held).sum()), "held_out": int(held.sum()),
            "max_decades": float(np.log10(form.compute(x[held]).max() / form.compute(x[~held]).max())),
            "mape": float(np.mean(np.abs(band["y"] - truth) / truth)), "inside_band": inside(band),
            "inside_naive_band": inside(naive), "scatter": calibration.scatter,
            "growth_per_decade": calibration.growth_per_decade, "converged": fit.certificate.converged}
