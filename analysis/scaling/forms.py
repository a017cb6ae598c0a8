"""The scaling-law forms: what a law predicts, in what coordinates it is fitted, and what follows from it.

Two forms are fitted by ``analysis.scaling.fit``:

- ``SATURATING``: E(C) = a (C + d)^(-b) + c (Zhai et al. 2022, error vs compute);
- ``CHINCHILLA``: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, loss vs parameters and data).

Both are fitted on log y. Internally every input is centred on its mean log (``ref``), so the scale parameters
of a law are those at the geometric-mean run: that keeps the scale and exponent uncorrelated and the starts
grid the same for any units (FLOPs, images, tokens). ``to_natural`` converts back to the published parameters.

Also here, without fitting: the compute-optimal allocation a Chinchilla law implies (N_opt ∝ C^a with
a = beta / (alpha + beta), C = 6 N D) and isoFLOP minima (Hoffmann et al.'s approach 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Training compute of a dense model: forward + backward = 6 FLOPs per parameter per token (image) seen.
FLOPS_PER_PARAM_PER_SAMPLE = 6.0


@dataclass(frozen=True)
class Form:
    """A law y = f(inputs; params), fitted in internal coordinates theta.

    Attributes:
        name: "chinchilla" or "saturating".
        inputs: names of the input columns, in the order of the ``x`` arrays (("N", "D") or ("C",)).
        params: the published parameter names, in the order ``to_natural`` returns them.
        log_predict: (theta (S, P), z (n, k)) -> (log y (S, n), d log y / d theta (S, n, P)), z = log x - ref.
        start_grid: (z, log y) -> starts (S, P) in internal coordinates.
        to_natural: (theta (..., P), ref (k,)) -> {param name: array (...)}.
        from_natural: ({param name: value}, ref) -> theta (P,).
        compute: x (n, k) -> training compute of each run (FLOPs), for extrapolation distances.
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    log_predict: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    start_grid: Callable[[np.ndarray, np.ndarray], np.ndarray]
    to_natural: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
    from_natural: Callable[[dict[str, float], np.ndarray], np.ndarray]
    compute: Callable[[np.ndarray], np.ndarray]

    @property
    def min_points(self) -> int:
        """Fewest runs a fit of this form accepts: the parameters plus three left for the residuals."""
        return len(self.params) + 3


def _softmax_terms(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logsumexp over the last axis and the weight of each term (the derivative of the logsumexp)."""
    top = terms.max(axis=-1, keepdims=True)
    exp = np.exp(terms - top)
    total = exp.sum(axis=-1, keepdims=True)
    return (top + np.log(total))[..., 0], exp / total


# ---- Chinchilla: theta = (log E, log A', log B', alpha, beta), A' = A / Nref^alpha, B' = B / Dref^beta ----

def _chinchilla_log_predict(theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, a, b, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    zn, zd = z[:, 0], z[:, 1]
    terms = np.stack(np.broadcast_arrays(e, a - alpha * zn, b - beta * zd), axis=-1)
    log_y, w = _softmax_terms(terms)
    jac = np.stack([w[..., 0], w[..., 1], w[..., 2], -w[..., 1] * zn, -w[..., 2] * zd], axis=-1)
    return log_y, jac


def _chinchilla_grid(z: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    # E below the smallest loss; the reducible terms at the mean run from ~0.1 % to ~all of the largest loss.
    e = log_y.min() + np.log([0.1, 0.3, 0.5, 0.7, 0.85, 0.95])
    scale = log_y.max() + np.array([-7.0, -5.0, -3.5, -2.0, -1.0, 0.0])
    exponents = np.array([0.05, 0.2, 0.4, 0.7, 1.0, 1.5])
    return np.stack(np.meshgrid(e, scale, scale, exponents, exponents, indexing="ij"), axis=-1).reshape(-1, 5)


def _chinchilla_to_natural(theta: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    e, a, b, alpha, beta = np.moveaxis(np.asarray(theta, dtype=float), -1, 0)
    return {"E": np.exp(e), "A": np.exp(a + alpha * ref[0]), "B": np.exp(b + beta * ref[1]),
            "alpha": alpha, "beta": beta}


def _chinchilla_from_natural(p: dict[str, float], ref: np.ndarray) -> np.ndarray:
    return np.array([np.log(p["E"]), np.log(p["A"]) - p["alpha"] * ref[0], np.log(p["B"]) - p["beta"] * ref[1],
                     p["alpha"], p["beta"]])


CHINCHILLA = Form(
    name="chinchilla", inputs=("N", "D"), params=("E", "A", "B", "alpha", "beta"),
    log_predict=_chinchilla_log_predict, start_grid=_chinchilla_grid, to_natural=_chinchilla_to_natural,
    from_natural=_chinchilla_from_natural, compute=lambda x: FLOPS_PER_PARAM_PER_SAMPLE * x[:, 0] * x[:, 1])


# ---- Saturating: theta = (log c, log a', b, log d'), a' = a Cref^-b, d' = d / Cref ----

def _saturating_log_predict(theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lc, la, b, ld = (theta[:, i:i + 1] for i in range(4))
    zc = z[:, 0]
    u = np.logaddexp(zc, ld)  # log(C' + d')
    terms = np.stack(np.broadcast_arrays(lc, la - b * u), axis=-1)
    log_y, w = _softmax_terms(terms)
    du_dld = np.exp(ld - u)  # d'/(C' + d')
    jac = np.stack([w[..., 0], w[..., 1], -w[..., 1] * u, -w[..., 1] * b * du_dld], axis=-1)
    return log_y, jac


def _saturating_grid(z: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    lc = log_y.min() + np.log([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    la = log_y.max() + np.array([-6.0, -4.0, -2.5, -1.0, 0.0, 1.0])
    b = np.array([0.05, 0.15, 0.3, 0.5, 0.8, 1.2])
    ld = z[:, 0].min() + np.array([-10.0, -4.0, -2.0, -1.0, 0.0, 1.0])  # d from negligible to ~the smallest C
    return np.stack(np.meshgrid(lc, la, b, ld, indexing="ij"), axis=-1).reshape(-1, 4)


def _saturating_to_natural(theta: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    lc, la, b, ld = np.moveaxis(np.asarray(theta, dtype=float), -1, 0)
    return {"a": np.exp(la + b * ref[0]), "b": b, "c": np.exp(lc), "d": np.exp(ld + ref[0])}


def _saturating_from_natural(p: dict[str, float], ref: np.ndarray) -> np.ndarray:
    return np.array([np.log(p["c"]), np.log(p["a"]) - p["b"] * ref[0], p["b"], np.log(p["d"]) - ref[0]])


SATURATING = Form(
    name="saturating", inputs=("C",), params=("a", "b", "c", "d"),
    log_predict=_saturating_log_predict, start_grid=_saturating_grid, to_natural=_saturating_to_natural,
    from_natural=_saturating_from_natural, compute=lambda x: x[:, 0])

FORMS = {form.name: form for form in (CHINCHILLA, SATURATING)}


def chinchilla_loss(n: np.ndarray, d: np.ndarray, E: float, A: float, B: float, alpha: float,
                    beta: float) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta.

    Args:
        n: parameters of each run.
        d: samples (tokens, images) seen by each run.
        E, A, B, alpha, beta: the law's parameters.
    """
    return E + A / np.asarray(n, dtype=float) ** alpha + B / np.asarray(d, dtype=float) ** beta


def saturating_error(c: np.ndarray, a: float, b: float, c_inf: float, d: float) -> np.ndarray:
    """E(C) = a (C + d)^(-b) + c.

    Args:
        c: training compute of each run.
        a, b, c_inf, d: the law's a, b, c (the error at infinite compute) and d.
    """
    return a * (np.asarray(c, dtype=float) + d) ** (-b) + c_inf


def compute_optimal(params: dict[str, np.ndarray], compute: float) -> dict[str, np.ndarray]:
    """The allocation of a compute budget C = 6 N D that minimises a Chinchilla law (Hoffmann et al. eq. 4).

    N_opt = G (C/6)^a and D_opt = G^-1 (C/6)^(1-a), with a = beta/(alpha+beta) and
    G = (alpha A / (beta B))^(1/(alpha+beta)). Works elementwise on arrays of parameters (bootstrap draws).

    Args:
        params: E, A, B, alpha, beta (floats or arrays of one shape).
        compute: the budget C in FLOPs.

    Returns:
        a (N_opt ∝ C^a), n_opt, d_opt, d_over_n (D_opt / N_opt) and loss_opt (the law at the optimum).
    """
    alpha, beta = np.asarray(params["alpha"]), np.asarray(params["beta"])
    a = beta / (alpha + beta)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_g = (np.log(alpha * params["A"]) - np.log(beta * params["B"])) / (alpha + beta)
        log_half = np.log(compute / FLOPS_PER_PARAM_PER_SAMPLE)
        n_opt = np.exp(log_g + a * log_half)
        d_opt = np.exp(-log_g + (1 - a) * log_half)
        loss = chinchilla_loss(n_opt, d_opt, params["E"], params["A"], params["B"], alpha, beta)
    return {"a": a, "n_opt": n_opt, "d_opt": d_opt, "d_over_n": d_opt / n_opt, "loss_opt": loss}


def isoflop_minima(n: np.ndarray, compute: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray | float]:
    """Hoffmann et al.'s approach 2: per compute budget, the N minimising y from a parabola in log N; then
    N_opt ∝ C^a by least squares of log N_opt on log C.

    Args:
        n: parameters of each run.
        compute: the budget of each run; runs of one budget share the exact same value.
        y: loss (or error) of each run.

    Returns:
        budgets, n_opt and y_opt per budget that has a minimum inside its runs (a parabola opening upwards
        with its vertex within the budget's range of N; at least 3 sizes), and ``a``, the exponent (NaN with fewer
        than 2 such budgets).
    """
    n, compute, y = (np.asarray(v, dtype=float) for v in (n, compute, y))
    budgets, n_opt, y_opt = [], [], []
    for budget in np.unique(compute):
        at = compute == budget
        log_n = np.log(n[at])
        if np.unique(log_n).size < 3:
            continue
        curvature, slope, level = np.polyfit(log_n, y[at], 2)
        vertex = -slope / (2 * curvature) if curvature > 0 else np.nan
        if not log_n.min() <= vertex <= log_n.max():  # no interior minimum: the budget says nothing about N_opt
            continue
        budgets.append(budget)
        n_opt.append(np.exp(vertex))
        y_opt.append(level - slope**2 / (4 * curvature))
    budgets_a, n_opt_a = np.array(budgets), np.array(n_opt)
    a = float(np.polyfit(np.log(budgets_a), np.log(n_opt_a), 1)[0]) if len(budgets) >= 2 else float("nan")
    return {"budgets": budgets_a, "n_opt": n_opt_a, "y_opt": np.array(y_opt), "a": a}
