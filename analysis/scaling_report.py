"""The scaling laws of a study (``mixer-study fit NAME``, and a section of ``report``): results table in -> fits,
intervals, family comparisons, held-out checks, a table (markdown + JSON) and figures out. Pure analysis: no MLflow,
no Ray (``analysis.report`` reads the runs and logs what this returns).

Forms fitted where the study's grid supports them (otherwise skipped, with the reason in the output):

- per family, error = 1 - accuracy vs training compute C (``train_flops``) as the saturating law
  E(C) = a (C + d)^(-b) + c, on the family's Pareto frontier and on all its runs;
- L(N, D) = E + A/N^alpha + B/D^beta over all runs, N = parameters without the classification head (the head
  depends on the dataset's classes, which runs do not log), D = images seen. With repeated epochs D counts
  repetitions, not unique images: the output also reports the unique images (``train_images``) per run.

Runs sharing a model size are not independent (one architecture, one initialisation scheme), so the bootstrap draws
whole variants when a fit has at least ``MIN_GROUPS`` of them, and draws runs otherwise (the output says which).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import save_figure
from analysis.pareto import pareto_front
from analysis.scaling.bootstrap import Bootstrap, bootstrap_fit, compare
from analysis.scaling.fit import fit_law
from analysis.scaling.forms import CHINCHILLA, SATURATING, Form
from analysis.scaling.predict import calibrate, holdout_check, prediction_interval
from analysis.scaling.table import MIN_GROUPS
from workers.models.registry import get_variant, param_count
from workers.names import scaling_metric

log = logging.getLogger(__name__)

# A saturating law has 4 parameters. Through 4 distinct compute levels it passes exactly through their mean errors,
# whatever (a, b, c, d) the noise picks: nothing is left to test the curve's shape, and bootstrap refits wander
# (model_scale's 4 Mixers gave b in [-26, 538] and 7 minutes of refits). One level more than parameters, however
# many runs repeat them.
MIN_COMPUTE_LEVELS = len(SATURATING.params) + 1
# Chinchilla: each of N and D needs 3 levels, or its power law cannot be told apart from the constant E.
MIN_AXIS_LEVELS = 3
HOLDOUT_QUANTILE = 0.75  # the held-out check holds out the runs above this quantile of compute
REFERENCE_FAMILY = "Mixer"  # family comparisons are Mixer - other
EXTRAPOLATE_DECADES = 1.0  # figures draw the law this far beyond the largest compute


def quality_column(df: pd.DataFrame) -> str:
    """The accuracy the fits use: fine-tuned top-1 where trials fine-tuned, else linear 5-shot, else best val/acc
    (the order ``report``'s figures use)."""
    for column in ("finetune_top1", "fewshot_5shot", "best_val_acc"):
        if column in df and df[column].notna().any():
            return column
    raise LookupError("no accuracy column with values (finetune_top1, fewshot_5shot, best_val_acc)")


def scaling_rows(df: pd.DataFrame, quality: str) -> pd.DataFrame:
    """The finished, unpermuted runs with what the laws need: family, variant, compute, error = 1 - ``quality``,
    n_params (without head), images_seen and train_images; runs missing any of these, or with error 0, are dropped.

    Args:
        df: a study's results table (``analysis.results.load_study``).
        quality: the accuracy column.
    """
    keep = (df["status"] == "FINISHED") & (df["permute"].fillna("none") == "none")
    rows = df.loc[keep, ["variant", "family", "image_size", "train_flops", "images_seen", "train_images", quality]]
    rows = rows.rename(columns={"train_flops": "compute"}).assign(error=1.0 - rows[quality])
    rows = rows[rows["compute"].gt(0) & rows["error"].gt(0) & rows["family"].notna()].copy()

    def params_without_head(row: pd.Series) -> float:
        if pd.isna(row["image_size"]):
            return float("nan")
        return float(param_count(get_variant(row["variant"]), int(row["image_size"]), 0))

    rows["n_params"] = rows.apply(params_without_head, axis=1) if len(rows) else []
    return rows.reset_index(drop=True)


def rows_sha256(rows: pd.DataFrame) -> str:
    """sha256 of the rows a fit read (sorted, as CSV): the provenance tag of the fits."""
    ordered = rows.sort_values(list(rows.columns), ignore_index=True)
    return hashlib.sha256(ordered.to_csv(index=False).encode()).hexdigest()


def _support(form: Form, x: np.ndarray) -> str | None:
    """Why the grid cannot support ``form`` on inputs ``x``, or None if it can."""
    if len(x) < form.min_points:
        return f"{len(x)} runs; the {form.name} form needs at least {form.min_points}"
    levels = [len(np.unique(x[:, k])) for k in range(x.shape[1])]
    needed = MIN_COMPUTE_LEVELS if form is SATURATING else MIN_AXIS_LEVELS
    for name, count in zip(form.inputs, levels):
        if count < needed:
            return f"{count} distinct {name} values; the {form.name} form needs at least {needed}"
    return None


def _groups(variants: pd.Series) -> tuple[np.ndarray | None, str]:
    count = variants.nunique()
    if count >= MIN_GROUPS:
        return variants.to_numpy(), f"whole variants ({count})"
    return None, f"runs (only {count} variants; a variant bootstrap needs at least {MIN_GROUPS})"


def _fit_one(label: str, form: Form, x: np.ndarray, y: np.ndarray, variants: pd.Series, draws: int, seed: int,
             target: float) -> tuple[dict[str, Any], Bootstrap | None]:
    """One fit (``label`` names it in the progress log): params, intervals, certificate, held-out check; or the
    reason it was skipped."""
    reason = _support(form, x)
    if reason:
        log.info("scaling: %s skipped: %s", label, reason)
        return {"skipped": reason, "n_points": len(x)}, None
    log.info("scaling: %s: fitting %d runs, %d bootstrap draws and the held-out check", label, len(x), draws)
    start = time.monotonic()
    groups, resampled = _groups(variants)
    fit = fit_law(form, x, y)
    # Refits of wild resamples overflow on the way (exp, power): expected, and counted in ``not_converged``.
    with np.errstate(over="ignore", invalid="ignore"):
        boot = bootstrap_fit(fit, draws, seed, groups, target_compute=target)
    ci = boot.intervals()
    out: dict[str, Any] = {
        "params": fit.params, "ci95": {name: list(bounds) for name, bounds in ci.items()},
        "derived": {name: value for name, value in boot.point.items() if name not in fit.params},
        "target_compute": target, "n_points": len(x), "resampled": resampled,
        "bootstrap": {"draws": draws, "seed": seed, "not_converged": boot.not_converged},
        "certificate": fit.certificate.as_dict(),
    }
    compute = form.compute(x)
    cut = float(np.quantile(compute, HOLDOUT_QUANTILE))
    below = compute <= cut
    why_not = _support(form, x[below]) if (~below).any() else "no run above the compute cut"
    if why_not:
        out["holdout"] = {"skipped": f"the runs at or below the {HOLDOUT_QUANTILE:.0%} compute quantile: {why_not}"}
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            check = holdout_check(form, x, y, holdout_above=cut, draws=draws, seed=seed, groups=groups)
        out["holdout"] = {"holdout_above": cut, **check}
    log.info("scaling: %s: done in %.0f s", label, time.monotonic() - start)
    return out, boot


def _frontier(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs no other run beats on both compute and error (the Pareto frontier)."""
    return pareto_front(runs.assign(accuracy=1 - runs["error"]), "compute", "accuracy").drop(columns="accuracy")


def fit_study_rows(rows: pd.DataFrame, draws: int = 200, seed: int = 0) -> tuple[dict[str, Any], dict[str, Bootstrap]]:
    """Every form the grid supports, fitted with intervals; Mixer - other families compared.

    Args:
        rows: ``scaling_rows`` output.
        draws: bootstrap resamples per fit.
        seed: bootstrap seed.

    Returns:
        the JSON-ready result ({"saturating": {family: {"frontier": ..., "all": ...}}, "chinchilla": ...,
        "comparisons": ..., ...}) and the bootstraps by key ("saturating/<family>/<scope>", "chinchilla").
    """
    target = float(rows["compute"].max()) if len(rows) else float("nan")
    result: dict[str, Any] = {"n_rows": len(rows), "target_compute": target, "saturating": {}, "comparisons": {}}
    boots: dict[str, Bootstrap] = {}
    for family, runs in rows.groupby("family", sort=True):
        result["saturating"][family] = {}
        for scope, part in (("frontier", _frontier(runs)), ("all", runs)):
            fitted, boot = _fit_one(f"{family} saturating, {scope}", SATURATING, part[["compute"]].to_numpy(float),
                                    part["error"].to_numpy(float), part["variant"], draws, seed, target)
            result["saturating"][family][scope] = fitted
            if boot is not None:
                boots[f"saturating/{family}/{scope}"] = boot
    others = sorted(set(result["saturating"]) - {REFERENCE_FAMILY}) if REFERENCE_FAMILY in result["saturating"] else []
    for other in others:
        for scope in ("frontier", "all"):
            first = boots.get(f"saturating/{REFERENCE_FAMILY}/{scope}")
            second = boots.get(f"saturating/{other}/{scope}")
            key = f"{REFERENCE_FAMILY}-{other}/{scope}"
            if first is None or second is None:
                result["comparisons"][key] = {"skipped": "a law for both families is needed"}
                continue
            result["comparisons"][key] = compare(first, second, names=("b", "y_at_target"))
    x = rows[["n_params", "images_seen"]].to_numpy(float)
    ok = np.isfinite(x).all(axis=1)
    fitted, boot = _fit_one("L(N, D)", CHINCHILLA, x[ok], rows["error"].to_numpy(float)[ok], rows.loc[ok, "variant"],
                            draws, seed, target)
    result["chinchilla"] = {**fitted, "unique_images": sorted({int(v) for v in rows["train_images"].dropna()}),
                            "note": "D = images seen, repeated epochs included; unique_images lists the distinct "
                                    "train-set sizes (train_images)"}
    if boot is not None:
        boots["chinchilla"] = boot
    return result, boots


def scaling_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: scaling/<family>/<scope>/<name>[_lo|_hi], scaling/chinchilla/..., and
    scaling/compare/<Mixer-X>/<scope>/<name>[_lo|_hi]; held-out MAPE and inside-band fraction per fit."""
    metrics: dict[str, float] = {}

    def add(prefix: tuple[str, ...], fitted: dict[str, Any]) -> None:
        if "skipped" in fitted:
            return
        for name, value in {**fitted["params"], **fitted["derived"]}.items():
            metrics[scaling_metric(*prefix, name)] = float(value)
            if name in fitted["ci95"]:
                lo, hi = map(float, fitted["ci95"][name])
                metrics[scaling_metric(*prefix, f"{name}_lo")], metrics[scaling_metric(*prefix, f"{name}_hi")] = lo, hi
        holdout = fitted.get("holdout", {})
        if "mape" in holdout:
            metrics[scaling_metric(*prefix, "holdout_mape")] = holdout["mape"]
            metrics[scaling_metric(*prefix, "holdout_inside_band")] = holdout["inside_band"]

    for family, scopes in result["saturating"].items():
        for scope, fitted in scopes.items():
            add((family, scope), fitted)
    add(("chinchilla",), result["chinchilla"])
    for key, names in result["comparisons"].items():
        for name, diff in names.items():
            if isinstance(diff, dict):
                for suffix, field in (("", "diff"), ("_lo", "lo"), ("_hi", "hi")):
                    metrics[scaling_metric("compare", key, name + suffix)] = diff[field]
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def _fmt(value: float, bounds: list[float] | None = None) -> str:
    text = f"{value:.4g}"
    return f"{text} [{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else text


def markdown_table(result: dict[str, Any]) -> str:
    """The fits as markdown: one row per fit (or the reason it was skipped), then the family comparisons."""
    lines = [f"# Scaling laws ({result['n_rows']} runs; error = 1 - {result.get('quality', 'accuracy')}; "
             f"95 % bootstrap intervals; target compute {result['target_compute']:.3g} FLOPs)", "",
             "| fit | points | parameters [95 %] | error at target | held-out MAPE / inside band | resampled |",
             "|---|---|---|---|---|---|"]

    def row(name: str, fitted: dict[str, Any]) -> None:
        if "skipped" in fitted:
            lines.append(f"| {name} | {fitted['n_points']} | skipped: {fitted['skipped']} | | | |")
            return
        params = "; ".join(f"{k} {_fmt(v, fitted['ci95'].get(k))}" for k, v in fitted["params"].items())
        derived = fitted["derived"]
        at_target = next((k for k in ("y_at_target", "loss_opt") if k in derived), None)
        target = _fmt(derived[at_target], fitted["ci95"].get(at_target)) if at_target else ""
        holdout = fitted["holdout"]
        held = holdout.get("skipped") or (f"{holdout['mape']:.1%} / {holdout['inside_band']:.0%} of "
                                          f"{holdout['held_out']}")
        converged = "" if fitted["certificate"]["converged"] else " (optimiser DID NOT CONVERGE)"
        lines.append(f"| {name}{converged} | {fitted['n_points']} | {params} | {target} | {held} | "
                     f"{fitted['resampled']} |")

    for family, scopes in result["saturating"].items():
        for scope, fitted in scopes.items():
            row(f"{family} saturating, {scope}", fitted)
    row("L(N, D) chinchilla", result["chinchilla"])
    lines += ["", result["chinchilla"]["note"] + f": {result['chinchilla']['unique_images']}", ""]
    if result["comparisons"]:
        lines += ["| comparison | exponent b difference [95 %] | error at target difference [95 %] |", "|---|---|---|"]
        for key, diff in result["comparisons"].items():
            if "skipped" in diff:
                lines.append(f"| {key} | skipped: {diff['skipped']} | |")
            else:
                cells = [_fmt(diff[k]["diff"], [diff[k]["lo"], diff[k]["hi"]]) for k in ("b", "y_at_target")]
                lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def frontier_figure(rows: pd.DataFrame, result: dict[str, Any], boots: dict[str, Bootstrap], scope: str) -> Figure:
    """Error vs compute per family: runs (those fitted solid), the law with its 95 % prediction band extrapolated a
    decade beyond, and the fitted runs the held-out check held out (above its compute cut) marked x."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for index, (family, runs) in enumerate(rows.groupby("family", sort=True)):
        colour = f"C{index}"
        fitted_runs = _frontier(runs) if scope == "frontier" else runs
        ax.scatter(runs["compute"], runs["error"], color=colour, alpha=0.25, s=14)
        ax.scatter(fitted_runs["compute"], fitted_runs["error"], color=colour, s=18, label=f"{family} {scope} runs")
        boot = boots.get(f"saturating/{family}/{scope}")
        if boot is None:
            continue
        fitted = result["saturating"][family][scope]
        grid = np.logspace(np.log10(runs["compute"].min()), np.log10(runs["compute"].max()) + EXTRAPOLATE_DECADES, 100)
        band = prediction_interval(boot, grid[:, None], calibrate(boot.fit))
        ax.plot(grid, band["y"], color=colour, label=f"{family} law, b = {fitted['params']['b']:.3g}")
        ax.fill_between(grid, band["lo"], band["hi"], color=colour, alpha=0.15)
        cut = fitted["holdout"].get("holdout_above")
        if cut is not None:
            held = fitted_runs[fitted_runs["compute"] > cut]
            ax.scatter(held["compute"], held["error"], color=colour, marker="x", s=50, label=f"{family} held out")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="error = 1 - accuracy",
           title=f"Saturating law per family ({scope} runs), 95 % prediction band")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def chinchilla_figure(rows: pd.DataFrame, boot: Bootstrap) -> Figure:
    """L(N, D) in slices: error vs images seen, one curve per model size, with the runs."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    d_grid = np.logspace(np.log10(rows["images_seen"].min()), np.log10(rows["images_seen"].max()) + 1, 100)
    for index, (n, runs) in enumerate(rows.groupby("n_params", sort=True)):
        ax.scatter(runs["images_seen"], runs["error"], color=f"C{index}", s=18)
        ax.plot(d_grid, boot.fit.predict(np.column_stack([np.full_like(d_grid, n), d_grid])), color=f"C{index}",
                label=f"N = {n:,.0f}")
    ax.set(xscale="log", yscale="log", xlabel="images seen D", ylabel="error = 1 - accuracy",
           title="L(N, D) = E + A/N^alpha + B/D^beta, slices at each N")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_scaling(df: pd.DataFrame, out_dir: str | Path, draws: int = 200, seed: int = 0) -> tuple[dict[str, Any],
                                                                                                list[Path]]:
    """Fit a study's results and write ``scaling.json``, ``scaling.md`` and the figures into ``out_dir``.

    Args:
        df: the study's results table (``analysis.results.load_study``).
        out_dir: the report folder for the fits (created).
        draws: bootstrap resamples per fit.
        seed: bootstrap seed.

    Returns:
        the result (with "quality" and "input_sha256") and the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = quality_column(df)
    rows = scaling_rows(df, quality)
    result, boots = fit_study_rows(rows, draws, seed)
    result.update(quality=quality, input_sha256=rows_sha256(rows))
    paths = [out_dir / "scaling.json", out_dir / "scaling.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=float))
    paths[1].write_text(markdown_table(result))
    for scope in ("frontier", "all"):
        if any(key.endswith(f"/{scope}") for key in boots):
            paths += save_figure(frontier_figure(rows, result, boots, scope), out_dir, f"scaling_{scope}")
    if "chinchilla" in boots:
        paths += save_figure(chinchilla_figure(rows, boots["chinchilla"]), out_dir, "scaling_chinchilla")
    return result, paths
