"""Where a study's time goes: per-trial overhead and study goodput, from the timestamps every trial logs.

Each trial logs (``pipeline.trial`` / ``workers.training.trainer``): ``time/trial_start_unix`` (its driver process
started), ``time/worker_start_unix`` (rank 0's process started: the trial got its cores), ``time/first_step_unix`` and
``time/train_end_unix`` (the step loop of its last segment), and ``time/trial_end_unix`` (few-shot, fine-tuning and
bookkeeping done), plus ``compute/train_seconds`` (time inside training steps). The marks are run tags (metrics in
stores written before they moved; ``analysis.results`` reads either).

- queued = worker start - trial start: the trial's driver waits for cores that other trials hold. A study runs one
  trial more than fit (``pipeline.tune.default_concurrency``) so that this wait overlaps their training; it costs
  the cluster nothing and is not overhead. Both marks are process start times, and Ray may hand a trial a process
  it started earlier: an early driver process lengthens the wait, an early worker process (clipped to the trial
  start) moves wait into start-up. So start-up is an upper bound, never an underestimate. Runs logged before
  ``time/worker_start_unix`` existed count no wait.
- per-trial overhead = start-up (first step - worker start: the worker group, imports, process group, data) plus
  the tail (trial end - train end: evaluation of the last step, checkpoint, throughput, few-shot, fine-tuning,
  MLflow).
- goodput = sum over trials of in-loop training core-seconds (train_seconds x workers x cpus_per_worker) divided
  by (study wall x the CPUs Ray uses): the fraction of the machine's time spent training. It needs none of the
  above split: it is the figure to judge a study by.
"""

from __future__ import annotations

import pandas as pd

from analysis.results import load_study


def trial_timeline(df: pd.DataFrame) -> pd.DataFrame:
    """Per trial: time queued for cores, start-up and tail overhead (s), training seconds and core-seconds, from a
    ``load_study`` frame (module docstring)."""
    done = df[df["trial_end_unix"].notna() & df["first_step_unix"].notna()].copy()
    workers_start = done["worker_start_unix"].fillna(done["trial_start_unix"]).clip(lower=done["trial_start_unix"])
    done["queued_s"] = workers_start - done["trial_start_unix"]
    done["startup_s"] = done["first_step_unix"] - workers_start
    done["tail_s"] = done["trial_end_unix"] - done["train_end_unix"]
    done["overhead_s"] = done["startup_s"] + done["tail_s"]
    done["trial_s"] = done["trial_end_unix"] - done["trial_start_unix"]
    done["train_core_s"] = done["train_seconds"] * done["workers"] * done["cpus_per_worker"]
    columns = ["trial", "trial_s", "queued_s", "startup_s", "tail_s", "overhead_s", "train_seconds", "train_core_s"]
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
        "median_queued_s": float(timeline["queued_s"].median()),
        "median_startup_s": float(timeline["startup_s"].median()),
        "median_tail_s": float(timeline["tail_s"].median()),
        "median_train_s": float(timeline["train_seconds"].median()),
    }


def study_goodput(tracking_uri: str, study: str, cluster_cpus: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """(per-trial timeline, summary) of a study's finished trials in an MLflow store."""
    df = load_study(tracking_uri, study)
    df = df[df["status"] == "FINISHED"]
    return trial_timeline(df), goodput(df, cluster_cpus)
