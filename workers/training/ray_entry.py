"""The per-worker functions Ray Train's ``TorchTrainer`` runs: thin shells around
:class:`workers.training.trainer.Trainer` (pre-training, ``train_loop_per_worker``) and
:class:`workers.training.finetuner.FineTuner` (``finetune_loop_per_worker``).

It adds only what Ray provides: the DDP group (``prepare_model``), the device, the checkpoint to resume from,
and ``ray.train.report`` (rank 0 uploads the checkpoint folder written by ``workers.training.checkpoint``). Ray keeps
the best checkpoints by ``val/acc`` (early stopping, as the paper does it) plus the latest one, from which a restarted
worker group resumes.

Those Ray calls are one :class:`Engine`: :data:`RAY_TRAIN` in a worker group, or one a caller passes to
:func:`train_in_process` and :func:`finetune_in_process`, which run a 1-worker trial's pre-training and fine-tuning in
the calling process (no process group, no worker group: ``pipeline.trial_in_process`` reports pre-training through
Ray Tune, ``pipeline.finetune_sweep`` keeps each fine-tuning run's checkpoint in the run's folder on storage).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from workers.config import TrialConfig
from workers.data.permute import permute_spec
from workers.models.registry import build_model
from workers.names import (
    COMPILE_RESOLVED_TAG,
    DEVICE_KIND_TAG,
    PERF_MFU,
    PRECISION_RESOLVED_TAG,
)
from workers.training.checkpoint import load_model, read_state, write_checkpoint
from workers.training.finetuner import FineTuner
from workers.training.loop import ReportFn, StepLoop
from workers.training.throughput import device_kind, peak_flops, trial_throughput
from workers.training.trainer import Trainer

log = logging.getLogger(__name__)


# Evaluates the best model on rank 0 after training (the pipeline passes the linear few-shot): metrics to report.
EvaluateBest = Callable[[nn.Module, TrialConfig], dict[str, float]]


@dataclass(frozen=True)
class Engine:
    """What runs a worker's loop provides it: the model wrap, the checkpoint to resume from, the report of metrics
    and checkpoints, and a reported checkpoint found again by its step."""

    wrap_model: Callable[[nn.Module], nn.Module]
    latest_checkpoint: Callable[[], ray.train.Checkpoint | None]
    # (metrics, checkpoint folder or None, step): on every rank; the folder, from rank 0 only, is uploaded
    report: Callable[[dict[str, float], str | None, int], None]
    checkpoint_at_step: Callable[[int], ray.train.Checkpoint]


def _ray_train_report(metrics: dict[str, float], folder: str | None, step: int) -> None:
    if folder is None:
        ray.train.report(metrics, checkpoint=None)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step_{step:08d}")


def _ray_train_checkpoint_at_step(step: int) -> ray.train.Checkpoint:
    from ray.train.v2._internal.execution.context import get_train_context  # no public API for this path

    storage = get_train_context().get_storage()
    return ray.train.Checkpoint(storage.build_checkpoint_path_from_name(f"step_{step:08d}"),
                                filesystem=storage.storage_filesystem)


# A Ray Train worker group's engine (the checkpoints are named step_<step>, so a step finds its checkpoint).
RAY_TRAIN = Engine(wrap_model=ray.train.torch.prepare_model, latest_checkpoint=ray.train.get_checkpoint,
                   report=_ray_train_report, checkpoint_at_step=_ray_train_checkpoint_at_step)


def train_loop_per_worker(config: dict[str, Any], evaluate_best: EvaluateBest | None = None) -> None:
    """Ray Train entry point. ``config``: {"trial": TrialConfig dict, "mlflow": {"tracking_uri", "run_id",
    "system_metrics"} | None, "cpus_per_worker": int, "measure_throughput": bool}.

    ``evaluate_best`` runs on rank 0 with the worker's reserved cores before the worker group exits (no extra
    process, no resources taken from the next trial); its metrics go to the trial's MLflow run.
    """
    with _worker(config) as (trial, rank, world_size, device, cores, tracker):
        _train(trial, config, rank, world_size, device, cores, tracker, evaluate_best, RAY_TRAIN)


def train_in_process(config: dict[str, Any], engine: Engine, evaluate_best: EvaluateBest | None = None) -> None:
    """A 1-worker trial's pre-training in this process, as rank 0 of 1 with ``engine`` in Ray Train's place.

    Args:
        config: as :func:`train_loop_per_worker`'s, plus "gpus_per_worker" (0: train on the CPU).
        engine: the checkpoint and report calls (``pipeline.trial_in_process``).
        evaluate_best: as :func:`train_loop_per_worker`'s.
    """
    with _worker(config, placement=_in_process_placement(config)) as (trial, rank, world_size, device, cores, tracker):
        _train(trial, config, rank, world_size, device, cores, tracker, evaluate_best, engine)


def _in_process_placement(config: dict[str, Any]) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of a run in the calling process: rank 0 of 1, on GPU 0 when the trial holds GPUs
    (config "gpus_per_worker"), else on the CPU."""
    return 0, 1, torch.device("cuda", 0) if config.get("gpus_per_worker") else torch.device("cpu")


@contextlib.contextmanager
def _worker(config: dict[str, Any], placement: tuple[int, int, torch.device] | None = None
            ) -> Iterator[tuple[TrialConfig, int, int, torch.device, int, Any]]:
    """(trial, rank, world_size, device, cores, rank 0's MLflow logger or None) of this worker: ``placement``
    (rank, world size, device), else this Ray Train worker's; the logger is closed at the end, also when training
    fails."""
    trial = TrialConfig.model_validate(config["trial"])
    if placement is None:
        ctx = ray.train.get_context()
        placement = (ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    rank, world_size, device = placement
    tracker = None
    if rank == 0 and config.get("mlflow"):
        from workers.training.mlflow_logger import RunLogger  # only rank 0 talks to MLflow (and pays its import)

        tracker = RunLogger(**config["mlflow"])
    try:
        yield trial, rank, world_size, device, max(1, int(config.get("cpus_per_worker", 1))), tracker
    finally:
        if tracker:
            tracker.close()  # flushes, and stops the system-metrics sampler


def _train(trial: TrialConfig, config: dict[str, Any], rank: int, world_size: int, device, cores: int,
           tracker, evaluate_best: EvaluateBest | None, engine: Engine) -> None:
    trainer = Trainer(trial, rank=rank, world_size=world_size, device=device, cores=cores,
                      wrap_model=engine.wrap_model, log=tracker.log if tracker else None)
    _resume(trainer, rank, "training", engine)
    if tracker:
        tracker.set_tag(PRECISION_RESOLVED_TAG, trainer.precision)
        tracker.set_tag(COMPILE_RESOLVED_TAG, str(trainer.compiled).lower())
        tracker.set_tag(DEVICE_KIND_TAG, device_kind(device))  # what its throughput calibrates (analysis.ledger)
    trainer.fit(_reporter(trainer, rank, tracker, engine))

    if tracker:
        metrics = {PERF_MFU: mfu(trainer, peak_flops(device, trainer.precision, cores))}
        if config.get("measure_throughput", True):
            # Inference throughput (paper Fig. 3 right): the throughput table's figure, measured with its cores to
            # itself before the study's trials started (pipeline.throughput_table), else measured here, on rank 0.
            figures, tags = trial_throughput(trainer.module, trainer.precision, device, cores,
                                             config["mlflow"]["tracking_uri"])
            metrics.update(figures)
            for key, value in tags.items():
                tracker.set_tag(key, value)
        tracker.log(metrics, trial.train.steps)
    if tracker and evaluate_best is not None:
        # Rank 0 logs the evaluation to the trial's MLflow run, the driver reads it back from there: Ray Train's
        # Result carries only the metrics of the latest checkpoint, not of a report after it.
        tracker.log(evaluate_best(best_model(trainer, engine), trial), trial.train.steps)
        tracker.flush()


def best_model(trainer: Trainer, engine: Engine) -> nn.Module:
    """The model at the best checkpointed step: from memory when this segment reached it, else read back from the
    run's storage (a resumed run whose best checkpoint came from an earlier segment). Eval mode, on the device."""
    if trainer.best_state is not None:
        model = build_model(trainer.module.variant, trainer.image_size, trainer.num_classes)
        model.load_state_dict(trainer.best_state)
    else:
        with engine.checkpoint_at_step(trainer.progress.best_step).as_directory() as folder:
            model = load_model(folder)
    return model.to(trainer.device).eval()


def _resume(learner: StepLoop, rank: int, what: str, engine: Engine) -> None:
    """Load this run's latest checkpoint into ``learner`` (Ray hands it to every worker when it restarts or resumes
    the run; None on a fresh start)."""
    checkpoint = engine.latest_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            learner.load_state_dict(read_state(folder))
        log.info("rank %d resumes %s from step %d", rank, what, learner.progress.step)


def _reporter(learner: StepLoop, rank: int, tracker, engine: Engine) -> ReportFn:
    """``report(metrics, with_checkpoint)`` for ``learner.fit``: the engine's report on every rank (in a worker group,
    a barrier), rank 0 attaching the checkpoint folder (DDP replicas are identical, one copy is enough); MLflow
    flushed first."""
    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        if tracker:
            tracker.flush()
        if rank != 0 or not with_checkpoint:
            engine.report(metrics, None, learner.progress.step)
            return
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(folder, learner.module, learner.state_dict(), permute=permute_spec(learner.trial.data))
            engine.report(metrics, folder, learner.progress.step)

    return report


def mfu(trainer: Trainer, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak (same dtype).

    Achieved = 3 x forward FLOPs x images per second of one worker, over the time inside training steps only.
    """
    per_worker_images = trainer.progress.step * trainer.trial.train.batch_size / trainer.world_size
    return trainer.flops_per_image * per_worker_images / max(trainer.progress.train_seconds, 1e-9) / peak


# -- fine-tuning -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _checkpoint_folder(checkpoint: str | Path | ray.train.Checkpoint) -> Iterator[str]:
    """A local folder holding ``checkpoint`` (a path, or a Ray Checkpoint on any storage) while the block runs."""
    if isinstance(checkpoint, ray.train.Checkpoint):
        with checkpoint.as_directory() as folder:
            yield folder
    else:
        yield str(checkpoint)


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of one fine-tuning run (one learning rate). ``config``: {"trial": TrialConfig dict
    (its ``finetune`` block enabled), "pretrained": checkpoint folder path or ``ray.train.Checkpoint``, "lr": float,
    "mlflow": {"tracking_uri", "run_id", "system_metrics"} | None, "metric_suffix": str appended to every metric
    rank 0 logs to MLflow (``_lr0.01``: runs of a sweep share the trial's run), "cpus_per_worker": int}.

    Resumes from ``ray.train.get_checkpoint()`` (the run's latest checkpoint when Ray restarts or resumes it);
    reports every ``max(finetune.steps // 4, 1)`` steps with a checkpoint, rank 0 uploading it, as the
    pre-training loop does. The last report carries ``finetune/top1`` and ``compute/finetune_flops``.
    """
    with _worker(config) as (trial, rank, world_size, device, cores, tracker):
        _finetune(trial, config, rank, world_size, device, cores, tracker, RAY_TRAIN)


def finetune_in_process(config: dict[str, Any], engine: Engine) -> None:
    """One fine-tuning run of a 1-worker trial in this process, as rank 0 of 1 with ``engine`` in Ray Train's place.

    Args:
        config: as :func:`finetune_loop_per_worker`'s, plus "gpus_per_worker" (0: fine-tune on the CPU).
        engine: the checkpoint and report calls (``pipeline.finetune_sweep``: the run's folder on storage).
    """
    with _worker(config, placement=_in_process_placement(config)) as (trial, rank, world_size, device, cores, tracker):
        _finetune(trial, config, rank, world_size, device, cores, tracker, engine)


def _finetune(trial: TrialConfig, config: dict[str, Any], rank: int, world_size: int, device, cores: int,
              tracker, engine: Engine) -> None:
    suffix = config.get("metric_suffix", "")

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        tracker.log({f"{key}{suffix}": value for key, value in metrics.items()}, step)

    with _checkpoint_folder(config["pretrained"]) as folder:  # read once, in the constructor
        tuner = FineTuner(folder, trial, float(config["lr"]), rank=rank, world_size=world_size, device=device,
                          cores=cores, wrap_model=engine.wrap_model,
                          log=log_metrics if tracker else None)
    _resume(tuner, rank, "fine-tuning", engine)
    tuner.fit(_reporter(tuner, rank, tracker, engine))
