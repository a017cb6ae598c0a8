"""``mixer-study report``: a study's MLflow runs -> results table (CSV, parquet, markdown) and the paper's figures,
each also logged as an artifact of the study's parent MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import figures
from analysis.results import export, load_study

log = logging.getLogger(__name__)


def _checkpoint_for_fig5(df: pd.DataFrame) -> pd.Series | None:
    """The trial whose token-mixing weights Fig. 5 shows: the most pre-training compute, most data, a checkpoint."""
    candidates = df[df["checkpoint"].notna()]
    if candidates.empty:
        return None
    return candidates.sort_values(["fraction", "train_flops"], na_position="first").iloc[-1]


def token_mixing_weights(checkpoint: str, blocks: int = 3) -> tuple[list[np.ndarray], str]:
    """First token-mixing layer's weights (D_S, S) of the first ``blocks`` blocks of a checkpoint, and the variant."""
    from workers.train import load_model_from_checkpoint

    model = load_model_from_checkpoint(checkpoint)
    count = min(blocks, len(model.blocks))
    return [model.token_mixing_weights(b).float().numpy() for b in range(count)], model.variant.name


def build_report(tracking_uri: str, study: str, out_dir: str | Path, experiment: str | None = None) -> list[Path]:
    """Write every figure and table for ``study`` into ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    df = load_study(tracking_uri, study, experiment)
    if df.empty:
        raise LookupError(f"study '{study}' has no trial runs in {tracking_uri}")
    finished = df[df["status"] == "FINISHED"]
    if len(finished) < len(df):
        log.warning("%d of %d trials are not FINISHED; figures use the finished ones", len(df) - len(finished), len(df))
    paths = export(df, out_dir)
    paths += figures.results_table(finished, out_dir)
    paths += figures.fig2_left(finished, out_dir)
    paths += figures.fig2_right(finished, out_dir)
    paths += figures.fig3(finished, out_dir)
    row = _checkpoint_for_fig5(finished)
    if row is not None and Path(str(row["checkpoint"])).exists():
        weights, variant = token_mixing_weights(str(row["checkpoint"]))
        paths += figures.fig5_token_mixing(
            weights, out_dir, title=f"Token-mixing weights, first {len(weights)} blocks of {variant} ({row['trial']})"
        )
    else:
        log.warning("Fig. 5 skipped: no local best checkpoint among the finished trials")
    _log_artifacts(tracking_uri, study, experiment or study, paths)
    return paths


def _log_artifacts(tracking_uri: str, study: str, experiment: str, paths: list[Path]) -> None:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mixer.study` = '{study}' and tags.`mixer.role` = 'study'",
                              max_results=1)
    if not runs:
        log.warning("no parent run for study %s: figures not logged to MLflow", study)
        return
    for path in paths:
        client.log_artifact(runs[0].info.run_id, str(path), artifact_path="report")
