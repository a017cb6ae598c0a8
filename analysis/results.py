"""MLflow -> pandas: one row per trial of a study, with the columns the figures and tables use.

Only MLflow is read (no Ray, no pipeline imports), so results can be rebuilt anywhere the tracking store is
reachable: ``load_study("sqlite:///mlflow.db", "demo")``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from workers import names
from workers.models.registry import get_variant
from workers.training.mlflow_logger import tag_filter

# MLflow metric -> results column.
METRICS = {
    names.BEST_VAL_ACC: "best_val_acc",
    names.FINETUNE_TOP1: "finetune_top1",
    names.VAL_ACC: "final_val_acc",
    names.VAL_LOSS: "final_val_loss",
    names.TRAIN_LOSS: "final_train_loss",  # the last logging window's mean: with final_val_loss, the overfitting gap
    names.COMPUTE_TRAIN_FLOPS: "train_flops",
    names.COMPUTE_CORE_SECONDS: "core_seconds",
    names.COMPUTE_CPU_SECONDS: "cpu_seconds",
    names.COMPUTE_WALL_SECONDS: "wall_seconds",
    names.COMPUTE_TRAIN_SECONDS: "train_seconds",
    names.COMPUTE_IMAGES_SEEN: "images_seen",
    names.COMPUTE_EPOCHS: "epochs",
    names.PERF_IMG_PER_S_PER_CORE: "img_per_s_per_core",
    names.PERF_IMG_PER_S_PER_CORE_SPREAD: "img_per_s_per_core_spread",  # (max - min) / median of the table's last 3
    names.PERF_TRAIN_IMG_PER_S_PER_CORE: "train_img_per_s_per_core",
}
# A trial's wall-clock marks (unix seconds; analysis.timeline) -> results column. Tags since the summaries moved to
# step 0 (workers.names.is_timestamp); stores written before that hold them as metrics, which are read instead.
TIMESTAMPS = {
    names.TIME_TRIAL_START_UNIX: "trial_start_unix",
    names.TIME_WORKER_START_UNIX: "worker_start_unix",
    names.TIME_FIRST_STEP_UNIX: "first_step_unix",
    names.TIME_TRAIN_END_UNIX: "train_end_unix",
    names.TIME_TRIAL_END_UNIX: "trial_end_unix",
}
# MLflow param -> (results column, type).
PARAMS = {
    "model.variant": ("variant", str),
    "data.fraction": ("fraction", float),
    "data.permute": ("permute", str),  # Fig. 4 pipeline: none | patches | pixels (absent in older runs: NaN)
    "optim.lr": ("lr", float),
    "optim.weight_decay": ("weight_decay", float),
    "train.seed": ("seed", int),  # what a study's replicates vary (analysis.replicates: means and intervals over it)
    "data.image_size": ("image_size", int),
    "data.train_images": ("train_images", int),
    "train.steps": ("steps", int),
    "train.batch_size": ("batch_size", int),
    "resources.workers": ("workers", int),
    "resources.cpus_per_worker": ("cpus_per_worker", int),
}
# MLflow tag -> results column: the device a trial ran on, and the compute ledger's plan (analysis.ledger), tagged
# at its first start; the planned numbers stay strings here ("unknown" where the plan had no calibration).
TAGS = {
    names.DEVICE_KIND_TAG: "device_kind",
    names.PLAN_TRAIN_FLOPS_TAG: "planned_flops",
    names.PLAN_DEVICE_SECONDS_TAG: "planned_device_seconds",
    names.PLAN_COST_TAG: "planned_cost",
    names.PLAN_PRICE_TAG: "price_per_device_hour",
    names.PLAN_CALIBRATION_TAG: "calibration",
}
# A recipe sweep's setting per trial (pipeline.spec ``sweep``): ``setting`` is the mixer.sweep_setting tag ("base"
# where the family swept nothing, and in runs from before sweeps), ``grid_point`` the trial's grid coordinates
# without its setting and seed (the mixer.grid_point tag less those fields): the replicates of a setting share both.
SEED_PARAM = "train.seed"
# ``family`` is the model family ("Mixer", "ViT", "BiT"), ``size`` its size ("B", "R50x1"), from the variant
# (workers.models.registry); ``patch_size`` is empty for BiT.
COLUMNS = ["study", "trial", "status", "run_id", "variant", "family", "size", "patch_size", "image_size", "fraction",
           "permute", "grid_point", "setting", "seed", "lr", "weight_decay", "train_images", "steps", "batch_size",
           "epochs", "images_seen", "train_flops", "core_seconds", "cpu_seconds", "wall_seconds", "img_per_s_per_core",
           "img_per_s_per_core_spread",
           "train_img_per_s_per_core", "best_val_acc", "final_val_acc", "final_val_loss",
           "final_train_loss", "finetune_top1", "checkpoint", "workers",
           "cpus_per_worker", "train_seconds", "trial_start_unix", "worker_start_unix", "first_step_unix",
           "train_end_unix", "trial_end_unix", *TAGS.values()]


def load_study(tracking_uri: str, study: str, experiment: str | None = None) -> pd.DataFrame:
    """Every trial run of ``study`` (tag ``mixer.role = trial``) as a DataFrame, sorted by variant then fraction.

    Few-shot metrics appear as ``fewshot_<k>shot`` columns for every k that was logged. Raises ``LookupError``
    naming the experiment if it does not exist.
    """
    client = MlflowClient(tracking_uri)
    name = experiment or study
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LookupError(f"no MLflow experiment '{name}' at {tracking_uri} (experiments there: {known})")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=tag_filter({names.STUDY_TAG: study, names.ROLE_TAG: names.ROLE_TRIAL}),
        max_results=10_000,
    )
    rows = [_row(study, run) for run in runs]
    df = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in df:
            df[column] = np.nan
    fewshot = sorted((c for c in df if c.startswith("fewshot_") and c.endswith("shot")),
                     key=lambda c: int(c[len("fewshot_"):-len("shot")]))
    df = df[COLUMNS + fewshot]
    return df.sort_values(["variant", "fraction", "trial"], na_position="last", ignore_index=True)


def _row(study: str, run) -> dict:
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    row: dict = {"study": study, "trial": tags.get(names.TRIAL_TAG, run.info.run_name), "status": run.info.status,
                 "run_id": run.info.run_id, "checkpoint": tags.get(names.BEST_CHECKPOINT_TAG)}
    for param, (column, kind) in PARAMS.items():
        row[column] = kind(params[param]) if param in params else np.nan
    for metric, column in METRICS.items():
        row[column] = metrics.get(metric, np.nan)
    for mark, column in TIMESTAMPS.items():
        row[column] = float(tags[mark]) if mark in tags else metrics.get(mark, np.nan)
    for tag, column in TAGS.items():
        row[column] = tags.get(tag, np.nan)
    row["setting"] = tags.get(names.SWEEP_SETTING_TAG, names.SWEEP_SETTING_BASE)
    row["grid_point"] = grid_point(tags.get(names.GRID_POINT_TAG, row["trial"]), row["setting"])
    for key, value in metrics.items():
        if key.startswith(names.FEWSHOT_PREFIX) and key.endswith("shot"):
            row["fewshot_" + key.split("/", 1)[1]] = value
    if isinstance(row["variant"], str):
        try:
            variant = get_variant(row["variant"])
        except ValueError:  # a name no parser knows (older run?): keep the row, without family/size/patch
            pass
        else:
            row["variant"] = variant.name  # canonical: "B/16" and "B-16" are one group in the figures
            row["family"], row["size"], row["patch_size"] = variant.family, variant.size, variant.patch_size
    return row


# A "key=value,key=value" tag splits at the commas that start the next dotted key (a value may hold commas: [2, 15]).
_NEXT_KEY = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_.]*=)")


def grid_point(point: str, setting: str) -> str:
    """The grid coordinates of a trial: its mixer.grid_point tag without the sweep setting's fields and the seed.

    Args:
        point: the tag, ``model.variant=Micro-4,data.fraction=0.1,optim.lr=0.003,train.seed=1`` (or "base").
        setting: its mixer.sweep_setting tag, ``optim.lr=0.003`` (or "base").
    """
    swept = {part.partition("=")[0] for part in _NEXT_KEY.split(setting)} | {SEED_PARAM}
    kept = [part for part in _NEXT_KEY.split(point) if part.partition("=")[0] not in swept]
    return ",".join(kept) or names.SWEEP_SETTING_BASE


def export(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the table as CSV and parquet; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, parquet = out_dir / "results.csv", out_dir / "results.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)
    return [csv, parquet]
