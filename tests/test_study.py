"""A real study end to end: Ray Tune over a 2x2 grid of 2-worker trials on an embedded local Ray, the driver
killed mid-study, `mixer-study resume`, then `mixer-study report` from the MLflow runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis import figures
from analysis.results import load_study
from tests.conftest import CLI, REPO, cli_env, duplicated_points, run_cli, study_dict, write_study
from workers.training.checkpoint import load_model

NAME = "grid"
# Families mixed in one grid: a Mixer and a ViT of the same CPU size (Fig. 2 right draws one curve per model).
GRID = {"model.variant": ["Nano-4", "ViT-Nano/4"], "data.fraction": [0.1, 1.0]}
TRIALS = ["variant=Nano-4,fraction=0.1", "variant=Nano-4,fraction=1.0",
          "variant=ViT-Nano_4,fraction=0.1", "variant=ViT-Nano_4,fraction=1.0"]


def _finished_trials(uri: str) -> list[str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial' and attributes.status = 'FINISHED'")
    return [r.data.tags["mixer.trial"] for r in runs]


def _checkpointed_unfinished(storage: Path, finished: list[str]) -> str | None:
    for trial_dir in (storage / NAME / "train").glob("*"):
        if trial_dir.name not in finished and any(trial_dir.glob("step_*")):
            return trial_dir.name
    return None


@pytest.fixture(scope="module")
def study(tmp_path_factory, digits16: Path) -> dict:
    """Run the study, kill the driver once one trial finished and another has a checkpoint, then resume it."""
    tmp = tmp_path_factory.mktemp("study")
    path = write_study(tmp / "grid.yaml", study_dict(NAME, digits16, grid=GRID))
    uri, storage = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "runs"
    env = cli_env(tmp)
    log = open(tmp / "run.log", "w")
    driver = subprocess.Popen(CLI + ["run", str(path), "--tracking-uri", uri, "--storage", str(storage)],
                              env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # A second driver on the running study is refused (the study's lock), for both verbs that drive it. Asked as
    # soon as the first holds the lock: 4 trials still to train, so it is certainly running meanwhile.
    deadline = time.monotonic() + 300
    while not (storage / NAME / "driver.lock").exists():
        assert driver.poll() is None and time.monotonic() < deadline, (tmp / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    second = [run_cli(["run", str(path), "--tracking-uri", uri, "--storage", str(storage)], env, timeout=120),
              run_cli(["resume", NAME, "--storage", str(storage)], env, timeout=120)]
    killed_trial, deadline = None, time.monotonic() + 900
    while time.monotonic() < deadline and driver.poll() is None:
        finished = _finished_trials(uri)
        killed_trial = _checkpointed_unfinished(storage, finished) if finished else None
        if killed_trial:
            break
        time.sleep(1)
    log_tail = (tmp / "run.log").read_text()[-3000:]
    assert killed_trial, f"no trial checkpointed in time; driver exit {driver.poll()}: {log_tail}"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
    driver.wait()
    finished_before = _finished_trials(uri)
    # What a kill during a checkpoint upload leaves: a newer step folder with a partial state. Ray Train resumes
    # from the checkpoints it registered, so this one must never be loaded (it would fail to); the resumed run
    # later writes the real step 60 over it.
    partial = storage / NAME / "train" / killed_trial / "step_00000060"
    planted = not partial.exists()
    if planted:
        partial.mkdir()
        (partial / "state.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    time.sleep(3)

    resumed = run_cli(["resume", NAME, "--storage", str(storage)], env, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"uri": uri, "storage": storage, "killed": killed_trial, "finished_before": finished_before,
            "resume_log": resumed.stdout, "tmp": tmp, "second_drivers": second, "partial": partial if planted else None}


def test_one_finished_run_per_grid_point(study: dict) -> None:
    client = MlflowClient(study["uri"])
    exp = client.get_experiment_by_name(NAME)
    trials = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert sorted(r.data.tags["mixer.trial"] for r in trials) == sorted(TRIALS)  # no duplicates after resume
    assert {r.info.status for r in trials} == {"FINISHED"}
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.params["grid_size"] == "4"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    # What MLflow shows (tests/test_mlflow_view.py): short run names, summaries at step 0 (bar charts), curves at
    # their steps, the parent's summary naming the best trial, each trial's model card beside its checkpoint path.
    assert sorted(r.info.run_name for r in trials) == ["Nano-4 f=0.1", "Nano-4 f=1.0", "ViT-Nano/4 f=0.1",
                                                      "ViT-Nano/4 f=1.0"]
    assert parent.data.metrics["study/trials_done"] == 4 and parent.data.metrics["study/trials_failed"] == 0
    best = max(trials, key=lambda r: r.data.metrics["fewshot/5shot"])
    assert parent.data.metrics["fewshot/5shot"] == best.data.metrics["fewshot/5shot"]
    assert parent.data.tags["mixer.best_trial.fewshot/5shot"] == best.info.run_name
    run_id = trials[0].info.run_id
    for key in ("best/val_acc", "fewshot/5shot", "compute/train_flops", "perf/img_per_s_per_core"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0], key
    assert min(m.step for m in client.get_metric_history(run_id, "val/acc")) >= 1
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/model.json"}
    assert trials[0].data.tags["checkpoint.best"] in trials[0].data.tags["mlflow.note.content"]
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 2  # 1 s samples
    for run in trials:
        m = run.data.metrics
        for key in ("compute/train_flops", "compute/core_seconds", "compute/cpu_seconds", "compute/epochs",
                    "compute/images_seen", "perf/img_per_s_per_core", "best/val_acc", "fewshot/5shot"):
            assert key in m and m[key] > 0, (run.data.tags["mixer.trial"], key)
        assert m["compute/images_seen"] == 60 * 32  # matched steps across fractions
    epochs = {r.data.tags["mixer.trial"]: r.data.metrics["compute/epochs"] for r in trials}
    assert epochs["variant=Nano-4,fraction=0.1"] > 5 * epochs["variant=Nano-4,fraction=1.0"]
    # Tune runs a trial after another in a reused driver process (reuse_actors); each trial's logged start is its
    # own, not the process's, so no more trials overlap in time than the study runs at once (1 fits, 1 starts early).
    spans = [(float(r.data.tags["time/trial_start_unix"]), float(r.data.tags["time/trial_end_unix"])) for r in trials]
    assert all(start < end for start, end in spans)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2, spans


def test_second_driver_is_refused_while_the_first_runs(study: dict) -> None:
    for result in study["second_drivers"]:
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "another driver is running this study" in result.stderr and "Traceback" not in result.stderr
        assert "Ray logs" not in result.stdout  # refused before Ray


def test_resume_finishes_only_the_rest_from_checkpoints(study: dict) -> None:
    log = study["resume_log"]
    for trial in study["finished_before"]:
        assert f"start  {trial}" not in log  # finished trials are not rerun
    # Progress lines count the trials finished before the kill.
    assert f" {len(study['finished_before'])}/4 done] start" in log
    assert "4/4 trials finished" in log
    client = MlflowClient(study["uri"])
    exp = client.get_experiment_by_name(NAME)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`mixer.trial` = '{study['killed']}'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    # The killed trial's history: every logged step once (the resumed segment skips what the killed one logged)
    # and none missing (it logs what the killed one computed but never flushed).
    assert steps == list(range(10, 61, 10))
    for trial in client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'"):
        assert duplicated_points(client, trial.info.run_id) == {}, trial.data.tags["mixer.trial"]
    if study["killed"] not in study["finished_before"]:  # (it may have finished between the poll and the kill)
        assert run.data.tags["mixer.attempts"] == "2"  # resumed once, from a registered checkpoint, not the partial
    if study["partial"] is not None:  # overwritten by the resumed run's own step 60: a loadable checkpoint now
        assert "Nano" in load_model(study["partial"]).variant.name


def test_report_writes_every_figure(study: dict) -> None:
    out = study["tmp"] / "report"
    result = run_cli(["report", NAME, "--tracking-uri", study["uri"], "--out", str(out)], cli_env(study["tmp"]),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stem in ("fig2_left_fewshot_5shot_vs_train_flops", "fig2_right_fewshot_5shot", "fig3_fewshot_5shot",
                 "fig5_token_mixing"):
        for suffix in (".png", ".pdf"):
            assert (out / (stem + suffix)).stat().st_size > 1000, stem + suffix
    for name in ("table3.md", "table3.csv", "results.csv", "results.parquet"):
        assert (out / name).stat().st_size > 0
    df = load_study(study["uri"], NAME)
    assert len(df) == 4 and df["fewshot_5shot"].notna().all()
    # Fig. 2 right: one line per variant, one point per fraction.
    fig = figures._build_fig2_right(df, "fewshot_5shot")
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 0]
    assert sorted(len(line.get_xdata()) for line in lines) == [2, 2]
    # The figures are also artifacts of the study's parent run.
    client = MlflowClient(study["uri"])
    exp = client.get_experiment_by_name(NAME)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'study'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/fig2_right_fewshot_5shot.png" in logged and "report/table3.md" in logged


def test_running_a_finished_study_again_reruns_nothing(study: dict) -> None:
    path = study["tmp"] / "grid.yaml"
    again = run_cli(["run", str(path), "--tracking-uri", study["uri"], "--storage", str(study["storage"])],
                    cli_env(study["tmp"]), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing it" in again.stdout and "start  " not in again.stdout
    assert "4/4 trials finished" in again.stdout
    client = MlflowClient(study["uri"])
    exp = client.get_experiment_by_name(NAME)
    assert len(client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")) == 4
