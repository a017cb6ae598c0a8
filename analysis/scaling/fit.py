"""Fitting a law as Besiroglu et al. 2024 (Epoch AI) do: Huber loss (delta 1e-3) on log residuals, summed over runs;
the objective evaluated at once over a grid of >= 1,000 starts (numpy broadcasting); the best few starts refined by
L-BFGS-B with the analytic gradient and tight tolerances, then polished by a damped Gauss-Newton (IRLS) that drives
the gradient to zero; and a certificate that says whether that happened.

Loose tolerances are the failure Epoch found in the original Chinchilla fit: the optimiser stops near its start, so
bootstrap refits started at the full-data fit barely move and the intervals come out far too narrow, silently. Here
every fit (bootstrap refits included) reports its final gradient norm, and ``converged`` is judged on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from analysis.scaling.forms import Form

HUBER_DELTA = 1e-3
# Converged: the largest gradient component, per unit of summed weight and in units of delta, below this.
GRAD_TOL = 1e-7


@dataclass(frozen=True)
class Certificate:
    """What the optimiser can vouch for.

    Attributes:
        objective: the best summed Huber loss (Epoch's units: comparable with their notebook).
        objective_spread: largest minus smallest objective among the refined best starts.
        param_spread: largest relative spread of any parameter among refined starts within 1e-6 of the best
            objective (0: they agree; large: the optimum is flat or there are several).
        grad_norm: largest gradient component at the optimum, per unit weight and in units of delta.
        converged: grad_norm <= GRAD_TOL.
        n_starts: grid starts evaluated; refined: how many of the best were refined.
    """

    objective: float
    objective_spread: float
    param_spread: float
    grad_norm: float
    converged: bool
    n_starts: int
    refined: int

    def as_dict(self) -> dict[str, float | bool | int]:
        return asdict(self)


@dataclass(frozen=True)
class Fit:
    """A fitted law and the data it was fitted on.

    Attributes:
        form: the law.
        x: inputs (n, k), in the order of ``form.inputs``; y: observed values (n,).
        ref: mean log of each input (the internal coordinates' origin).
        theta: the optimum in internal coordinates (P,).
        params: the optimum as the published parameters.
        certificate: the optimiser's certificate.
        delta: the Huber threshold on log residuals.
    """

    form: Form
    x: np.ndarray
    y: np.ndarray
    ref: np.ndarray
    theta: np.ndarray
    params: dict[str, float]
    certificate: Certificate
    delta: float

    @property
    def z(self) -> np.ndarray:
        return np.log(self.x) - self.ref

    def log_predict(self, x: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        """log y at inputs ``x`` (m, k) for the fit's parameters, or for each row of ``theta`` (S, P) -> (S, m)."""
        thetas = self.theta[None] if theta is None else np.atleast_2d(theta)
        log_y, _ = self.form.log_predict(thetas, np.log(np.asarray(x, dtype=float)) - self.ref)
        return log_y[0] if theta is None else log_y

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The law at inputs ``x`` (m, k)."""
        return np.exp(self.log_predict(x))

    def log_residuals(self) -> np.ndarray:
        """log y - log f(x) of the fitted runs."""
        return np.log(self.y) - self.log_predict(self.x)


def objective(form: Form, theta: np.ndarray, z: np.ndarray, log_y: np.ndarray, weights: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of log residuals and its gradient, for S parameter vectors at once.

    Args:
        form: the law.
        theta: (S, P) internal parameters.
        z: (n, k) centred log inputs; log_y: (n,) log observations, or (S, n) one set per parameter vector.
        weights: (n,) shared or (S, n) per parameter vector (bootstrap counts): the weight of each run.
        delta: Huber threshold.

    Returns:
        objective (S,) and gradient (S, P).
    """
    log_pred, jac = form.log_predict(theta, z)
    r = log_y - log_pred
    abs_r = np.abs(r)
    loss = np.where(abs_r <= delta, 0.5 * r**2, delta * (abs_r - 0.5 * delta))
    psi = np.clip(r, -delta, delta)  # dHuber/dr
    return (weights * loss).sum(axis=-1), -np.einsum("sn,snp->sp", np.broadcast_to(weights * psi, r.shape), jac)


def grad_norms(grad: np.ndarray, weights: np.ndarray, delta: float) -> np.ndarray:
    """Largest gradient component per unit of summed weight, in units of delta (scale-free), per row."""
    return np.abs(grad).max(axis=-1) / (delta * np.broadcast_to(weights, (len(grad), weights.shape[-1])).sum(-1))


def refine_batch(form: Form, theta: np.ndarray, z: np.ndarray, log_y: np.ndarray, weights: np.ndarray,
                 delta: float = HUBER_DELTA, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Damped Gauss-Newton on the Huber objective for S problems at once (Levenberg-Marquardt steps on the IRLS
    majoriser: each run weighted by min(1, delta/|r|)); a step is kept only where it lowers that problem's
    objective, so each problem descends monotonically, and each stops when its gradient norm is below GRAD_TOL.

    Args:
        form: the law.
        theta: (S, P) starting points (e.g. the full-data optimum for every bootstrap draw).
        z: (n, k) centred log inputs shared by all problems.
        log_y: (n,) shared or (S, n) per problem (e.g. simulated datasets on one design).
        weights: (S, n) or (n,) run weights.
        delta: Huber threshold.
        max_iter: steps at most.

    Returns:
        theta (S, P), objective (S,), gradient norm (S,).
    """
    theta = np.array(theta, dtype=float)
    weights = np.broadcast_to(weights, (len(theta), z.shape[0]))
    log_y = np.broadcast_to(log_y, weights.shape)
    f, g = objective(form, theta, z, log_y, weights, delta)
    damping = np.full(len(theta), 1e-3)
    stopped = np.zeros(len(theta), dtype=bool)  # no descent left: damping exploded or the decrease stalled
    with threadpool_limits(1, user_api="blas"):  # thousands of 5x5 solves: threads only add overhead
        for _ in range(max_iter):
            active = np.flatnonzero((grad_norms(g, weights, delta) > GRAD_TOL) & ~stopped)
            if not active.size:
                break
            _lm_step(form, active, theta, f, g, damping, stopped, z, log_y, weights, delta)
    return theta, f, grad_norms(g, weights, delta)


def _lm_step(form: Form, idx: np.ndarray, theta: np.ndarray, f: np.ndarray, g: np.ndarray, damping: np.ndarray,
             stopped: np.ndarray, z: np.ndarray, log_y: np.ndarray, weights: np.ndarray, delta: float) -> None:
    """One damped Gauss-Newton step of problems ``idx``, updating theta, f, g, damping and stopped in place."""
    log_pred, jac = form.log_predict(theta[idx], z)
    r = log_y[idx] - log_pred
    irls = weights[idx] * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
    hess = np.einsum("snp,sn,snq->spq", jac, irls, jac)
    eye = np.eye(theta.shape[1])
    lhs = hess + damping[idx, None, None] * (np.einsum("spp->sp", hess)[:, :, None] * eye + 1e-12 * eye)
    step = np.linalg.solve(lhs, -g[idx][:, :, None])[:, :, 0]
    f_new, g_new = objective(form, theta[idx] + step, z, log_y[idx], weights[idx], delta)
    better = np.isfinite(f_new) & (f_new <= f[idx])
    took = idx[better]
    # A kept step that lowers f by no more than rounding ends that problem's descent.
    stopped[idx[better & (f[idx] - f_new <= 1e-15 * np.abs(f[idx]))]] = True
    theta[took] += step[better]
    f[took], g[took] = f_new[better], g_new[better]
    damping[took] = np.maximum(damping[took] / 3.0, 1e-12)
    damping[idx[~better]] *= 4.0
    stopped[idx[damping[idx] >= 1e12]] = True


def _lbfgs(form: Form, start: np.ndarray, z: np.ndarray, log_y: np.ndarray, weights: np.ndarray,
           delta: float) -> np.ndarray:
    # The objective is rescaled by 1/delta^2 so that L-BFGS-B's relative tolerances act on a quantity of order n.
    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = objective(form, theta[None], z, log_y, weights, delta)
        if not np.isfinite(f[0]):
            return 1e300, np.zeros_like(theta)
        return f[0] / delta**2, g[0] / delta**2

    # One BLAS thread: L-BFGS-B's tiny BLAS calls run ~10x slower when OpenBLAS spreads them over busy cores.
    with threadpool_limits(1, user_api="blas"):
        result = minimize(value_and_grad, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": 20_000, "maxfun": 40_000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 10})
    return result.x


def fit_law(form: Form, x: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None,
            delta: float = HUBER_DELTA, refine: int = 5) -> Fit:
    """Fit ``form`` to runs (x, y): grid of starts -> best ``refine`` by L-BFGS-B -> Gauss-Newton polish.

    Args:
        form: the law (``forms.CHINCHILLA`` or ``forms.SATURATING``).
        x: (n, k) positive inputs in the order of ``form.inputs`` (a 1-d array for a one-input form).
        y: (n,) positive observations (loss or error).
        weights: optional (n,) non-negative run weights (default 1 each).
        delta: Huber threshold on log residuals (Epoch: 1e-3).
        refine: how many of the best grid starts are refined.

    Returns:
        The Fit, with its certificate.
    """
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    ref = np.log(x).mean(axis=0)
    z, log_y = np.log(x) - ref, np.log(y)
    starts = form.start_grid(z, log_y)
    f_starts = np.concatenate([objective(form, chunk, z, log_y, weights, delta)[0]
                               for chunk in np.array_split(starts, max(1, len(starts) // 1000))])
    best = starts[np.argsort(np.where(np.isfinite(f_starts), f_starts, np.inf))[:refine]]
    refined = np.stack([_lbfgs(form, start, z, log_y, weights, delta) for start in best])
    refined, f_refined, gnorm = refine_batch(form, refined, z, log_y, weights, delta)
    order = np.argsort(f_refined)
    top = order[0]
    natural = form.to_natural(refined, ref)
    near = f_refined <= f_refined[top] * (1 + 1e-6)
    spread = max(float(np.ptp(v[near]) / max(abs(float(v[top])), 1e-300)) for v in natural.values())
    certificate = Certificate(objective=float(f_refined[top]), objective_spread=float(np.ptp(f_refined)),
                              param_spread=spread, grad_norm=float(gnorm[top]),
                              converged=bool(gnorm[top] <= GRAD_TOL), n_starts=len(starts), refined=len(best))
    params = {name: float(value[top]) for name, value in natural.items()}
    return Fit(form=form, x=x, y=y, ref=ref, theta=refined[top], params=params, certificate=certificate,
               delta=delta)
