"""The compute ledger: `plan`'s device-seconds and cost from a real bench's train_step rows and from earlier runs
in a real sqlite MLflow store (same device kind only), "unknown" where neither calibrates, and the report's
planned-vs-actual table and totals from trial runs tagged as `run` tags them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis.ledger import ledger_markdown, ledger_metrics, ledger_table, ledger_totals, write_ledger
from analysis.report import build_report
from analysis.results import load_study
from benchmarks.common import machine_info
from benchmarks.matmul import bench_matmul
from benchmarks.run import quick_config
from benchmarks.train_step import bench_train_step
from pipeline.cli import main
from pipeline.plan import calibrate, format_ledger, plan_costs, plan_study, plan_tags
from pipeline.spec import parse_study
from tests.conftest import study_dict, write_study
from workers import names

STEPS, BATCH, PRICE = 40, 8, 0.25


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    """A real bench JSON with the sections the ledger reads (machine, train_step): Nano-4 at 16 px, batches 4 and 8,
    on this CPU, as `mixer-study bench --quick` times it (its other sections are not needed here)."""
    config = quick_config()
    device = torch.device("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        matmul = bench_matmul(config, device, lambda _: None)
        train_step = bench_train_step(config, device, matmul, lambda _: None)
    finally:
        torch.set_num_threads(previous)
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    path.write_text(json.dumps({"machine": machine_info(device, config.threads), "train_step": train_step}))
    return path


def _spec(digits16: Path, **resources):
    study = study_dict("ledger", digits16, grid={"model.variant": ["Nano-4", "Micro-4"]},
                       train={"steps": STEPS, "batch_size": BATCH, "precision": "fp32"},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, **resources})
    return parse_study(study)


def _bench_rate(bench_file: Path, batch: int) -> float:
    row = next(r for r in json.loads(bench_file.read_text())["train_step"]["rows"]
               if r["variant"] == "Nano-4" and r["precision"] == "fp32")
    return next(c["img_per_s"] for c in row["sweep"] if c["batch_size"] == batch)  # 1 thread: per core


def _log_run(client: MlflowClient, exp: str, variant: str, kind: str, rate: float, status: str = "FINISHED",
             batch: int = BATCH) -> None:
    run = client.create_run(exp, tags={names.ROLE_TAG: names.ROLE_TRIAL, names.DEVICE_KIND_TAG: kind})
    params = {"model.variant": variant, "data.image_size": 16, "train.precision": "fp32", "train.compile": "auto",
              "train.batch_size": batch, "resources.workers": 1}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(names.PERF_TRAIN_IMG_PER_S_PER_CORE, rate, 0, 0)])
    client.set_terminated(run.info.run_id, status)


def test_bench_calibrates_what_it_timed_and_the_rest_is_unknown(digits16: Path, bench_file: Path,
                                                                tmp_path: Path) -> None:
    spec = _spec(digits16, price_per_device_hour=PRICE, calibration=str(bench_file))
    plans = plan_study(spec)
    missing_store = tmp_path / "none.db"
    calibration = calibrate(spec, tracking_uri=f"sqlite:///{missing_store}")
    assert not missing_store.exists()  # a dry run creates no store
    nano, micro = plan_costs(spec, plans, calibration)
    rate = _bench_rate(bench_file, BATCH)  # the per-worker batch 8 was timed: that cell, not the best one
    assert nano.device_seconds == pytest.approx(STEPS * BATCH / rate, rel=1e-12)
    assert nano.cost == pytest.approx(STEPS * BATCH / rate / 3600 * PRICE, rel=1e-12)
    assert nano.calibration == "bench fp32 batch 8"
    assert nano.train_flops == plans[0].train_flops
    assert micro.device_seconds is None and micro.cost is None  # the bench timed no Micro-4: no guess
    assert "no earlier run or bench row of Micro-4 at 16 px (fp32)" in micro.calibration
    text = format_ledger(plans, [nano, micro], calibration)
    assert "1 of 2 trial(s) unknown" in text and "for the 1 calibrated trial(s)" in text
    assert f"{STEPS * BATCH / rate:.4g} device-seconds" in text
    tags = plan_tags(micro, calibration)
    assert tags[names.PLAN_DEVICE_SECONDS_TAG] == "unknown" and tags[names.PLAN_COST_TAG] == "unknown"
    assert float(plan_tags(nano, calibration)[names.PLAN_DEVICE_SECONDS_TAG]) == nano.device_seconds


def test_bench_of_another_device_kind_is_left_out(digits16: Path, bench_file: Path, tmp_path: Path) -> None:
    doc = json.loads(bench_file.read_text())
    doc["machine"]["cpu_model"] = "Some Other CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    spec = _spec(digits16)
    calibration = calibrate(spec, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", bench=str(other))
    assert calibration.bench is None
    assert any("it measured cpu:Some Other CPU" in note for note in calibration.notes)
    costs = plan_costs(spec, plan_study(spec), calibration)
    assert [c.device_seconds for c in costs] == [None, None]
    assert "cost unknown" in format_ledger(plan_study(spec), costs, calibration)  # and no price given either


def test_earlier_runs_on_the_same_device_kind_calibrate_first(digits16: Path, bench_file: Path,
                                                             tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("earlier", artifact_location=str(tmp_path / "mlruns"))  # not ./mlruns
    spec = _spec(digits16, calibration=str(bench_file))
    kind = calibrate(spec, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}").device_kind
    assert kind.startswith("cpu:")
    _log_run(client, exp, "Micro-4", kind, 100.0)
    _log_run(client, exp, "Micro-4", kind, 300.0)
    _log_run(client, exp, "Micro-4", kind, 50.0, batch=64)  # another batch size: left out while batch 8 exists
    _log_run(client, exp, "Micro-4", kind, 1.0, status="FAILED")
    _log_run(client, exp, "Micro-4", "cpu:Some Other CPU", 1e6)
    _log_run(client, exp, "Nano-4", kind, 40.0)  # runs win over the bench
    calibration = calibrate(spec, tracking_uri=uri, price=2.0)
    nano, micro = plan_costs(spec, plan_study(spec), calibration)
    assert micro.device_seconds == pytest.approx(STEPS * BATCH / 200.0)  # median of the two finished batch-8 runs
    assert micro.calibration == "2 earlier run(s), batch 8"
    assert micro.cost == pytest.approx(STEPS * BATCH / 200.0 / 3600 * 2.0)
    assert nano.device_seconds == pytest.approx(STEPS * BATCH / 40.0)
    assert any("4 finished on this device kind" in note for note in calibration.notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="names this machine's GPU")
def test_gpu_study_on_a_machine_without_gpu_is_unknown(digits16: Path, tmp_path: Path) -> None:
    spec = _spec(digits16, gpus_per_worker=1)
    calibration = calibrate(spec, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert calibration.device_kind is None and "device kind unknown" in calibration.notes[0]
    assert all(c.device_seconds is None for c in plan_costs(spec, plan_study(spec), calibration))


def test_plan_verb_prints_the_ledger(digits16: Path, bench_file: Path, tmp_path: Path, capsys) -> None:
    path = write_study(tmp_path / "ledger.yaml", study_dict(
        "ledger", digits16, grid={"model.variant": ["Nano-4", "Micro-4"]},
        train={"steps": STEPS, "batch_size": BATCH, "precision": "fp32"},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1}))
    main(["plan", str(path), "--bench", str(bench_file), "--price-per-hour", "0.5", "--tracking-uri",
          f"sqlite:///{tmp_path / 'none.db'}"])
    out = capsys.readouterr().out
    assert "price per device-hour 0.5" in out and "bench fp32 batch 8" in out and "1 of 2 trial(s) unknown" in out
    with pytest.raises(SystemExit) as exit_info:  # a bad bench file: exit 2 naming it, no traceback
        main(["plan", str(path), "--bench", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json" in capsys.readouterr().err


def _trial_run(client: MlflowClient, exp: str, parent: str, name: str, tags: dict[str, str],
               metrics: dict[str, float]) -> None:
    run = client.create_run(exp, run_name=name, tags={names.STUDY_TAG: "ledger", names.TRIAL_TAG: name,
                                                      names.ROLE_TAG: names.ROLE_TRIAL, "mlflow.parentRunId": parent,
                                                      **tags})
    client.log_batch(run.info.run_id, params=[Param("model.variant", "Nano-4")],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, "FINISHED")


def test_report_table_and_totals(tmp_path: Path) -> None:
    """Two trials planned with a calibration, one without, one run before the ledger existed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ledger", artifact_location=str(tmp_path / "mlruns"))  # not ./mlruns
    parent = client.create_run(exp, tags={names.STUDY_TAG: "ledger", names.ROLE_TAG: names.ROLE_STUDY}).info.run_id

    def plan(flops: float, seconds: float | None) -> dict[str, str]:
        cost = None if seconds is None else seconds / 3600 * PRICE
        return {names.PLAN_TRAIN_FLOPS_TAG: repr(flops), names.PLAN_PRICE_TAG: repr(PRICE),
                names.PLAN_DEVICE_SECONDS_TAG: "unknown" if seconds is None else repr(seconds),
                names.PLAN_COST_TAG: "unknown" if cost is None else repr(cost),
                names.PLAN_CALIBRATION_TAG: "bench fp32 batch 8" if seconds else "none: no bench row",
                names.DEVICE_KIND_TAG: "cpu:test"}

    def actual(flops: float, core_seconds: float, step_rate: float) -> dict[str, float]:
        return {names.COMPUTE_TRAIN_FLOPS: flops, names.COMPUTE_CORE_SECONDS: core_seconds,
                names.COMPUTE_IMAGES_SEEN: 3600.0, names.PERF_TRAIN_IMG_PER_S_PER_CORE: step_rate}

    _trial_run(client, exp, parent, "a", plan(1e9, 1800.0), actual(1e9, 3600.0, 2.0))
    _trial_run(client, exp, parent, "b", plan(3e9, 3600.0), actual(3e9, 5400.0, 1.0))
    _trial_run(client, exp, parent, "c", plan(2e9, None), actual(2e9, 7200.0, 1.0))
    _trial_run(client, exp, parent, "d", {}, actual(4e9, 360.0, 10.0))
    table = ledger_table(load_study(uri, "ledger")).set_index("trial")
    assert table.loc["a", "planned_device_hours"] == 0.5 and table.loc["a", "actual_device_hours"] == 1.0
    assert table.loc["a", "actual_step_device_hours"] == 0.5  # 3600 images at 2 img/s/core
    assert table.loc["a", "ratio_device_hours"] == 2.0 and table.loc["b", "ratio_cost"] == 1.5
    assert table.loc["c", "actual_cost"] == 2.0 * PRICE and math.isnan(table.loc["c", "planned_cost"])
    assert math.isnan(table.loc["d", "planned_flops"]) and math.isnan(table.loc["d", "actual_cost"])
    totals = ledger_totals(table.reset_index())
    assert totals["unknown_trials"] == 2  # c (no calibration) and d (no plan)
    assert totals["planned_flops"] == 6e9 and totals["actual_flops"] == 10e9 and totals["ratio_flops"] == 1.0
    assert totals["planned_device_hours"] == 1.5 and totals["actual_device_hours"] == 4.6
    assert totals["ratio_device_hours"] == pytest.approx(2.5 / 1.5) and totals["compared_device_hours"] == 2
    assert totals["actual_cost"] == pytest.approx(4.5 * PRICE)  # d had no price: not in the cost
    metrics = ledger_metrics(totals)
    assert metrics[names.LEDGER_PLANNED_DEVICE_HOURS] == 1.5 and metrics[names.LEDGER_UNKNOWN_TRIALS] == 2
    assert set(metrics) == set(v for k, v in vars(names).items() if k.startswith("LEDGER_"))
    md, csv = write_ledger(table.reset_index(), totals, tmp_path / "report")
    text = md.read_text()
    assert "| c | 2.000e+09 | 2.000e+09 | unknown | 2 |" in text and "4 trial(s); 2 without" in text
    assert text == ledger_markdown(table.reset_index(), totals)
    rows = pd.read_csv(csv).set_index("trial")
    assert rows.loc["total", "actual_device_hours"] == 4.6 and rows.loc["total", "ratio_flops"] == 1.0
    assert rows.loc["d", "calibration"] == "not planned (run before the ledger)"


def test_report_writes_the_ledger_and_logs_its_totals_to_the_parent_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ledger", artifact_location=str(tmp_path / "mlruns"))  # not ./mlruns
    parent = client.create_run(exp, tags={names.STUDY_TAG: "ledger", names.ROLE_TAG: names.ROLE_STUDY}).info.run_id
    for name, seconds in (("a", "1800.0"), ("b", "unknown")):
        _trial_run(client, exp, parent, name,
                   {names.PLAN_TRAIN_FLOPS_TAG: "1e9", names.PLAN_DEVICE_SECONDS_TAG: seconds,
                    names.PLAN_PRICE_TAG: "unknown"},
                   {names.COMPUTE_TRAIN_FLOPS: 1e9, names.COMPUTE_CORE_SECONDS: 3600.0, names.BEST_VAL_ACC: 0.5,
                    names.FEWSHOT_5SHOT: 0.4})
    paths = build_report(uri, "ledger", tmp_path / "report")
    assert tmp_path / "report" / "ledger.md" in paths and tmp_path / "report" / "ledger.csv" in paths
    logged = client.get_run(parent).data.metrics
    assert logged[names.LEDGER_PLANNED_DEVICE_HOURS] == 0.5 and logged[names.LEDGER_ACTUAL_DEVICE_HOURS] == 2.0
    assert logged[names.LEDGER_RATIO_DEVICE_HOURS] == 2.0  # over trial a alone, the one with both
    assert logged[names.LEDGER_UNKNOWN_TRIALS] == 1 and logged[names.LEDGER_RATIO_FLOPS] == 1.0
    assert names.LEDGER_PLANNED_COST not in logged  # no price: unknown, not 0
    assert "report/ledger.md" in {a.path for a in client.list_artifacts(parent, "report")}
