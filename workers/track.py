"""Rank-0 MLflow logging: a thin helper the training loop calls.

The trial driver (``pipeline.trial``) creates or reuses the trial's MLflow run and passes its id down; workers
never start runs of their own, so a retried or resumed worker group keeps writing into the same run.

A resumed worker group restarts from its last checkpoint, so it computes again the steps between that checkpoint
and the failure, some of which the failed group had already logged. :class:`RunLogger` therefore writes a point only
past the last step the run already holds for that key: every metric's history has each step at most once, and the
points the failed group never flushed are written by the resumed one, so none is missing either.

System metrics (CPU, memory, disk, network; GPU where ``nvidia-ml-py`` is installed) are sampled by MLflow's
``SystemMetricsMonitor`` in the rank-0 worker process, i.e. the host that does the training, not the trial driver.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)

# Tags that identify a study's runs: written by pipeline.tracking, queried there and by analysis.
STUDY_TAG, TRIAL_TAG, ROLE_TAG = "mixer.study", "mixer.trial", "mixer.role"


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow ``search_runs`` filter matching runs that carry all ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class RunLogger:
    """Buffers metrics and writes them to one existing MLflow run with ``log_batch`` (one round trip per flush).

    With ``system_metrics=True`` it also samples system metrics into the run (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ...) every ``sampling_interval`` seconds, averaging
    ``samples_before_logging`` samples per logged point, until :meth:`close`. Their step counter continues from the
    run's last ``system/`` step, so a resumed trial appends to its curves instead of overwriting step 0 onwards.
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` and ``$MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``, when set,
    take precedence over the arguments (MLflow reads them itself).
    """

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = False, sampling_interval: float = 10.0,
                 samples_before_logging: int = 1) -> None:
        self._client = MlflowClient(tracking_uri)
        self._run_id = run_id
        self._pending: list[Metric] = []
        self._last_step = last_logged_steps(self._client, run_id)  # {} for a new run
        self.skipped = 0  # points not written because the run already had them (a resumed segment)
        self._monitor: SystemMetricsMonitor | None = None
        if system_metrics:
            self._monitor = _start_monitor(tracking_uri, run_id, sampling_interval, samples_before_logging)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; a key whose history in the run already reaches ``step`` is skipped."""
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                self.skipped += 1
                continue
            self._last_step[key] = step
            self._pending.append(Metric(key, float(value), timestamp, step))
        if len(self._pending) >= 200:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        self._client.set_tag(self._run_id, key, value)

    def flush(self) -> None:
        # MLflow caps a batch at 1000 metrics; flushing every 200 keeps us well under it.
        if self._pending:
            self._client.log_batch(self._run_id, metrics=self._pending)
            self._pending = []

    def close(self) -> None:
        """Flush pending metrics and stop the system-metrics sampler (it flushes its own buffer). Idempotent."""
        monitor, self._monitor = self._monitor, None
        try:
            self.flush()
        finally:
            if monitor is not None:
                monitor.finish()  # wakes the sampler at once; the samples of an unfinished window are dropped


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each metric already in run ``run_id`` (system metrics excluded: their sampler keeps its
    own step counter). One history query per key, and only for a run that has metrics, i.e. a resumed one."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
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
