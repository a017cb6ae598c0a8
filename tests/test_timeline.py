"""analysis.timeline: per-trial queue, start-up and tail, and study goodput, from constructed timestamps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.timeline import goodput, trial_timeline


def _trials() -> pd.DataFrame:
    """Two 2-worker trials on a 2-CPU machine, the second queued while the first trains (the study runs fit + 1)."""
    rows = [
        # trial a: starts at 0, its workers at 2, first step at 10, trains 80 s in a 90 s loop, ends at 105
        {"trial": "a", "trial_start_unix": 0.0, "worker_start_unix": 2.0, "first_step_unix": 10.0,
         "train_end_unix": 100.0, "trial_end_unix": 105.0, "train_seconds": 80.0},
        # trial b: its driver starts at 1 and waits for a's cores; workers at 101, first step at 106, ends at 200
        {"trial": "b", "trial_start_unix": 1.0, "worker_start_unix": 101.0, "first_step_unix": 106.0,
         "train_end_unix": 196.0, "trial_end_unix": 200.0, "train_seconds": 90.0},
        # still running: left out
        {"trial": "c", "trial_start_unix": 2.0, "worker_start_unix": np.nan, "first_step_unix": np.nan,
         "train_end_unix": np.nan, "trial_end_unix": np.nan, "train_seconds": np.nan},
    ]
    return pd.DataFrame(rows).assign(workers=2, cpus_per_worker=1)


def test_queueing_for_cores_is_not_overhead() -> None:
    timeline = trial_timeline(_trials()).set_index("trial")
    assert list(timeline.index) == ["a", "b"]
    assert timeline.loc["a", ["queued_s", "startup_s", "tail_s", "overhead_s"]].tolist() == [2, 8, 5, 13]
    assert timeline.loc["b", ["queued_s", "startup_s", "tail_s", "overhead_s"]].tolist() == [100, 5, 4, 9]
    assert timeline.loc["b", "trial_s"] == 199 and timeline.loc["b", "train_core_s"] == 180


def test_runs_without_a_worker_start_count_no_queue() -> None:
    """Runs logged before time/worker_start_unix existed: start-up from the trial's start, as before."""
    old = _trials().drop(columns=["worker_start_unix"]).assign(worker_start_unix=np.nan)
    timeline = trial_timeline(old).set_index("trial")
    assert timeline["queued_s"].tolist() == [0, 0] and timeline["startup_s"].tolist() == [10, 105]


def test_goodput_is_training_core_seconds_over_wall_times_cpus() -> None:
    summary = goodput(_trials(), cluster_cpus=2)
    assert summary["study_wall_s"] == 200 and summary["trials"] == 2
    assert summary["goodput"] == pytest.approx((80 * 2 + 90 * 2) / (200 * 2))
    assert summary["median_overhead_s"] == 11 and summary["median_queued_s"] == 51
    with pytest.raises(ValueError, match="no finished trial"):
        goodput(_trials().iloc[2:], cluster_cpus=2)
