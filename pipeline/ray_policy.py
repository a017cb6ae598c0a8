"""The Ray Train policy of every ``TorchTrainer`` a trial runs (pre-training in ``pipeline.trial``, each fine-tuning
run in ``pipeline.finetune_sweep``): where its workers run, which checkpoints it keeps, and that it never retries; and
the same checkpoint policy for a trial that reports its checkpoints to Ray Tune (``pipeline.trial_in_process``).

Retries have ONE layer, Ray Tune's ``FailureConfig(max_failures=resources.max_failures)`` (``pipeline.tune``): a
failed attempt is retried as a whole trial, which resumes each Ray Train run (by its deterministic name) from its
latest checkpoint. Ray Train's own retry is therefore off (``max_failures=0``), so a deterministic failure runs
1 + max_failures times, not (1 + max_failures)².
"""

from __future__ import annotations

from typing import Any

import ray.train
from ray import tune

from workers.names import VAL_ACC


def worker_scaling(workers: int, cpus_per_worker: int, gpus_per_worker: int) -> ray.train.ScalingConfig:
    """The trial's Ray Train workers (``pipeline.trial.TrialJob``'s resources).

    Args:
        workers: DDP workers (ranks).
        cpus_per_worker: CPUs each worker holds.
        gpus_per_worker: GPUs each worker holds (0: CPU training).
    """
    gpus = {"GPU": gpus_per_worker} if gpus_per_worker else {}
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker={"CPU": cpus_per_worker, **gpus},
    )


def train_run_config(name: str, storage: str, keep_checkpoints: int, score_metric: str | None = None,
                     callbacks: list[Any] | None = None) -> ray.train.RunConfig:
    """A Ray Train run that resumes by ``name`` from ``storage``, keeps ``keep_checkpoints`` checkpoints and never
    retries (module docstring).

    Args:
        name: the run's deterministic name (a restarted trial continues the run of that name).
        storage: the Ray Train storage path of the study's trial runs.
        keep_checkpoints: how many checkpoints to keep.
        score_metric: keep the best by this reported metric (higher is better; of equal ones Ray keeps the latest);
            None keeps the latest.
        callbacks: Ray Train callbacks (e.g. Tune's report callback), or None.
    """
    if score_metric is None:
        checkpoints = ray.train.CheckpointConfig(num_to_keep=keep_checkpoints)
    else:
        checkpoints = ray.train.CheckpointConfig(
            num_to_keep=keep_checkpoints, checkpoint_score_attribute=score_metric, checkpoint_score_order="max",
        )
    return ray.train.RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=checkpoints,
        failure_config=ray.train.FailureConfig(max_failures=0),  # retries: Tune's layer only (module docstring)
        callbacks=callbacks,
    )


def tune_checkpoints(keep_checkpoints: int) -> tune.CheckpointConfig:
    """What Ray Tune keeps of the checkpoints a trial reports to it (a 1-worker trial, ``pipeline.trial_in_process``):
    as :func:`train_run_config` keeps a pre-training run's, the best ``keep_checkpoints`` by ``val/acc`` (of equal ones
    the latest) plus the latest.

    Args:
        keep_checkpoints: how many checkpoints to keep.
    """
    return tune.CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute=VAL_ACC,
                                 checkpoint_score_order="max")
