"""Rank-0 MLflow logging: a thin helper the training loop calls.

The trial driver (``pipeline.trial``) creates or reuses the trial's MLflow run and passes its id down; workers
never start runs of their own, so a retried or resumed worker group keeps writing into the same run.

A resumed worker group restarts from its last checkpoint, so it computes again the steps between that checkpoint
and the failure, some of which the failed group had already logged. :class:`RunLogger` therefore writes a point only
past the last step the run already holds for that key: every metric's history has each step at most once, and the
points the failed group never flushed are written by the resumed one, so none is missing either.

How a value appears in MLflow is decided here, by its name (``workers.names``): a curve (``train/loss``,
``val/acc``, ...) at its training step; a summary (``best/*``, ``compute/*``, ``fewshot/*``, ``finetune/top1`` ...:
one value per run) once, at step 0, which MLflow's chart view draws as a bar chart comparing runs; a wall-clock mark
(``time/*_unix``) as a tag of the same name.

System metrics (CPU, memory, disk, network; GPU where ``nvidia-ml-py`` is installed) are sampled by MLflow's
``SystemMetricsMonitor`` in the rank-0 worker process: whole-host figures of the node that runs rank 0 (every
worker on that node is in them; other nodes' workers are not), not the trial driver's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from workers.names import SYSTEM_PREFIX, is_summary, is_timestamp

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow ``search_runs`` filter matching runs that carry all ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class RunLogger:
    """Buffers metrics and writes them to one existing MLflow run with ``log_batch`` (one round trip per flush).

    Summaries (:func:`workers.names.is_summary`) are points at step 0, so the resume rule (module docstring) keeps
    the first value logged: a resumed segment that recomputes one adds nothing, as it added nothing at the last step
    before. They are sent with the flush before the checkpoint that implies them, like every point.
    Timestamps (:func:`workers.names.is_timestamp`) become tags, sent with the next flush.

    With ``system_metrics=True`` it also samples system metrics into the run (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ...) every ``sampling_interval`` seconds, averaging
    ``samples_before_logging`` samples per logged point, until :meth:`close`. Their step counter continues from the
    run's last ``system/`` step, so a resumed trial appends to its curves instead of overwriting step 0 onwards.
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` and ``$MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``, when set,
    take precedence over the arguments (MLflow reads them itself).

    ``spool``: a folder URL (the trial's storage) that receives what MLflow does not take. When the tracking store
    fails to answer, the batch (metrics, tags, the run's end status) is written there and training goes on; from
    then on everything goes to the spool, in order, until a flush finds the store back and replays it
    (:func:`replay_spool`, which skips points the run already has). Without a spool, an unreachable store raises.
    System metrics sampled during an outage are lost (MLflow's sampler logs them itself).
    """

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = False, sampling_interval: float = 1.0,
                 samples_before_logging: int = 1, spool: str | None = None) -> None:
        if spool:  # the spool is the retry: MLflow's back-off (7 retries, minutes) would stall training per flush
            os.environ.update(_fail_fast_settings(10.0))
        self._client = MlflowClient(tracking_uri)
        self._run_id, self._spool = run_id, spool
        self._pending: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._spooling = bool(spool) and bool(spool_files(spool))  # an earlier segment's leftovers go first
        try:
            self._last_step = last_logged_steps(self._client, run_id)  # {} for a new run
        except Exception:
            if not spool:
                raise
            self._last_step, self._spooling = {}, True  # the replay will drop what the run already has
        self.skipped = 0  # points not written because the run already had them (a resumed segment)
        self._monitor: SystemMetricsMonitor | None = None
        if system_metrics:
            self._monitor = _start_monitor(tracking_uri, run_id, sampling_interval, samples_before_logging)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (a summary at step 0, a timestamp as a tag: class docstring); a key whose
        history in the run already reaches that step is skipped."""
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if is_timestamp(key):
                self._tags[key] = f"{float(value):.3f}"  # unix seconds to the millisecond
                continue
            at = 0 if is_summary(key) else step
            if at <= self._last_step.get(key, -1):
                self.skipped += 1
                continue
            self._last_step[key] = at
            self._pending.append(Metric(key, float(value), timestamp, at))
        if len(self._pending) >= 200:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag of the run (sent with the next flush, in order with the metrics)."""
        self._tags[key] = str(value)
        self.flush()

    def flush(self, status: str | None = None) -> None:
        """Send what is queued (and end the run with ``status``, e.g. "FINISHED", if given), or spool it."""
        metrics, tags = self._pending, self._tags
        self._pending, self._tags = [], {}
        if not (metrics or tags or status):
            return
        if self._spooling and not self._replay():
            self._write_spool(metrics, tags, status)
            return
        try:
            for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
                self._client.log_batch(self._run_id, metrics=metrics[start:start + 1000])
            for key, value in tags.items():
                self._client.set_tag(self._run_id, key, value)
            if status:
                self._client.set_terminated(self._run_id, status)
        except Exception as exc:
            if not self._spool:
                raise
            log.warning("MLflow did not take run %s's batch (%s: %s): spooling to %s until it answers", self._run_id,
                        type(exc).__name__, exc, self._spool)
            self._spooling = True
            self._write_spool(metrics, tags, status)  # replay skips whatever part of the batch did arrive

    @property
    def spooling(self) -> bool:
        """Whether some of this run's records wait in the spool (the store did not answer at the last flush)."""
        return self._spooling

    def _write_spool(self, metrics: list[Metric], tags: dict[str, str], status: str | None) -> None:
        write_spool(self._spool, self._run_id, metrics, tags, status)

    def _replay(self) -> bool:
        try:
            replay_spool(self._client, self._spool)
        except Exception as exc:  # still down: keep spooling
            log.debug("spool replay to MLflow failed: %s", exc)
            return False
        self._spooling = False
        log.warning("MLflow answers again: run %s's spooled records are replayed", self._run_id)
        return True

    def close(self, status: str | None = None) -> None:
        """Flush (ending the run with ``status`` if given) and stop the system-metrics sampler. Idempotent."""
        monitor, self._monitor = self._monitor, None
        try:
            self.flush(status)
        finally:
            if monitor is not None:
                monitor.finish()  # wakes the sampler at once; the samples of an unfinished window are dropped


# -- the spool ---------------------------------------------------------------------------------------------------------


def spool_files(spool: str) -> list[str]:
    """The spool's record files in the order they were written (names start with a nanosecond timestamp)."""
    fs, root = fsspec.core.url_to_fs(spool)
    try:
        return sorted(fs.find(root))
    except FileNotFoundError:
        return []


def write_spool(spool: str, run_id: str, metrics: list[Metric], tags: dict[str, str], status: str | None) -> None:
    """One record file: the metrics, tags and end status MLflow could not take, for :func:`replay_spool`."""
    fs, root = fsspec.core.url_to_fs(spool)
    fs.makedirs(root, exist_ok=True)
    doc = {"run_id": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics], "tags": tags,
           "status": status}
    name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    aside = f"{root}/.{name}"  # written aside and moved: a replay never reads half a record
    fs.pipe_file(aside, json.dumps(doc).encode())
    fs.mv(aside, f"{root}/{name}")


def replay_spool(client: MlflowClient, spool: str) -> int:
    """Send the spool's records to MLflow in the order written, deleting each once sent; returns the points sent.

    A point is sent only past the last step its run already holds for that key (as :meth:`RunLogger.log` does), so
    a record that partly arrived before the store failed, or a replay interrupted and run again, duplicates nothing.
    Raises when the store does not answer; what was not sent stays in the spool.
    """
    sent, last = 0, {}
    fs, _ = fsspec.core.url_to_fs(spool)
    for path in spool_files(spool):
        if path.rsplit("/", 1)[-1].startswith("."):
            continue  # a record being written
        doc = json.loads(fs.cat_file(path))
        run_id = doc["run_id"]
        if run_id not in last:
            last[run_id] = last_logged_steps(client, run_id)
        steps, metrics = last[run_id], []
        for key, value, timestamp, step in doc["metrics"]:
            if step > steps.get(key, -1):
                steps[key] = step
                metrics.append(Metric(key, float(value), int(timestamp), int(step)))
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        for key, value in doc["tags"].items():
            client.set_tag(run_id, key, value)
        if doc.get("status"):
            client.set_terminated(run_id, doc["status"])
        fs.rm_file(path)
        sent += len(metrics)
    return sent


def _fail_fast_settings(timeout_s: float) -> dict[str, str]:
    """MLflow's environment variables for an HTTP client without retries and with a ``timeout_s`` timeout."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(timeout_s, 1)))}


@contextlib.contextmanager
def fail_fast_http(timeout_s: float = 10.0) -> Iterator[None]:
    """MLflow's HTTP client with no retries and a ``timeout_s`` timeout in this block: its defaults (7 retries with
    exponential back-off, 120 s timeouts) take minutes to report a server that is simply not there."""
    settings = _fail_fast_settings(timeout_s)
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each metric already in run ``run_id`` (system metrics excluded: their sampler keeps its
    own step counter). One history query per key, and only for a run that has metrics, i.e. a resumed one."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(SYSTEM_PREFIX)]
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def _start_monitor(tracking_uri: str, run_id: str, sampling_interval: float,
                   samples_before_logging: int) -> SystemMetricsMonitor | None:
    """MLflow's sampler thread for ``run_id``, or None (with a warning) where it cannot run: monitoring is a
    diagnostic and must never fail a trial."""
    try:
        # Imported here: it imports psutil, and only runs that ask for system metrics should need it.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # tracking_uri is passed explicitly, so the process-wide mlflow.set_tracking_uri() stays untouched;
        # resume_logging starts at the run's last system/ step + 1 (0 on a fresh run).
        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval,
                                       samples_before_logging=samples_before_logging, resume_logging=True,
                                       tracking_uri=tracking_uri)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - any failure (no psutil, store unreachable) only turns monitoring off
        log.warning("system metrics for run %s are off: %s: %s", run_id, type(exc).__name__, exc)
        return None
    return monitor
