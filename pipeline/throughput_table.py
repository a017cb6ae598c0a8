"""The throughput table: inference throughput (paper Table 3, Fig. 3 right) measured once per model and device kind,
with its cores to itself, before a study's trials start; the trials log the table's figure instead of measuring.

Why: measured inside a trial, at its end, the figure shared the machine with the trials that trained meanwhile, and
the same model's throughput swung tenfold between trials (Nano-4 on 2 cores: 31,539 / 33,717 / 29,765 / 2,811
img/s/core), which made Fig. 3's throughput axis noise.

How: the study's distinct (variant, image size, classes, precision) go to one Ray task that reserves what one trial
worker reserves (``cpus_per_worker`` CPUs, or one GPU) while no trial of the study runs yet, so nothing else Ray
schedules shares those cores. It repeats the batch-size sweep (:func:`workers.training.throughput.inference_throughput`)
until the last 3 repetitions lie within 5 % of their median, or 8 repetitions ran, or 60 s passed per model; the
figure is the median of those last repetitions, logged with their relative range (``perf/img_per_s_per_core_spread``),
min, max, the number of repetitions and whether the tolerance was met (``perf/throughput_stable``).

Where: the experiment ``mixer-study-throughput`` of the study's tracking store, one run per key and device kind
(``cpu:<CPU model>``, ``cuda:<GPU name>``), the key as tags. A later study on the same store finds it there and does
not measure again, unless the run was not stable (its cores were contended, e.g. by processes outside Ray): then it
measures anew. Delete a run to have it measured anew. A trial's rank-0 worker logs the latest entry of its own key and
device kind (``workers.training.ray_entry``) and measures once inside the trial only where the table has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.plan import TrialPlan
from pipeline.spec import StudySpec
from pipeline.tracking import experiment_id
from workers.names import DEVICE_KIND_TAG, PERF_THROUGHPUT_STABLE, ROLE_TAG, ROLE_THROUGHPUT, THROUGHPUT_EXPERIMENT
from workers.training.mlflow_logger import tag_filter
from workers.training.throughput import StableThroughput, ThroughputKey, measure_table_rows

# One table row as the driver reports it: (device kind, key, the stable figure).
TableRow = tuple[str, ThroughputKey, StableThroughput]


def table_requests(plans: list[TrialPlan]) -> list[tuple[str, int, int, str]]:
    """The distinct (variant, image size, classes, precision as asked) of the study's trials, in plan order.

    Args:
        plans: the study's trial plans.
    """
    requests = [(p.config.model.variant, p.image_size, p.num_classes, p.config.train.precision) for p in plans]
    return list(dict.fromkeys(requests))


def tabled_keys(client: MlflowClient) -> set[tuple[str, ThroughputKey]]:
    """Every (device kind, key) the store's throughput table holds a finished, stable run of (an unstable one is
    measured again by the next study).

    Args:
        client: the tracking store's client.
    """
    experiment = client.get_experiment_by_name(THROUGHPUT_EXPERIMENT)
    if experiment is None:
        return set()
    runs = client.search_runs([experiment.experiment_id], tag_filter({ROLE_TAG: ROLE_THROUGHPUT})
                              + " and attributes.status = 'FINISHED'", max_results=10_000)
    return {(run.data.tags[DEVICE_KIND_TAG], ThroughputKey.from_tags(run.data.tags)) for run in runs
            if run.data.metrics.get(PERF_THROUGHPUT_STABLE) == 1.0}


def record_rows(client: MlflowClient, kind: str, rows: list[tuple[ThroughputKey, StableThroughput]]) -> list[str]:
    """One finished run per measured key in the table's experiment; returns their run ids.

    Args:
        client: the tracking store's client.
        kind: the device kind the rows were measured on.
        rows: (key, stable throughput) per model.
    """
    exp_id = experiment_id(client, THROUGHPUT_EXPERIMENT)
    run_ids = []
    for key, result in rows:
        run = client.create_run(exp_id, run_name=key.label(), tags=key.tags(kind))
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(name, float(value), now, 0)
                                                   for name, value in result.metrics().items()])
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    return run_ids


def prepare_throughput_table(spec: StudySpec, plans: list[TrialPlan], tracking_uri: str,
                             write: Callable[[str], None] = print, **settings: Any) -> list[TableRow]:
    """Measure, on Ray, the study's models the throughput table lacks for the trials' device kind; call it after
    ``ray.init`` and before any trial starts. Returns the rows measured now (none when the table had them all).

    A failed measurement (a model that does not fit the device at batch 128, say) is written as a line, not raised:
    the trials then measure once inside themselves, as they did before the table existed.

    Args:
        spec: the study (its resources: the cores or GPU one trial worker reserves).
        plans: its trial plans.
        tracking_uri: the study's tracking store (the table lives there).
        write: where the progress line goes.
        **settings: :func:`workers.training.throughput.measure_until_stable`'s keywords (tests shorten the sweep).
    """
    client = MlflowClient(tracking_uri)
    requests = table_requests(plans)
    r = spec.resources
    gpu = r.gpus_per_worker > 0
    # What one trial worker reserves, so the figure is per one worker's cores; on a GPU, a whole GPU.
    task = ray.remote(measure_table_rows).options(num_cpus=r.cpus_per_worker, num_gpus=1 if gpu else 0,
                                                  name="throughput-table")
    try:
        kind, rows = ray.get(task.remote(requests, tabled_keys(client), r.cpus_per_worker, gpu, **settings))
    except ray.exceptions.RayError as exc:
        write(f"inference throughput: the table's measurement failed ({type(exc).__name__}: "
              f"{' '.join(str(exc).split())[:200]}); each trial measures its own")
        return []
    record_rows(client, kind, rows)
    window = settings.get("window", 3)
    for key, result in rows:
        write(f"inference throughput {key.label()} on {kind}: {result.img_per_s_per_core:,.0f} img/s/core, spread "
              f"{result.spread:.1%} over the last {min(result.repetitions, window)} of {result.repetitions} "
              "repetitions"
              + ("" if result.stable else " (not stable within the caps)"))
    reused = len(requests) - len(rows)
    if reused:
        write(f"inference throughput: {reused} model(s) already in the table on {kind} "
              f"(MLflow experiment '{THROUGHPUT_EXPERIMENT}'), reused")
    return [(kind, key, result) for key, result in rows]
