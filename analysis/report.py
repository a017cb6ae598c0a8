"""``mixer-study report``: a study's MLflow runs -> results table (CSV, parquet, markdown), the compute ledger
(planned vs actual, analysis.ledger) and the paper's figures, each also logged as an artifact of the study's parent
MLflow run (the ledger's totals as its ``ledger/*`` metrics).

Where a study sweeps a recipe per family or replicates its points over seeds, the table and figures show, per grid
point, the setting kept on upstream validation (analysis.replicates.select_recipe; ``recipe_selection.md`` lists
every setting's validation accuracy) and its mean with the 95 % interval over seeds."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis import figures
from analysis.ledger import ledger_metrics, ledger_table, ledger_totals, write_ledger
from analysis.replicates import select_recipe, summarize
from analysis.results import export, load_study
from analysis.scaling_report import scaling_metrics, write_scaling
from workers.names import ROLE_STUDY, ROLE_TAG, SCALING_INPUT_SHA256_TAG, STUDY_TAG
from workers.training.mlflow_logger import tag_filter

log = logging.getLogger(__name__)


def _checkpoint_for_fig5(df: pd.DataFrame) -> pd.Series | None:
    """The trial whose token-mixing weights Fig. 5 shows: a Mixer with a checkpoint, the most data and compute."""
    candidates = df[df["checkpoint"].notna() & (df["family"] == "Mixer")]
    if candidates.empty:
        return None
    return candidates.sort_values(["fraction", "train_flops"], na_position="first").iloc[-1]


def model_scale_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Fig. 3 compares models on fixed data: keep the trials on the largest data fraction, and give each variant
    the median inference throughput over all its trials (throughput is a property of the model; single
    measurements on a shared machine are noisy)."""
    if df.empty or df["fraction"].isna().all():
        return df
    rows = df[df["fraction"] == df["fraction"].max()].copy()
    rows["img_per_s_per_core"] = rows["variant"].map(df.groupby("variant")["img_per_s_per_core"].median())
    return rows


def token_mixing_weights(checkpoint: str, blocks: int = 3) -> tuple[list[np.ndarray], str]:
    """First token-mixing layer's weights (D_S, S) of the first ``blocks`` blocks of a checkpoint, and the variant.

    ``checkpoint`` is a local folder or any fsspec URL (s3://...), which is copied to a temporary folder first.
    """
    from workers.training.checkpoint import load_model

    if "://" in checkpoint:
        fs, path = fsspec.core.url_to_fs(checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            model = load_model(tmp)
    else:
        model = load_model(checkpoint)
    count = min(blocks, len(model.blocks))
    return [model.token_mixing_weights(b).float().numpy() for b in range(count)], model.variant.name


def build_report(tracking_uri: str, study: str, out_dir: str | Path, experiment: str | None = None,
                 bootstrap: int = 200, seed: int = 0) -> list[Path]:
    """Write every figure and table for ``study`` into ``out_dir`` (the scaling laws into ``out_dir/scaling``, with
    ``bootstrap`` resamples and ``seed``); returns the written paths."""
    out_dir = Path(out_dir)
    df = load_study(tracking_uri, study, experiment)
    if df.empty:
        raise LookupError(f"study '{study}' has no trial runs in {tracking_uri}")
    finished = df[df["status"] == "FINISHED"]
    if len(finished) < len(df):
        log.warning("%d of %d trials are not FINISHED; figures use the finished ones", len(df) - len(finished), len(df))
    paths = export(df, out_dir)
    ledger = ledger_table(df)  # planned vs actual compute per trial, and the study's total
    totals = ledger_totals(ledger)
    paths += write_ledger(ledger, totals, out_dir)
    # One recipe per grid point, chosen on upstream validation over the finished trials; then mean and 95 % interval
    # over its seeds (a point with one trial is that trial's numbers).
    kept, choice = select_recipe(finished)
    if choice.groupby("grid_point").size().max() > 1:  # a sweep chose among settings: say what it saw and kept
        paths += write_selection(choice, out_dir)
    summary = summarize(kept)
    # Fig. 2, Fig. 3, Table 3 and Fig. 5 compare models on the original images; permuted pipelines only in Fig. 4.
    original = summary[summary["permute"].fillna("none") == "none"]
    paths += figures.results_table(original, out_dir)
    # The paper's Fig. 2 left / Fig. 3 accuracy is top-1 after fine-tuning; linear 5-shot where no trial fine-tuned
    # (each figure's title and file name say which).
    downstream = "finetune_top1" if original["finetune_top1"].notna().any() else "fewshot_5shot"
    paths += figures.fig2_left(original, out_dir, quality=downstream)
    paths += figures.fig2_right(original, out_dir)
    paths += figures.fig3(model_scale_rows(original), out_dir, quality=downstream)
    if finished["permute"].fillna("none").nunique() > 1:  # a permutation study (data.permute in the grid): Fig. 4
        paths += figures.fig4_permutation(summary, out_dir)
    row = _checkpoint_for_fig5(kept[kept["permute"].fillna("none") == "none"])
    if row is None:
        log.warning("Fig. 5 skipped: no best checkpoint among the finished trials")
    else:
        try:
            weights, variant = token_mixing_weights(str(row["checkpoint"]))
        except (OSError, ValueError) as error:
            log.warning("Fig. 5 skipped: cannot load checkpoint %s: %s", row["checkpoint"], error)
        else:
            title = f"Token-mixing weights, first {len(weights)} blocks of {variant} ({row['trial']})"
            paths += figures.fig5_token_mixing(weights, out_dir, title=title)
    _log_artifacts(tracking_uri, study, experiment or study, paths, ledger_metrics(totals))
    # The fits read the kept settings' trials (and every trial of a point where none finished to choose on).
    keys = df["grid_point"] + "\n" + df["setting"]
    chosen = choice.loc[choice["kept"], "grid_point"] + "\n" + choice.loc[choice["kept"], "setting"]
    fit_rows = df[keys.isin(chosen) | ~df["grid_point"].isin(choice["grid_point"])]
    try:  # a grid that supports no law still gets scaling.md saying why; only a study without accuracies has none
        paths += fit_study(tracking_uri, study, out_dir / "scaling", experiment, bootstrap, seed, fit_rows)
    except LookupError as error:
        log.warning("scaling laws skipped: %s", error)
    return paths


def write_selection(choice: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``recipe_selection.csv`` and ``.md``: per grid point every sweep setting's upstream validation accuracy (mean
    ± 95 % interval over its seeds, n) and which one the report kept.

    Args:
        choice: :func:`analysis.replicates.select_recipe`'s second frame.
        out_dir: where the files go.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / "recipe_selection.csv", out_dir / "recipe_selection.md"
    choice.to_csv(csv, index=False)
    lines = ["Recipe per grid point, kept on the best mean upstream validation accuracy over seeds (few-shot, "
             "fine-tuning and test numbers are not read).", "",
             "| grid point | setting | best val acc (%) | seeds | kept |", "|---|---|---:|---:|---|"]
    for row in choice.itertuples():
        ci = f" ± {100 * row.val_ci:.1f}" if pd.notna(row.val_ci) else ""
        acc = "–" if pd.isna(row.val_mean) else f"{100 * row.val_mean:.1f}{ci}"
        lines.append(f"| {row.grid_point} | {row.setting} | {acc} | {row.n} | {'kept' if row.kept else ''} |")
    md.write_text("\n".join(lines) + "\n")
    return [md, csv]


def fit_study(tracking_uri: str, study: str, out_dir: str | Path, experiment: str | None = None, bootstrap: int = 200,
              seed: int = 0, df: pd.DataFrame | None = None) -> list[Path]:
    """``mixer-study fit NAME``: every scaling law the study's grid supports (analysis.scaling_report) into
    ``out_dir``, and onto the study's parent run: the table, JSON and figures as artifacts under ``scaling/``, each
    parameter and its interval as ``scaling/...`` metrics, the input rows' sha256 as a tag.

    Args:
        tracking_uri: the MLflow store; study: the study's name; out_dir: where the files go.
        experiment: the MLflow experiment if not the study's name.
        bootstrap: resamples per fit; seed: their seed.
        df: the study's results table if already loaded.
    """
    df = load_study(tracking_uri, study, experiment) if df is None else df
    if df.empty:
        raise LookupError(f"study '{study}' has no trial runs in {tracking_uri}")
    result, paths = write_scaling(df, out_dir, bootstrap, seed)
    _log_artifacts(tracking_uri, study, experiment or study, paths, scaling_metrics(result), artifact_path="scaling",
                   tags={SCALING_INPUT_SHA256_TAG: result["input_sha256"]})
    return paths


def _log_artifacts(tracking_uri: str, study: str, experiment: str, paths: list[Path],
                   metrics: dict[str, float], artifact_path: str = "report",
                   tags: dict[str, str] | None = None) -> None:
    """Files as artifacts of the study's parent run (under ``artifact_path``), and ``metrics`` and ``tags`` on it."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], tag_filter({STUDY_TAG: study, ROLE_TAG: ROLE_STUDY}),
                              max_results=1)
    if not runs:
        log.warning("no parent run for study %s: figures not logged to MLflow", study)
        return
    for path in paths:
        client.log_artifact(runs[0].info.run_id, str(path), artifact_path=artifact_path)
    now_ms = int(time.time() * 1000)
    metric_list = [Metric(k, v, now_ms, 0) for k, v in metrics.items()]
    for start in range(0, len(metric_list), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(runs[0].info.run_id, metrics=metric_list[start:start + 1000])
    for key, value in (tags or {}).items():
        client.set_tag(runs[0].info.run_id, key, value)
