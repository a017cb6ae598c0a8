"""`ray job submit --working-dir . -- mixer-study run ...` against a real local Ray cluster (`ray start --head`),
with Ray 2.60's token authentication on, results checked in the MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port, stop_processes_mentioning, study_dict, write_study

RAY = str(Path(sys.executable).with_name("ray"))



@pytest.fixture
def cluster(tmp_path: Path):
    """A 2-CPU head node on 127.0.0.1 with its dashboard (job server); stopped afterwards."""
    port, dashboard = free_port(), free_port()
    # A fresh HOME, as on a new machine: `ray start --head` refuses to start with token auth and no token, so
    # the token is generated first (as the README tells users); `ray job submit` then reads ~/.ray/auth_token.
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"ray-{dashboard}"  # Ray's socket paths must stay short
    generate = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert generate.returncode == 0 and (home / ".ray" / "auth_token").is_file(), generate.stderr
    start = subprocess.run(
        [RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(address, env)
        yield {"address": address, "env": env}
    finally:
        stop_processes_mentioning(str(temp_dir))  # this cluster only: never `ray stop`, which stops every Ray here
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_agent(address: str, env: dict, timeout: float = 120) -> None:
    """`ray start` returns before the head's job agent accepts jobs ("No available agent to submit job")."""
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True,
                                timeout=60)
        if listed.returncode == 0:
            return
        assert time.monotonic() < deadline, f"job server at {address} not ready: {listed.stderr[-2000:]}"
        time.sleep(2)


def test_ray_job_submit_runs_a_study(cluster: dict, tmp_path: Path, digits16: Path) -> None:
    name = "submitted"
    study = write_study(tmp_path / "submitted.yaml", study_dict(
        name, digits16, train={"steps": 40, "eval_every": 20, "checkpoint_every": 20},
        grid={"data.fraction": [0.3, 1.0]},
    ))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO), "--",
               "mixer-study", "run", str(study), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    started = time.monotonic()
    for _ in range(30):  # a loaded machine's job agent can refuse a while after `ray job list` already works
        result = subprocess.run(command, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=1200)
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(2)
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert time.monotonic() - started < 1200

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert sorted(r.data.tags["mixer.trial"] for r in runs) == ["fraction=0.3", "fraction=1.0"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics["best/val_acc"] > 0.2 for r in runs)
