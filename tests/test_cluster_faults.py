"""Node loss and driver loss on the stack a cluster user runs, all real and on this machine: a two-node `ray start`
cluster with token authentication (the head trains nothing), shards and study storage on a local S3 API (moto
server), MLflow as an `mlflow server` process, the study submitted with `ray job submit`.

One study of two grid points runs through both faults (docs/reliability.md, cases 1 and 3):
1. after the long trial's first checkpoint on S3, its worker node dies (raylet and every process under it
   SIGKILLed) and a replacement node joins: the trial resumes from that checkpoint;
2. after its next checkpoint, the job is stopped (`ray job stop`), and `mixer-study resume` is submitted as a new
   job: it finishes only the unfinished trial.
The end: exactly one FINISHED MLflow run per grid point, the finished trial not run again, and no metric point
duplicated or missing in any run.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    REPO,
    S3_TEST_CREDENTIALS,
    duplicated_points,
    mlflow_server,
    moto_server,
    study_dict,
    write_study,
)
from tests.ray_cluster import RayCluster, ray_cluster

pytestmark = pytest.mark.slow  # `make test-slow` (in CI): minutes of cluster time

NAME, SHORT, LONG = "faults", 60, 400
LOG_EVERY, CHECKPOINT_EVERY, BATCH = 5, 100, 32


def _wait_for(s3, path: str, cluster: RayCluster, job: str, timeout: float = 600) -> None:
    """Until ``path`` exists on S3; fails early, with the job's log, if the job ended."""
    deadline = time.monotonic() + timeout
    for polls in itertools.count():
        s3.invalidate_cache()
        if s3.exists(path):
            return
        if polls % 20 == 19:  # every 10 s: each `ray job status` is a new Python process of a CPU-second or two
            status = cluster.ray("job", "status", "--address", cluster.job_address, job, timeout=60).stdout
            if time.monotonic() > deadline or re.search(r"\b(succeeded|failed|stopped)\b", status):
                logs = cluster.ray("job", "logs", "--address", cluster.job_address, job, timeout=60).stdout
                pytest.fail(f"{path} never appeared; job {job}: {status[-500:]}\n{logs[-4000:]}")
        time.sleep(0.5)


def test_node_and_driver_lost_on_a_cluster(tmp_path: Path, digits16: Path) -> None:
    s3fs = pytest.importorskip("s3fs")
    with moto_server() as endpoint, mlflow_server(tmp_path / "mlflow") as tracking_uri:
        s3 = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
        s3.mkdir("data")
        s3.mkdir("study")
        s3.put(str(digits16), "data/digits16", recursive=True)
        data = "s3://data/digits16"
        study = study_dict(NAME, Path("/unused"), train={"log_every": LOG_EVERY, "eval_every": 20, "batch_size": BATCH,
                                                          "checkpoint_every": CHECKPOINT_EVERY},
                           grid={"train.steps": [SHORT, LONG]},
                           resources={"workers_per_trial": 2, "max_failures": 2, "max_concurrent_trials": 1})
        study["base"]["data"].update(train=f"{data}/train", val=f"{data}/val")
        study["base"]["fewshot"].update(train=f"{data}/train", test=f"{data}/test")
        path = write_study(tmp_path / f"{NAME}.yaml", study)
        storage = "s3://study/runs"
        env = {**os.environ, **S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}

        with ray_cluster(env, home=tmp_path / "home") as cluster:
            cluster.start_head(0, job_server=True)  # the head holds the job drivers and trains nothing
            doomed_node = cluster.add_node(2)
            submitted = cluster.submit("mixer-study", "run", str(path), "--tracking-uri", tracking_uri,
                                       "--storage", storage, working_dir=REPO, wait=False)
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
            job = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group()  # the output has colour codes

            trial = f"study/runs/{NAME}/train/steps={LONG}"
            _wait_for(s3, f"{trial}/step_{CHECKPOINT_EVERY:08d}", cluster, job)
            killed = cluster.kill_node(doomed_node)
            assert any("RayTrainWorker" in c for c in killed), "the long trial's workers were not on that node"
            cluster.add_node(2)

            _wait_for(s3, f"{trial}/step_{2 * CHECKPOINT_EVERY:08d}", cluster, job)
            stopped = cluster.ray("job", "stop", "--address", cluster.job_address, job, timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            status = cluster.ray("job", "status", "--address", cluster.job_address, job, timeout=60).stdout
            assert "was stopped" in status, status

            resumed = cluster.submit("mixer-study", "resume", NAME, "--storage", storage, working_dir=REPO)
            output = resumed.stdout + resumed.stderr
            assert resumed.returncode == 0 and "succeeded" in output, output[-4000:]

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(NAME)
        runs = {r.data.tags["mixer.trial"]: r for r in
                client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")}
        assert sorted(runs) == [f"steps={LONG}", f"steps={SHORT}"]  # one run per grid point, never a second
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
        assert runs[f"steps={SHORT}"].data.tags["mixer.attempts"] == "1"  # finished before the stop: not rerun
        # the attempt on the lost node, the one on its replacement, and the resumed job's
        assert int(runs[f"steps={LONG}"].data.tags["mixer.attempts"]) >= 3
        for name, run in runs.items():
            steps = int(name.split("=")[1])
            assert duplicated_points(client, run.info.run_id) == {}, name
            logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
            assert logged == list(range(LOG_EVERY, steps + 1, LOG_EVERY)), name
            assert run.data.metrics["compute/images_seen"] == steps * BATCH
            assert "fewshot/5shot" in run.data.metrics
        (parent,) = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'study'")
        assert parent.info.status == "FINISHED"
