"""One worker's training of one trial, without Ray: set-up, ``train_step``, ``evaluate``, state and the step loop.

:class:`Trainer` is the torchtitan-style core; ``workers.training.ray_entry`` is the thin Ray Train shell around it (DDP
wrapping, ``ray.train.report``, checkpoint upload), and a test drives a Trainer in-process with ``world_size=1``.

The recipe is the paper's (README "Recipe"): Adam with big_vision's weight decay and schedule
(``workers.training.optim``), clipping at global norm ``grad_clip``, the ``sigmoid`` or ``softmax`` loss on one-hot (or
mixup-soft) targets, the ``data.augment`` pipeline, stochastic depth inside the model. A fixed number of steps;
every ``eval_every`` steps the upstream val split is evaluated, every ``checkpoint_every`` steps the state is
reported with a checkpoint. The step loop never synchronises with the host except at ``log_every`` boundaries.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import OptimConfig, TrialConfig, head_bias
from workers.data.augment import mixup
from workers.data.fractions import fraction_slices, subset_size
from workers.data.manifest import load_manifest
from workers.data.permute import permute_spec
from workers.data.reader import ShardDataset, make_loader
from workers.models.registry import build_model, train_flops_per_image
from workers.training.optim import build_optimizer, classification_loss, clip_by_global_norm, set_lr
from workers.training.precision import compile_model, resolve_compile, resolve_precision


@dataclasses.dataclass
class Progress:
    """What a resumed trial carries over from earlier segments (saved in every checkpoint)."""

    step: int = 0
    wall_seconds: float = 0.0     # trial wall time, all segments (training, evaluation, checkpointing)
    train_seconds: float = 0.0    # time inside training steps only: the denominator of throughput and MFU
    cpu_seconds: float = 0.0      # measured CPU time of every worker and its DataLoader processes, all segments
    best_val_acc: float = -1.0    # best val/acc among checkpointed steps (early stopping ranks checkpoints)
    best_step: int = 0
    skipped_samples: int = 0      # data.on_error: skip: samples dropped, all ranks and segments
    corrupt_shards: int = 0       # ... and shards whose checksum failed


def process_tree_cpu_seconds() -> float:
    """CPU seconds of this process, its live children (DataLoader workers) and its reaped children."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited between listing and reading: counted by RUSAGE_CHILDREN once reaped
            continue
        total += times.user + times.system
    return total


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def optimizer_update(model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
                     targets: Tensor, step: int, total_steps: int, optim: OptimConfig, loss: str,
                     autocast) -> tuple[Tensor, Tensor]:
    """The recipe's update number ``step`` (0-based): learning rate of the schedule, forward under ``autocast``,
    loss on (one-hot or soft) ``targets``, backward, exact global-norm clipping, AdamW step. ``model`` is what runs
    the forward (a DDP wrapper, a compiled module), ``module`` the parameters. Returns (loss, pre-clip gradient
    norm) as device tensors: no host synchronisation. Trials (``Trainer.train_step``) and the bench run this."""
    set_lr(optimizer, step, total_steps, optim)
    with autocast:
        logits, _ = model(images)
    value = classification_loss(logits, targets, loss)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    grad_norm = clip_by_global_norm(module.parameters(), optim.grad_clip)
    optimizer.step()
    return value.detach(), grad_norm.detach()


@torch.no_grad()
def evaluate_split(module: nn.Module, loader, device: torch.device, num_classes: int, loss: str,
                   autocast) -> tuple[float, float]:
    """(mean ``loss`` on one-hot targets, top-1) over a whole split, summed across ranks (each rank holds a disjoint
    part of it); the module is back in training mode afterwards."""
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast:
            logits, _ = module(images)
        targets = F.one_hot(labels, num_classes).float()
        totals[0] += classification_loss(logits, targets, loss) * labels.numel()
        totals[1] += (logits.argmax(-1) == labels).sum()
        totals[2] += labels.numel()
    module.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (timing boundaries only; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _infinite(loader) -> Iterator:
    while True:
        yield from loader


ReportFn = Callable[[dict[str, float], bool], None]  # (metrics, with_checkpoint)


class Trainer:
    """Model, optimiser and data of one trial on one worker.

    Args:
        trial: the validated recipe.
        rank, world_size: this worker's place in the DDP group (1 worker: 0, 1).
        device: where the model trains.
        cores: CPU cores this worker holds (torch threads on CPU; the core-seconds accounting).
        wrap_model: wraps the module for distributed training (Ray's ``prepare_model``); identity by default.
        log: called with (metrics, step) at ``log_every`` and evaluation steps (rank 0's MLflow logger).
    """

    def __init__(
        self,
        trial: TrialConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        cores: int = 1,
        wrap_model: Callable[[nn.Module], nn.Module] = lambda module: module,
        log: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        self.trial, self.rank, self.world_size = trial, rank, world_size
        self.device = device or torch.device("cpu")
        self.cores = max(1, cores)
        self.log = log
        tr = trial.train
        if tr.batch_size % world_size:
            raise ValueError(f"train.batch_size {tr.batch_size} is not divisible by the {world_size} workers")
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
        self.model = wrap_model(self.module)
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

    # -- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": dataclasses.asdict(self.progress)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])

    # -- data ----------------------------------------------------------------------------------------------------

    def _seed(self, *parts: int) -> int:
        seed = self.trial.train.seed
        for part in parts:
            seed = seed * 1_000_003 + part
        return seed % 2**63

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
        per_rank = self.trial.train.batch_size // self.world_size
        return _infinite(make_loader(dataset, per_rank, data.loader_workers, pin_memory=self.device.type == "cuda"))

    def val_loader(self):
        data = self.trial.data
        dataset = ShardDataset(
            fraction_slices(self.val_manifest, 1.0), train=False, rank=self.rank, world_size=self.world_size,
            augment=data.augment, image_size=self.image_size, permute=permute_spec(data), on_error=data.on_error,
            verify_checksums=data.verify_checksums, cache_mb=data.cache_mb,
        )
        self.datasets.append(dataset)
        return make_loader(dataset, self.trial.train.batch_size // self.world_size, data.loader_workers)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- steps ---------------------------------------------------------------------------------------------------

    def train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One optimiser update on this rank's batch; returns (loss, pre-clip gradient norm) as device tensors
        (no host synchronisation)."""
        step, trial = self.progress.step, self.trial
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = F.one_hot(labels, self.num_classes).float()
        if trial.data.augment.mixup:
            # One mixing coefficient per step, the same on every rank (big_vision draws it from the replicated rng).
            generator = torch.Generator().manual_seed(self._seed(step, 7))
            images, targets = mixup(images, targets, trial.data.augment.mixup, generator)
        result = optimizer_update(self.model, self.module, self.optimizer, images, targets, step, trial.train.steps,
                                  trial.optim, trial.train.loss, self._autocast())
        self.progress.step += 1
        return result

    def evaluate(self, loader) -> tuple[float, float]:
        """Mean loss (the training loss, on one-hot targets) and top-1 over the whole val split."""
        return evaluate_split(self.module, loader, self.device, self.num_classes, self.trial.train.loss,
                              self._autocast())

    def _sync(self) -> None:
        sync_device(self.device)

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self, report: ReportFn) -> None:
        """Train from ``progress.step`` to ``train.steps``; ``report(metrics, with_checkpoint)`` at every evaluation
        (all ranks call it: Ray's report is a barrier)."""
        tr, progress = self.trial.train, self.progress
        if self.device.type == "cpu":
            torch.set_num_threads(self.cores)
        # Stochastic depth and dropout draw from the global generator: distinct per rank, fixed per resume point.
        torch.manual_seed(self._seed(progress.step, self.rank, 13))
        self.datasets = []  # this segment's ShardDatasets, whose problem counts the reports sum (data.on_error)
        self._problems_before = (progress.skipped_samples, progress.corrupt_shards)
        batches, val_loader = self.train_batches(), self.val_loader()
        segment_start, segment_cpu = time.perf_counter(), process_tree_cpu_seconds()
        self.first_step_unix = None  # wall-clock marks of this segment, for the per-trial overhead (time/*)
        wall_before, cpu_before = progress.wall_seconds, progress.cpu_seconds
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_time, grad_norm = 0, 0.0, torch.zeros(())
        self.module.train()
        while progress.step < tr.steps:
            started = time.perf_counter()
            if self.first_step_unix is None:
                self.first_step_unix = time.time()
            images, labels = next(batches)
            loss, grad_norm = self.train_step(images, labels)
            window_loss += loss
            window_steps += 1
            step = progress.step
            at_log = step % tr.log_every == 0 or step == tr.steps
            at_eval = step % tr.eval_every == 0 or step == tr.steps
            if at_log or at_eval:
                self._sync()
            window_time += time.perf_counter() - started
            if at_log and self.log:
                self.log({"train/loss": window_loss.item() / window_steps,
                          "train/lr": self.optimizer.param_groups[0]["lr"], "train/grad_norm": float(grad_norm),
                          "perf/train_img_per_s": window_steps * tr.batch_size / window_time}, step)
            if at_log:
                progress.train_seconds += window_time
                window_loss.zero_()
                window_steps, window_time = 0, 0.0
            if not at_eval:
                continue
            progress.train_seconds += window_time
            window_time = 0.0
            self._evaluate_and_report(report, val_loader, segment_start, segment_cpu, wall_before, cpu_before)

    def _evaluate_and_report(self, report: ReportFn, val_loader, segment_start: float, segment_cpu: float,
                             wall_before: float, cpu_before: float) -> None:
        tr, progress = self.trial.train, self.progress
        step = progress.step
        val_loss, val_acc = self.evaluate(val_loader)
        checkpoint = step % tr.checkpoint_every == 0 or step == tr.steps
        # Ray's report is a barrier anyway, so summing the CPU time over ranks here costs no extra wait.
        problems = [sum(d.problem_counts()[i] for d in self.datasets) for i in (0, 1)]
        segment_cpu_all, *problems = _sum_over_ranks([process_tree_cpu_seconds() - segment_cpu, *problems],
                                                      self.device)
        progress.wall_seconds = wall_before + time.perf_counter() - segment_start
        progress.cpu_seconds = cpu_before + segment_cpu_all
        progress.skipped_samples, progress.corrupt_shards = (b + int(n) for b, n in zip(self._problems_before,
                                                                                         problems))
        images_seen = step * tr.batch_size
        metrics: dict[str, float] = {"step": step, "val/loss": val_loss, "val/acc": val_acc,
                                     "images_seen": images_seen, "epochs": images_seen / self.train_images,
                                     "compute/wall_seconds": progress.wall_seconds}
        if self.trial.data.on_error == "skip":
            metrics.update({"data/skipped_samples": progress.skipped_samples,
                            "data/corrupt_shards": progress.corrupt_shards})
        # >=: the latest of equal checkpoints wins, as Ray Train keeps it (its retention evicts the earlier of ties),
        # so the best step here is always a checkpoint that still exists (pipeline.trial.best_checkpoint agrees).
        if checkpoint and val_acc >= progress.best_val_acc:
            progress.best_val_acc, progress.best_step = val_acc, step
            if self.rank == 0:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        if step == tr.steps:
            metrics.update(self.compute_metrics())
            # The last segment's worker start (this rank's process: when the trial got its cores), and the start
            # and end of its step loop: worker start -> first step and train end -> trial end are the per-trial
            # overhead that `analysis.timeline` reports; trial start -> worker start is time queued for cores.
            metrics.update({"time/worker_start_unix": psutil.Process().create_time(),
                            "time/first_step_unix": self.first_step_unix or time.time(),
                            "time/train_end_unix": time.time()})
        if self.log:
            self.log({k: v for k, v in metrics.items() if k != "step"}, step)
        report(metrics, checkpoint)

    def compute_metrics(self) -> dict[str, float]:
        """Compute accounting of the whole trial (all resumed segments together)."""
        progress, tr = self.progress, self.trial.train
        images_seen = progress.step * tr.batch_size
        allocated = self.world_size * (self.cores if self.device.type == "cpu" else 1)
        train_seconds = max(progress.train_seconds, 1e-9)
        return {
            "compute/train_flops": float(self.flops_per_image) * images_seen,
            "compute/core_seconds": progress.wall_seconds * allocated,  # allocated cores (or GPUs) x wall
            "compute/cpu_seconds": progress.cpu_seconds,  # measured: workers + their DataLoader processes
            "compute/train_seconds": progress.train_seconds,
            "compute/images_seen": images_seen,
            "compute/epochs": images_seen / self.train_images,
            "compute/train_images": self.train_images,
            "perf/train_img_per_s_per_core": images_seen / train_seconds / allocated,
            "best/val_acc": progress.best_val_acc,
            "best/step": progress.best_step,
        }
