"""Rank-0 MLflow logging: a thin helper the training loop calls.

The trial driver (``pipeline.trial``) creates or reuses the trial's MLflow run and passes its id down; workers
never start runs of their own, so a retried or resumed worker group keeps writing into the same run.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

# Tags that identify a study's runs: written by pipeline.tracking, queried there and by analysis.
STUDY_TAG, TRIAL_TAG, ROLE_TAG = "mixer.study", "mixer.trial", "mixer.role"


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow ``search_runs`` filter matching runs that carry all ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class RunLogger:
    """Buffers metrics and writes them to one existing MLflow run with ``log_batch`` (one round trip per flush)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self._client = MlflowClient(tracking_uri)
        self._run_id = run_id
        self._pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())
        if len(self._pending) >= 200:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        self._client.set_tag(self._run_id, key, value)

    def flush(self) -> None:
        # MLflow caps a batch at 1000 metrics; flushing every 200 keeps us well under it.
        if self._pending:
            self._client.log_batch(self._run_id, metrics=self._pending)
            self._pending = []
