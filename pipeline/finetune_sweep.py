"""A trial's fine-tuning stage: one ``TorchTrainer(workers.training.ray_entry.finetune_loop_per_worker)`` per
learning rate of ``finetune.lr``, each from the trial's best pre-training checkpoint, the learning rate with the best
top-1 on the held-out ``finetune.val`` kept (the test split reports, never selects).

Runs inside the trial driver (``pipeline.trial.run_trial``) after pre-training, on the same ``ScalingConfig`` (the
workers the pre-training run held are free again by then), so it uses the trial's resources and nothing more.
Each learning rate is its own Ray Train run ``<trial>-finetune-lr<lr>`` in the trial's storage: Ray Train V2
resumes a run by name, so a retried or resumed trial continues each fine-tuning run from its latest checkpoint
(one finished already only re-evaluates its final checkpoint). Ray Train's own retry is off, as for pre-training:
retries are Tune's one layer (``pipeline.ray_policy``).

Metrics (returned; the caller logs them to the trial's MLflow run):

* ``finetune/best_lr``: the learning rate with the best top-1 on the held-out ``finetune.val`` (:func:`select_lr`),
  and its ``finetune/val_top1`` and ``finetune/top1`` (the downstream test split, which only reports); each run's
  own ``finetune/top1_lr<lr>`` and ``finetune/val_top1_lr<lr>`` (``<lr>`` formatted with ``:g``) are logged by its
  rank 0, not again here;
* ``finetune/image_size``: the fine-tuning resolution; when ``finetune.image_size`` is set, ``finetune/top1`` is
  also logged as ``finetune/top1_<N>px`` (e.g. ``finetune/top1_384px``): the unsuffixed name stays the one the
  analysis reads, and the named copy keeps runs at different resolutions apart in the MLflow UI;
* ``compute/finetune_flops`` (3 x forward FLOPs at the fine-tuning resolution x images, summed over the sweep:
  the compute the stage cost, kept apart from ``compute/train_flops``), ``compute/finetune_core_seconds`` and
  ``compute/finetune_seconds``, summed likewise.

Training curves are logged by rank 0 of each run with the suffix ``_lr<lr>`` (``finetune/train_loss_lr0.01``),
so the runs of a sweep do not overwrite each other's points in the trial's single MLflow run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from pipeline.ray_policy import train_run_config, worker_scaling
from pipeline.tracking import checkpoint_uri
from workers.config import TrialConfig
from workers.names import (
    COMPUTE_FINETUNE_CORE_SECONDS,
    COMPUTE_FINETUNE_FLOPS,
    COMPUTE_FINETUNE_SECONDS,
    FINETUNE_BEST_LR,
    FINETUNE_BEST_LR_TAG,
    FINETUNE_CHECKPOINT_TAG,
    FINETUNE_IMAGE_SIZE,
    FINETUNE_RUN_TAG,
    FINETUNE_TOP1,
    FINETUNE_VAL_TOP1,
    finetune_top1_at,
)
from workers.training.ray_entry import finetune_loop_per_worker

log = logging.getLogger(__name__)

SUMMED = (COMPUTE_FINETUNE_FLOPS, COMPUTE_FINETUNE_CORE_SECONDS, COMPUTE_FINETUNE_SECONDS)


def lr_tag(lr: float) -> str:
    """``lr0.003``: how a learning rate appears in run and metric names."""
    return f"lr{lr:g}"


def finetune_run_name(trial_name: str, lr: float) -> str:
    """The Ray Train run name of one fine-tuning run (deterministic, so a restarted trial resumes it)."""
    return f"{trial_name}-finetune-{lr_tag(lr)}"


def select_lr(metrics: dict[float, dict[str, Any]], order: tuple[float, ...]) -> float:
    """The learning rate a sweep keeps: the best ``finetune/val_top1`` (the held-out ``finetune.val``), the first in
    ``order`` (``finetune.lr``) on a tie. The test split never selects: a sweep without ``finetune.val`` is refused
    by ``FinetuneConfig``, so a run without ``finetune/val_top1`` can only be a single learning rate."""
    if len(metrics) == 1:
        return next(iter(metrics))
    missing = [f"{lr:g}" for lr, m in metrics.items() if FINETUNE_VAL_TOP1 not in m]
    if missing:
        raise RuntimeError(f"fine-tuning runs at lr {', '.join(missing)} reported no finetune/val_top1 to select by")
    return max(metrics, key=lambda lr: (metrics[lr][FINETUNE_VAL_TOP1], -order.index(lr)))


def run_finetune(job: dict[str, Any], checkpoint: ray.train.Checkpoint, mlflow: dict[str, Any],
                 set_tag: Callable[[str, str], None]) -> dict[str, float]:
    """Fine-tune ``checkpoint`` once per ``finetune.lr`` and return the stage's metrics (module docstring).

    ``job``: the trial's job dict (``pipeline.trial.TrialJob`` fields: name, trial, storage, workers,
    cpus_per_worker, gpus_per_worker). ``mlflow``: the workers' logging config (tracking_uri, run_id,
    system_metrics, spool) of the trial's run; ``set_tag`` sets a tag of that run (``finetune.best_lr``,
    ``finetune.checkpoint``: the best run's final checkpoint, ``ray.finetune_run``). Returns {} when the trial has
    no ``finetune`` block.
    """
    trial = TrialConfig.model_validate(job["trial"])
    ft = trial.finetune
    if not ft.enabled:
        return {}
    scaling = worker_scaling(job["workers"], job["cpus_per_worker"], job.get("gpus_per_worker") or 0)
    results: dict[float, ray.train.Result] = {}
    for lr in ft.lr:
        trainer = TorchTrainer(
            finetune_loop_per_worker,
            train_loop_config={"trial": job["trial"], "pretrained": checkpoint, "lr": lr, "mlflow": mlflow,
                               "metric_suffix": f"_{lr_tag(lr)}", "cpus_per_worker": job["cpus_per_worker"]},
            scaling_config=scaling,
            # keep the latest checkpoint only: it resumes the run and is its result
            run_config=train_run_config(finetune_run_name(job["name"], lr), job["storage"], keep_checkpoints=1),
        )
        result = trainer.fit()
        if FINETUNE_TOP1 not in (result.metrics or {}):
            raise RuntimeError(f"fine-tuning run {result.path} (lr {lr:g}) reported no finetune/top1")
        log.info("%s: fine-tuned at lr %g: top-1 %.4f", job["name"], lr, result.metrics[FINETUNE_TOP1])
        results[lr] = result

    best_lr = select_lr({lr: r.metrics for lr, r in results.items()}, ft.lr)
    best = results[best_lr]
    metrics: dict[str, float] = {
        FINETUNE_TOP1: best.metrics[FINETUNE_TOP1],
        FINETUNE_BEST_LR: best_lr,
        **({FINETUNE_VAL_TOP1: best.metrics[FINETUNE_VAL_TOP1]} if ft.val else {}),
        FINETUNE_IMAGE_SIZE: best.metrics[FINETUNE_IMAGE_SIZE],
        **{key: sum(float(r.metrics[key]) for r in results.values()) for key in SUMMED},
    }
    if ft.image_size:
        metrics[finetune_top1_at(ft.image_size)] = metrics[FINETUNE_TOP1]
    set_tag(FINETUNE_BEST_LR_TAG, f"{best_lr:g}")
    set_tag(FINETUNE_RUN_TAG, best.path)
    if best.checkpoint is not None:
        set_tag(FINETUNE_CHECKPOINT_TAG, checkpoint_uri(best.checkpoint))
    return metrics
