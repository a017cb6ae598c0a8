"""A node lost mid-trial on a real multi-node Ray cluster on this machine (`ray start` head + worker node on
127.0.0.1): the worker node's raylet and every process under it are SIGKILLed after the trial's first checkpoint, a
replacement node joins, and the trial resumes from its checkpoint on the shared storage to its full step count, in
one MLflow run with no metric point duplicated or missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CLI, REPO, duplicated_points, free_port, stop_processes_mentioning, study_dict, write_study

RAY = str(Path(sys.executable).with_name("ray"))
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 400, 5, 100

pytestmark = pytest.mark.slow  # `make test-slow` (in CI): minutes of cluster time each


def _start_node(env: dict, head: str, manager_port: int) -> None:
    started = subprocess.run([RAY, "start", "--address", head, "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                              "--node-manager-port", str(manager_port), "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr


def _raylet(manager_port: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        if f"--node_manager_port={manager_port}" in " ".join(process.info["cmdline"] or []):
            return process
    raise AssertionError(f"no raylet with node manager port {manager_port}")


def test_node_lost_mid_trial_resumes_on_a_replacement(tmp_path: Path, digits16: Path) -> None:
    port = free_port()
    ray_tmp = Path("/tmp") / f"rn-{port}"  # every process of this cluster mentions it: stopped by it afterwards
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = f"127.0.0.1:{port}"
    try:
        # The head trains nothing (0 CPUs): the trial's workers can only run on the worker node.
        started = subprocess.run([RAY, "start", "--head", "--num-cpus", "0", "--port", str(port), "--node-ip-address",
                                  "127.0.0.1", "--include-dashboard", "false", "--temp-dir", str(ray_tmp),
                                  "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        first, replacement = free_port(), free_port()
        _start_node(env, head, first)

        study = study_dict("nodeloss", digits16, train={"steps": STEPS, "log_every": LOG_EVERY, "eval_every": 20,
                                                        "checkpoint_every": CHECKPOINT_EVERY},
                           resources={"workers_per_trial": 2, "max_failures": 2, "max_concurrent_trials": 1})
        path = write_study(tmp_path / "nodeloss.yaml", study)
        uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
        log_path = tmp_path / "driver.log"
        with open(log_path, "w") as log:
            driver = subprocess.Popen(CLI + ["run", str(path), "--address", head, "--tracking-uri", uri,
                                             "--storage", str(storage)],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            checkpoint = storage / "nodeloss" / "train" / "base" / f"step_{CHECKPOINT_EVERY:08d}"
            deadline = time.monotonic() + 600
            while not checkpoint.exists():
                assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            raylet = _raylet(first)
            doomed = [raylet, *raylet.children(recursive=True)]
            assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in doomed[1:]), "no trial worker there"
            for process in doomed:  # the node dies at once, as a machine would
                process.send_signal(signal.SIGKILL)
            psutil.wait_procs(doomed, timeout=30)
            _start_node(env, head, replacement)
            assert driver.wait(timeout=900) == 0, log_path.read_text()[-4000:]
    finally:
        # The head's processes mention its temp dir; the worker nodes' (temp dir of their own) its GCS address.
        stop_processes_mentioning(str(ray_tmp))
        stop_processes_mentioning(f"gcs-address={head}")
        stop_processes_mentioning(f"gcs_address={head}")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nodeloss")
    (run,) = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["mixer.attempts"]) >= 2  # the attempt on the lost node, then the resumed one
    assert duplicated_points(client, run.info.run_id) == {}
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert run.data.metrics["compute/images_seen"] == STEPS * 32 and "fewshot/5shot" in run.data.metrics
