"""The one step loop of pre-training (:class:`workers.training.trainer.Trainer`) and fine-tuning
(:class:`workers.training.finetuner.FineTuner`), torchtitan style.

:class:`StepLoop` owns what the two share: the iteration, the host sync points (only at log and report boundaries),
the windowed loss logging, the time and CPU accounting across resumed segments, seeding, autocast, the gradient
update after the learning rate is set, evaluation of a whole split, and ``state_dict``/``load_state_dict``. A subclass
supplies what differs: model, optimiser and data (its constructor, ``train_batches``), the update rule
(``_update``), the report cadence (``_is_report_step``, ``_is_checkpoint_step``) and what a report carries
(``_report_metrics`` before the accounting, ``_accounted_metrics`` after it).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any, TypedDict, Unpack

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import TrialConfig
from workers.names import STEP
from workers.training.optim import classification_loss, clip_by_global_norm

ReportFn = Callable[[dict[str, float], bool], None]  # (metrics, with_checkpoint)
LogFn = Callable[[dict[str, float], int], None]  # (metrics, step)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module


class WorkerArgs(TypedDict, total=False):
    """Where a run trains, the same keywords for every :class:`StepLoop` (each optional; defaults: one worker on the
    CPU, one core, no DDP wrapping, no logging). See :class:`StepLoop`'s Args."""

    rank: int
    world_size: int
    device: torch.device | None
    cores: int
    wrap_model: Callable[[nn.Module], nn.Module]
    log: LogFn | None


@dataclasses.dataclass
class LoopProgress:
    """What a resumed run carries over from earlier segments (saved in every checkpoint)."""

    step: int = 0
    wall_seconds: float = 0.0     # wall time of all segments (training, evaluation, checkpointing)
    train_seconds: float = 0.0    # time inside training steps only: the denominator of throughput and MFU
    cpu_seconds: float = 0.0      # measured CPU time of every worker and its DataLoader processes, all segments


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


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over the DDP group (one all-reduce); themselves without a group."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (timing boundaries only; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infinite(loader) -> Iterator:
    """Pass after pass over ``loader``, endlessly."""
    while True:
        yield from loader


def gradient_update(model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
                    targets: Tensor, loss: str, grad_clip: float, autocast) -> tuple[Tensor, Tensor]:
    """One update at the learning rate already set: forward under ``autocast``, ``loss`` on (one-hot or soft)
    ``targets``, backward, exact global-norm clipping at ``grad_clip``, optimiser step. ``model`` is what runs the
    forward (a DDP wrapper, a compiled module), ``module`` the parameters. Returns (loss, pre-clip gradient norm) as
    device tensors: no host synchronisation."""
    with autocast:
        logits, _ = model(images)
    value = classification_loss(logits, targets, loss)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    grad_norm = clip_by_global_norm(module.parameters(), grad_clip)
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


@dataclasses.dataclass(frozen=True)
class StepLogNames:
    """The metric names of the ``log_every`` line: mean loss of the window, learning rate, last gradient norm,
    images per second of the window."""

    loss: str
    lr: str
    grad_norm: str
    img_per_s: str


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Marks of the running ``fit`` call: perf-counter and process-tree CPU at its start, and the wall and CPU
    seconds of the earlier segments."""

    start: float
    cpu_start: float
    wall_before: float
    cpu_before: float


class StepLoop:
    """Model, optimiser and data of one run on one worker, and the loop that trains them.

    A subclass builds in its constructor ``module`` (the parameters), ``model`` (what runs the training forward),
    ``optimizer``, ``precision`` ("bf16" or "fp32"), ``num_classes``, ``progress`` (a :class:`LoopProgress`),
    ``total_steps``, ``batch_size`` (global, over all ranks) and ``loss_name`` (the training and evaluation loss);
    and sets the class attributes ``step_log_names`` and, where it needs them, ``seed_stream`` (parts that keep its
    random streams apart from other subclasses' of the same seed), ``unlogged_report_keys`` and
    ``reports_when_resumed_done``.

    Args:
        trial: the validated recipe (``trial.train`` gives the seed and ``log_every``).
        rank, world_size: this worker's place in the DDP group (1 worker: 0, 1).
        device: where the model trains.
        cores: CPU cores this worker holds (torch threads on CPU; the core-seconds accounting).
        wrap_model: wraps the module for distributed training (Ray's ``prepare_model``); identity by default.
        log: called with (metrics, step) at ``log_every`` and report steps (rank 0's MLflow logger).
    """

    step_log_names: StepLogNames
    seed_stream: tuple[int, ...] = ()
    unlogged_report_keys: frozenset[str] = frozenset({STEP})  # reported to Ray, not logged to MLflow
    reports_when_resumed_done = False  # a segment resumed at total_steps reports its evaluation once more

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: str
    num_classes: int
    progress: LoopProgress
    total_steps: int
    batch_size: int
    loss_name: str

    def __init__(self, trial: TrialConfig, **worker: Unpack[WorkerArgs]) -> None:
        self.trial = trial
        self.rank, self.world_size = worker.get("rank", 0), worker.get("world_size", 1)
        self.device = worker.get("device") or torch.device("cpu")
        self.cores = max(1, worker.get("cores", 1))
        self.wrap_model = worker.get("wrap_model", _unwrapped)
        self.log = worker.get("log")
        self.first_step_unix: float | None = None  # wall-clock mark of the running segment's first step

    # -- what a subclass supplies -----------------------------------------------------------------------------------

    def train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless training stream of this rank from ``progress.step``."""
        raise NotImplementedError

    def _update(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The update rule at ``progress.step`` on device ``images`` and one-hot ``targets``: (loss, grad norm)."""
        raise NotImplementedError

    def _is_report_step(self, step: int) -> bool:
        """Whether ``fit`` reports after update ``step`` (1-based count; the last step always reports)."""
        raise NotImplementedError

    def _is_checkpoint_step(self, step: int) -> bool:
        """Whether the report after update ``step`` carries a checkpoint (the last step's always does)."""
        raise NotImplementedError

    def _start_segment(self) -> None:
        """Set up what a ``fit`` call needs besides the training stream (before its time is counted)."""

    def _report_metrics(self, loss_sum: Tensor, loss_steps: int, with_checkpoint: bool) -> dict[str, float]:
        """The report's metrics measured before the accounting (evaluations count as wall time); ``loss_sum`` is the
        training loss summed over the ``loss_steps`` updates since the last report."""
        raise NotImplementedError

    def _rank_counts(self) -> list[float]:
        """This rank's counts that the report sums over ranks, in the accounting's all-reduce."""
        return []

    def _accounted_metrics(self, measured: dict[str, float], rank_sums: list[float],
                           with_checkpoint: bool) -> dict[str, float]:
        """The report's metrics after the accounting: ``progress`` is up to date, ``measured`` holds the metrics of
        :meth:`_report_metrics`, ``rank_sums`` the :meth:`_rank_counts` summed over ranks."""
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": dataclasses.asdict(self.progress)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = type(self.progress)(**state["progress"])

    # -- shared parts ---------------------------------------------------------------------------------------------

    def _seed(self, *parts: int) -> int:
        """A seed of the trial's seed, this class's ``seed_stream`` and ``parts`` (e.g. start step, rank, purpose)."""
        seed = self.trial.train.seed
        for part in (*self.seed_stream, *parts):
            seed = seed * 1_000_003 + part
        return seed % 2**63

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def allocated_cores(self) -> int:
        """Cores (or GPUs) this run holds over all ranks: the core-seconds accounting's multiplier."""
        return self.world_size * (self.cores if self.device.type == "cpu" else 1)

    def train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One update on this rank's batch; returns (loss, pre-clip gradient norm) as device tensors (no host
        synchronisation)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        result = self._update(images, F.one_hot(labels, self.num_classes).float())
        self.progress.step += 1
        return result

    def evaluate(self, loader) -> tuple[float, float]:
        """(mean loss on one-hot targets, top-1) over the whole split, summed across ranks."""
        return evaluate_split(self.module, loader, self.device, self.num_classes, self.loss_name, self._autocast())

    # -- the loop -------------------------------------------------------------------------------------------------

    def fit(self, report: ReportFn) -> None:
        """Train from ``progress.step`` to ``total_steps``; ``report(metrics, with_checkpoint)`` at every report step
        (all ranks call it: Ray's report is a barrier). Between reports the host synchronises with the device only at
        ``log_every`` boundaries. A segment resumed from the last step reports once more without a checkpoint when
        ``reports_when_resumed_done``."""
        progress = self.progress
        if self.device.type == "cpu":
            torch.set_num_threads(self.cores)
        # Stochastic depth and dropout draw from the global generator: distinct per rank, fixed per resume point.
        torch.manual_seed(self._seed(progress.step, self.rank, 13))
        done = progress.step >= self.total_steps
        self._start_segment()
        batches = None if done else self.train_batches()
        self._segment = _Segment(time.perf_counter(), process_tree_cpu_seconds(), progress.wall_seconds,
                                 progress.cpu_seconds)
        self.first_step_unix = None
        if done:
            if self.reports_when_resumed_done:
                self._report(report, torch.zeros(()), 0, with_checkpoint=False)
            return
        log_every = self.trial.train.log_every
        report_loss, report_steps = torch.zeros((), device=self.device), 0
        log_loss, log_steps = torch.zeros((), device=self.device), 0
        window_time, log_time = 0.0, 0.0  # since the last host sync (-> train_seconds); since the last log
        self.module.train()
        while progress.step < self.total_steps:
            started = time.perf_counter()
            if self.first_step_unix is None:
                self.first_step_unix = time.time()
            images, labels = next(batches)
            loss, grad_norm = self.train_step(images, labels)
            report_loss += loss
            log_loss += loss
            report_steps += 1
            log_steps += 1
            step = progress.step
            last = step == self.total_steps
            at_log = step % log_every == 0 or last
            at_report = self._is_report_step(step) or last
            if at_log or at_report:
                sync_device(self.device)
            elapsed = time.perf_counter() - started
            window_time += elapsed
            log_time += elapsed
            if at_log:
                if self.log:
                    names = self.step_log_names
                    self.log({names.loss: log_loss.item() / log_steps,
                              names.lr: self.optimizer.param_groups[0]["lr"], names.grad_norm: float(grad_norm),
                              names.img_per_s: log_steps * self.batch_size / log_time}, step)
                log_loss.zero_()
                log_steps, log_time = 0, 0.0
            if at_log or at_report:
                progress.train_seconds += window_time
                window_time = 0.0
            if at_report:
                self._report(report, report_loss, report_steps, self._is_checkpoint_step(step) or last)
                report_loss.zero_()
                report_steps = 0

    def _report(self, report: ReportFn, loss_sum: Tensor, loss_steps: int, with_checkpoint: bool) -> None:
        progress, segment = self.progress, self._segment
        metrics: dict[str, float] = {STEP: progress.step,
                                     **self._report_metrics(loss_sum, loss_steps, with_checkpoint)}
        # Ray's report is a barrier anyway, so summing the CPU time over ranks here costs no extra wait.
        segment_cpu, *rank_sums = sum_over_ranks([process_tree_cpu_seconds() - segment.cpu_start,
                                                  *self._rank_counts()], self.device)
        progress.wall_seconds = segment.wall_before + time.perf_counter() - segment.start
        progress.cpu_seconds = segment.cpu_before + segment_cpu
        metrics.update(self._accounted_metrics(metrics, rank_sums, with_checkpoint))
        if self.log:
            self.log({k: v for k, v in metrics.items() if k not in self.unlogged_report_keys}, progress.step)
        report(metrics, with_checkpoint)
