"""Replicates and per-family recipe sweeps in the analysis: the recipe is chosen on upstream validation only,
intervals are over seeds, and the report and figures show them (real frames, a real sqlite MLflow store)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis import figures
from analysis.replicates import difference, kept_label, select_recipe, summarize, t_interval
from analysis.report import build_report
from analysis.results import grid_point, load_study
from workers import names

SEEDS = (0, 1, 2)
# (grid point: variant, fraction) -> {setting: (val acc, 5-shot acc)}: at every point the setting with the better
# upstream validation has the WORSE few-shot accuracy, so a selection that peeked at few-shot would pick the other.
POINTS = {
    ("Micro-4", 0.3): {"optim.lr=0.001": (0.70, 0.60), "optim.lr=0.003": (0.80, 0.50)},
    ("Micro-4", 1.0): {"optim.lr=0.001": (0.90, 0.40), "optim.lr=0.003": (0.85, 0.70)},
    ("BiT-Micro", 0.3): {"base": (0.75, 0.55)},
}
KEPT = {"variant=Micro-4,fraction=0.3": "optim.lr=0.003", "variant=Micro-4,fraction=1.0": "optim.lr=0.001",
        "variant=BiT-Micro,fraction=0.3": "base"}


def _trials() -> pd.DataFrame:
    """One row per (point, setting, seed), as analysis.results gives them; seed s adds (s - 1) / 100 to val and
    few-shot, so each setting's mean is its table value and its sample sd 0.01."""
    rows = []
    for (variant, fraction), settings in POINTS.items():
        point = f"variant={variant},fraction={fraction}"
        for setting, (val, shot) in settings.items():
            for seed in SEEDS:
                noise = (seed - 1) / 100
                rows.append({"study": "s", "trial": f"{point}-{setting}-s{seed}", "status": "FINISHED",
                             "variant": variant, "family": figures.family_of(variant), "fraction": fraction,
                             "permute": "none", "grid_point": point, "setting": setting, "seed": seed,
                             "train_images": int(1000 * fraction), "train_flops": 1e12 * (1 + fraction),
                             "img_per_s_per_core": 100.0 + seed, "best_val_acc": val + noise,
                             "fewshot_1shot": shot - 0.1 + noise, "fewshot_5shot": shot + noise,
                             "finetune_top1": shot + 0.1 + noise})
    return pd.DataFrame(rows)


def test_t_interval_is_student_t_over_seeds() -> None:
    mean, half, n = t_interval([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))  # s = 1, t with n - 1 = 2 dof
    mean, half, n = t_interval([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(half)  # one seed: no interval


def test_difference_is_welch_and_calls_a_finding_only_beyond_the_interval() -> None:
    a, b = [0.80, 0.82, 0.81, 0.83], [0.70, 0.75, 0.72]
    d = difference(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.lo, d.hi) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert d.significant and (d.n_a, d.n_b) == (4, 3)
    overlapping = difference([0.80, 0.90, 0.70], [0.78, 0.88, 0.74])
    assert overlapping.lo < 0 < overlapping.hi and not overlapping.significant
    single = difference([0.9], [0.1, 0.2])
    assert math.isnan(single.lo) and not single.significant  # one seed: nothing can be called a finding
    with pytest.raises(ValueError, match="at least one value"):
        difference([], [0.1])


def test_select_recipe_keeps_the_best_mean_validation_and_never_reads_downstream_columns() -> None:
    df = _trials()
    kept, choice = select_recipe(df)
    assert dict(zip(choice.loc[choice["kept"], "grid_point"], choice.loc[choice["kept"], "setting"])) == KEPT
    assert len(kept) == 3 * len(SEEDS) and set(zip(kept["grid_point"], kept["setting"])) == set(KEPT.items())
    row = choice[(choice["grid_point"] == "variant=Micro-4,fraction=0.3") & (choice["setting"] == "optim.lr=0.003")]
    assert row["val_mean"].item() == pytest.approx(0.80) and row["n"].item() == 3
    assert row["val_ci"].item() == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    # Every few-shot, fine-tuning and test value rewritten (here: reversed so the other setting would win):
    # the choice does not move.
    rng = np.random.default_rng(0)
    downstream = [c for c in df.columns if c.startswith(("fewshot_", "finetune_"))]
    changed = df.assign(**{c: rng.uniform(0, 1, len(df)) for c in downstream})
    changed_kept, changed_choice = select_recipe(changed)
    pd.testing.assert_frame_equal(changed_choice, choice)
    assert changed_kept.index.equals(kept.index)
    # Dropping them altogether changes nothing either: the choice reads best_val_acc and the keys only.
    _, without = select_recipe(df.drop(columns=downstream))
    pd.testing.assert_frame_equal(without, choice)


def test_select_recipe_ties_and_missing_validation_are_deterministic() -> None:
    df = _trials()
    tie = df[df["grid_point"] == "variant=Micro-4,fraction=0.3"].assign(best_val_acc=0.5)
    assert select_recipe(tie)[1].query("kept")["setting"].tolist() == ["optim.lr=0.001"]  # first in sorted order
    failed = df.assign(best_val_acc=np.where(df["setting"] == "optim.lr=0.001", np.nan, df["best_val_acc"]))
    kept = select_recipe(failed)[1].query("kept")
    assert kept.set_index("grid_point")["setting"]["variant=Micro-4,fraction=1.0"] == "optim.lr=0.003"


def test_summarize_gives_mean_interval_and_n_per_point() -> None:
    kept, _ = select_recipe(_trials())
    summary = summarize(kept).set_index("grid_point")
    assert len(summary) == 3
    point = summary.loc["variant=Micro-4,fraction=1.0"]
    assert point["kept"] == "lr=0.001" and point["n"] == 3 and point["seeds"] == "0,1,2"
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    for column, mean in (("best_val_acc", 0.90), ("fewshot_5shot", 0.40), ("fewshot_1shot", 0.30),
                         ("finetune_top1", 0.50)):
        assert point[column] == pytest.approx(mean) and point[column + "_ci"] == pytest.approx(half)
        assert point[column + "_n"] == 3
    assert point["img_per_s_per_core"] == pytest.approx(101.0) and point["img_per_s_per_core_ci"] > 0  # cost too
    assert point["variant"] == "Micro-4" and point["fraction"] == 1.0 and pd.isna(point["seed"])
    single = summarize(kept[kept["seed"] == 0]).set_index("grid_point").loc["variant=Micro-4,fraction=1.0"]
    assert single["n"] == 1 and math.isnan(single["fewshot_5shot_ci"])  # one seed: no interval
    assert single["fewshot_5shot"] == pytest.approx(0.39)


def test_kept_label_and_grid_point_of_the_tags() -> None:
    assert kept_label("optim.lr=0.003,optim.weight_decay=0.0001") == "lr=0.003, wd=0.0001"
    assert kept_label("base") == "base"
    tag = "model.variant=ViT-Micro/4,data.augment.randaug=[2, 15],optim.lr=0.003,train.seed=1"
    assert grid_point(tag, "optim.lr=0.003") == "model.variant=ViT-Micro/4,data.augment.randaug=[2, 15]"
    assert grid_point("model.variant=Micro-4", "base") == "model.variant=Micro-4"  # a study without sweep/seeds
    assert grid_point("train.seed=3", "base") == "base"  # the empty grid, replicated


def test_figures_and_table_show_the_intervals(tmp_path: Path) -> None:
    summary = summarize(select_recipe(_trials())[0])
    mixer = summary[summary["variant"] == "Micro-4"]
    (ax,) = figures._build_fig2_right(mixer, "fewshot_5shot").axes
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    low = band.get_paths()[0].vertices[:, 1].min()
    half = 100 * stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert low == pytest.approx(100 * mixer["fewshot_5shot"].min() - half)  # the band is mean ± the 95 % interval
    (ax,) = figures._build_fig2_left(summary, "fewshot_5shot", "train_flops").axes
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert sum(len(b.get_segments()) for b in bars) == len(summary)  # one error bar per point
    left, right = figures._build_fig3(summary, "fewshot_5shot").axes
    assert any(isinstance(c, LineCollection) for c in left.collections)
    # One seed per point: no bands, no error bars (the figures look as without replicates).
    single = summarize(select_recipe(_trials()[lambda d: d["seed"] == 0])[0])
    (ax,) = figures._build_fig2_right(single, "fewshot_5shot").axes
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    md, csv = figures.results_table(summary, tmp_path)
    text = md.read_text()
    assert "| kept setting |" in text and "lr=0.003" in text and "| seeds |" in text
    assert f"90.0 ± {half:.1f}" in text  # best val acc of Micro-4 at fraction 1.0 (lr=0.001 kept)
    assert "95 % Student-t interval" in text
    table = pd.read_csv(csv)
    assert {"kept", "n", "fewshot_5shot_ci"} <= set(table.columns)
    md, csv = figures.results_table(single, tmp_path / "single")
    assert "±" not in md.read_text() and "fewshot_5shot_ci" not in pd.read_csv(csv).columns


def test_report_keeps_one_setting_per_point_on_validation(tmp_path: Path) -> None:
    """A real sqlite store with trials tagged as `mixer-study run` tags them (grid point, sweep setting, seed)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=str(tmp_path / "mlruns"))
    client.create_run(exp, tags={names.STUDY_TAG: "s", names.ROLE_TAG: names.ROLE_STUDY})
    for row in _trials().itertuples():
        lr = row.setting.partition("=")[2] or "0.003"
        point = f"model.variant={row.variant},data.fraction={row.fraction}"
        point += "" if row.setting == "base" else f",{row.setting}"
        tags = {names.STUDY_TAG: "s", names.ROLE_TAG: names.ROLE_TRIAL, names.TRIAL_TAG: row.trial,
                names.GRID_POINT_TAG: f"{point},train.seed={row.seed}", names.SWEEP_SETTING_TAG: row.setting}
        run = client.create_run(exp, tags=tags).info.run_id
        for key, value in (("model.variant", row.variant), ("data.fraction", row.fraction), ("optim.lr", lr),
                           ("train.seed", row.seed), ("data.train_images", row.train_images)):
            client.log_param(run, key, value)
        for key, value in (("best/val_acc", row.best_val_acc), ("fewshot/5shot", row.fewshot_5shot),
                           ("compute/train_flops", row.train_flops), ("perf/img_per_s_per_core", 100.0)):
            client.log_metric(run, key, value)
        client.set_terminated(run)
    df = load_study(uri, "s")
    assert set(df["grid_point"]) == {"model.variant=Micro-4,data.fraction=0.3",
                                     "model.variant=Micro-4,data.fraction=1.0",
                                     "model.variant=BiT-Micro,data.fraction=0.3"}
    assert sorted(df["seed"].unique()) == list(SEEDS) and set(df["lr"]) == {0.001, 0.003}
    paths = {p.name: p for p in build_report(uri, "s", tmp_path / "out", bootstrap=20)}
    selection = paths["recipe_selection.md"].read_text()
    assert "| model.variant=Micro-4,data.fraction=0.3 | optim.lr=0.003 | 80.0 ± 2.5 | 3 | kept |" in selection
    table = pd.read_csv(paths["table3.csv"])
    assert sorted(table["kept"]) == ["base", "lr=0.001", "lr=0.003"] and set(table["n"]) == {3}
    micro = table.set_index(["variant", "fraction"]).loc[("Micro-4", 1.0)]
    assert micro["fewshot_5shot"] == pytest.approx(0.40)  # the kept setting's 5-shot, not the better 0.70


def test_fig4_bars_carry_the_interval_over_seeds() -> None:
    trials = pd.DataFrame([{"trial": f"{permute}-s{seed}", "variant": "Micro-4", "permute": permute, "seed": seed,
                            "grid_point": f"permute={permute}", "setting": "base", "best_val_acc": 0.9,
                            "fewshot_5shot": acc + seed / 100}
                           for permute, acc in (("none", 0.80), ("pixels", 0.40)) for seed in SEEDS])
    (ax,) = figures._build_fig4(summarize(trials), "fewshot_5shot").axes[:1]
    segments = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    heights = sorted(abs(seg[1][1] - seg[0][1]) for seg in segments)
    half = 100 * stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert heights == [pytest.approx(2 * half)] * 2  # mean ± the 95 % interval on both bars
