"""Replicates and recipe sweeps: one recipe per grid point chosen on upstream validation, then means and 95 %
intervals over seeds.

A study's trials (analysis.results, one row each) sit at a ``grid_point`` (the grid coordinates), run a sweep
``setting`` of their model family (pipeline.spec ``sweep``; "base" where it swept nothing) and a ``seed``
(``replicates``). The report reads them in three steps:

1. :func:`select_recipe`: per grid point, the setting with the best mean over seeds of the upstream validation
   accuracy (``best_val_acc``), as the paper tunes each model on its upstream validation set. Only that column
   decides: the few-shot, fine-tuning and test numbers never enter the choice, so they stay unbiased estimates.
2. :func:`summarize`: per grid point (its kept setting), the mean, the 95 % Student-t interval over seeds and n of
   every quality and cost column.
3. :func:`difference`: the 95 % Welch interval of mean(A) - mean(B), so a difference the report calls a finding
   is one whose interval excludes 0.

Pure pandas/numpy/scipy: no MLflow, no Ray.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from workers.names import SWEEP_SETTING_BASE

LEVEL = 0.95
SELECTION_COLUMN = "best_val_acc"  # upstream validation: the only column select_recipe reads besides the keys
QUALITY_COLUMNS = ("best_val_acc", "final_val_acc", "finetune_top1")  # and every fewshot_<k>shot
COST_COLUMNS = ("train_flops", "core_seconds", "cpu_seconds", "wall_seconds", "train_seconds", "images_seen",
                "epochs", "img_per_s_per_core", "train_img_per_s_per_core")
CI_SUFFIX = "_ci"  # the interval's half-width: mean ± it (NaN with fewer than two seeds)
N_SUFFIX = "_n"    # the seeds with a value
# How a swept field shows in the report's "kept" column; others by their last dotted part.
_SHORT_FIELDS = {"weight_decay": "wd"}
_FEWSHOT = re.compile(r"fewshot_\d+shot")
# A "key=value,key=value" setting splits at the commas that start the next dotted key.
_NEXT_KEY = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_.]*=)")


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, int]:
    """(mean, half-width, n) of the finite ``values``: mean ± t_{n-1} · s / √n; the half-width is NaN for n < 2
    (one seed says nothing about the spread) and the mean NaN for n = 0.

    Args:
        values: one number per seed.
        level: the interval's coverage.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


@dataclass(frozen=True)
class Difference:
    """mean(A) - mean(B) with its Welch interval [lo, hi] (NaN where either side has fewer than two seeds)."""

    diff: float
    lo: float
    hi: float
    dof: float
    n_a: int
    n_b: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0: the difference holds beyond the seeds' noise."""
        return bool(self.lo > 0 or self.hi < 0)


def difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """The ``level`` Welch-t interval of mean(a) - mean(b) over seeds (unequal variances, Welch-Satterthwaite dof).

    Args:
        a: one value per seed of A (non-finite values are left out).
        b: the same for B.
        level: the interval's coverage.
    """
    sizes = [int(np.isfinite(np.asarray(v, dtype=float)).sum()) for v in (a, b)]
    if not min(sizes):
        raise ValueError(f"difference: need at least one value on each side, got {sizes[0]} and {sizes[1]}")
    return replace(contrast([(1.0, a), (-1.0, b)], level), n_a=sizes[0], n_b=sizes[1])


def contrast(terms: Sequence[tuple[float, Sequence[float]]], level: float = LEVEL) -> Difference:
    """The ``level`` interval of sum_i c_i mean(x_i) over independent groups of seeds: the Welch-Satterthwaite
    interval of a linear contrast. ``difference`` is (1, a), (-1, b); an interaction such as "Mixer gains more from
    data than BiT" is (1, Mixer@100 %), (-1, Mixer@3 %), (-1, BiT@100 %), (1, BiT@3 %).

    Var = sum_i c_i^2 s_i^2 / n_i, dof = Var^2 / sum_i (c_i^2 s_i^2 / n_i)^2 / (n_i - 1), half-width t_dof * sqrt(Var).

    Args:
        terms: (coefficient, one value per seed) per group (non-finite values are left out).
        level: the interval's coverage.

    Returns:
        a Difference (``n_a``/``n_b``: the smallest and largest group size); NaN bounds where a group has < 2 seeds.
    """
    groups = []
    for coef, values in terms:
        x = np.asarray(values, dtype=float)
        x = x[np.isfinite(x)]
        if not len(x):
            raise ValueError("contrast: every group needs at least one value")
        groups.append((float(coef), x))
    estimate = float(sum(c * x.mean() for c, x in groups))
    sizes = [len(x) for _, x in groups]
    if min(sizes) < 2:
        return Difference(estimate, math.nan, math.nan, math.nan, min(sizes), max(sizes))
    parts = [c * c * x.var(ddof=1) / len(x) for c, x in groups]
    var = sum(parts)
    if var == 0:  # identical replicates everywhere: no spread, the contrast is exact
        return Difference(estimate, estimate, estimate, math.inf, min(sizes), max(sizes))
    dof = var**2 / sum(v**2 / (len(x) - 1) for v, (_, x) in zip(parts, groups))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(var)
    return Difference(estimate, estimate - half, estimate + half, float(dof), min(sizes), max(sizes))


def _keys(df: pd.DataFrame) -> pd.DataFrame:
    """The grouping keys of each trial: grid_point (else the trial's name) and setting ("base" where none)."""
    point = df["grid_point"] if "grid_point" in df else df["trial"]
    setting = df["setting"] if "setting" in df else pd.Series(SWEEP_SETTING_BASE, index=df.index)
    return pd.DataFrame({"grid_point": point.fillna(df["trial"]).astype(str),
                         "setting": setting.fillna(SWEEP_SETTING_BASE).astype(str)}, index=df.index)


def select_recipe(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per grid point, keep the sweep setting with the highest mean ``best_val_acc`` over its seeds.

    Reads only the keys and ``best_val_acc`` (never a few-shot, fine-tuning or test column). Ties go to the first
    setting in sorted order; a point where no setting has a validation accuracy keeps its first setting.

    Args:
        df: trials (analysis.results.load_study), e.g. the finished ones.

    Returns:
        (the kept settings' trials, one row per grid point and setting: grid_point, setting, the validation
        mean/half-width/n over seeds, kept).
    """
    keys = _keys(df)
    val = pd.to_numeric(df[SELECTION_COLUMN], errors="coerce") if SELECTION_COLUMN in df else np.nan
    rows = []
    for (point, setting), group in keys.assign(val=val).groupby(["grid_point", "setting"], sort=True):
        mean, half, n = t_interval(group["val"])
        rows.append({"grid_point": point, "setting": setting, "val_mean": mean, "val_ci": half, "n": n})
    choice = pd.DataFrame(rows, columns=["grid_point", "setting", "val_mean", "val_ci", "n"])
    best = choice.assign(rank=choice["val_mean"].fillna(-math.inf)).groupby("grid_point", sort=False)["rank"]
    choice["kept"] = choice.index.isin(best.idxmax())
    kept = choice.loc[choice["kept"], ["grid_point", "setting"]]
    mask = pd.MultiIndex.from_frame(keys).isin(pd.MultiIndex.from_frame(kept))
    return df[mask], choice


def kept_label(setting: str) -> str:
    """How the report names a kept setting: ``optim.lr=0.003,optim.weight_decay=0.0001`` -> ``lr=0.003, wd=0.0001``.

    Args:
        setting: a mixer.sweep_setting value ("base": the base recipe).
    """
    if setting == SWEEP_SETTING_BASE:
        return setting
    parts = [part.partition("=") for part in _NEXT_KEY.split(setting)]
    return ", ".join(f"{_SHORT_FIELDS.get(key.rsplit('.', 1)[-1], key.rsplit('.', 1)[-1])}={value}"
                     for key, _, value in parts)


def summary_columns(df: pd.DataFrame) -> list[str]:
    """The columns :func:`summarize` averages: quality (accuracies, every few-shot k) and cost, where present."""
    fewshot = [c for c in df.columns if _FEWSHOT.fullmatch(c)]
    return [c for c in (*QUALITY_COLUMNS, *fewshot, *COST_COLUMNS) if c in df.columns]


def summarize(df: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per grid point and setting: every summary column's mean over seeds, ``<col>_ci`` (the ``level``
    Student-t half-width; NaN for a single seed: no interval) and ``<col>_n``; ``n`` the trials (seeds), ``seeds``
    their train.seed values, ``kept`` the setting's label. Other columns keep their value where every seed agrees
    (variant, fraction, ...), else NaN; ``trial`` becomes the grid point.

    Args:
        df: trials, usually :func:`select_recipe`'s kept ones (one setting per grid point).
        level: the intervals' coverage.
    """
    keys = _keys(df)
    columns = summary_columns(df)
    others = [c for c in df.columns if c not in columns]
    out = [*others, *(c for c in ("grid_point", "setting", "kept", "n", "seeds") if c not in others),
           *(c + suffix for c in columns for suffix in ("", CI_SUFFIX, N_SUFFIX))]
    rows = []
    for (point, setting), index in keys.groupby(["grid_point", "setting"], sort=False).groups.items():
        group = df.loc[index]
        row = {c: (group[c].iloc[0] if group[c].nunique(dropna=False) == 1 else np.nan) for c in others}
        row.update(trial=point, grid_point=point, setting=setting, kept=kept_label(setting), n=len(group))
        row["seeds"] = ",".join(str(int(s)) for s in sorted(group["seed"].dropna())) if "seed" in group else ""
        for c in columns:
            row[c], row[c + CI_SUFFIX], row[c + N_SUFFIX] = t_interval(pd.to_numeric(group[c], errors="coerce"),
                                                                       level)
        rows.append(row)
    return pd.DataFrame(rows, columns=out)
