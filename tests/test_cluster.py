"""`ray job submit --working-dir . -- mixer-study run ...` against a real local Ray cluster (`ray start --head`),
with Ray 2.60's token authentication on, results checked in the MLflow store."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import REPO, study_dict, write_study
from tests.ray_cluster import ray_cluster


def test_ray_job_submit_runs_a_study(tmp_path: Path, digits16: Path) -> None:
    name = "submitted"
    study = write_study(tmp_path / "submitted.yaml", study_dict(
        name, digits16, train={"steps": 40, "eval_every": 20, "checkpoint_every": 20},
        grid={"data.fraction": [0.3, 1.0]},
    ))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A fresh HOME, as on a new machine: the token is generated there first, as the README tells users.
    with ray_cluster(dict(os.environ), home=tmp_path / "home") as cluster:
        cluster.start_head(2, job_server=True)
        started = time.monotonic()
        result = cluster.submit("mixer-study", "run", str(study), "--tracking-uri", uri, "--storage",
                                str(tmp_path / "runs"), working_dir=REPO)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "succeeded" in output
        assert time.monotonic() - started < 1200

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert sorted(r.data.tags["mixer.trial"] for r in runs) == ["fraction=0.3", "fraction=1.0"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics["best/val_acc"] > 0.2 for r in runs)
