"""A 1-worker trial's pre-training inside its Ray Tune trial process, with Ray Tune keeping its checkpoints.

A trial of one worker needs no process group, so it needs no Ray Train worker group either: the Tune trial process
(which holds the worker's CPUs and GPUs itself, ``pipeline.tune``) runs the same ``Trainer`` through
``workers.training.ray_entry.train_in_process``. That saves each trial the processes a ``TorchTrainer`` starts (its
controller, worker, placement-group cleaner, synchronisation actor and dataset manager, each importing Ray and
torch anew), and with Tune's ``reuse_actors`` the next trial finds torch, Ray and MLflow already imported.

Checkpoints go through ``ray.tune.report(metrics, checkpoint=...)`` to the trial's Tune folder
(``<storage>/<study>/tune/<trial>/checkpoint_<index>``), kept by Tune's ``CheckpointConfig`` as Ray Train kept them
(the best by ``val/acc``, of equal ones the latest, plus the latest). Retries and resumes are unchanged: a retried
attempt (Tune's ``FailureConfig``) or a ``mixer-study resume`` starts from ``ray.tune.get_checkpoint()``, the
latest checkpoint Tune registered. Each checkpoint carries in its metadata its report's metrics and the earlier
checkpoints of the trial with theirs, so a resumed attempt still knows every step's checkpoint (the best one may
come from an earlier attempt).

A study interrupted under an earlier revision ran its 1-worker trials in worker groups, whose checkpoints Tune does
not know: such a trial refuses to start again from step 0 into its MLflow run (:func:`worker_group_checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import ray.train
from ray import tune

from pipeline.trial_worker import fewshot_of_model
from workers.data.manifest import join_url
from workers.names import STEP
from workers.training.ray_entry import Engine, train_in_process

Reported = list[tuple[ray.train.Checkpoint, dict[str, Any]]]


@dataclass
class InProcessResult:
    """The fields of ``ray.train.Result`` that ``pipeline.trial`` reads, for an in-process run."""

    path: str                     # the trial's checkpoint folder on storage
    metrics: dict[str, Any]       # the last report's metrics
    best_checkpoints: Reported    # every checkpoint reported, with its metrics (``pipeline.trial.best_checkpoint``)


@dataclass
class TuneCheckpoints:
    """The :class:`~workers.training.ray_entry.Engine` calls over Ray Tune's function-trainable session."""

    worker_group_run: str  # where a Ray Train run of this trial would be (``pipeline.ray_policy.train_run_config``)
    reported: Reported = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def latest(self) -> ray.train.Checkpoint | None:
        """Tune's latest registered checkpoint of this trial (None on a first start); learns the earlier ones."""
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            left = worker_group_checkpoints(self.worker_group_run)
            if left:
                raise RuntimeError(
                    f"{self.worker_group_run} holds {len(left)} checkpoint(s) of this trial from a Ray Train worker "
                    "group (an earlier revision, which did not train 1-worker trials in their Tune trial process); "
                    "starting it again from step 0 would mix two runs in its MLflow run: finish the study with that "
                    "revision, or run it under another name")
        else:
            record = checkpoint.get_metadata()
            self.reported = [(ray.train.Checkpoint(path, filesystem=checkpoint.filesystem), metrics)
                             for path, metrics in record["earlier"]] + [(checkpoint, record["metrics"])]
        return checkpoint

    def report(self, metrics: dict[str, float], folder: str | None, step: int) -> None:
        """Report ``metrics`` to Tune, with the checkpoint in ``folder`` when given (Tune uploads it)."""
        self.metrics = metrics
        if folder is None:
            tune.report(metrics)
            return
        checkpoint = tune.Checkpoint.from_directory(folder)
        checkpoint.set_metadata({"metrics": metrics, "earlier": [[c.path, m] for c, m in self.reported]})
        tune.report(metrics, checkpoint=checkpoint)
        self.reported.append((tune.get_checkpoint(), metrics))  # the persisted copy, on the trial's storage

    def at_step(self, step: int) -> ray.train.Checkpoint:
        """The checkpoint reported at ``step``."""
        for checkpoint, metrics in self.reported:
            if metrics.get(STEP) == step:
                return checkpoint
        raise LookupError(f"no checkpoint of step {step} among {[m.get(STEP) for _, m in self.reported]}")

    def engine(self) -> Engine:
        return Engine(wrap_model=lambda module: module, latest_checkpoint=self.latest, report=self.report,
                      checkpoint_at_step=self.at_step)

    def result(self) -> InProcessResult:
        if not self.reported:
            raise RuntimeError("the in-process trial reported no checkpoint")
        return InProcessResult(path=self.reported[-1][0].path.rsplit("/", 1)[0], metrics=self.metrics,
                               best_checkpoints=list(self.reported))


def worker_group_checkpoints(run_url: str) -> list[str]:
    """The checkpoint folders (``step_*``) a Ray Train run left at ``run_url`` (any fsspec URL); [] if none."""
    fs, root = fsspec.core.url_to_fs(run_url)
    return fs.glob(join_url(root, "step_*"))


def fit_in_process(trial: dict[str, Any], worker_mlflow: dict[str, Any], cpus_per_worker: int,
                   gpus_per_worker: int, worker_group_run: str) -> InProcessResult:
    """Pre-train a 1-worker trial in this Tune trial process (module docstring); few-shot of the best model as the
    worker group's rank 0 runs it.

    Args:
        trial: the trial's recipe (TrialConfig as a dict).
        worker_mlflow: the worker's logging config (tracking_uri, run_id, system_metrics, spool).
        cpus_per_worker: CPUs the trial holds (torch threads).
        gpus_per_worker: GPUs it holds (0: train on the CPU).
        worker_group_run: where a Ray Train run of this trial would keep its checkpoints (module docstring).
    """
    checkpoints = TuneCheckpoints(worker_group_run)
    train_in_process({"trial": trial, "mlflow": worker_mlflow, "cpus_per_worker": cpus_per_worker,
                      "gpus_per_worker": gpus_per_worker}, checkpoints.engine(), evaluate_best=fewshot_of_model)
    return checkpoints.result()
