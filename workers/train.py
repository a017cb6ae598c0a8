"""The per-worker function Ray Train's ``TorchTrainer`` runs: a thin shell around :class:`workers.trainer.Trainer`.

It adds only what Ray provides: the DDP group (``prepare_model``), the device, the checkpoint to resume from,
and ``ray.train.report`` (rank 0 uploads the checkpoint folder written by ``workers.checkpoint``). Ray keeps the
best checkpoints by ``val/acc`` (early stopping, as the paper does it) plus the latest one, from which a restarted
worker group resumes.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import ray.train
import ray.train.torch

from workers.checkpoint import read_state, write_checkpoint
from workers.config import TrialConfig
from workers.throughput import inference_throughput, peak_flops
from workers.trainer import Trainer

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"trial": TrialConfig dict, "mlflow": {"tracking_uri", "run_id",
    "system_metrics"} | None, "cpus_per_worker": int, "measure_throughput": bool}."""
    trial = TrialConfig.model_validate(config["trial"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cores = max(1, int(config.get("cpus_per_worker", 1)))

    tracker = None
    if rank == 0 and config.get("mlflow"):
        from workers.track import RunLogger  # only rank 0 talks to MLflow (and pays its import)

        tracker = RunLogger(**config["mlflow"])
    try:
        _train(trial, config, rank, world_size, device, cores, tracker)
    finally:
        if tracker:
            tracker.close()  # flushes, and stops the system-metrics sampler even when training failed


def _train(trial: TrialConfig, config: dict[str, Any], rank: int, world_size: int, device, cores: int,
           tracker) -> None:
    trainer = Trainer(trial, rank=rank, world_size=world_size, device=device, cores=cores,
                      wrap_model=ray.train.torch.prepare_model, log=tracker.log if tracker else None)
    checkpoint = ray.train.get_checkpoint()  # the latest reported one when Ray restarts or resumes this run
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(read_state(folder))
        log.info("rank %d resumes from step %d", rank, trainer.progress.step)
    if tracker:
        tracker.set_tag("train.precision_resolved", trainer.precision)

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        if tracker:
            tracker.flush()
        if rank != 0 or not with_checkpoint:  # DDP replicas are identical: rank 0's copy is the checkpoint
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(folder, trainer.module, trainer.state_dict())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{trainer.progress.step:08d}")

    trainer.fit(report)

    if tracker:
        metrics = {"perf/mfu": mfu(trainer, peak_flops(device, trainer.precision, cores))}
        if config.get("measure_throughput", True):
            # Inference throughput (paper Fig. 3 right): rank 0 only, after training, with this worker's cores.
            best, batch = inference_throughput(trainer.module, precision=trainer.precision, device=device)
            metrics.update({"perf/img_per_s_per_core": best / (cores if device.type == "cpu" else 1),
                            "perf/best_batch_size": batch})
        tracker.log(metrics, trial.train.steps)


def mfu(trainer: Trainer, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak (same dtype).

    Achieved = 3 x forward FLOPs x images per second of one worker, over the time inside training steps only.
    """
    per_worker_images = trainer.progress.step * trainer.trial.train.batch_size / trainer.world_size
    return trainer.flops_per_image * per_worker_images / max(trainer.progress.train_seconds, 1e-9) / peak
