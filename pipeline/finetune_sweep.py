"""A trial's fine-tuning stage: one ``TorchTrainer(workers.training.ray_entry.finetune_loop_per_worker)`` per
learning rate of ``finetune.lr``, each from the trial's best pre-training checkpoint, the learning rate with the best
top-1 on the held-out ``finetune.val`` kept (the test split reports, never selects).

Runs inside the trial driver (``pipeline.trial.run_trial``) after pre-training, on the trial's resources and nothing
more. Each learning rate is its own run ``<trial>-finetune-lr<lr>`` in the trial's storage, its checkpoints in
``step_<step>`` folders there, the latest kept:

* a 1-worker trial in a study fine-tunes in its Tune trial process, as it pre-trains (``pipeline.trial.in_process``):
  ``workers.training.ray_entry.finetune_in_process`` with :class:`RunFolderCheckpoints` as its engine. No worker
  group starts (each would cost a Ray Train controller and worker, seconds of start-up, per lr), and the trial
  process, which holds the trial's CPUs, asks Ray for nothing more;
* a DDP trial (and ``mixer-study train``) runs one ``TorchTrainer`` per lr on the pre-training's ``ScalingConfig``
  (its workers are free again by then).

Either way a retried or resumed trial continues each fine-tuning run from its latest checkpoint (Ray Train V2
resumes a run by name; the in-process engine reads the run's folder), and a run finished already only re-evaluates
its final checkpoint. Ray Train's own retry is off, as for pre-training: retries are Tune's one layer
(``pipeline.ray_policy``).

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

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.ray_policy import train_run_config, worker_scaling
from pipeline.tracking import checkpoint_uri
from workers.config import TrialConfig
from workers.data.manifest import join_url
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
from workers.training.ray_entry import Engine, finetune_in_process, finetune_loop_per_worker

log = logging.getLogger(__name__)

SUMMED = (COMPUTE_FINETUNE_FLOPS, COMPUTE_FINETUNE_CORE_SECONDS, COMPUTE_FINETUNE_SECONDS)
# Written into a checkpoint folder after its files: a folder without it (an upload cut short) is never resumed from.
COMPLETE = ".complete"


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
                 set_tag: Callable[[str, str], None], in_process: bool = False) -> dict[str, float]:
    """Fine-tune ``checkpoint`` once per ``finetune.lr`` and return the stage's metrics (module docstring).

    ``job``: the trial's job dict (``pipeline.trial.TrialJob`` fields: name, trial, storage, workers,
    cpus_per_worker, gpus_per_worker). ``mlflow``: the workers' logging config (tracking_uri, run_id,
    system_metrics, spool) of the trial's run; ``set_tag`` sets a tag of that run (``finetune.best_lr``,
    ``finetune.checkpoint``: the best run's final checkpoint, ``ray.finetune_run``). Returns {} when the trial has
    no ``finetune`` block. ``in_process``: fine-tune in this process (a 1-worker trial in its Tune trial process),
    else one ``TorchTrainer`` per lr.
    """
    trial = TrialConfig.model_validate(job["trial"])
    ft = trial.finetune
    if not ft.enabled:
        return {}
    scaling = worker_scaling(job["workers"], job["cpus_per_worker"], job.get("gpus_per_worker") or 0)
    results: dict[float, ray.train.Result | RunFolderCheckpoints] = {}
    for lr in ft.lr:
        config = {"trial": job["trial"], "pretrained": checkpoint, "lr": lr, "mlflow": mlflow,
                  "metric_suffix": f"_{lr_tag(lr)}", "cpus_per_worker": job["cpus_per_worker"],
                  "gpus_per_worker": job.get("gpus_per_worker") or 0}
        run_name = finetune_run_name(job["name"], lr)
        if in_process:
            result = RunFolderCheckpoints(join_url(job["storage"], run_name))
            finetune_in_process(config, result.engine())
        else:
            result = TorchTrainer(
                finetune_loop_per_worker, train_loop_config=config, scaling_config=scaling,
                # keep the latest checkpoint only: it resumes the run and is its result
                run_config=train_run_config(run_name, job["storage"], keep_checkpoints=1),
            ).fit()
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


@dataclass
class RunFolderCheckpoints:
    """The :class:`~workers.training.ray_entry.Engine` of an in-process fine-tuning run: its checkpoints in
    ``<run_url>/step_<step>`` (the folders a Ray Train run of that name keeps), each marked complete once its files
    are written, the latest one kept; the run's metrics are its last report's. ``run_url``: any fsspec URL."""

    run_url: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: ray.train.Checkpoint | None = None

    def __post_init__(self) -> None:
        self._fs, root = fsspec.core.url_to_fs(self.run_url)
        self._root = root.rstrip("/")

    @property
    def path(self) -> str:
        """The run's folder (as ``ray.train.Result.path``)."""
        return self.run_url

    def _complete(self) -> list[str]:
        return sorted(marker.rsplit("/", 1)[0] for marker in self._fs.glob(f"{self._root}/step_*/{COMPLETE}"))

    def _checkpoint(self, folder: str) -> ray.train.Checkpoint:
        """``folder`` (a path of the run's filesystem) as a Checkpoint named as the run's URL names it: a local path,
        or ``s3://...``."""
        return ray.train.Checkpoint(folder if "://" not in self.run_url else self._fs.unstrip_protocol(folder))

    def latest(self) -> ray.train.Checkpoint | None:
        """The run's latest complete checkpoint (None on a first start); its report's metrics become the run's."""
        folders = self._complete()
        if not folders:
            return None
        self.metrics = json.loads(self._fs.cat_file(f"{folders[-1]}/{COMPLETE}"))
        self.checkpoint = self._checkpoint(folders[-1])
        return self.checkpoint

    def report(self, metrics: dict[str, float], folder: str | None, step: int) -> None:
        """Keep ``metrics`` as the run's; with ``folder``, copy it to ``step_<step>`` on storage, mark it complete
        (the marker holds the metrics) and delete the run's older checkpoints."""
        self.metrics = metrics
        if folder is None:
            return
        target = f"{self._root}/step_{step:08d}"
        self._fs.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(folder)):
            self._fs.put_file(os.path.join(folder, name), f"{target}/{name}")
        self._fs.pipe_file(f"{target}/{COMPLETE}", json.dumps(metrics, default=float).encode())
        for older in self._complete()[:-1]:
            self._fs.rm(older, recursive=True)
        self.checkpoint = self._checkpoint(target)

    def engine(self) -> Engine:
        return Engine(wrap_model=lambda module: module, latest_checkpoint=self.latest, report=self.report,
                      checkpoint_at_step=self._no_lookup)

    @staticmethod
    def _no_lookup(step: int) -> ray.train.Checkpoint:
        raise NotImplementedError("a fine-tuning run keeps only its latest checkpoint; it looks up no other step")
