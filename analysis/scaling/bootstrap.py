"""Bootstrap intervals for a fitted law: every parameter and every derived quantity, resampling runs or whole groups.

A resample is a vector of counts over the runs (how often each run was drawn), so all B refits are one weighted
problem solved at once (``fit.refine_batch``), each started from the full-data optimum and each driven to a zero
gradient; a draw that does not get there is refitted from the whole grid of starts. Runs that share a model size,
seed or family are not independent: with ``groups`` whole groups are drawn, so noise shared within a group is
carried into the intervals instead of being averaged away (tests/test_scaling.py measures both coverages).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.scaling.fit import GRAD_TOL, Fit, fit_law, refine_batch
from analysis.scaling.forms import CHINCHILLA, compute_optimal, isoflop_minima

LEVEL = 0.95


def percentile_intervals(draws: dict[str, np.ndarray], point: dict[str, float], units: int, n_params: int,
                         level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile intervals, each side's distance from the point estimate stretched by sqrt(units/(units - P)) (on the
    log scale where the stretch would take a positive lower percentile below zero).

    The stretch is the degrees-of-freedom correction of the sandwich variance (HC1): a bootstrap of ``units``
    independent units (runs, or groups) spreads like the residuals, which a P-parameter fit has pulled in.

    Args:
        draws: {name: (B,)} bootstrap draws; point: {name: value} the full-data estimates.
        units: independent units resampled (runs, or groups); n_params: P.
        level: interval level.
    """
    stretch = np.sqrt(units / max(units - n_params, 1))
    tail = 100 * (1 - level) / 2
    out = {}
    for name, v in draws.items():
        lo, hi = np.nanpercentile(v, [tail, 100 - tail], axis=-1)
        p = point[name]
        low = p - stretch * (p - lo)
        if np.ndim(low) == 0 and low <= 0 < lo and p > 0:
            # A positive quantity (its lower percentile is positive): stretch on the log scale, so it stays positive.
            low = p * (lo / p) ** stretch
        out[name] = (low, p + stretch * (hi - p))
    return out


def resample_counts(n: int, draws: int, rng: np.random.Generator, groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap resamples as counts: (draws, n), row b = how often each run is in resample b.

    Args:
        n: number of runs.
        draws: number of resamples.
        rng: the random generator.
        groups: optional (n,) labels; then as many groups as there are are drawn with replacement, and a drawn
            group brings all its runs.
    """
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)
    labels, member = np.unique(np.asarray(groups), return_inverse=True)
    group_counts = rng.multinomial(len(labels), np.full(len(labels), 1.0 / len(labels)), size=draws)
    return group_counts[:, member].astype(float)


def derived_quantities(fit: Fit, params: dict[str, np.ndarray], target_compute: float) -> dict[str, np.ndarray]:
    """Quantities that follow from a law's parameters, elementwise over draws.

    Chinchilla: ``a`` (N_opt ∝ C^a), ``n_opt``, ``d_opt``, ``d_over_n`` and ``loss_opt`` at ``target_compute``.
    Saturating: ``y_at_target``, the law at ``target_compute``.

    Args:
        fit: the fit (its form says which quantities exist).
        params: parameter arrays (or floats) by name.
        target_compute: the compute budget the quantities are evaluated at (FLOPs).
    """
    if fit.form is CHINCHILLA:
        return compute_optimal(params, target_compute)
    theta = np.stack([np.atleast_1d(params[name]) for name in ("a", "b", "c", "d")], axis=-1)
    a, b, c, d = theta.T
    return {"y_at_target": a * (target_compute + d) ** (-b) + c}


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap draws of a fit.

    Attributes:
        fit: the full-data fit.
        theta: (B, P) internal parameters of each draw.
        draws: {name: (B,)} parameters and derived quantities of each draw.
        point: {name: float} the same quantities of the full-data fit.
        target_compute: where the derived quantities are evaluated.
        grad_norm_max: the largest final gradient norm over the draws.
        refitted_from_grid: draws that needed the whole grid of starts.
        not_converged: draws whose gradient norm stayed above GRAD_TOL (they are kept, and counted here).
        units: the independent units resampled (runs, or groups).
    """

    fit: Fit
    theta: np.ndarray
    draws: dict[str, np.ndarray]
    point: dict[str, float]
    target_compute: float
    grad_norm_max: float
    refitted_from_grid: int
    not_converged: int
    units: int

    def intervals(self, level: float = LEVEL) -> dict[str, tuple[float, float]]:
        """Percentile intervals of every parameter and derived quantity (``percentile_intervals``)."""
        found = percentile_intervals(self.draws, self.point, self.units, len(self.fit.theta), level)
        return {name: (float(lo), float(hi)) for name, (lo, hi) in found.items()}


def bootstrap_fit(fit: Fit, draws: int = 200, seed: int = 0, groups: np.ndarray | None = None,
                  target_compute: float | None = None, warm_start: bool = True) -> Bootstrap:
    """Refit ``fit``'s law on ``draws`` resamples of its runs.

    Args:
        fit: the full-data fit (``fit.fit_law``).
        draws: number of resamples B.
        seed: seed of the resampling.
        groups: optional (n,) group label of each run: resample whole groups.
        target_compute: where derived quantities are evaluated (default: the largest compute among the runs).
        warm_start: start every refit at the full-data optimum (fast); False refits each draw from the whole grid
            of starts (the reference the tests compare the warm starts with).
    """
    rng = np.random.default_rng(seed)
    counts = resample_counts(len(fit.y), draws, rng, groups)
    z, log_y = fit.z, np.log(fit.y)
    if warm_start:
        theta, _, gnorm = refine_batch(fit.form, np.repeat(fit.theta[None], draws, axis=0), z, log_y, counts,
                                       fit.delta)
        redo = np.flatnonzero(gnorm > GRAD_TOL)
    else:
        theta, gnorm, redo = np.empty((draws, len(fit.theta))), np.empty(draws), np.arange(draws)
    for b in redo:
        refit = fit_law(fit.form, fit.x, fit.y, weights=counts[b], delta=fit.delta)
        theta[b], gnorm[b] = refit.theta, refit.certificate.grad_norm
    target = float(fit.form.compute(fit.x).max()) if target_compute is None else float(target_compute)
    natural = fit.form.to_natural(theta, fit.ref)
    point_natural = {name: np.array(value) for name, value in fit.params.items()}
    all_draws = {**natural, **derived_quantities(fit, natural, target)}
    point = {name: float(np.squeeze(v))
             for name, v in {**point_natural, **derived_quantities(fit, point_natural, target)}.items()}
    return Bootstrap(fit=fit, theta=theta, draws={k: np.asarray(v, dtype=float) for k, v in all_draws.items()},
                     point=point, target_compute=target, grad_norm_max=float(gnorm.max()),
                     refitted_from_grid=len(redo) if warm_start else draws,
                     not_converged=int((gnorm > GRAD_TOL).sum()),
                     units=len(fit.y) if groups is None else len(np.unique(np.asarray(groups))))


def compare(first: Bootstrap, second: Bootstrap, names: tuple[str, ...] | None = None,
            level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Intervals on differences first - second (e.g. Mixer - ViT), draw b of one against draw b of the other.

    The two fits are on different runs, so their draws are independent and pairing them by index gives draws of
    the difference. Both bootstraps need the same number of draws and, for derived quantities, the same target.

    Args:
        first, second: bootstraps of two fits of one form.
        names: quantities to compare (default: every one both have).
        level: interval level.

    Returns:
        {name: {"diff": point difference, "lo": ..., "hi": ...}}.
    """
    if len(first.theta) != len(second.theta):
        raise ValueError(f"paired comparison needs equal draws: {len(first.theta)} vs {len(second.theta)}")
    if first.target_compute != second.target_compute:
        raise ValueError(f"the two bootstraps evaluate derived quantities at different compute: "
                         f"{first.target_compute:g} vs {second.target_compute:g}")
    names = names or tuple(k for k in first.draws if k in second.draws)
    tail = 100 * (1 - level) / 2
    out = {}
    for name in names:
        diff = first.draws[name] - second.draws[name]
        out[name] = {"diff": first.point[name] - second.point[name], "lo": float(np.nanpercentile(diff, tail)),
                     "hi": float(np.nanpercentile(diff, 100 - tail))}
    return out


def isoflop_bootstrap(n: np.ndarray, compute: np.ndarray, y: np.ndarray, draws: int = 200, seed: int = 0,
                      level: float = LEVEL) -> dict[str, object]:
    """Approach 2 (``forms.isoflop_minima``) with a bootstrap interval on its exponent ``a`` (N_opt ∝ C^a).

    Each resample redraws the runs of every budget from that budget's own runs (stratified: the design's budgets
    are kept, as a rerun of the study would keep them), refits each budget's parabola in log N by weighted least
    squares (all draws at once) and the line log N_opt vs log C through the budgets that still have an interior
    minimum. A draw where fewer than 2 budgets keep one has no exponent; their share is reported, since a large
    share means the profiles are too flat or too noisy to locate a minimum.

    Args:
        n, compute, y: as ``isoflop_minima`` (runs of one budget share the exact same compute value).
        draws: bootstrap resamples B.
        seed: seed of the resampling.
        level: interval level.

    Returns:
        {"a": point exponent, "ci": (lo, hi) percentile interval over the draws with an exponent, "budgets": the
        budgets with an interior minimum in the full data, "draws_without_exponent": their share, "a_draws": (B,)}.
    """
    n, compute, y = (np.asarray(v, dtype=float) for v in (n, compute, y))
    point = isoflop_minima(n, compute, y)
    rng = np.random.default_rng(seed)
    budgets = [b for b in np.unique(compute) if np.unique(n[compute == b]).size >= 3]
    log_c = np.log(np.array(budgets))
    vertex = np.full((draws, len(budgets)), np.nan)
    for j, budget in enumerate(budgets):
        at = np.flatnonzero(compute == budget)
        log_n = np.log(n[at])
        centre = log_n.mean()  # a parabola in log N - centre: well conditioned, unlike one in log N of ~20
        u = log_n - centre
        counts = rng.multinomial(len(at), np.full(len(at), 1.0 / len(at)), size=draws).astype(float)
        design = np.stack([u**2, u, np.ones_like(u)], axis=1)  # (m, 3)
        gram = np.einsum("bm,mi,mj->bij", counts, design, design)
        rhs = np.einsum("bm,mi,m->bi", counts, design, y[at])
        # A parabola needs 3 distinct sizes among the drawn runs.
        solvable = np.array([np.unique(log_n[row > 0]).size >= 3 for row in counts])
        coef = np.full((draws, 3), np.nan)
        coef[solvable] = np.linalg.solve(gram[solvable], rhs[solvable][..., None])[..., 0]
        curvature, slope = coef[:, 0], coef[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            v = centre + np.where(curvature > 0, -slope / (2 * curvature), np.nan)
        vertex[:, j] = np.where((v >= log_n.min()) & (v <= log_n.max()), v, np.nan)
    valid = np.isfinite(vertex)
    usable = valid.sum(axis=1) >= 2
    # Least-squares slope of vertex (log N_opt) on log C over each draw's valid budgets.
    w = valid.astype(float)
    sw = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c = (w * log_c).sum(axis=1) / sw
        mean_v = np.nansum(w * np.nan_to_num(vertex), axis=1) / sw
        dc = log_c[None] - mean_c[:, None]
        a_draws = (w * dc * (np.nan_to_num(vertex) - mean_v[:, None])).sum(axis=1) / (w * dc**2).sum(axis=1)
    a_draws = np.where(usable, a_draws, np.nan)
    tail = 100 * (1 - level) / 2
    ci = tuple(float(v) for v in np.nanpercentile(a_draws, [tail, 100 - tail])) if usable.any() else (np.nan, np.nan)
    return {"a": point["a"], "ci": ci, "budgets": point["budgets"], "draws_without_exponent": float(1 - usable.mean()),
            "a_draws": a_draws}
