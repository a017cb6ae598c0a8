"""Faults a cluster does to a study, on this machine: a Ray Train worker SIGKILLed mid-trial.

The trial's worker group is lost; Tune retries the trial (the one retry layer), which resumes from its last
checkpoint into the same MLflow run. The guarantee: the trial ends at its configured step count, in one run, with
every metric's history holding each step exactly once (none duplicated, none missing).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CLI, REPO, cli_env, duplicated_points, study_dict, write_study

STEPS, LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY = 300, 5, 10, 50

pytestmark = pytest.mark.slow  # `make test-slow` (in CI): a study of minutes on an embedded Ray


def _train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes of the embedded Ray that the CLI process ``driver_pid`` started."""
    workers = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            continue
    return workers


def test_worker_killed_mid_trial_resumes_without_duplicate_or_missing_points(tmp_path: Path, digits16: Path) -> None:
    # eval_every < checkpoint_every: the killed group has flushed points past its last checkpoint, the measured
    # source of duplicates (the resumed group computes those steps again).
    study = study_dict("faults", digits16, train={"steps": STEPS, "log_every": LOG_EVERY, "eval_every": EVAL_EVERY,
                                                  "checkpoint_every": CHECKPOINT_EVERY},
                       resources={"workers_per_trial": 2, "max_failures": 1})
    path = write_study(tmp_path / "faults.yaml", study)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen(CLI + ["run", str(path), "--tracking-uri", uri, "--storage", str(storage)],
                                  env=cli_env(tmp_path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            first_checkpoint = storage / "faults" / "train" / "base" / f"step_{CHECKPOINT_EVERY:08d}"
            deadline = time.monotonic() + 600
            while not first_checkpoint.exists() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert first_checkpoint.exists(), (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.5)  # a few steps past the checkpoint, logged by the group about to die
            victims = _train_workers(driver.pid)
            assert len(victims) == 2, victims
            victims[-1].kill()
            assert driver.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    (run,) = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mixer.attempts"] == "2"  # the kill cost one attempt, resumed from a checkpoint
    assert duplicated_points(client, run.info.run_id) == {}
    history = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
               for key in ("train/loss", "val/acc")}
    assert history["train/loss"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # none missing either
    assert history["val/acc"][-1] == STEPS and len(history["val/acc"]) == len(set(history["val/acc"]))
    assert run.data.metrics["compute/images_seen"] == STEPS * 32
