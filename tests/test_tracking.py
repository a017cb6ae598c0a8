"""MLflow bookkeeping against a real sqlite store: experiment kind tag, dataset inputs, system metrics.

No Ray here: everything runs in the pytest process against one ``sqlite:///.../mlflow.db``, an experiment per test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    DataSplit,
    dataset_digest,
    experiment_id,
    log_dataset_inputs,
    redact_url,
)
from workers.training.mlflow_logger import RunLogger

SHARDS = [f"{i:064x}" for i in range(4)]  # stand-ins for a manifest's shard sha256 list
VAL_SHARDS = [f"{i + 100:064x}" for i in range(2)]


def _splits(fraction: float, num_samples: int) -> list[DataSplit]:
    return [
        DataSplit("train", "s3://user:secret@bucket/digits16/train/manifest.json", SHARDS, fraction, num_samples, 10),
        DataSplit("val", "/data/digits16/val/manifest.json", VAL_SHARDS, 1.0, 50, 10),
    ]


def _inputs_by_context(run: Run) -> dict[str, list]:
    by_context: dict[str, list] = {}
    for dataset_input in run.inputs.dataset_inputs:
        contexts = [t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT]
        assert len(contexts) == 1, dataset_input.tags
        by_context.setdefault(contexts[0], []).append(dataset_input.dataset)
    return by_context


def test_new_experiment_opens_on_runs_table(client: MlflowClient) -> None:
    exp_id = experiment_id(client, "study-a")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert experiment_id(client, "study-a") == exp_id  # found again, not created twice


def test_existing_experiment_gets_the_kind_tag_but_a_chosen_kind_is_kept(client: MlflowClient) -> None:
    old = client.create_experiment("made-before-the-tag")
    chosen = client.create_experiment("chosen-in-ui", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "made-before-the-tag") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment_id(client, "chosen-in-ui") == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_experiment_created_meanwhile_by_another_driver_is_used(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = client.create_experiment("raced", tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    real_lookup, lookups = client.get_experiment_by_name, []

    def late_lookup(name: str):  # the first lookup runs before the other driver's create_experiment
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(name)

    monkeypatch.setattr(client, "get_experiment_by_name", late_lookup)
    assert experiment_id(client, "raced") == winner


def test_redact_url() -> None:
    assert redact_url("s3://key:secret@bucket/a/manifest.json") == "s3://bucket/a/manifest.json"
    assert redact_url("https://user@host:9000/a?x=1") == "https://host:9000/a?x=1"
    assert redact_url("/data/me@home/train") == "/data/me@home/train"  # a local path: '@' is no credential
    assert redact_url("gs://bucket/train") == "gs://bucket/train"


def test_digest_identifies_the_subset_not_its_location() -> None:
    assert dataset_digest(SHARDS, 0.1) != dataset_digest(SHARDS, 1.0)
    assert dataset_digest(SHARDS, 0.1) == dataset_digest(list(SHARDS), 0.1)
    assert dataset_digest(SHARDS, 1.0) != dataset_digest(list(reversed(SHARDS)), 1.0)  # order defines the prefix
    assert len(dataset_digest(SHARDS, 0.5)) == 8


def test_dataset_inputs_one_per_split_shared_by_equal_subsets_and_never_duplicated(client: MlflowClient) -> None:
    exp_id = experiment_id(client, "study-b")
    small, full, small_again = (client.create_run(exp_id).info.run_id for _ in range(3))
    log_dataset_inputs(client, small, _splits(0.1, 20))
    log_dataset_inputs(client, full, _splits(1.0, 200))
    log_dataset_inputs(client, small_again, _splits(0.1, 20))
    log_dataset_inputs(client, small, _splits(0.1, 20))  # a resumed trial logs the same inputs again

    runs = {run_id: _inputs_by_context(client.get_run(run_id)) for run_id in (small, full, small_again)}
    for by_context in runs.values():
        assert {k: len(v) for k, v in by_context.items()} == {"train": 1, "val": 1}
    (train_small,), (train_full,) = runs[small]["train"], runs[full]["train"]
    assert train_small.digest != train_full.digest
    assert runs[small_again]["train"][0].digest == train_small.digest  # same subset, same digest
    assert runs[small]["val"][0].digest == runs[full]["val"][0].digest

    assert train_small.name == "digits16/train@0.1" and train_full.name == "digits16/train"
    assert train_small.source_type == "s3"
    assert json.loads(train_small.source) == {"uri": "s3://bucket/digits16/train/manifest.json"}
    assert "secret" not in train_small.source
    assert json.loads(train_small.profile) == {"num_samples": 20, "fraction": 0.1, "num_classes": 10}
    val = runs[small]["val"][0]
    assert val.source_type == "local" and json.loads(val.source) == {"uri": "/data/digits16/val/manifest.json"}


def test_same_data_in_two_roles_keeps_both_inputs(client: MlflowClient) -> None:
    """Few-shot on the upstream training set at fraction 1: MLflow would merge identical datasets of one run."""
    run_id = client.create_run(experiment_id(client, "study-c")).info.run_id
    url = "/data/digits16/train"
    splits = [DataSplit("train", url, SHARDS, 1.0, 200, 10), DataSplit("fewshot-train", url, SHARDS, 1.0, 200, 10)]
    log_dataset_inputs(client, run_id, splits[:1])
    log_dataset_inputs(client, run_id, splits)
    log_dataset_inputs(client, run_id, splits)
    by_context = _inputs_by_context(client.get_run(run_id))
    assert {k: len(v) for k, v in by_context.items()} == {"train": 1, "fewshot-train": 1}
    assert by_context["train"][0].name == "digits16/train"
    assert by_context["fewshot-train"][0].name == "digits16/train (fewshot-train)"


def _busy(seconds: float) -> None:
    end, x = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        x += 1


def _system_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_system_metrics_are_logged_per_run_and_resume_their_step(
    client: MlflowClient, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow lets these variables override the constructor arguments: keep the test independent of the shell.
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    # Not skipped without it: MLflow's sampler needs psutil, and RunLogger would only warn and log nothing.
    assert importlib.util.find_spec("psutil"), "psutil is missing: it must be a dependency in pyproject.toml"
    run_id = client.create_run(experiment_id(client, "study-d")).info.run_id

    tracker = RunLogger(tracking_uri, run_id, system_metrics=True, sampling_interval=0.3, samples_before_logging=1)
    tracker.log({"train/loss": 1.0}, 1)
    _busy(2.5)
    tracker.close()
    tracker.close()  # idempotent
    metrics = client.get_run(run_id).data.metrics
    assert "train/loss" in metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    first = _system_steps(client, run_id, "system/cpu_utilization_percentage")
    assert len(first) >= 2 and first[0] == 0

    # A resumed trial (a new worker process, same run) appends after the last step instead of restarting at 0.
    tracker = RunLogger(tracking_uri, run_id, system_metrics=True, sampling_interval=0.3, samples_before_logging=1)
    _busy(1.5)
    tracker.close()
    steps = _system_steps(client, run_id, "system/cpu_utilization_percentage")
    assert len(steps) > len(first) and len(set(steps)) == len(steps)  # no step written twice
    assert min(set(steps) - set(first)) == max(first) + 1


def test_system_metrics_off_by_default(client: MlflowClient, tracking_uri: str) -> None:
    run_id = client.create_run(experiment_id(client, "study-e")).info.run_id
    tracker = RunLogger(tracking_uri, run_id)
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close()
    assert set(client.get_run(run_id).data.metrics) == {"train/loss"}


def test_a_broken_monitor_never_fails_training(
    client: MlflowClient, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow.system_metrics.system_metrics_monitor as smm

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("no psutil here")

    monkeypatch.setattr(smm, "SystemMetricsMonitor", broken)
    run_id = client.create_run(experiment_id(client, "study-f")).info.run_id
    with caplog.at_level(logging.WARNING, logger="workers.training.mlflow_logger"):
        tracker = RunLogger(tracking_uri, run_id, system_metrics=True)
    assert "system metrics for run" in caplog.text
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close()
    assert set(client.get_run(run_id).data.metrics) == {"train/loss"}


def test_rerun_refused_for_an_edit_but_not_for_a_field_added_since(tracking_uri: str, digits16, tmp_path) -> None:
    """``refuse_changed_rerun``: a run stored before a recipe field existed lacks its param; rerunning it with that
    field at its default changes nothing the run did, a non-default value is an edit (named in the error)."""
    from pipeline.plan import plan_study
    from pipeline.spec import StudyError, parse_study
    from pipeline.trial import TrialJob, make_job, refuse_changed_rerun, trial_params
    from tests.conftest import study_dict
    from workers.data.manifest import load_manifest
    from workers.names import ROLE_TAG, STUDY_TAG, TRIAL_TAG

    spec = parse_study(study_dict("rerun", digits16))
    config = plan_study(spec)[0].config

    def job(trial) -> dict:
        return make_job(spec, "train-base", trial, {}, tracking_uri=tracking_uri, storage=str(tmp_path), role="train")

    client = MlflowClient(tracking_uri)
    params = trial_params(config, TrialJob(**job(config)), load_manifest(config.data.train))
    stored = {k: v for k, v in params.items() if k not in ("data.on_error", "data.verify_checksums")}  # an old run
    run = client.create_run(experiment_id(client, spec.experiment),
                            tags={STUDY_TAG: "rerun", TRIAL_TAG: "train-base", ROLE_TAG: "train"})
    for key, value in stored.items():
        client.log_param(run.info.run_id, key, str(value))

    refuse_changed_rerun(job(config))  # the new fields at their defaults: the same recipe, not refused
    skipping = config.model_copy(update={"data": config.data.model_copy(update={"on_error": "skip"})})
    with pytest.raises(StudyError, match=r"data.on_error: <unset> -> skip"):
        refuse_changed_rerun(job(skipping))
    faster = config.model_copy(update={"optim": config.optim.model_copy(update={"lr": 0.01})})
    with pytest.raises(StudyError, match=r"optim.lr: 0.003 -> 0.01"):
        refuse_changed_rerun(job(faster))


def _log_same_datasets(uri: str, run_ids: list[str], barrier, errors) -> None:
    """One of several processes: round r logs dataset r to its own run, all processes at once (the barrier)."""
    client = MlflowClient(uri)
    for r, run_id in enumerate(run_ids):
        split = DataSplit("val", f"/data/race-{r}/val/manifest.json", [f"{r + 500:064x}"], 1.0, 50, 10)
        barrier.wait(timeout=120)  # a dead sibling breaks the barrier instead of hanging the test
        try:
            log_dataset_inputs(client, run_id, [split])
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.put(f"round {r}: {type(error).__name__}: {str(error)[:200]}")


def test_trials_starting_at_once_share_a_new_dataset(tmp_path) -> None:
    """Trials of a study starting together log the same new datasets (val, few-shot splits) to their runs. MLflow
    creates a dataset row check-then-insert, so without a retry the loser's transaction fails on the unique
    constraint (it failed a data_fraction trial here; 10 of 60 racing calls failed in 15 rounds of 4 processes)."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, "race")
    processes, rounds = 4, 12
    runs = [[client.create_run(exp).info.run_id for _ in range(rounds)] for _ in range(processes)]
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_log_same_datasets, args=(uri, runs[i], barrier, errors))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # only the processes this test started
            worker.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures and all(w.exitcode == 0 for w in workers), failures
    for r in range(rounds):  # every run has its input, all linked to one dataset row per round
        digests = {client.get_run(runs[i][r]).inputs.dataset_inputs[0].dataset.digest for i in range(processes)}
        assert len(digests) == 1
