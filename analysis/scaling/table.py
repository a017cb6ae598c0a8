"""A law fitted to any CSV (``mixer-study fit --csv``): read and check the columns, fit, bootstrap, predict, and the
JSON-ready result. Every bad input raises ValueError/LookupError naming the file, column and row.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from analysis.scaling.bootstrap import bootstrap_fit, isoflop_bootstrap
from analysis.scaling.fit import fit_law
from analysis.scaling.forms import FORMS, isoflop_minima
from analysis.scaling.predict import calibrate, prediction_interval

MIN_GROUPS = 5  # fewer groups than this and a group bootstrap has too few distinct resamples to mean anything


def read_columns(path: str | Path, columns: list[str], positive: list[str]) -> dict[str, np.ndarray]:
    """Columns of a CSV file as arrays; those in ``positive`` must be finite numbers > 0 (others: any text).

    Args:
        path: the CSV file (a header row, then one run per row).
        columns: the columns wanted.
        positive: those of ``columns`` that must be positive finite numbers.

    Raises:
        LookupError: a column is missing. ValueError: a value is empty, not a number, NaN/inf or <= 0.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for name in columns:
            if name not in header:
                raise LookupError(f"{path}: no column {name!r}; the columns are {header}")
        raw = {name: [] for name in columns}
        for row in reader:
            for name in columns:
                raw[name].append(row[name])
    out: dict[str, np.ndarray] = {}
    for name in columns:
        if name not in positive:
            out[name] = np.array(raw[name], dtype=object)
            continue
        values = np.empty(len(raw[name]))
        for i, text in enumerate(raw[name]):
            try:
                values[i] = float(text)
            except (TypeError, ValueError):
                values[i] = np.nan
            if not (np.isfinite(values[i]) and values[i] > 0):
                # Row numbers as a spreadsheet shows them: the header is row 1.
                raise ValueError(f"{path} row {i + 2} column {name!r}: {text!r} is not a positive finite number "
                                 "(a law is fitted in logs: every value must be > 0)")
        out[name] = values
    return out


def fit_table(path: str | Path, form_name: str, inputs: dict[str, str], y: str, *, group: str | None = None,
              draws: int = 200, seed: int = 0, predict_path: str | Path | None = None) -> dict[str, Any]:
    """Fit a law to the runs of a CSV and return the JSON-ready result.

    Args:
        path: the CSV of runs.
        form_name: "chinchilla" or "saturating".
        inputs: the form's inputs -> CSV columns ({"N": ..., "D": ...} or {"C": ...}).
        y: the column of the observed loss/error.
        group: optional column of group labels: the bootstrap resamples whole groups.
        draws: bootstrap resamples.
        seed: bootstrap seed.
        predict_path: optional CSV with the same input columns: a 95 % prediction interval for a new run per row.

    Returns:
        {"form", "params", "ci95", "derived", "n_points", "n_groups", "bootstrap", "certificate", "calibration"}
        and, with ``predict_path``, "predictions": [{"y", "lo", "hi"}, ...] in the file's row order.
    """
    form = FORMS[form_name]
    columns = [inputs[name] for name in form.inputs]
    table = read_columns(path, columns + [y] + ([group] if group else []), positive=columns + [y])
    x = np.stack([table[c] for c in columns], axis=1)
    n = len(x)
    if n < form.min_points:
        raise ValueError(f"{path}: {n} runs; the {form.name} form ({len(form.params)} parameters) needs at least "
                         f"{form.min_points}")
    groups = table[group] if group else None
    n_groups = len(set(groups)) if group else n
    if group and n_groups < MIN_GROUPS:
        raise ValueError(f"{path} column {group!r}: {n_groups} groups; a group bootstrap needs at least {MIN_GROUPS}")
    if draws < 2:
        raise ValueError(f"--bootstrap {draws}: at least 2 resamples are needed for an interval")
    fit = fit_law(form, x, table[y])
    boot = bootstrap_fit(fit, draws, seed, groups)
    ci = boot.intervals()
    result: dict[str, Any] = {
        "form": form.name, "columns": {**inputs, "y": y, **({"group": group} if group else {})},
        "params": fit.params, "ci95": {name: list(ci[name]) for name in ci},
        "derived": {name: value for name, value in boot.point.items() if name not in fit.params},
        "target_compute": boot.target_compute, "n_points": n, "n_groups": n_groups,
        "bootstrap": {"draws": draws, "seed": seed, "grad_norm_max": boot.grad_norm_max,
                      "refitted_from_grid": boot.refitted_from_grid, "not_converged": boot.not_converged},
        "certificate": fit.certificate.as_dict(),
    }
    if predict_path is not None:
        new = read_columns(predict_path, columns, positive=columns)
        calibration = calibrate(fit)
        band = prediction_interval(boot, np.stack([new[c] for c in columns], axis=1), calibration)
        result["calibration"] = {"scatter": calibration.scatter, "growth_per_decade": calibration.growth_per_decade,
                                 "max_compute": calibration.max_compute, "backtest": calibration.backtest}
        result["predictions"] = [{"y": float(v), "lo": float(lo), "hi": float(hi)}
                                 for v, lo, hi in zip(band["y"], band["lo"], band["hi"])]
    return result


def isoflop_table(path: str | Path, n: str, c: str, y: str, *, draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """Approach 2 on the runs of a CSV (``mixer-study fit --csv FILE --form isoflop``): per compute budget the N
    minimising y, then N_opt ∝ C^a, with a bootstrap interval on ``a`` (``bootstrap.isoflop_bootstrap``).

    Args:
        path: the CSV of runs; the runs of one budget share the exact same value in column ``c``.
        n, c, y: columns of parameters, training compute and loss/error.
        draws: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        {"form": "isoflop", "params": {"a"}, "ci95": {"a": [lo, hi]}, "budgets": [{"compute", "n_opt", "y_opt"}],
        "n_points", "bootstrap": {"draws", "seed", "draws_without_exponent"}}.
    """
    table = read_columns(path, [n, c, y], positive=[n, c, y])
    if draws < 2:
        raise ValueError(f"--bootstrap {draws}: at least 2 resamples are needed for an interval")
    result = isoflop_bootstrap(table[n], table[c], table[y], draws=draws, seed=seed)
    found = isoflop_minima(table[n], table[c], table[y])
    if len(found["budgets"]) < 2:
        raise ValueError(f"{path} column {c!r}: {len(found['budgets'])} compute budget(s) with an interior minimum "
                         f"of {y!r} over at least 3 sizes of {n!r}; approach 2 needs at least 2 (the runs of one "
                         f"budget must share the exact same {c!r} value)")
    return {
        "form": "isoflop", "columns": {"N": n, "C": c, "y": y}, "params": {"a": result["a"]},
        "ci95": {"a": list(result["ci"])},
        "budgets": [{"compute": float(b), "n_opt": float(no), "y_opt": float(yo)}
                    for b, no, yo in zip(found["budgets"], found["n_opt"], found["y_opt"])],
        "n_points": len(table[y]),
        "bootstrap": {"draws": draws, "seed": seed, "draws_without_exponent": result["draws_without_exponent"]},
    }
