"""The scaling laws of a study (analysis.scaling_report, `mixer-study fit NAME`): known laws recovered from a
synthetic results table, too-small grids skipped with their reason, and the fits written and logged on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.scaling_report import fit_study_rows, scaling_metrics
from pipeline.cli import main
from workers.names import ROLE_TAG, SCALING_INPUT_SHA256_TAG, STUDY_TAG, TRIAL_TAG, scaling_metric

# Error = a (C + d)^-b + c per family; Mixer's exponent is larger (it scales better) by 0.05.
TRUTH = {"Mixer": {"a": 40.0, "b": 0.25, "c": 0.02, "d": 1e9}, "ViT": {"a": 20.0, "b": 0.20, "c": 0.03, "d": 1e9}}


def _law(p: dict[str, float], compute: np.ndarray) -> np.ndarray:
    return p["a"] * (compute + p["d"]) ** (-p["b"]) + p["c"]


def _synthetic_rows(families: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Per family, ``families[f]`` variants x 3 frontier runs on the law (1 % noise) plus one dominated run each
    (error 1.5x the law): the frontier drops exactly those."""
    rng = np.random.default_rng(seed)
    rows = []
    for family, variants in families.items():
        runs = variants * 3
        for i in range(runs):
            compute = 10 ** (10 + 4 * i / (runs - 1))
            error = _law(TRUTH[family], compute) * np.exp(rng.normal(0, 0.01))
            rows.append({"variant": f"{family}{i // 3}", "family": family, "compute": compute, "error": error})
        for v in range(variants):  # a badly tuned run at the variant's largest compute: off the frontier
            compute = 10 ** (10 + 4 * (3 * v + 2) / (runs - 1)) * 1.01
            rows.append({"variant": f"{family}{v}", "family": family, "compute": compute,
                         "error": 1.5 * _law(TRUTH[family], compute)})
    return pd.DataFrame(rows).assign(n_params=np.nan, images_seen=np.nan, train_images=np.nan)


def test_known_exponents_are_recovered_within_their_intervals_and_compared() -> None:
    result, _ = fit_study_rows(_synthetic_rows({"Mixer": 6, "ViT": 6}), draws=50, seed=0)
    for family, truth in TRUTH.items():
        frontier = result["saturating"][family]["frontier"]
        assert frontier["n_points"] == 18 and frontier["certificate"]["converged"]
        lo, hi = frontier["ci95"]["b"]
        assert lo <= truth["b"] <= hi and hi - lo < 0.2
        assert frontier["resampled"] == "whole variants (6)"
        assert result["saturating"][family]["all"]["n_points"] == 24  # the dominated runs are in "all" only
        holdout = frontier["holdout"]
        assert holdout["held_out"] >= 4 and holdout["mape"] < 0.1 and 0 <= holdout["inside_band"] <= 1
    diff = result["comparisons"]["Mixer-ViT/frontier"]["b"]
    assert diff["lo"] <= 0.05 <= diff["hi"]
    y_target = result["comparisons"]["Mixer-ViT/frontier"]["y_at_target"]
    true_gap = _law(TRUTH["Mixer"], result["target_compute"]) - _law(TRUTH["ViT"], result["target_compute"])
    assert y_target["lo"] <= true_gap <= y_target["hi"] < 0  # Mixer's error is lower at the target compute
    metrics = scaling_metrics(result)
    assert metrics[scaling_metric("ViT", "frontier", "b_lo")] == lo
    assert {scaling_metric("ViT", "frontier", "b"), scaling_metric("compare", "Mixer-ViT/frontier", "b_hi"),
            scaling_metric("Mixer", "all", "holdout_inside_band")} <= set(metrics)


def test_a_family_with_too_few_runs_is_skipped_with_the_reason() -> None:
    rows = _synthetic_rows({"Mixer": 6, "ViT": 1})  # ViT: 3 frontier runs + 1 dominated
    result, boots = fit_study_rows(rows, draws=20, seed=0)
    skipped = result["saturating"]["ViT"]
    assert skipped["frontier"]["skipped"] == "3 runs; the saturating form needs at least 7"
    assert skipped["all"]["skipped"] == "4 runs; the saturating form needs at least 7"
    assert "saturating/ViT/all" not in boots and "saturating/Mixer/all" in boots
    assert result["comparisons"]["Mixer-ViT/all"] == {"skipped": "a law for both families is needed"}
    assert result["chinchilla"]["skipped"].startswith("0 runs")  # no parameter counts in these rows
    assert not any(key.startswith("scaling/ViT/") for key in scaling_metrics(result))


def test_a_law_through_as_many_compute_levels_as_parameters_is_not_fitted(caplog) -> None:
    # 4 model sizes x 3 seeds: 12 runs, but the 4 parameters pass through the 4 levels' mean errors whatever they
    # are, so the law is skipped (with the reason, in the table and the progress log); a 5th level makes it fit.
    rng = np.random.default_rng(0)

    def rows(levels: int) -> pd.DataFrame:
        compute = np.repeat(np.logspace(10, 13, levels), 3)
        error = _law(TRUTH["Mixer"], compute) * np.exp(rng.normal(0, 0.02, len(compute)))
        return pd.DataFrame({"variant": [f"M{i // 3}" for i in range(len(compute))], "family": "Mixer",
                             "compute": compute, "error": error, "n_params": np.nan, "images_seen": np.nan,
                             "train_images": np.nan})

    with caplog.at_level("INFO", logger="analysis.scaling_report"):
        result, boots = fit_study_rows(rows(4), draws=20, seed=0)
    assert result["saturating"]["Mixer"]["all"] == {
        "skipped": "4 distinct C values; the saturating form needs at least 5", "n_points": 12}
    assert not boots
    assert "scaling: Mixer saturating, all skipped: 4 distinct C values" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="analysis.scaling_report"):
        result, boots = fit_study_rows(rows(5), draws=20, seed=0)
    assert result["saturating"]["Mixer"]["all"]["n_points"] == 15 and "saturating/Mixer/all" in boots
    assert "scaling: Mixer saturating, all: fitting 15 runs, 20 bootstrap draws" in caplog.text
    assert "scaling: Mixer saturating, all: done in" in caplog.text


def _store(tmp_path: Path) -> str:
    """A study of one Mixer variant at 9 compute budgets (5-shot accuracy on a saturating law), and its parent run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=str(tmp_path / "mlruns"))
    client.create_run(exp, tags={STUDY_TAG: "s", ROLE_TAG: "study"})
    for i, compute in enumerate(np.logspace(10, 14, 9)):
        run = client.create_run(exp, tags={STUDY_TAG: "s", ROLE_TAG: "trial", TRIAL_TAG: f"t{i}"}).info.run_id
        for key, value in (("model.variant", "Micro-4"), ("data.fraction", "1.0"), ("data.image_size", "16")):
            client.log_param(run, key, value)
        for key, value in (("compute/train_flops", compute), ("fewshot/5shot", 1 - _law(TRUTH["Mixer"], compute)),
                           ("compute/images_seen", 1000.0 * (i + 1))):
            client.log_metric(run, key, value)
        client.set_terminated(run)
    return uri


def test_fit_study_writes_the_table_and_logs_to_the_parent_run(tmp_path: Path, capsys) -> None:
    uri = _store(tmp_path)
    out = tmp_path / "scaling"
    main(["fit", "s", "--tracking-uri", uri, "--out", str(out), "--bootstrap", "20"])
    assert "Mixer saturating, all | 9 |" in capsys.readouterr().out
    assert {"scaling.json", "scaling.md", "scaling_all.png"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "scaling.json").read_text())
    assert result["saturating"]["Mixer"]["all"]["resampled"].startswith("runs (only 1 variants")
    assert result["chinchilla"]["skipped"] == "1 distinct N values; the chinchilla form needs at least 3"
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("s").experiment_id], "tags.`mixer.role` = 'study'")
    b = parent.data.metrics[scaling_metric("Mixer", "all", "b")]
    assert abs(b - TRUTH["Mixer"]["b"]) < 0.02  # noiseless runs: the law itself
    assert parent.data.metrics[scaling_metric("Mixer", "all", "b_lo")] <= b
    assert parent.data.tags[SCALING_INPUT_SHA256_TAG] == result["input_sha256"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "scaling")}
    assert {"scaling/scaling.json", "scaling/scaling.md", "scaling/scaling_all.png"} <= logged
