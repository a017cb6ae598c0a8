"""A 1-worker trial pre-trains inside its Ray Tune trial process (pipeline.trial_in_process), with checkpoints kept by
Tune: killed mid-trial it is retried by Tune and resumes from Tune's latest checkpoint into the same MLflow run, and
it computes what the same recipe computes in a Ray Train worker group (`mixer-study train`, a TorchTrainer).

The study test is slow (`make test-slow`): two embedded Rays and three trial attempts, 1.5-3.5 min on 2 busy cores.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.spec import parse_study
from pipeline.trial import in_process, make_job
from pipeline.trial_in_process import TuneCheckpoints, worker_group_checkpoints
from pipeline.tune import trial_resources
from tests.conftest import CLI, REPO, cli_env, cmdline, duplicated_points, run_cli, study_dict, write_study

STEPS, LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY = 60, 5, 10, 20



def _tune_trial_processes(driver_pid: int) -> list[psutil.Process]:
    """The Tune function-trainable processes (``ray::ImplicitFunc``) of the embedded Ray under ``driver_pid``."""
    return [p for p in psutil.Process(driver_pid).children(recursive=True) if "ImplicitFunc" in cmdline(p)]


def _histories(client: MlflowClient, run_id: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def test_which_trials_train_in_their_tune_trial_process_and_what_they_hold(digits16: Path) -> None:
    def job(workers: int, **sections) -> dict:
        spec = parse_study(study_dict("which", digits16, resources={"workers_per_trial": workers, "cpus_per_worker": 2},
                                      **sections))
        return make_job(spec, "base", spec.base, {}, tracking_uri="sqlite://", storage="/runs")

    one, two = job(1), job(2)
    finetuning = job(1, finetune={"train": str(digits16 / "train"), "test": str(digits16 / "test"), "steps": 4,
                                  "warmup_steps": 1, "lr": [0.01]})
    assert in_process(one) and not in_process(one, in_tune=False)  # `mixer-study train` keeps its TorchTrainer
    assert not in_process(two)  # DDP needs the worker group
    # A 1-worker trial fine-tunes in its trial process too (pipeline.finetune_sweep), on the CPUs that process holds.
    assert in_process(finetuning)
    for held in (one, finetuning):
        assert trial_resources({"job": held}).required_resources == {"CPU": 2}
    assert trial_resources({"job": two}).required_resources.get("CPU", 0) == 0


def test_a_trial_with_worker_group_checkpoints_does_not_start_again_in_process(tmp_path: Path) -> None:
    run = tmp_path / "train" / "base"  # where the trial's Ray Train run kept its checkpoints before
    assert worker_group_checkpoints(str(run)) == [] and TuneCheckpoints(str(run)).latest() is None  # a first start
    (run / "mlflow-spool").mkdir(parents=True)  # an in-process trial's spool is no checkpoint
    assert TuneCheckpoints(str(run)).latest() is None
    (run / "step_00000020").mkdir()
    with pytest.raises(RuntimeError, match=r"holds 1 checkpoint\(s\) of this trial from a Ray Train worker group"):
        TuneCheckpoints(str(run)).latest()


@pytest.mark.slow
def test_one_worker_trial_in_process_resumes_from_tune_checkpoint_and_matches_ray_train(tmp_path: Path,
                                                                                        digits16: Path) -> None:
    study = study_dict("inproc", digits16, train={"steps": STEPS, "log_every": LOG_EVERY, "eval_every": EVAL_EVERY,
                                                  "checkpoint_every": CHECKPOINT_EVERY},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 1})
    path = write_study(tmp_path / "inproc.yaml", study)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    tune_trial = storage / "inproc" / "tune" / "base"
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen(CLI + ["run", str(path), "--tracking-uri", uri, "--storage", str(storage)],
                                  env=cli_env(tmp_path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not any(tune_trial.glob("checkpoint_*")) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert any(tune_trial.glob("checkpoint_*")), (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.5)  # a few steps past the checkpoint, logged by the process about to die
            victims = _tune_trial_processes(driver.pid)
            assert len(victims) == 1, victims  # the trial's only process: no Ray Train worker group
            assert not any(cmdline(p).startswith("ray::RayTrainWorker")
                           for p in psutil.Process(driver.pid).children(recursive=True))
            victims[0].kill()
            assert driver.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inproc").experiment_id],
                                "tags.`mixer.role` = 'trial'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mixer.attempts"] == "2"  # the kill cost one attempt, resumed from Tune's checkpoint
    assert duplicated_points(client, run.info.run_id) == {}
    steps = {k: [s for s, _ in v] for k, v in _histories(client, run.info.run_id, ("train/loss",)).items()}
    assert steps["train/loss"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # none missing either
    assert run.data.tags["checkpoint.best"].startswith(str(tune_trial / "checkpoint_"))
    assert run.data.metrics["fewshot/5shot"] > 0 and run.data.metrics["compute/images_seen"] == STEPS * 32
    assert list((storage / "inproc" / "train" / "base").glob("step_*")) == []  # no Ray Train run

    # The same recipe in a Ray Train worker group of one (`train`, uninterrupted): the same numbers, step for step,
    # up to the checkpoint the killed attempt resumed from (a resumed segment draws its data from a seed of its start
    # step, in either engine, so later points differ from an uninterrupted run's by design).
    trained = run_cli(["train", "--config", str(path), "--tracking-uri", uri, "--storage", str(storage)],
                      cli_env(tmp_path), timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    (reference,) = client.search_runs([client.get_experiment_by_name("inproc").experiment_id],
                                      "tags.`mixer.role` = 'train'")
    ours, theirs = (_histories(client, r.info.run_id, ("train/loss", "val/acc")) for r in (run, reference))
    for key in ours:
        first_segment = [point for point in ours[key] if point[0] <= CHECKPOINT_EVERY]
        assert len(first_segment) >= 2 and first_segment == theirs[key][:len(first_segment)], key
