"""analysis.scaling: real fits on synthetic data from known laws (no mocks), and `mixer-study fit --csv`.

The coverage simulations (the bootstrap's 95 % intervals against the truth, ungrouped and grouped noise) are in
tests/test_scaling_coverage.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.scaling.bootstrap import bootstrap_fit, compare, isoflop_bootstrap
from analysis.scaling.fit import GRAD_TOL, fit_law, refine_batch
from analysis.scaling.forms import (
    CHINCHILLA,
    SATURATING,
    chinchilla_loss,
    compute_optimal,
    isoflop_minima,
    saturating_error,
)
from analysis.scaling.predict import calibrate, holdout_check, prediction_interval
from pipeline.cli import main

TRUE = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.34, "beta": 0.28}
SAT = {"a": 50.0, "b": 0.3, "c": 0.08, "d": 3e3}


def chinchilla_grid(sizes: int = 12, per_size: int = 6) -> np.ndarray:
    n = np.repeat(np.geomspace(1e7, 1e9, sizes), per_size)
    d = np.tile(np.geomspace(1e8, 1e10, per_size), sizes) * np.repeat(np.geomspace(1, 3, sizes), per_size)
    return np.stack([n, d], axis=1)


def chinchilla_data(noise: float, seed: int = 0, **grid: int) -> tuple[np.ndarray, np.ndarray]:
    x = chinchilla_grid(**grid)
    y = chinchilla_loss(x[:, 0], x[:, 1], **TRUE) * np.exp(np.random.default_rng(seed).normal(0, noise, len(x)))
    return x, y


@pytest.mark.parametrize("form", [CHINCHILLA, SATURATING])
def test_jacobian_matches_finite_differences(form) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (30, len(form.inputs)))
    theta = form.start_grid(z, np.log(rng.uniform(1, 3, 30)))[::97][:5]
    _, jac = form.log_predict(theta, z)
    step = 1e-6
    for p in range(theta.shape[1]):
        bump = np.zeros(theta.shape[1])
        bump[p] = step
        numeric = (form.log_predict(theta + bump, z)[0] - form.log_predict(theta - bump, z)[0]) / (2 * step)
        np.testing.assert_allclose(jac[..., p], numeric, atol=1e-7)


def test_forms_predict_the_published_laws() -> None:
    x = chinchilla_grid()
    ref = np.log(x).mean(axis=0)
    theta = CHINCHILLA.from_natural(TRUE, ref)
    np.testing.assert_allclose(np.exp(CHINCHILLA.log_predict(theta[None], np.log(x) - ref)[0][0]),
                               chinchilla_loss(x[:, 0], x[:, 1], **TRUE), rtol=1e-12)
    c = np.geomspace(1e3, 1e9, 20)[:, None]
    ref = np.log(c).mean(axis=0)
    theta = SATURATING.from_natural(SAT, ref)
    np.testing.assert_allclose(np.exp(SATURATING.log_predict(theta[None], np.log(c) - ref)[0][0]),
                               saturating_error(c[:, 0], SAT["a"], SAT["b"], SAT["c"], SAT["d"]), rtol=1e-12)
    for name, value in SATURATING.to_natural(theta, ref).items():
        assert value == pytest.approx(SAT[name], rel=1e-12)


def test_chinchilla_fit_recovers_the_law_and_certifies_it() -> None:
    x, y = chinchilla_data(noise=0.0)
    fit = fit_law(CHINCHILLA, x, y)
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name
    cert = fit.certificate
    assert cert.converged and cert.grad_norm <= GRAD_TOL and cert.n_starts >= 1000
    assert cert.objective < 1e-12 and cert.param_spread < 1e-3


def test_saturating_fit_recovers_the_law() -> None:
    c = np.geomspace(1e3, 1e9, 25)
    y = saturating_error(c, SAT["a"], SAT["b"], SAT["c"], SAT["d"])
    fit = fit_law(SATURATING, c, y)
    assert fit.certificate.converged
    for name in ("a", "b", "c"):
        assert fit.params[name] == pytest.approx(SAT[name], rel=1e-3), name
    assert fit.params["d"] == pytest.approx(SAT["d"], rel=0.05)  # d moves the curve only below ~d FLOPs


def test_an_unfinished_optimisation_is_reported_as_not_converged() -> None:
    x, y = chinchilla_data(noise=0.01)
    fit = fit_law(CHINCHILLA, x, y)
    start = fit.theta + np.array([0.0, 0.3, -0.3, 0.05, -0.05])
    _, _, gnorm = refine_batch(CHINCHILLA, start[None], fit.z, np.log(y), np.ones(len(y)), max_iter=2)
    assert gnorm[0] > GRAD_TOL  # two steps are not enough, and the gradient norm says so
    _, _, gnorm = refine_batch(CHINCHILLA, start[None], fit.z, np.log(y), np.ones(len(y)))
    assert gnorm[0] <= GRAD_TOL


def test_compute_optimal_allocation_minimises_the_law() -> None:
    budget = 1e21
    opt = compute_optimal({k: np.array(v) for k, v in TRUE.items()}, budget)
    assert float(opt["a"]) == pytest.approx(0.28 / 0.62)
    n = np.geomspace(1e6, 1e12, 200_001)
    brute = n[np.argmin(chinchilla_loss(n, budget / (6 * n), **TRUE))]
    assert float(opt["n_opt"]) == pytest.approx(brute, rel=1e-3)
    assert float(opt["d_over_n"]) == pytest.approx(budget / (6 * brute) / brute, rel=3e-3)


def test_isoflop_minima_give_the_allocation_exponent() -> None:
    budgets = np.geomspace(1e17, 1e21, 5)
    n = np.concatenate([np.geomspace(0.1, 10, 9) * float(compute_optimal(TRUE, b)["n_opt"]) for b in budgets])
    c = np.repeat(budgets, 9)
    result = isoflop_minima(n, c, chinchilla_loss(n, c / (6 * n), **TRUE))
    assert len(result["budgets"]) == 5
    assert result["a"] == pytest.approx(0.28 / 0.62, abs=0.02)


def test_warm_started_bootstrap_equals_refits_from_the_whole_grid() -> None:
    """Warm starts at the full-data optimum do not narrow the intervals: each draw reaches the optimum a full
    multi-start fit of that resample reaches."""
    x, y = chinchilla_data(noise=0.01, sizes=8, per_size=5)
    fit = fit_law(CHINCHILLA, x, y)
    warm = bootstrap_fit(fit, 8, seed=3)
    cold = bootstrap_fit(fit, 8, seed=3, warm_start=False)
    assert warm.not_converged == 0 and cold.not_converged == 0
    for name in ("alpha", "beta", "E", "a"):
        np.testing.assert_allclose(warm.draws[name], cold.draws[name], rtol=1e-4)


def test_group_bootstrap_resamples_whole_groups() -> None:
    x, y = chinchilla_data(noise=0.01, sizes=8, per_size=5)
    fit = fit_law(CHINCHILLA, x, y)
    groups = np.repeat(np.arange(8), 5)
    boot = bootstrap_fit(fit, 50, seed=0, groups=groups)
    rows = bootstrap_fit(fit, 50, seed=0)
    lo, hi = boot.intervals()["alpha"]
    assert lo < fit.params["alpha"] < hi and boot.not_converged == 0 and rows.not_converged == 0
    assert set(boot.draws) >= {"E", "A", "B", "alpha", "beta", "a", "d_over_n", "loss_opt"}


def test_compare_pairs_draws_and_sees_a_real_difference() -> None:
    x, y = chinchilla_data(noise=5e-4, seed=1)
    steeper = dict(TRUE, alpha=0.45)
    y2 = chinchilla_loss(x[:, 0], x[:, 1], **steeper) * np.exp(np.random.default_rng(2).normal(0, 5e-4, len(x)))
    same = bootstrap_fit(fit_law(CHINCHILLA, *chinchilla_data(noise=5e-4, seed=3)), 100, seed=0, target_compute=1e21)
    first = bootstrap_fit(fit_law(CHINCHILLA, x, y), 100, seed=1, target_compute=1e21)
    second = bootstrap_fit(fit_law(CHINCHILLA, x, y2), 100, seed=2, target_compute=1e21)
    diff = compare(first, second, ("alpha", "loss_opt"))
    assert diff["alpha"]["lo"] < 0.34 - 0.45 < diff["alpha"]["hi"] < 0
    assert diff["loss_opt"]["lo"] > 0  # the steeper law reaches a lower loss at 1e21 FLOPs
    null = compare(first, same, ("alpha",))["alpha"]
    assert null["lo"] < 0 < null["hi"]


def test_prediction_bands_hold_out_of_sample() -> None:
    x, y = chinchilla_data(noise=0.01, seed=4, sizes=16, per_size=8)
    result = holdout_check(CHINCHILLA, x, y, holdout_above=np.quantile(6 * x[:, 0] * x[:, 1], 0.75), draws=100)
    assert result["converged"] and result["held_out"] == 32
    assert result["mape"] < 0.02
    assert result["inside_band"] >= 0.85


def test_extrapolation_widens_the_band() -> None:
    x, y = chinchilla_data(noise=0.01, seed=5)
    fit = fit_law(CHINCHILLA, x, y)
    boot = bootstrap_fit(fit, 50, seed=0)
    calibration = calibrate(fit)
    assert calibration.scatter == pytest.approx(0.01, rel=0.35) and len(calibration.backtest) == 4
    inside, far = np.array([[1e8, 1e9]]), np.array([[1e11, 1e13]])
    near_band, far_band = (prediction_interval(boot, v, calibration) for v in (inside, far))
    assert (far_band["hi"] / far_band["lo"])[0] > (near_band["hi"] / near_band["lo"])[0]
    assert near_band["lo"][0] < near_band["y"][0] < near_band["hi"][0]


# ---- the CLI on a CSV ----

def write_csv(path, rows: list[dict]) -> str:
    keys = list(rows[0])
    path.write_text(",".join(keys) + "\n" + "\n".join(",".join(str(r[k]) for k in keys) for r in rows) + "\n")
    return str(path)


def runs_table(noise: float = 0.01) -> list[dict]:
    x, y = chinchilla_data(noise=noise, sizes=8, per_size=5)
    return [{"params": n, "images": d, "loss": v, "size": f"s{i // 5}", "flops": 6 * n * d}
            for i, ((n, d), v) in enumerate(zip(x, y))]


def test_fit_csv_chinchilla_with_groups_and_predictions(tmp_path, capsys) -> None:
    csv = write_csv(tmp_path / "runs.csv", runs_table())
    new = write_csv(tmp_path / "new.csv", [{"params": 5e8, "images": 2e10}, {"params": 1e10, "images": 2e11}])
    out = tmp_path / "fit.json"
    main(["fit", "--csv", csv, "--form", "chinchilla", "--n", "params", "--d", "images", "--y", "loss",
          "--group", "size", "--bootstrap", "40", "--seed", "1", "--predict", new, "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert set(result["ci95"]) >= {"E", "A", "B", "alpha", "beta", "a"}
    assert result["n_points"] == 40 and result["n_groups"] == 8 and result["certificate"]["converged"]
    lo, hi = result["ci95"]["alpha"]
    assert lo <= result["params"]["alpha"] <= hi
    assert len(result["predictions"]) == 2
    for p in result["predictions"]:
        assert p["lo"] < p["y"] < p["hi"]
    assert "converged" in capsys.readouterr().out


def test_fit_csv_saturating(tmp_path) -> None:
    c = np.geomspace(1e3, 1e9, 20)
    y = saturating_error(c, SAT["a"], SAT["b"], SAT["c"], SAT["d"]) * np.exp(
        np.random.default_rng(0).normal(0, 0.005, 20))
    csv = write_csv(tmp_path / "runs.csv", [{"flops": a, "err": b} for a, b in zip(c, y)])
    out = tmp_path / "fit.json"
    main(["fit", "--csv", csv, "--form", "saturating", "--c", "flops", "--y", "err", "--bootstrap", "30",
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["params"]) == {"a", "b", "c", "d"} and result["params"]["b"] == pytest.approx(0.3, abs=0.05)
    assert set(result["ci95"]) >= {"a", "b", "c", "d"}


def isoflop_runs(noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approach 2's design: 6 budgets, 9 sizes around each budget's optimum, log-normal noise on the loss."""
    budgets = np.geomspace(1e17, 1e21, 6)
    n = np.concatenate([np.geomspace(0.2, 5, 9) * float(compute_optimal(TRUE, b)["n_opt"]) for b in budgets])
    c = np.repeat(budgets, 9)
    return n, c, chinchilla_loss(n, c / (6 * n), **TRUE) * np.exp(rng.normal(0, noise, len(n)))


def test_isoflop_interval_covers_the_true_exponent() -> None:
    """100 simulated approach-2 studies: the bootstrap interval on a covers the law's a = beta/(alpha+beta) at
    least 93 % of the time (measured 98 % at 300 studies: the parabola's own approximation error makes it
    conservative, never narrow), and more noise gives a wider interval."""
    rng = np.random.default_rng(0)
    truth = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    hits, widths = [], []
    for seed in range(100):
        found = isoflop_bootstrap(*isoflop_runs(0.01, rng), draws=100, seed=seed)
        lo, hi = found["ci"]
        hits.append(lo <= truth <= hi)
        widths.append(hi - lo)
    assert np.mean(hits) >= 0.93
    noisier = isoflop_bootstrap(*isoflop_runs(0.03, np.random.default_rng(1)), draws=100)
    assert noisier["ci"][1] - noisier["ci"][0] > np.median(widths)


def test_fit_csv_isoflop(tmp_path, capsys) -> None:
    n, c, y = isoflop_runs(0.005, np.random.default_rng(2))
    csv = write_csv(tmp_path / "runs.csv", [{"params": a, "flops": b, "loss": v} for a, b, v in zip(n, c, y)])
    out = tmp_path / "iso.json"
    main(["fit", "--csv", csv, "--form", "isoflop", "--n", "params", "--c", "flops", "--bootstrap", "50",
          "--json", str(out)])
    result = json.loads(out.read_text())
    lo, hi = result["ci95"]["a"]
    assert lo <= result["params"]["a"] <= hi and result["params"]["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert len(result["budgets"]) == 6 and result["n_points"] == 54
    assert "N_opt" in capsys.readouterr().out
    flat = write_csv(tmp_path / "flat.csv", [{"params": a, "flops": b * (1 + i), "loss": v}
                                             for i, (a, b, v) in enumerate(zip(n, c, y))])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--csv", flat, "--form", "isoflop", "--n", "params", "--c", "flops", "--json", str(out)])
    assert exit_info.value.code == 2
    assert "needs at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("change, extra, message", [
    (None, ["--n", "nparams"], "no column 'nparams'"),
    ({3: {"loss": -1.0}}, [], "row 5 column 'loss'"),
    ({7: {"images": "nan"}}, [], "row 9 column 'images'"),
    ({2: {"params": ""}}, [], "row 4 column 'params'"),
    ("few", [], "needs at least 8"),
    (None, ["--group", "size"], "2 groups"),
    (None, ["--d", None], "needs --d COLUMN"),
])
def test_fit_csv_bad_input_exits_2_naming_the_problem(tmp_path, capsys, change, extra, message) -> None:
    rows = runs_table()
    if change == "few":
        rows = rows[:5]
    elif isinstance(change, dict):
        for i, edit in change.items():
            rows[i].update(edit)
    if "--group" in extra:
        for i, r in enumerate(rows):
            r["size"] = f"s{i % 2}"
    csv = write_csv(tmp_path / "runs.csv", rows)
    args = {"--n": "params", "--d": "images", "--y": "loss"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    argv = ["fit", "--csv", csv, "--json", str(tmp_path / "x.json"), "--bootstrap", "5"]
    argv += [v for flag, value in args.items() if value is not None for v in (flag, value)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
