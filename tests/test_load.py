"""Load and hygiene: a study of 16 very short trials on a 2-CPU `ray start` cluster finishes every trial, leaves no
actor, placement group, worker process or temp file behind, and its processes' memory stays bounded.

Slow (`make test-slow`): on 2 cores each four-step trial spends about half a minute starting (a Tune trial actor, a
Ray Train controller and its worker, each a new process importing torch), so 16 take about 6 minutes. 40 ran here
until CI's 60-minute budget needed the time; 16 still show any per-trial leak 16 times over.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CLI, REPO, cmdline, study_dict, write_study
from tests.ray_cluster import RayCluster, ray_cluster

TRIALS = 16
# Named, detached actors that Ray Train V2's controller gets or creates once per cluster (Ray's, not a trial's):
# ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py.
CLUSTER_SINGLETONS = {"_AutoscalingCoordinatorActor"}

pytestmark = pytest.mark.slow


def _ray_list(cluster: RayCluster, kind: str) -> list[dict]:
    out = cluster.ray("list", kind, "--address", cluster.job_address, "--format", "json", "--limit", "10000",
                      timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_many_short_trials_leave_nothing_behind(tmp_path: Path, digits16: Path) -> None:
    own_tmp = tmp_path / "tmp"  # TMPDIR of every process of the cluster and the study
    own_tmp.mkdir()
    # As an embedded Ray sets them (pipeline.tune.init_ray): each trial's start and end wait less for the controller.
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(own_tmp), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    with ray_cluster(env) as cluster:
        cluster.start_head(2, job_server=True)  # the job server is also the state API `ray list` asks
        baseline = {p.pid for p in cluster.processes()}
        tmp_before = set(own_tmp.iterdir())  # the cluster's own (its dashboard's multiprocessing listener)
        study = study_dict("load", digits16, train={"steps": 4, "eval_every": 2, "checkpoint_every": 4,
                                                    "log_every": 2},
                           optim={"warmup_steps": 1}, grid={"train.seed": list(range(TRIALS))},
                           resources={"workers_per_trial": 1, "max_failures": 0},
                           tracking={"system_metrics": False})
        study["base"]["fewshot"] = {"train": None, "test": None}
        path = write_study(tmp_path / "load.yaml", study)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        peaks: dict[str, float] = {}
        started = time.monotonic()
        driver = subprocess.Popen(CLI + ["run", str(path), "--address", cluster.address, "--tracking-uri", uri,
                                         "--storage", str(tmp_path / "runs")],
                                  env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        sampler = threading.Thread(target=_sample_rss, args=(driver, cluster, peaks), daemon=True)
        sampler.start()
        output = driver.communicate(timeout=1500)[0]
        elapsed = time.monotonic() - started
        assert driver.returncode == 0, output[-4000:]
        assert f"{TRIALS}/{TRIALS} trials finished" in output

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("load")
        runs = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'", max_results=1000)
        assert len(runs) == TRIALS and {r.info.status for r in runs} == {"FINISHED"}

        time.sleep(5)  # actors of the last trial are reaped asynchronously
        alive = [a for a in _ray_list(cluster, "actors") if a["state"] != "DEAD"]
        leaked_actors = [a for a in alive if a["class_name"] not in CLUSTER_SINGLETONS]
        assert leaked_actors == [], leaked_actors
        assert len(alive) <= len(CLUSTER_SINGLETONS), alive  # one of each, however many trials ran
        groups = [g for g in _ray_list(cluster, "placement-groups") if g["state"] != "REMOVED"]
        assert groups == [], groups
        # Every process of the cluster now: its daemons (there before the study), Ray's pool of idle workers
        # (`ray::IDLE`, kept for reuse) and the singletons' actors; anything else, such as a trial's actor, is a leak.
        leaked = [cmdline(p)[:200] for p in cluster.processes() if p.pid not in baseline
                  and not _is_idle_worker_or_singleton(p)]
        assert leaked == [], leaked
        # Nothing the study made stays, but torch's per-user inductor cache folder (made once, empty here).
        left = [p for p in set(own_tmp.iterdir()) - tmp_before
                if not (p.name.startswith("torchinductor_") and not any(p.iterdir()))]
        assert left == [], left
        print(f"\n{TRIALS} trials in {elapsed:.0f} s ({elapsed / TRIALS:.1f} s per trial); peak RSS MiB: "
              + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(peaks.items()))
              + f"; cluster processes before {len(baseline)}, after {len(cluster.processes())}")
        assert peaks["driver"] < 2 * 2**30 and peaks["worker"] < 2 * 2**30


def _is_idle_worker_or_singleton(process: psutil.Process) -> bool:
    line = cmdline(process)
    if line == "" or line.startswith("ray::IDLE") or "default_worker.py" in line:  # gone, idle, or starting
        return True
    return any(line.startswith(f"ray::{name}") for name in CLUSTER_SINGLETONS)


def _sample_rss(driver: subprocess.Popen, cluster: RayCluster, peaks: dict[str, float]) -> None:
    """Peak resident memory of the study driver and of the largest Ray worker process (an actor or task:
    `ray::...`), every 0.5 s."""
    while driver.poll() is None:
        try:
            peaks["driver"] = max(peaks.get("driver", 0), psutil.Process(driver.pid).memory_info().rss)
        except psutil.Error:
            return
        for process in cluster.processes():
            try:
                if cmdline(process).startswith("ray::"):
                    peaks["worker"] = max(peaks.get("worker", 0), process.memory_info().rss)
            except psutil.Error:
                continue
        time.sleep(0.5)
