"""MLflow bookkeeping of a study: one parent run per study, one child run per grid point, found again on resume.

Runs are looked up by tags (``mixer.study``, ``mixer.trial``) rather than remembered in local state, so a resumed
study, a retried trial or a driver on another machine all land in the same runs: never a duplicate per grid point.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from workers.track import ROLE_TAG, STUDY_TAG, TRIAL_TAG, tag_filter



def resolve_tracking_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """--tracking-uri, then the study file, then $MLFLOW_TRACKING_URI, then ./mlflow.db (sqlite, absolute path)."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _find_run(client: MlflowClient, exp_id: str, tags: dict[str, str]):
    runs = client.search_runs([exp_id], filter_string=tag_filter(tags), order_by=["attributes.start_time ASC"], max_results=2)
    return runs[0] if runs else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def study_run(client: MlflowClient, exp_id: str, study: str, params: dict[str, Any]) -> str:
    """The study's parent run id: found by tag, else created with ``params`` (spec summary) logged."""
    run = _find_run(client, exp_id, {STUDY_TAG: study, ROLE_TAG: "study"})
    if run:
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(exp_id, run_name=study, tags={STUDY_TAG: study, ROLE_TAG: "study",
                                                          "mixer.git_commit": git_commit()})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def trial_run(client: MlflowClient, exp_id: str, study: str, parent_run_id: str | None, trial: str,
              params: dict[str, Any]) -> str:
    """The trial's child run id: the existing run of this grid point (status set back to RUNNING), else a new one."""
    tags = {STUDY_TAG: study, TRIAL_TAG: trial, ROLE_TAG: "trial"}
    run = _find_run(client, exp_id, tags)
    if run:
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    tags[MLFLOW_RUN_NAME] = trial
    run = client.create_run(exp_id, run_name=trial, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def end_run(client: MlflowClient, run_id: str, ok: bool) -> None:
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
