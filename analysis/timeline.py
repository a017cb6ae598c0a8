"""Where a study's time goes: per-trial overhead and study goodput, from the timestamps every trial logs.

Each trial logs (``pipeline.trial`` / ``workers.trainer``): ``time/trial_start_unix`` (its process started: Tune
launched it), ``time/first_step_unix`` and ``time/train_end_unix`` (the step loop of its last segment), and
``time/trial_end_unix`` (few-shot and bookkeeping done), plus ``compute/train_seconds`` (time inside training steps).

- per-trial overhead = (first step - trial start) + (trial end - train end): start-up (actors, imports, process
  group, data) plus the tail (evaluation of the last step, checkpoint, throughput, few-shot, MLflow).
- goodput = sum over trials of in-loop training core-seconds (train_seconds x workers x cpus_per_worker) divided
  by (study wall x the CPUs Ray uses): the fraction of the machine's time spent training.
"""

from __future__ import annotations

import pandas as pd

from analysis.results import load_study


def trial_timeline(df: pd.DataFrame) -> pd.DataFrame:
    """Per trial: start-up and tail overhead (s), training seconds and core-seconds, from a ``load_study`` frame."""
    done = df[df["trial_end_unix"].notna() & df["first_step_unix"].notna()].copy()
    done["startup_s"] = done["first_step_unix"] - done["trial_start_unix"]
    done["tail_s"] = done["trial_end_unix"] - done["train_end_unix"]
    done["overhead_s"] = done["startup_s"] + done["tail_s"]
    done["trial_s"] = done["trial_end_unix"] - done["trial_start_unix"]
    done["train_core_s"] = done["train_seconds"] * done["workers"] * done["cpus_per_worker"]
    columns = ["trial", "trial_s", "startup_s", "tail_s", "overhead_s", "train_seconds", "train_core_s"]
    return done.sort_values("trial_start_unix")[columns].reset_index(drop=True)


def goodput(df: pd.DataFrame, cluster_cpus: float) -> dict[str, float]:
    """Study-level summary: wall (first trial start to last trial end), goodput, median per-trial overhead."""
    timeline = trial_timeline(df)
    if timeline.empty:
        raise ValueError("no finished trial with timestamps (time/*) in this study")
    done = df[df["trial_end_unix"].notna() & df["first_step_unix"].notna()]
    wall = float(done["trial_end_unix"].max() - done["trial_start_unix"].min())
    return {
        "trials": float(len(timeline)),
        "study_wall_s": wall,
        "goodput": float(timeline["train_core_s"].sum()) / (wall * cluster_cpus),
        "median_overhead_s": float(timeline["overhead_s"].median()),
        "median_startup_s": float(timeline["startup_s"].median()),
        "median_tail_s": float(timeline["tail_s"].median()),
        "median_train_s": float(timeline["train_seconds"].median()),
    }


def study_goodput(tracking_uri: str, study: str, cluster_cpus: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """(per-trial timeline, summary) of a study's finished trials in an MLflow store."""
    df = load_study(tracking_uri, study)
    df = df[df["status"] == "FINISHED"]
    return trial_timeline(df), goodput(df, cluster_cpus)
