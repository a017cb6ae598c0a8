"""The throughput table (pipeline.throughput_table): measured on a real local Ray with reserved cores, repeated until
stable with the spread recorded, stored in a real sqlite MLflow store, reused by a second study, and what a trial
logs (workers.training.throughput.trial_throughput)."""

from __future__ import annotations

import pytest
import ray
import torch

from pipeline.plan import plan_study
from pipeline.spec import parse_study
from pipeline.throughput_table import prepare_throughput_table, record_rows, tabled_keys
from tests.conftest import cli_env, run_cli, study_dict, write_study
from workers.models.registry import build_model
from workers.names import (
    DEVICE_KIND_TAG,
    PERF_BEST_BATCH_SIZE,
    PERF_IMG_PER_S_PER_CORE,
    PERF_IMG_PER_S_PER_CORE_MAX,
    PERF_IMG_PER_S_PER_CORE_MIN,
    PERF_IMG_PER_S_PER_CORE_SPREAD,
    PERF_THROUGHPUT_REPETITIONS,
    PERF_THROUGHPUT_RUN_TAG,
    PERF_THROUGHPUT_SOURCE_TAG,
    PERF_THROUGHPUT_STABLE,
    ROLE_TAG,
    ROLE_TRIAL,
    THROUGHPUT_EXPERIMENT,
    THROUGHPUT_FROM_TABLE,
    THROUGHPUT_FROM_TRIAL,
)
from workers.training.throughput import (
    StableThroughput,
    ThroughputKey,
    device_kind,
    measure_until_stable,
    trial_throughput,
)

# A short sweep: the tests check the bookkeeping, not the figure.
QUICK = {"batch_sizes": (1, 8), "seconds_per_batch_size": 0.02, "max_repetitions": 4}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def local_ray():
    """A real embedded Ray with one CPU, as `mixer-study run` starts one (the measurement task reserves it)."""
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def table_runs(client) -> list:
    experiment = client.get_experiment_by_name(THROUGHPUT_EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_stops_when_the_window_agrees_or_at_the_cap():
    model = build_model("Nano-4", 16, 10)
    settled = measure_until_stable(model, 1, "fp32", CPU, window=3, tolerance=10.0, **QUICK)
    assert settled.stable and settled.repetitions == 3  # any three agree within 1000 %
    assert settled.low <= settled.img_per_s_per_core <= settled.high
    assert settled.spread == pytest.approx((settled.high - settled.low) / settled.img_per_s_per_core)
    capped = measure_until_stable(model, 1, "fp32", CPU, window=3, tolerance=0.0, **QUICK)
    assert not capped.stable and capped.repetitions == QUICK["max_repetitions"]  # no three timings are equal
    assert capped.spread > 0


def test_a_study_measures_once_and_a_second_study_reuses(local_ray, digits16, tracking_uri, client):
    # Tolerance 0: no three timings agree, so the cap stops it and the entry is not stable.
    lines: list[str] = []
    spec = parse_study(study_dict("first", digits16, grid={"data.fraction": [0.5, 1.0]},
                                  resources={"workers_per_trial": 1, "cpus_per_worker": 1}))
    rows = prepare_throughput_table(spec, plan_study(spec), tracking_uri, lines.append, tolerance=0.0, **QUICK)

    assert len(rows) == 1  # two trials, one model: one measurement
    kind, key, result = rows[0]
    assert kind == device_kind(CPU)
    assert (key.variant, key.image_size, key.num_classes, key.threads) == ("Nano-4", 16, 10, 1)
    [run] = table_runs(client)
    assert run.info.status == "FINISHED"
    assert ThroughputKey.from_tags(run.data.tags) == key and run.data.tags[DEVICE_KIND_TAG] == kind
    logged = run.data.metrics
    median, low, high = (logged[name] for name in (PERF_IMG_PER_S_PER_CORE, PERF_IMG_PER_S_PER_CORE_MIN,
                                                   PERF_IMG_PER_S_PER_CORE_MAX))
    assert median == pytest.approx(result.img_per_s_per_core) and 0 < low <= median <= high
    assert logged[PERF_IMG_PER_S_PER_CORE_SPREAD] == pytest.approx((high - low) / median) and high > low
    assert logged[PERF_THROUGHPUT_REPETITIONS] == QUICK["max_repetitions"] and logged[PERF_THROUGHPUT_STABLE] == 0
    assert logged[PERF_BEST_BATCH_SIZE] in (1, 8)
    assert "Nano-4 16px 10cls" in lines[0] and "(not stable within the caps)" in lines[0]

    # Not stable, so the next study measures again; tolerance 1000 %: the first three repetitions settle it.
    again = prepare_throughput_table(spec, plan_study(spec), tracking_uri, lines.append, tolerance=10.0, **QUICK)
    assert [(k, r.stable, r.repetitions) for _, k, r in again] == [(key, True, 3)]
    assert len(table_runs(client)) == 2

    # Another study of the same model on the same store and machine: nothing measured, no new run.
    lines.clear()
    other = parse_study(study_dict("second", digits16, resources={"workers_per_trial": 1, "cpus_per_worker": 1}))
    assert prepare_throughput_table(other, plan_study(other), tracking_uri, lines.append, **QUICK) == []
    assert len(table_runs(client)) == 2
    assert lines == [f"inference throughput: 1 model(s) already in the table on {kind} (MLflow experiment "
                     f"'{THROUGHPUT_EXPERIMENT}'), reused"]


def test_a_trial_logs_the_tables_figure_else_measures_its_own(tracking_uri, client):
    model = build_model("Nano-4", 16, 7)
    kind = device_kind(CPU)
    key = ThroughputKey.of_model(model, "fp32", CPU, 1)
    # A table entry with figures no measurement here would give: the trial must log these, not its own.
    tabled = StableThroughput(123_456.0, 120_000.0, 126_000.0, 32, 5, True)
    [run_id] = record_rows(client, kind, [(key, tabled)])
    assert (kind, key) in tabled_keys(client)

    metrics, tags = trial_throughput(model, "fp32", CPU, 1, tracking_uri)
    assert metrics == {PERF_IMG_PER_S_PER_CORE: 123_456.0, PERF_BEST_BATCH_SIZE: 32,
                       PERF_IMG_PER_S_PER_CORE_SPREAD: pytest.approx(6_000 / 123_456)}
    assert tags == {PERF_THROUGHPUT_SOURCE_TAG: THROUGHPUT_FROM_TABLE, PERF_THROUGHPUT_RUN_TAG: run_id}

    # Another device kind's entry, or another key's, is not this trial's: it measures once itself.
    metrics, tags = trial_throughput(build_model("Nano-4", 16, 5), "fp32", CPU, 1, tracking_uri)
    assert tags == {PERF_THROUGHPUT_SOURCE_TAG: THROUGHPUT_FROM_TRIAL}
    assert metrics[PERF_IMG_PER_S_PER_CORE] > 0 and PERF_IMG_PER_S_PER_CORE_SPREAD not in metrics
    record_rows(client, "cpu:some other CPU", [(ThroughputKey.of_model(model, "fp32", CPU, 2), tabled)])
    assert trial_throughput(model, "fp32", CPU, 2, tracking_uri)[1][PERF_THROUGHPUT_SOURCE_TAG] == THROUGHPUT_FROM_TRIAL


@pytest.mark.slow
def test_a_studys_trial_logs_the_tables_figure(tmp_path, digits16):
    """`mixer-study run` end to end: the driver fills the table before the trial, the trial's rank 0 logs its entry."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = study_dict("tabled", digits16, train={"steps": 20, "eval_every": 10, "checkpoint_every": 10},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1})
    result = run_cli(["run", str(write_study(tmp_path / "tabled.yaml", study)), "--tracking-uri", uri, "--storage",
                      str(tmp_path / "runs")], cli_env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inference throughput Nano-4 16px 10cls" in result.stdout

    client = MlflowClient(uri)
    [table] = table_runs(client)
    [trial] = client.search_runs([client.get_experiment_by_name("tabled").experiment_id],
                                 f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    assert trial.data.tags[PERF_THROUGHPUT_SOURCE_TAG] == THROUGHPUT_FROM_TABLE
    assert trial.data.tags[PERF_THROUGHPUT_RUN_TAG] == table.info.run_id
    for name in (PERF_IMG_PER_S_PER_CORE, PERF_IMG_PER_S_PER_CORE_SPREAD, PERF_BEST_BATCH_SIZE):
        assert trial.data.metrics[name] == table.data.metrics[name]
