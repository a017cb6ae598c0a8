"""One worker's pre-training of one trial, without Ray: model, optimiser, data, the update rule and the reports.

:class:`Trainer` is the torchtitan-style core (its step loop, state and accounting are
:class:`workers.training.loop.StepLoop`'s, shared with fine-tuning); ``workers.training.ray_entry`` is the thin Ray
Train shell around it (DDP wrapping, ``ray.train.report``, checkpoint upload), and a test drives a Trainer in-process
with ``world_size=1``.

The recipe is the paper's (README "Recipe"): Adam with big_vision's weight decay and schedule
(``workers.training.optim``), clipping at global norm ``grad_clip``, the ``sigmoid`` or ``softmax`` loss on one-hot (or
mixup-soft) targets, the ``data.augment`` pipeline, stochastic depth inside the model. A fixed number of steps;
every ``eval_every`` steps the upstream val split is evaluated, every ``checkpoint_every`` steps the state is
reported with a checkpoint. The step loop never synchronises with the host except at ``log_every`` boundaries.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Unpack

import psutil
import torch
from torch import Tensor, nn

from workers.config import OptimConfig, TrialConfig, head_bias
from workers.data.augment import mixup
from workers.data.fractions import fraction_slices, subset_size
from workers.data.manifest import load_manifest
from workers.data.permute import permute_spec
from workers.data.reader import ShardDataset, make_loader
from workers.models.registry import build_model, train_flops_per_image
from workers.names import (
    BEST_STEP,
    BEST_VAL_ACC,
    COMPUTE_CORE_SECONDS,
    COMPUTE_CPU_SECONDS,
    COMPUTE_EPOCHS,
    COMPUTE_IMAGES_SEEN,
    COMPUTE_TRAIN_FLOPS,
    COMPUTE_TRAIN_IMAGES,
    COMPUTE_TRAIN_SECONDS,
    COMPUTE_WALL_SECONDS,
    DATA_CORRUPT_SHARDS,
    DATA_SKIPPED_SAMPLES,
    EPOCHS,
    IMAGES_SEEN,
    PERF_TRAIN_IMG_PER_S,
    PERF_TRAIN_IMG_PER_S_PER_CORE,
    TIME_FIRST_STEP_UNIX,
    TIME_TRAIN_END_UNIX,
    TIME_WORKER_START_UNIX,
    TRAIN_GRAD_NORM,
    TRAIN_LOSS,
    TRAIN_LR,
    VAL_ACC,
    VAL_LOSS,
)
from workers.training.loop import LoopProgress, StepLogNames, StepLoop, WorkerArgs, gradient_update, infinite
from workers.training.optim import build_optimizer, set_lr
from workers.training.precision import compile_model, resolve_compile, resolve_precision


@dataclasses.dataclass
class Progress(LoopProgress):
    """What a resumed trial carries over from earlier segments (saved in every checkpoint)."""

    best_val_acc: float = -1.0    # best val/acc among checkpointed steps (early stopping ranks checkpoints)
    best_step: int = 0
    skipped_samples: int = 0      # data.on_error: skip: samples dropped, all ranks and segments
    corrupt_shards: int = 0       # ... and shards whose checksum failed


def optimizer_update(model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
                     targets: Tensor, step: int, total_steps: int, optim: OptimConfig, loss: str,
                     autocast) -> tuple[Tensor, Tensor]:
    """The recipe's update number ``step`` (0-based): learning rate of the schedule, then
    :func:`workers.training.loop.gradient_update` (forward under ``autocast``, loss on one-hot or soft ``targets``,
    backward, global-norm clipping, AdamW step). Returns (loss, pre-clip gradient norm) as device tensors: no host
    synchronisation. Trials (``Trainer.train_step``) and the bench run this."""
    set_lr(optimizer, step, total_steps, optim)
    return gradient_update(model, module, optimizer, images, targets, loss, optim.grad_clip, autocast)


class Trainer(StepLoop):
    """Model, optimiser and data of one trial on one worker; the step loop is :class:`workers.training.loop.StepLoop`'s.

    Reports at every ``eval_every`` step (val loss and top-1 of the whole val split), with a checkpoint at every
    ``checkpoint_every`` step; the last report also carries the compute accounting and the segment's time marks.

    Args:
        trial: the validated recipe.
        worker: rank, world_size, device, cores, wrap_model, log (:class:`workers.training.loop.WorkerArgs`).
    """

    step_log_names = StepLogNames(loss=TRAIN_LOSS, lr=TRAIN_LR, grad_norm=TRAIN_GRAD_NORM,
                                  img_per_s=PERF_TRAIN_IMG_PER_S)

    def __init__(self, trial: TrialConfig, **worker: Unpack[WorkerArgs]) -> None:
        super().__init__(trial, **worker)
        tr = trial.train
        if tr.batch_size % self.world_size:
            raise ValueError(f"train.batch_size {tr.batch_size} is not divisible by the {self.world_size} workers")
        self.total_steps, self.batch_size, self.loss_name = tr.steps, tr.batch_size, tr.loss
        self.train_manifest = load_manifest(trial.data.train)
        self.val_manifest = load_manifest(trial.data.val)
        self.image_size = trial.data.image_size or self.train_manifest.image_size
        if not self.image_size:
            raise ValueError(f"data.image_size is required: {self.train_manifest.url} has no fixed image_size")
        self.num_classes = self.train_manifest.num_classes
        self.train_images = subset_size(self.train_manifest, trial.data.fraction)

        # The seed fixes the initial weights (identical on every rank, as DDP requires) and, below, the data order.
        torch.manual_seed(tr.seed)
        self.module = build_model(  # any family of workers.models.registry (Mixer, ViT, BiT)
            trial.model.variant, image_size=self.image_size, num_classes=self.num_classes,
            stoch_depth=trial.model.stoch_depth, dropout=trial.model.dropout,
            head_bias_init=head_bias(trial.model, tr.loss, self.num_classes),
        ).to(self.device)
        self.model = self.wrap_model(self.module)
        self.compiled = resolve_compile(tr.compile, self.device)
        if self.compiled:  # the training forward and backward; evaluation runs the module eagerly
            self.model = compile_model(self.model)
        self.optimizer = build_optimizer(self.module, trial.optim)
        self.precision = resolve_precision(tr.precision, self.device)
        self.flops_per_image = train_flops_per_image(self.module.variant, self.image_size, self.num_classes)
        self.progress = Progress()
        # Rank 0: a CPU copy of the best checkpointed weights of this segment, for the evaluation after training
        # (workers.training.ray_entry.best_model reads earlier segments' best from storage instead).
        self.best_state: dict[str, Tensor] | None = None
        self.datasets: list[ShardDataset] = []  # of the running segment (fit), for data.on_error counts

    # -- data ----------------------------------------------------------------------------------------------------

    def train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless training stream of this rank. A resumed segment gets a new seed (seed, start step), so it
        does not replay the first segment's order."""
        data = self.trial.data
        dataset = ShardDataset(
            fraction_slices(self.train_manifest, data.fraction), train=True, rank=self.rank,
            world_size=self.world_size, seed=self._seed(self.progress.step), repeat=True,
            shuffle_buffer=data.shuffle_buffer, augment=data.augment, image_size=self.image_size,
            permute=permute_spec(data), on_error=data.on_error, verify_checksums=data.verify_checksums,
            cache_mb=data.cache_mb,
        )
        self.datasets.append(dataset)
        per_rank = self.batch_size // self.world_size
        return infinite(make_loader(dataset, per_rank, data.loader_workers, pin_memory=self.device.type == "cuda"))

    def val_loader(self):
        data = self.trial.data
        dataset = ShardDataset(
            fraction_slices(self.val_manifest, 1.0), train=False, rank=self.rank, world_size=self.world_size,
            augment=data.augment, image_size=self.image_size, permute=permute_spec(data), on_error=data.on_error,
            verify_checksums=data.verify_checksums, cache_mb=data.cache_mb,
        )
        self.datasets.append(dataset)
        return make_loader(dataset, self.batch_size // self.world_size, data.loader_workers)

    # -- the update and the reports ------------------------------------------------------------------------------

    def _update(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        step, trial = self.progress.step, self.trial
        if trial.data.augment.mixup:
            # One mixing coefficient per step, the same on every rank (big_vision draws it from the replicated rng).
            generator = torch.Generator().manual_seed(self._seed(step, 7))
            images, targets = mixup(images, targets, trial.data.augment.mixup, generator)
        return optimizer_update(self.model, self.module, self.optimizer, images, targets, step, self.total_steps,
                                trial.optim, self.loss_name, self._autocast())

    def _is_report_step(self, step: int) -> bool:
        return step % self.trial.train.eval_every == 0

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.trial.train.checkpoint_every == 0

    def _start_segment(self) -> None:
        self.datasets = []  # this segment's ShardDatasets, whose problem counts the reports sum (data.on_error)
        self._problems_before = (self.progress.skipped_samples, self.progress.corrupt_shards)
        self._val_loader = self.val_loader()

    def _report_metrics(self, loss_sum: Tensor, loss_steps: int, with_checkpoint: bool) -> dict[str, float]:
        val_loss, val_acc = self.evaluate(self._val_loader)
        images_seen = self.progress.step * self.batch_size
        return {VAL_LOSS: val_loss, VAL_ACC: val_acc, IMAGES_SEEN: images_seen,
                EPOCHS: images_seen / self.train_images}

    def _rank_counts(self) -> list[float]:
        return [sum(d.problem_counts()[i] for d in self.datasets) for i in (0, 1)]  # skipped samples, bad shards

    def _accounted_metrics(self, measured: dict[str, float], rank_sums: list[float],
                           with_checkpoint: bool) -> dict[str, float]:
        progress = self.progress
        progress.skipped_samples, progress.corrupt_shards = (b + int(n) for b, n in zip(self._problems_before,
                                                                                         rank_sums))
        metrics = {COMPUTE_WALL_SECONDS: progress.wall_seconds}
        if self.trial.data.on_error == "skip":
            metrics.update({DATA_SKIPPED_SAMPLES: progress.skipped_samples,
                            DATA_CORRUPT_SHARDS: progress.corrupt_shards})
        # >=: the latest of equal checkpoints wins, as Ray Train keeps it (its retention evicts the earlier of ties),
        # so the best step here is always a checkpoint that still exists (pipeline.trial.best_checkpoint agrees).
        if with_checkpoint and measured[VAL_ACC] >= progress.best_val_acc:
            progress.best_val_acc, progress.best_step = measured[VAL_ACC], progress.step
            if self.rank == 0:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        if progress.step == self.total_steps:
            metrics.update(self.compute_metrics())
            # The last segment's worker start (this rank's process: when the trial got its cores), and the start
            # and end of its step loop: worker start -> first step and train end -> trial end are the per-trial
            # overhead that `analysis.timeline` reports; trial start -> worker start is time queued for cores.
            metrics.update({TIME_WORKER_START_UNIX: psutil.Process().create_time(),
                            TIME_FIRST_STEP_UNIX: self.first_step_unix or time.time(),
                            TIME_TRAIN_END_UNIX: time.time()})
        return metrics

    def compute_metrics(self) -> dict[str, float]:
        """Compute accounting of the whole trial (all resumed segments together)."""
        progress = self.progress
        images_seen = progress.step * self.batch_size
        allocated = self.allocated_cores
        train_seconds = max(progress.train_seconds, 1e-9)
        return {
            COMPUTE_TRAIN_FLOPS: float(self.flops_per_image) * images_seen,
            COMPUTE_CORE_SECONDS: progress.wall_seconds * allocated,  # allocated cores (or GPUs) x wall
            COMPUTE_CPU_SECONDS: progress.cpu_seconds,  # measured: workers + their DataLoader processes
            COMPUTE_TRAIN_SECONDS: progress.train_seconds,
            COMPUTE_IMAGES_SEEN: images_seen,
            COMPUTE_EPOCHS: images_seen / self.train_images,
            COMPUTE_TRAIN_IMAGES: self.train_images,
            PERF_TRAIN_IMG_PER_S_PER_CORE: images_seen / train_seconds / allocated,
            BEST_VAL_ACC: progress.best_val_acc,
            BEST_STEP: progress.best_step,
        }
