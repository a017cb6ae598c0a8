"""What a study shows in MLflow, against a real sqlite store: summaries as bar charts (step 0, once), curves at
their steps, timestamps as tags, short run names, dataset names with the grid's fraction, the parent run's
description and summary. No Ray here; the study tests (tests/test_study.py, tests/test_trial.py) check the same on
real runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from analysis.results import load_study
from pipeline.spec import StudyError, parse_study, trial_name
from pipeline.tracking import (
    MODEL_CARD,
    DataSplit,
    checkpoint_note,
    experiment_id,
    log_dataset_inputs,
    log_study_summary,
    run_label,
    study_run,
    trial_run,
)
from tests.conftest import duplicated_points, study_dict
from workers import names
from workers.training.checkpoint import MODEL_FILE
from workers.training.mlflow_logger import RunLogger, replay_spool, write_spool


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _drawn_as_bars(client: MlflowClient, run_id: str, key: str) -> bool:
    """MLflow's chart view (3.x, RunsChartsCardConfig): a line chart when the metric's latest step is >= 1 in any
    run, else a bar chart comparing the runs."""
    latest = [m for m in client.get_run(run_id).data._metric_objs if m.key == key]
    return latest[0].step < 1


def test_metric_kinds_by_name() -> None:
    for key in ("best/val_acc", "compute/train_flops", "compute/finetune_flops_lr0.01", "fewshot/5shot",
                "fewshot/5shot_std", "perf/mfu", "perf/img_per_s_per_core", "finetune/top1", "finetune/top1_lr0.1",
                "finetune/top1_384px", "finetune/val_top1_lr1e-05", "finetune/best_lr"):
        assert names.is_summary(key), key
    for key in ("train/loss", "val/acc", "perf/train_img_per_s", "finetune/train_loss_lr0.01", "finetune/lr_lr0.01",
                "finetune/loss_lr0.01", "perf/finetune_img_per_s_lr0.01", "data/skipped_samples", "images_seen",
                "system/cpu_utilization_percentage", "compute/wall_seconds"):  # the wall time at each evaluation
        assert not names.is_summary(key), key
    assert names.is_timestamp(names.TIME_TRIAL_END_UNIX) and not names.is_timestamp(names.COMPUTE_WALL_SECONDS)


def test_summaries_once_at_step_0_curves_at_their_steps_timestamps_as_tags(client: MlflowClient,
                                                                           tracking_uri: str) -> None:
    run_id = client.create_run(experiment_id(client, "view-a")).info.run_id
    tracker = RunLogger(tracking_uri, run_id)
    # What a trial's rank 0 logs: compute/wall_seconds at every evaluation, the summaries at the last step, flushed
    # before the checkpoint that implies them (a segment killed after it is not asked for them again).
    tracker.log({"train/loss": 2.0, "val/acc": 0.5, "compute/wall_seconds": 10.0}, 50)
    tracker.log({"train/loss": 1.0, "val/acc": 0.75, "compute/wall_seconds": 20.0, "best/val_acc": 0.75,
                 "best/step": 100, "fewshot/5shot": 0.6, "time/train_end_unix": 1_700_000_000.1234}, 100)
    tracker.flush()
    assert client.get_run(run_id).data.metrics["best/val_acc"] == 0.75
    tracker.close("FINISHED")

    run = client.get_run(run_id)
    assert _history(client, run_id, "train/loss") == [(50, 2.0), (100, 1.0)]
    assert _history(client, run_id, "val/acc") == [(50, 0.5), (100, 0.75)]
    assert _history(client, run_id, "compute/wall_seconds") == [(50, 10.0), (100, 20.0)]
    for key in ("best/val_acc", "best/step", "fewshot/5shot"):
        assert _history(client, run_id, key)[0][0] == 0 and _drawn_as_bars(client, run_id, key), key
    assert not _drawn_as_bars(client, run_id, "train/loss")
    assert "time/train_end_unix" not in run.data.metrics
    assert run.data.tags["time/train_end_unix"] == "1700000000.123"

    # A resumed segment that recomputes the summaries adds nothing: every point once, the first value kept.
    tracker = RunLogger(tracking_uri, run_id)
    tracker.log({"best/val_acc": 0.75, "fewshot/5shot": 0.61, "train/loss": 1.0}, 100)
    tracker.close()
    assert tracker.skipped == 3 and duplicated_points(client, run_id) == {}
    assert client.get_run(run_id).data.metrics["fewshot/5shot"] == 0.6


def test_spooled_summaries_are_replayed_once(client: MlflowClient, tmp_path: Path) -> None:
    run_id = client.create_run(experiment_id(client, "view-b")).info.run_id
    spool = str(tmp_path / "spool")
    points = [Metric("train/loss", 1.0, 1000, 10), Metric("best/val_acc", 0.8, 1000, 0)]
    write_spool(spool, run_id, points, {"time/trial_end_unix": "1700000000.000"}, None)
    assert replay_spool(client, spool) == 2
    write_spool(spool, run_id, points, {}, None)  # a record that had partly arrived before the store failed
    assert replay_spool(client, spool) == 0
    assert duplicated_points(client, run_id) == {}
    assert client.get_run(run_id).data.tags["time/trial_end_unix"] == "1700000000.000"


def test_run_labels_are_short_and_distinct() -> None:
    grid = [{"model.variant": v, "data.fraction": f} for v in ("Nano-4", "Micro-4") for f in (0.03, 0.1, 0.3, 1.0)]
    labels = [run_label(trial_name(point), point) for point in grid]
    assert labels[4] == "Micro-4 f=0.03" and labels[3] == "Nano-4 f=1.0"
    assert len(set(labels)) == len(labels) and max(map(len, labels)) <= 15
    assert run_label("base", {}) == "base" and run_label("train-base", {}) == "train-base"
    assert run_label("x", {"optim.lr": 0.001, "train.steps": 300}) == "lr=0.001 steps=300"
    assert run_label("x", {"optim.lr": 0.1, "finetune.lr": 0.2}) == "optim.lr=0.1 finetune.lr=0.2"  # ambiguous
    assert run_label("x", {"data.fraction": 0.1, "model.variant": "B-16"}) == "f=0.1 B-16"  # the grid's key order


def test_a_run_is_found_by_its_trial_tag_whatever_its_shown_name(client: MlflowClient) -> None:
    exp_id = experiment_id(client, "view-c")
    point = {"model.variant": "Micro-4", "data.fraction": 0.03}
    name = trial_name(point)
    parent = study_run(client, exp_id, "view-c", {"grid_size": 1}, description="a **data-scale** study")
    # A run made before the short names existed is found again and renamed.
    old = trial_run(client, exp_id, "view-c", parent, name, {"model.variant": "Micro-4"})
    assert client.get_run(old).info.run_name == name
    again = trial_run(client, exp_id, "view-c", parent, name, {}, run_name=run_label(name, point))
    run = client.get_run(again)
    assert again == old and run.info.run_name == "Micro-4 f=0.03"
    assert run.data.tags[names.TRIAL_TAG] == name and run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.data.tags["mlflow.source.name"] == "mixer-study"
    assert client.get_run(parent).data.tags[MLFLOW_RUN_NOTE] == "a **data-scale** study"
    assert study_run(client, exp_id, "view-c", {}) == parent  # resume: found, its description kept


def test_dataset_named_by_the_grid_fraction(client: MlflowClient) -> None:
    run_id = client.create_run(experiment_id(client, "view-d")).info.run_id
    split = DataSplit("train", "/data/digits16/train/manifest.json", ["ab" * 32], 0.299682, 1437, 10,
                      grid_fraction=0.3)
    log_dataset_inputs(client, run_id, [split])
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits16/train@0.3"
    assert json.loads(dataset_input.dataset.profile) == {"num_samples": 1437, "fraction": 0.299682,
                                                         "num_classes": 10, "grid_fraction": 0.3}
    assert [t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT] == ["train"]


def test_parent_run_summary_names_the_best_trials(client: MlflowClient) -> None:
    exp_id = experiment_id(client, "view-e")
    parent = study_run(client, exp_id, "view-e", {})
    results = {"Nano-4 f=1.0": ("FINISHED", 0.9, 0.55), "Micro-4 f=1.0": ("FINISHED", 0.95, 0.5),
               "Micro-4 f=0.1": ("FAILED", 0.99, 0.9)}  # a failed trial's values never count
    for label, (status, val_acc, fewshot) in results.items():
        run_id = trial_run(client, exp_id, "view-e", parent, label.replace(" ", "_"), {}, run_name=label)
        client.log_batch(run_id, metrics=[Metric("best/val_acc", val_acc, 0, 0),
                                          Metric("fewshot/5shot", fewshot, 0, 0)])
        client.set_terminated(run_id, status)
    best = log_study_summary(client, parent)
    assert best == {"best/val_acc": ("Micro-4 f=1.0", 0.95), "fewshot/5shot": ("Nano-4 f=1.0", 0.55)}
    run = client.get_run(parent)
    assert {k: run.data.metrics[k] for k in ("study/trials_done", "study/trials_failed", "best/val_acc",
                                              "fewshot/5shot")} == {"study/trials_done": 2, "study/trials_failed": 1,
                                                                    "best/val_acc": 0.95, "fewshot/5shot": 0.55}
    assert "finetune/top1" not in run.data.metrics  # no trial fine-tuned
    assert run.data.tags["mixer.best_trial.fewshot/5shot"] == "Nano-4 f=1.0"
    assert all(_drawn_as_bars(client, parent, key) for key in run.data.metrics)
    log_study_summary(client, parent)  # the study resumed or run again: nothing changed, nothing added
    assert duplicated_points(client, parent) == {}


def test_checkpoint_note_and_model_card_name() -> None:
    note = checkpoint_note("/runs/demo/train/x/step_00000300", 300, 0.971234, {"data.fraction": 0.3})
    assert "step 300, val/acc 0.9712, at `/runs/demo/train/x/step_00000300`" in note and "`data.fraction` = 0.3" in note
    assert MODEL_CARD == MODEL_FILE  # the file log_model_card copies is the one checkpoints hold


def test_timestamps_read_from_tags_and_from_old_metrics(client: MlflowClient) -> None:
    """analysis.results reads the marks as tags, and as metrics from stores written before they moved."""
    exp_id = experiment_id(client, "view-f")
    for trial, as_tags in (("new", True), ("old", False)):
        run_id = client.create_run(exp_id, tags={names.STUDY_TAG: "view-f", names.ROLE_TAG: names.ROLE_TRIAL,
                                                 names.TRIAL_TAG: trial}).info.run_id
        marks = {names.TIME_TRIAL_START_UNIX: 100.0, names.TIME_TRIAL_END_UNIX: 160.5}
        if as_tags:
            for key, value in marks.items():
                client.set_tag(run_id, key, f"{value:.3f}")
        else:
            client.log_batch(run_id, metrics=[Metric(k, v, 0, 300) for k, v in marks.items()])
    df = load_study(client.tracking_uri, "view-f").set_index("trial")
    assert df.loc["new", "trial_end_unix"] == df.loc["old", "trial_end_unix"] == 160.5
    assert df.loc["new", "trial_start_unix"] == df.loc["old", "trial_start_unix"] == 100.0
    assert np.isnan(df.loc["new", "first_step_unix"])


def test_system_metrics_interval_is_a_tracking_field(digits16: Path) -> None:
    spec = parse_study(study_dict("interval", digits16))
    assert spec.tracking.system_metrics_interval == 1.0
    faster = parse_study(study_dict("interval", digits16, tracking={"system_metrics_interval": 0.5}))
    assert faster.tracking.system_metrics_interval == 0.5
    with pytest.raises(StudyError, match="tracking.system_metrics_interval"):
        parse_study(study_dict("interval", digits16, tracking={"system_metrics_interval": 0}))
