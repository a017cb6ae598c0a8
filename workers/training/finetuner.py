"""Fine-tuning one pre-trained checkpoint at one learning rate on one worker, without Ray: the paper's §3 recipe.

:class:`FineTuner` is the fine-tuning counterpart of :class:`workers.training.trainer.Trainer`: both run the one step
loop of :class:`workers.training.loop.StepLoop` and supply only what differs (model, optimiser, update rule, report
cadence and contents, evaluation data); ``workers.training.ray_entry``'s ``finetune_loop_per_worker`` is its Ray Train
shell.

The recipe (paper §3 "Fine-tuning" and Supplementary C; ViT's setup, which the paper follows):

* the pre-trained weights, moved to ``finetune.image_size`` by ``workers.models.resolution.to_resolution`` (Mixer: K x
  the side, block-diagonal token mixing; ViT: resampled position embeddings; BiT: unchanged);
* a fresh head for the downstream classes with zero weight AND zero bias (vision_transformer
  ``checkpoint.load_pretrained`` takes the head from the zero-initialised new model);
* momentum SGD (``momentum`` 0.9), no weight decay, gradients clipped at global norm ``grad_clip`` (1) first:
  the optax chain ``clip_by_global_norm -> trace(momentum) -> scale(-lr * s(t))``, i.e. torch's SGD
  (``buf = mu * buf + g; theta -= lr_t * buf``, no dampening, not Nesterov) with ``lr_t`` set every step;
* ``s(t)`` = big_vision ``utils.create_learning_rate_schedule(decay_type="cosine", warmup_steps=w)`` with
  ``base=1``: ``0.5 * (1 + cos(pi * clip((t - w) / (T - w), 0, 1)))`` times ``min(1, t / w)`` (linear warm-up
  from 0: the first update has multiplier 0), ``t`` = updates already made (:func:`cosine_multiplier`);
* softmax cross-entropy on one-hot targets (``workers.training.optim.classification_loss(..., "softmax")``);
* top-1 of the final model on the whole downstream test split, through the evaluation view (resize + central
  crop, ``data.augment.eval_crop_fraction``), and on ``finetune.val`` when given: the held-out split that picks
  the learning rate of a sweep (``pipeline.finetune_sweep``), so the test split is never used to select.

Training view: the study's ``data.augment`` crop and flip (the study chose what suits its images: inception crop
for the paper studies, ``pad`` for digits) without RandAugment and mixup, which the paper's fine-tuning does not use
(Supplementary A.2: mixup during fine-tuning "did not lead to consistent improvements, so we dropped them").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Unpack

import torch
from torch import Tensor, nn

from workers.config import TrialConfig
from workers.data.fractions import fraction_slices
from workers.data.manifest import Manifest, load_manifest
from workers.data.permute import permute_spec
from workers.data.reader import ShardDataset, make_loader
from workers.models.registry import forward_flops
from workers.models.resolution import to_resolution
from workers.names import (
    COMPUTE_FINETUNE_CORE_SECONDS,
    COMPUTE_FINETUNE_CPU_SECONDS,
    COMPUTE_FINETUNE_FLOPS,
    COMPUTE_FINETUNE_IMAGES_SEEN,
    COMPUTE_FINETUNE_SECONDS,
    COMPUTE_FINETUNE_WALL_SECONDS,
    FINETUNE_GRAD_NORM,
    FINETUNE_IMAGE_SIZE,
    FINETUNE_LOSS,
    FINETUNE_LR,
    FINETUNE_TEST_LOSS,
    FINETUNE_TOP1,
    FINETUNE_TRAIN_LOSS,
    FINETUNE_VAL_LOSS,
    FINETUNE_VAL_TOP1,
    PERF_FINETUNE_IMG_PER_S,
    STEP,
)
from workers.training.checkpoint import load_model
from workers.training.loop import LoopProgress, StepLogNames, StepLoop, WorkerArgs, gradient_update, infinite
from workers.training.precision import resolve_precision

__all__ = ["FineTuner", "FinetuneProgress", "cosine_multiplier", "model_forward_flops", "reset_head"]


@dataclasses.dataclass
class FinetuneProgress(LoopProgress):
    """What a resumed fine-tuning run carries over from earlier segments (saved in every checkpoint): the loop's
    step, wall, train and CPU seconds, nothing more."""


def cosine_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """big_vision ``create_learning_rate_schedule(total_steps, base=1, decay_type="cosine", warmup_steps=w)``
    at update ``step`` (0-based): ``0.5 * (1 + cos(pi * progress)) * min(1, step / w)`` with
    ``progress = clip((step - w) / (total - w), 0, 1)``."""
    progress = min(1.0, max(0.0, (step - warmup_steps) / float(max(1, total_steps - warmup_steps))))
    multiplier = 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup_steps:
        multiplier *= min(1.0, step / warmup_steps)
    return multiplier


@torch.no_grad()
def reset_head(model: nn.Module, num_classes: int) -> None:
    """Replace ``model.head`` (a Linear) by a zero-weight, zero-bias Linear onto ``num_classes`` (in place)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no Linear `head` to replace for fine-tuning (got {head!r})")
    new = nn.Linear(head.in_features, num_classes, device=head.weight.device, dtype=head.weight.dtype)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    model.head = new
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def model_forward_flops(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs of one ``image_size`` image through ``model`` as it is (multiply-add = 2): the registry's
    analytic count of its variant (``workers.models.registry.forward_flops``, equal to torch's FLOP counter). A Mixer
    moved to a higher resolution carries a variant with the K²·D_S token-mixing width, so the count is that of the dense
    K²S x K²D_S matmuls it runs."""
    return forward_flops(model.variant, image_size, model.num_classes, getattr(model, "in_chans", 3))


class FineTuner(StepLoop):
    """Model, optimiser and data of one fine-tuning run (one learning rate) on one worker; the step loop is
    :class:`workers.training.loop.StepLoop`'s.

    Reports every ``max(finetune.steps // 4, 1)`` steps with a checkpoint and the mean training loss since the last
    report; the last one also carries ``finetune/top1`` (and ``finetune/val_top1``) and the compute accounting. A
    segment resumed from the final checkpoint only evaluates and reports (without a checkpoint).

    Args:
        pretrained: the pre-trained checkpoint folder (``workers.training.checkpoint``: model.json + state.pt); read
            here.
        trial: the trial's recipe: ``trial.finetune`` is the fine-tuning block (must be enabled); ``trial.data``
            gives the augmentation, shuffle buffer and loader processes, ``trial.train`` the seed, precision and
            ``log_every``.
        lr: the peak learning rate (one value of ``finetune.lr``).
        worker: rank, world_size, device, cores, wrap_model, log (:class:`workers.training.loop.WorkerArgs`).
    """

    step_log_names = StepLogNames(loss=FINETUNE_TRAIN_LOSS, lr=FINETUNE_LR, grad_norm=FINETUNE_GRAD_NORM,
                                  img_per_s=PERF_FINETUNE_IMG_PER_S)
    seed_stream = (17,)  # distinct from the pre-training streams of the same seed
    unlogged_report_keys = frozenset({STEP, FINETUNE_LR})  # the lr is logged at log_every steps
    reports_when_resumed_done = True

    def __init__(
        self,
        pretrained: str | Path,
        trial: TrialConfig,
        lr: float,
        **worker: Unpack[WorkerArgs],
    ) -> None:
        super().__init__(trial, **worker)
        ft = trial.finetune
        if not ft.enabled:
            raise ValueError("trial.finetune is not enabled: give finetune.train and finetune.test")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if ft.batch_size % self.world_size:
            raise ValueError(f"finetune.batch_size {ft.batch_size} is not divisible by the {self.world_size} workers")
        self.finetune, self.lr = ft, float(lr)
        self.total_steps, self.batch_size, self.loss_name = ft.steps, ft.batch_size, "softmax"
        self.train_manifest = load_manifest(ft.train)
        self.test_manifest = load_manifest(ft.test)
        # picks the lr of a sweep (pipeline.finetune_sweep)
        self.val_manifest = load_manifest(ft.val) if ft.val else None
        self.num_classes = self.train_manifest.num_classes
        for name, manifest in (("test", self.test_manifest), ("val", self.val_manifest)):
            if manifest is not None and manifest.num_classes != self.num_classes:
                raise ValueError(f"finetune.{name} has {manifest.num_classes} classes, finetune.train"
                                 f" {self.num_classes}: they must be splits of one downstream data set")

        pretrained_model = load_model(pretrained)
        self.pretrained_image_size = int(pretrained_model.image_size)
        self.image_size = ft.image_size or self.pretrained_image_size
        # The fixed pixel permutation of the Fig. 4 study (data.permute) is defined per resolution: fine-tune a
        # permuted model on the same permutation, which only exists at the pre-training resolution.
        self.permute = permute_spec(trial.data)
        if self.permute and self.image_size != self.pretrained_image_size:
            raise ValueError(f"data.permute: {trial.data.permute} fixes a permutation of {self.pretrained_image_size}"
                             f" px images; fine-tuning at finetune.image_size {self.image_size} has none")
        self.module = to_resolution(pretrained_model, self.image_size)
        reset_head(self.module, self.num_classes)
        self.module.to(self.device).train()
        self.model = self.wrap_model(self.module)
        # No weight decay (paper §3); the learning rate is set before every step (set_lr).
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=self.lr, momentum=ft.momentum,
                                         weight_decay=0.0, foreach=True)
        self.precision = resolve_precision(trial.train.precision, self.device)
        self.augment = trial.data.augment.model_copy(update={"randaug": None, "mixup": 0.0})
        self.forward_flops_per_image = model_forward_flops(self.module, self.image_size)
        self.checkpoint_every = max(ft.steps // 4, 1)
        self.progress = FinetuneProgress()

    # -- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lr": self.lr, "image_size": self.image_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("lr") != self.lr or state.get("image_size") != self.image_size:
            raise ValueError(f"checkpoint of fine-tuning at lr {state.get('lr')}, {state.get('image_size')} px;"
                             f" this run is lr {self.lr}, {self.image_size} px")
        super().load_state_dict(state)

    # -- data ----------------------------------------------------------------------------------------------------

    def train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless stream of this rank over the whole ``finetune.train`` split; a resumed segment gets a new
        seed (seed, start step), as :meth:`workers.training.trainer.Trainer.train_batches`."""
        data = self.trial.data
        dataset = ShardDataset(
            fraction_slices(self.train_manifest, 1.0), train=True, rank=self.rank, world_size=self.world_size,
            seed=self._seed(self.progress.step), repeat=True, shuffle_buffer=data.shuffle_buffer,
            augment=self.augment, image_size=self.image_size, permute=self.permute, cache_mb=data.cache_mb,
        )
        per_rank = self.batch_size // self.world_size
        return infinite(make_loader(dataset, per_rank, data.loader_workers, pin_memory=self.device.type == "cuda"))

    def eval_loader(self, manifest: Manifest):
        """A whole downstream split (``finetune.test`` or ``finetune.val``) through the evaluation view, a disjoint
        part per rank."""
        dataset = ShardDataset(
            fraction_slices(manifest, 1.0), train=False, rank=self.rank, world_size=self.world_size,
            augment=self.augment, image_size=self.image_size, permute=self.permute,
        )
        return make_loader(dataset, self.batch_size // self.world_size, self.trial.data.loader_workers)

    # -- the update and the reports ------------------------------------------------------------------------------

    def set_lr(self, step: int) -> float:
        """Set the learning rate of update number ``step``: ``lr * cosine_multiplier(step)``; returns it."""
        lr = self.lr * cosine_multiplier(step, self.finetune.steps, self.finetune.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _update(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Momentum SGD at the cosine schedule's learning rate, softmax cross-entropy."""
        self.set_lr(self.progress.step)
        return gradient_update(self.model, self.module, self.optimizer, images, targets, self.loss_name,
                               self.finetune.grad_clip, self._autocast())

    def _is_report_step(self, step: int) -> bool:
        return step % self.checkpoint_every == 0

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.checkpoint_every == 0

    def _report_metrics(self, loss_sum: Tensor, loss_steps: int, with_checkpoint: bool) -> dict[str, float]:
        metrics: dict[str, float] = {FINETUNE_LR: self.optimizer.param_groups[0]["lr"]}
        if loss_steps:
            metrics[FINETUNE_LOSS] = loss_sum.item() / loss_steps  # mean training loss since the last report
        if self.progress.step >= self.total_steps:
            test_loss, top1 = self.evaluate(self.eval_loader(self.test_manifest))
            metrics.update({FINETUNE_TOP1: top1, FINETUNE_TEST_LOSS: test_loss})
            if self.val_manifest is not None:
                val_loss, val_top1 = self.evaluate(self.eval_loader(self.val_manifest))
                metrics.update({FINETUNE_VAL_TOP1: val_top1, FINETUNE_VAL_LOSS: val_loss})
        return metrics

    def _accounted_metrics(self, measured: dict[str, float], rank_sums: list[float],
                           with_checkpoint: bool) -> dict[str, float]:
        return self.compute_metrics() if self.progress.step >= self.total_steps else {}

    def compute_metrics(self) -> dict[str, float]:
        """Compute of the whole fine-tuning run (all resumed segments), separate from pre-training's."""
        progress = self.progress
        images = progress.step * self.batch_size
        return {
            FINETUNE_IMAGE_SIZE: self.image_size,
            COMPUTE_FINETUNE_FLOPS: 3.0 * self.forward_flops_per_image * images,  # 3 x forward, as pre-training
            COMPUTE_FINETUNE_IMAGES_SEEN: images,
            COMPUTE_FINETUNE_SECONDS: progress.train_seconds,
            COMPUTE_FINETUNE_WALL_SECONDS: progress.wall_seconds,
            COMPUTE_FINETUNE_CORE_SECONDS: progress.wall_seconds * self.allocated_cores,
            COMPUTE_FINETUNE_CPU_SECONDS: progress.cpu_seconds,
        }
