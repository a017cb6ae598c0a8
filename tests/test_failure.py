"""A trial that fails for good ends its MLflow run FAILED (never left RUNNING), the study says so, and a
deterministic failure is retried by one layer only: 1 + max_failures attempts, not (1 + max_failures)²."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import cli_env, run_cli, study_dict, write_study


def test_failed_trial_is_marked_failed(tmp_path: Path, digits16: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(digits16, data)
    (data / "val" / "shard-000001.tar").unlink()  # the manifest still lists it: reading val fails mid-trial
    study = study_dict("broken", data, train={"steps": 20, "eval_every": 10, "checkpoint_every": 10},
                       resources={"workers_per_trial": 2, "max_failures": 1})
    path = write_study(tmp_path / "broken.yaml", study)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["run", str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")],
                     cli_env(tmp_path), timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED base" in result.stdout and "failed: base" in result.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("broken")
    runs = {r.data.tags["mixer.role"]: r for r in client.search_runs([exp.experiment_id])}
    assert runs["trial"].info.status == "FAILED"
    assert runs["trial"].data.tags["mixer.attempts"] == "2"  # Tune's retry only; Ray Train's own retry is off
    assert runs["study"].info.status == "FAILED"
