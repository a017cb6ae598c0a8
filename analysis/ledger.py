"""The compute ledger: what each trial of a study was planned to cost (FLOPs, device-seconds, cost) and what it cost.

A device is what a trial allocates per worker: a CPU core or a GPU, so device-seconds are the analogue of
``compute/core_seconds``. A calibrated throughput of r training images/s per device predicts images / r
device-seconds, however many devices share a trial (DDP over a few workers scales about linearly here). Two
calibrations, both measured on the same kind of device as the plan's (``mixer.device_kind``: ``cpu:<CPU model>`` or
``cuda:<GPU name>``), never another:

- earlier finished runs of the same variant, resolution, precision and compile setting
  (``perf/train_img_per_s_per_core``, the median over them, preferring the same per-worker batch size);
- the train_step section of a ``mixer-study bench`` JSON (its img/s at the per-worker batch size if it timed it,
  else its best over the sweep, per core on CPU).

Where neither has the trial, its device-seconds and cost are "unknown" and the totals count such trials: no guess.
Planned device-seconds cover the training steps only (what a throughput predicts); the actual ones are
``compute/core_seconds`` (allocated devices x the training's wall time, evaluation and checkpoints included), so the
actual/planned ratio measures that overhead too; the ``step`` column holds the part inside training steps.
Pre-training only: fine-tuning and few-shot are not in the ledger.

Readers of MLflow and a bench file, and pure table maths (no Ray, no pipeline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from workers import names
from workers.models.registry import get_variant
from workers.training.mlflow_logger import tag_filter

UNKNOWN = "unknown"
# One row per earlier run that can calibrate a plan (load_calibration_runs).
CALIBRATION_COLUMNS = ["run_id", "variant", "image_size", "precision", "compile", "batch_per_worker",
                       "img_per_s_per_device"]


@dataclass(frozen=True)
class Throughput:
    """A calibrated training throughput and where it came from (shown in the plan and tagged on the trial)."""

    img_per_s_per_device: float
    source: str


@dataclass(frozen=True)
class PlannedCost:
    """One trial's prediction. ``device_seconds``/``cost`` are None where unknown; ``calibration`` says from what,
    or why nothing."""

    train_flops: float
    device_seconds: float | None
    cost: float | None
    calibration: str


def bench_device_kind(bench: dict[str, Any]) -> str:
    """The device kind a bench JSON measured, in the trials' format (``workers.training.throughput.device_kind``).

    Args:
        bench: a ``mixer-study bench`` JSON, parsed.
    """
    machine = bench.get("machine", {})
    if str(bench.get("train_step", {}).get("device", "cpu")).startswith("cuda"):
        return f"cuda:{machine.get('gpu_name', UNKNOWN)}"
    return f"cpu:{machine.get('cpu_model', UNKNOWN)}"


def bench_throughput(bench: dict[str, Any], variant: str, image_size: int, precision: str, compiled: bool,
                     batch_per_worker: int) -> Throughput | None:
    """The bench's training img/s per device for one trial, or None if it did not time that model.

    Args:
        bench: a ``mixer-study bench`` JSON, parsed (its device kind is the caller's to check).
        variant: the trial's canonical variant name.
        image_size: its resolution.
        precision: the recipe's ``train.precision`` (``auto`` resolves as the bench machine would: bf16 where fast).
        compiled: whether the trial's step is ``torch.compile``'d; an eager row stands in where no compiled row
            was timed, and the source says so.
        batch_per_worker: the trial's batch size per worker; that sweep cell if timed, else the best one.
    """
    section = bench.get("train_step", {})
    if precision == "auto":
        precision = "bf16" if bench.get("machine", {}).get("bf16_fast_on_device") else "fp32"
    rows = [r for r in section.get("rows", []) if r["variant"] == variant and r["image_size"] == image_size
            and r["precision"] == precision]
    wanted = "compiled" if compiled else "eager"
    row = next((r for r in rows if r["mode"] == wanted), None) or next((r for r in rows if r["mode"] == "eager"), None)
    if row is None:
        return None
    per_device = int(section.get("threads", 1)) if str(section.get("device", "cpu")) == "cpu" else 1
    cell = next((c for c in row.get("sweep", []) if c["batch_size"] == batch_per_worker), None)
    img_per_s, batch = (cell["img_per_s"], batch_per_worker) if cell else (row["img_per_s"], row["best_batch_size"])
    note = "" if row["mode"] == wanted else ", eager: no compiled row"
    return Throughput(img_per_s / per_device, f"bench {precision} batch {batch}{note}")


def load_calibration_runs(tracking_uri: str, device_kind: str) -> pd.DataFrame:
    """Every finished trial or one-off run in the store (all experiments) trained on ``device_kind``: one row each
    with the keys :func:`runs_throughput` matches on and its ``perf/train_img_per_s_per_core``.

    Args:
        tracking_uri: the MLflow store.
        device_kind: ``cpu:<CPU model>`` or ``cuda:<GPU name>``.
    """
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    rows = []
    for role in (names.ROLE_TRIAL, names.ROLE_TRAIN):
        runs = client.search_runs(experiments, tag_filter({names.DEVICE_KIND_TAG: device_kind, names.ROLE_TAG: role})
                                  + " and attributes.status = 'FINISHED'", max_results=10_000) if experiments else []
        for run in runs:
            params, rate = run.data.params, run.data.metrics.get(names.PERF_TRAIN_IMG_PER_S_PER_CORE)
            if rate is None or "model.variant" not in params:
                continue
            rows.append({"run_id": run.info.run_id, "variant": canonical_variant(params["model.variant"]),
                         "image_size": int(params.get("data.image_size", 0)),
                         "precision": params.get("train.precision", "auto"),
                         "compile": params.get("train.compile", "auto"),
                         "batch_per_worker": int(params.get("train.batch_size", 0))
                         // max(1, int(params.get("resources.workers", 1))),
                         "img_per_s_per_device": rate})
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def canonical_variant(name: str) -> str:
    """``B/16`` and ``B-16`` are one model: the registry's name, or ``name`` itself if no family parses it.

    Args:
        name: a variant name as a recipe or run writes it.
    """
    try:
        return get_variant(name).name
    except ValueError:
        return name


def runs_throughput(runs: pd.DataFrame, variant: str, image_size: int, precision: str, compile_setting: str,
                    batch_per_worker: int) -> Throughput | None:
    """The median training img/s per device of the earlier runs of the same model and recipe, or None.

    Args:
        runs: :func:`load_calibration_runs` (already of the plan's device kind).
        variant: the trial's canonical variant name.
        image_size: its resolution.
        precision: the recipe's ``train.precision`` (the same device kind resolves ``auto`` the same way).
        compile_setting: the recipe's ``train.compile`` as MLflow stores it (``auto``, ``True``, ``False``).
        batch_per_worker: runs at this per-worker batch size are used if there are any, else all that match.
    """
    same = runs[(runs["variant"] == variant) & (runs["image_size"] == image_size) & (runs["precision"] == precision)
                & (runs["compile"] == compile_setting)]
    if same.empty:
        return None
    same_batch = same[same["batch_per_worker"] == batch_per_worker]
    used = same_batch if not same_batch.empty else same
    batch = f"batch {batch_per_worker}" if not same_batch.empty else "other batch sizes"
    return Throughput(float(used["img_per_s_per_device"].median()), f"{len(used)} earlier run(s), {batch}")


def planned_cost(train_flops: float, images_seen: int, throughput: Throughput | None, price: float | None,
                 why_unknown: str) -> PlannedCost:
    """A trial's prediction: device-seconds = images / (img/s per device); cost = device-hours x price.

    Args:
        train_flops: its planned training FLOPs.
        images_seen: steps x batch size.
        throughput: its calibration, or None (then device-seconds and cost are unknown).
        price: per device-hour, or None (cost unknown).
        why_unknown: what the calibration lacked, shown when ``throughput`` is None.
    """
    if throughput is None:
        return PlannedCost(train_flops, None, None, why_unknown)
    seconds = images_seen / throughput.img_per_s_per_device
    cost = None if price is None else seconds / 3600 * price
    return PlannedCost(train_flops, seconds, cost, throughput.source)


def _float(value: Any) -> float:
    """A number, or NaN for None / "unknown" / blanks (a planned tag)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def ledger_table(results: pd.DataFrame) -> pd.DataFrame:
    """Planned vs actual per trial, from the results table (``analysis.results.load_study``, which carries the
    plan's tags). NaN where unknown. Device-seconds are shown as device-hours.

    Args:
        results: one row per trial.
    """
    price = results["price_per_device_hour"].map(_float)
    planned_hours = results["planned_device_seconds"].map(_float) / 3600
    actual_hours = results["core_seconds"] / 3600
    step_hours = results["images_seen"] / results["train_img_per_s_per_core"] / 3600
    table = pd.DataFrame({
        "trial": results["trial"], "status": results["status"], "device_kind": results["device_kind"],
        "calibration": results["calibration"].fillna("not planned (run before the ledger)"),
        "planned_flops": results["planned_flops"].map(_float), "actual_flops": results["train_flops"],
        "planned_device_hours": planned_hours, "actual_device_hours": actual_hours,
        "actual_step_device_hours": step_hours, "price_per_device_hour": price,
        "planned_cost": results["planned_cost"].map(_float), "actual_cost": actual_hours * price,
    })
    for what in ("flops", "device_hours", "cost"):
        table[f"ratio_{what}"] = table[f"actual_{what}"] / table[f"planned_{what}"]
    return table


def ledger_totals(table: pd.DataFrame) -> dict[str, float]:
    """The study's totals: planned and actual sums over the trials where each is known, the actual/planned ratio
    over the trials where both are, and how many trials had no planned device-seconds.

    Args:
        table: :func:`ledger_table`.
    """
    totals: dict[str, float] = {"trials": float(len(table)),
                                "unknown_trials": float(table["planned_device_hours"].isna().sum())}
    for what in ("flops", "device_hours", "cost"):
        planned, actual = table[f"planned_{what}"], table[f"actual_{what}"]
        both = planned.notna() & actual.notna()
        totals[f"planned_{what}"] = float(planned.sum()) if planned.notna().any() else math.nan
        totals[f"actual_{what}"] = float(actual.sum()) if actual.notna().any() else math.nan
        totals[f"ratio_{what}"] = float(actual[both].sum() / planned[both].sum()) if both.any() else math.nan
        totals[f"compared_{what}"] = float(both.sum())
    return totals


LEDGER_METRICS = {
    "planned_flops": names.LEDGER_PLANNED_FLOPS, "actual_flops": names.LEDGER_ACTUAL_FLOPS,
    "ratio_flops": names.LEDGER_RATIO_FLOPS, "planned_device_hours": names.LEDGER_PLANNED_DEVICE_HOURS,
    "actual_device_hours": names.LEDGER_ACTUAL_DEVICE_HOURS, "ratio_device_hours": names.LEDGER_RATIO_DEVICE_HOURS,
    "planned_cost": names.LEDGER_PLANNED_COST, "actual_cost": names.LEDGER_ACTUAL_COST,
    "ratio_cost": names.LEDGER_RATIO_COST, "unknown_trials": names.LEDGER_UNKNOWN_TRIALS,
}


def ledger_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The totals as the parent run's ``ledger/*`` metrics; unknown ones (NaN) are left out, not logged as 0.

    Args:
        totals: :func:`ledger_totals`.
    """
    return {metric: totals[key] for key, metric in LEDGER_METRICS.items() if not math.isnan(totals[key])}


def _cell(value: float, fmt: str) -> str:
    return UNKNOWN if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, fmt)


def ledger_markdown(table: pd.DataFrame, totals: dict[str, float]) -> str:
    """The ledger as a markdown table, one line per trial and the total, then what the total covers.

    Args:
        table: :func:`ledger_table`.
        totals: :func:`ledger_totals`.
    """
    head = ("| trial | FLOPs planned | FLOPs actual | device-h planned | device-h actual | device-h in steps | "
            "cost planned | cost actual | ratio device-h | calibration |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in table.itertuples():
        lines.append(f"| {r.trial} | {_cell(r.planned_flops, '.3e')} | {_cell(r.actual_flops, '.3e')} | "
                     f"{_cell(r.planned_device_hours, '.4g')} | {_cell(r.actual_device_hours, '.4g')} | "
                     f"{_cell(r.actual_step_device_hours, '.4g')} | {_cell(r.planned_cost, '.4g')} | "
                     f"{_cell(r.actual_cost, '.4g')} | {_cell(r.ratio_device_hours, '.3g')} | {r.calibration} |")
    t = totals
    lines.append(f"| **total** | {_cell(t['planned_flops'], '.3e')} | {_cell(t['actual_flops'], '.3e')} | "
                 f"{_cell(t['planned_device_hours'], '.4g')} | {_cell(t['actual_device_hours'], '.4g')} | "
                 f"{_cell(table['actual_step_device_hours'].sum(min_count=1), '.4g')} | "
                 f"{_cell(t['planned_cost'], '.4g')} | {_cell(t['actual_cost'], '.4g')} | "
                 f"{_cell(t['ratio_device_hours'], '.3g')} | |")
    unknown = int(t["unknown_trials"])
    lines += ["", f"{int(t['trials'])} trial(s); {unknown} without a planned device-time (no calibration: their "
              "device-hours and cost are unknown, and the planned totals leave them out)." if unknown else
              f"{int(t['trials'])} trial(s), every one calibrated.",
              f"Actual/planned over the trials where both are known: FLOPs {_cell(t['ratio_flops'], '.3g')} "
              f"({int(t['compared_flops'])} trials), device-hours {_cell(t['ratio_device_hours'], '.3g')} "
              f"({int(t['compared_device_hours'])}), cost {_cell(t['ratio_cost'], '.3g')} "
              f"({int(t['compared_cost'])}). Planned device-hours are training steps at the calibrated throughput; "
              "actual ones are allocated devices x the training's wall time (evaluation, checkpoints and start-up of "
              "the step loop included; `device-h in steps` is the part inside steps)."]
    return "\n".join(lines) + "\n"


def write_ledger(table: pd.DataFrame, totals: dict[str, float], out_dir: str | Path) -> list[Path]:
    """``ledger.md`` and ``ledger.csv`` (per trial, then a ``total`` row) in ``out_dir``; returns the paths.

    Args:
        table: :func:`ledger_table`.
        totals: :func:`ledger_totals`.
        out_dir: the report folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total_row = {"trial": "total", **{k: v for k, v in totals.items() if k in table.columns},
                 "actual_step_device_hours": table["actual_step_device_hours"].sum(min_count=1)}
    csv, md = out_dir / "ledger.csv", out_dir / "ledger.md"
    pd.concat([table, pd.DataFrame([total_row])], ignore_index=True).to_csv(csv, index=False)
    md.write_text(ledger_markdown(table, totals))
    return [md, csv]
