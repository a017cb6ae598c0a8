"""One trial: TrialConfig -> ``TorchTrainer(workers.train.train_loop_per_worker).fit()`` -> few-shot on the best
checkpoint -> MLflow. Used as the Ray Tune function trainable and by ``mixer-study train`` on its own.

Ray Train V2 resumes by run name: a ``TorchTrainer`` whose ``RunConfig(name, storage_path)`` points at an
existing run restarts from that run's latest checkpoint. Trial names are deterministic, so a restarted trial
(Tune retry or ``mixer-study resume``) continues where its checkpoints left off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import mlflow.tracking
import ray.train
import torch
from ray.train.torch import TorchTrainer

from analysis.features import fewshot_for_model
from pipeline.tracking import end_run, experiment_id, trial_run
from workers.config import TrialConfig, flatten
from workers.data import load_manifest, subset_size
from workers.train import load_model_from_checkpoint, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrialJob:
    """Everything one trial needs, as plain data (it travels through Ray Tune's param space)."""

    name: str
    study: str
    trial: dict[str, Any]                 # TrialConfig as a dict
    tracking_uri: str
    experiment: str
    storage: str                          # Ray Train storage path for this study's trial runs
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 1
    parent_run_id: str | None = None
    point: dict[str, Any] = field(default_factory=dict)


def _checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def best_checkpoint(result: ray.train.Result) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """Early stopping as the paper does it: the checkpoint with the best upstream val/acc (earliest on ties)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val/acc" in m]
    if not candidates:
        raise RuntimeError(f"trial run {result.path} reported no checkpoint with val/acc")
    return max(candidates, key=lambda cm: (cm[1]["val/acc"], -cm[1]["step"]))


def run_trial(job_dict: dict[str, Any], in_tune: bool = False) -> dict[str, float]:
    """Train one trial and evaluate it; returns the trial's final metrics (also logged to its MLflow run)."""
    job = TrialJob(**job_dict)
    trial = TrialConfig.model_validate(job.trial)
    client = mlflow.tracking.MlflowClient(job.tracking_uri)
    exp_id = experiment_id(client, job.experiment)
    manifest = load_manifest(trial.data.train)
    params = {**flatten(trial), "data.image_size": manifest.image_size, "data.num_classes": manifest.num_classes,
              "data.train_images": subset_size(manifest, trial.data.fraction), "resources.workers": job.workers, "resources.cpus_per_worker": job.cpus_per_worker,
              "resources.gpus_per_worker": job.gpus_per_worker}
    run_id = trial_run(client, exp_id, job.study, job.parent_run_id, job.name, params)
    client.set_tag(run_id, "mixer.grid_point", ",".join(f"{k}={v}" for k, v in job.point.items()) or "base")
    ok = False
    try:
        callbacks = []
        if in_tune:
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "trial": job.trial,
                "mlflow": {"tracking_uri": job.tracking_uri, "run_id": run_id},
                "cpus_per_worker": job.cpus_per_worker,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=job.workers,
                use_gpu=job.gpus_per_worker > 0,
                resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})},
            ),
            run_config=ray.train.RunConfig(
                name=job.name,
                storage_path=job.storage,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=trial.train.keep_checkpoints,
                    checkpoint_score_attribute="val/acc",
                    checkpoint_score_order="max",
                ),
                failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
                callbacks=callbacks,
            ),
        )
        result = trainer.fit()
        checkpoint, best_metrics = best_checkpoint(result)
        client.set_tag(run_id, "checkpoint.best", _checkpoint_uri(checkpoint))
        client.set_tag(run_id, "ray.train_run", result.path)
        final = {"best/val_acc": best_metrics["val/acc"], "best/step": best_metrics["step"]}
        if trial.fewshot.enabled:
            with checkpoint.as_directory() as checkpoint_dir:
                model = load_model_from_checkpoint(checkpoint_dir)
            torch.set_num_threads(max(1, job.cpus_per_worker * job.workers))
            final.update(fewshot_for_model(model, trial.fewshot.train, trial.fewshot.test, shots=trial.fewshot.shots,
                                           seeds=trial.fewshot.seeds, l2_reg=trial.fewshot.l2_reg))
        for key, value in final.items():
            client.log_metric(run_id, key, float(value), step=trial.train.steps)
        ok = True
        return final
    finally:
        end_run(client, run_id, ok)
