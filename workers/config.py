"""The resolved configuration of one trial: what a training worker needs, and nothing about Ray Tune or grids.

A study file's ``base:`` section is exactly a :class:`TrialConfig`; ``pipeline.spec`` adds the grid, resources
and tracking around it. Every field is validated here once, so a typo fails with the field's dotted name before
any Ray process starts.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt `weight_decey` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(_Strict):
    """Training-time augmentation (``workers.data.augment``), named as the paper and big_vision name it.

    big_vision ``configs/mlp_mixer_i1k.py``: ``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)`` and
    ``mixup=dict(p=0.5)``; evaluation ``resize_small(256)|central_crop(224)`` (``eval_crop_fraction`` 224/256).
    """

    crop: Literal["inception", "pad", "none"] = Field(
        "none",
        description="inception: random-resized crop (area 5-100 %, aspect 3/4-4/3), as big_vision's inception_crop;"
        " pad: pad `pad` pixels and crop back at a random offset; none: the eval view (resize + central crop)",
    )
    pad: int = Field(0, ge=0, description="pixels of padding for crop: pad")
    area_min: float = Field(0.05, gt=0.0, le=1.0, description="inception crop: smallest crop area (fraction)")
    flip: bool = Field(False, description="random horizontal flip (off for digits: a flipped 2 is no 2)")
    randaug: tuple[int, int] | None = Field(
        None, description="RandAugment [num_layers, magnitude], e.g. [2, 15] as big_vision; null = off"
    )
    mixup: float = Field(0.0, ge=0.0, description="mixup Beta(p, p) parameter (big_vision p=0.5); 0 = off")
    pixel_ops: Literal["exact", "fast"] = Field(
        "exact",
        description="exact: TF's arithmetic bit for bit (the crop's bilinear resample, RandAugment); fast: one C"
        " call per step (the crop resized by torch's uint8 kernel, RandAugment's ops as Pillow calls on the PIL"
        " image), the same crop boxes and op draws, pixels 0.2 levels off on average (docs/benchmarks.md)",
    )
    eval_crop_fraction: float = Field(
        0.875, gt=0.0, le=1.0,
        description="evaluation view: resize the shorter side to image_size / this, then central crop image_size"
        " (big_vision: 224/256 = 0.875; 1.0 = resize only)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.crop == "pad" and self.pad == 0:
            raise ValueError("crop: pad needs pad > 0 (pixels of padding)")
        if self.crop != "pad" and self.pad:
            raise ValueError(f"pad: {self.pad} only applies to crop: pad, but crop is {self.crop!r}")
        if self.randaug is not None and (self.randaug[0] < 1 or not 0 <= self.randaug[1] <= 30):
            raise ValueError(f"randaug must be [num_layers >= 1, magnitude in 0..30], got {list(self.randaug)}")
        return self


class DataConfig(_Strict):
    """Upstream (pre-training) data: WebDataset shards described by a manifest per split."""

    train: str = Field(description="manifest URL (or its folder) of the training split; any fsspec URL")
    val: str = Field(description="manifest URL of the upstream validation split (early stopping)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="nested subset of the training split")
    image_size: int | None = Field(
        None, gt=0, description="resolution the model sees; default: the train manifest's image_size"
    )
    augment: AugmentConfig = AugmentConfig()
    permute: Literal["none", "patches", "pixels"] = Field(
        "none", description="the paper's Fig. 4 input permutations, one fixed permutation for every image and split:"
        " patches = shuffle the order of the PxP patches and permute the pixels inside each patch (one shared"
        " permutation); pixels = permute the pixels of the whole image",
    )
    permute_seed: int = Field(0, ge=0, description="seed of the fixed permutation of data.permute")
    permute_patch: int = Field(
        16, gt=0, description="patch size P of data.permute: patches (the paper: 16, as Mixer-B/16); Mixer is"
        " invariant to it only when P is its own patch size; must divide the image size",
    )
    shuffle_buffer: int = Field(256, ge=1)
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per training worker")
    cache_mb: float = Field(
        128, ge=0, description="memory per loader process for raw shard records and decoded images, kept after the"
        " first read so later epochs and val passes neither read nor decode (workers.data.reader); 0 = off"
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a truncated shard, an undecodable image, a sample without label or a checksum mismatch:"
        " raise fails the trial naming the shard and sample; skip drops what cannot be read, counts it in"
        " data/skipped_samples and data/corrupt_shards, and goes on"
    )
    verify_checksums: bool = Field(
        True, description="hash each shard once per process as it is read and compare with the manifest's sha256"
    )

    @model_validator(mode="after")
    def _whole_patches(self) -> DataConfig:
        # Without data.image_size (the manifest's size), the shard reader checks the same when it starts.
        if self.permute == "patches" and self.image_size and self.image_size % self.permute_patch:
            raise ValueError(
                f"data.permute_patch ({self.permute_patch}) must divide data.image_size ({self.image_size}):"
                " data.permute: patches cuts the image into whole P x P patches"
            )
        return self


class ModelConfig(_Strict):
    variant: str = Field(
        description="a variant of any family in workers.models.registry: Mixer SIZE/PATCH (B/16, B-16, Micro-4, S/8),"
        " ViT (ViT-B/16, ViT-Micro/4), BiT (BiT-R50x1, BiT-Micro)"
    )
    stoch_depth: float = Field(0.0, ge=0.0, lt=1.0, description="drop rate of the last block (big_vision 0.1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on pre_logits before the head")
    head_bias_init: float | None = Field(
        None, description="initial head bias; default -log(num_classes) with the sigmoid loss (big_vision -6.9"
        " for 1000 classes), 0 with softmax (where a constant bias changes nothing, so only 0 is allowed)",
    )

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, name: str) -> str:
        from workers.models.registry import get_variant

        return get_variant(name).name  # ValueError lists the families and names; B/16 -> B-16, ViT-B-16 -> ViT-B/16


class OptimConfig(_Strict):
    """Adam + big_vision's decoupled weight decay on kernels, warm-up from 0 then linear decay (workers.training.optim).

    Per step t with schedule multiplier s(t) (0 -> 1 over warmup_steps, then linearly down to linear_end):
    ``theta -= s(t) * (lr * adam(g) + weight_decay * theta)`` (the decay term on kernels only), as big_vision's
    ``optax.py`` chains scale_by_adam -> scale(lr) -> add_decayed_weights(wd) -> scale_by_schedule.
    """

    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the schedule multiplier from 0")
    linear_end: float = Field(
        1e-5, ge=0.0, le=1.0, description="schedule multiplier at the last step (big_vision linear_end 1e-5)"
    )
    weight_decay: float = Field(
        1e-4, ge=0.0, description="big_vision wd: kernels shrink by weight_decay x s(t) per step, NOT x lr"
    )
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0, description="clip gradients at this global L2 norm")


class TrainConfig(_Strict):
    steps: int = Field(gt=0, description="total optimiser steps (matched across data fractions)")
    batch_size: int = Field(gt=0, description="global batch size, split evenly over the workers")
    eval_every: int = Field(gt=0, description="validate on the val split every this many steps")
    checkpoint_every: int = Field(gt=0, description="checkpoint every this many steps (a multiple of eval_every)")
    log_every: int = Field(10, gt=0, description="log train loss/lr/throughput every this many steps")
    loss: Literal["sigmoid", "softmax"] = Field(
        "sigmoid", description="sigmoid: big_vision's sigmoid_xent (per-class BCE summed over classes, batch mean);"
        " softmax: softmax cross-entropy"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast, fp32, or auto: bf16 where the hardware runs it fast"
        " (workers.training.precision)"
    )
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model (inductor, falling back to eager where it cannot compile): "
        "true, false, or auto: on a CUDA device only (workers.training.precision.resolve_compile)"
    )
    seed: int = Field(0, description="seeds the weight init, the data order, augmentation and mixup")
    keep_checkpoints: int = Field(2, ge=1, description="best checkpoints (by val/acc) kept on storage")

    @model_validator(mode="after")
    def _cadence(self) -> TrainConfig:
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every ({self.eval_every}):"
                " each checkpoint carries the validation accuracy that early stopping ranks it by"
            )
        return self


class FewshotConfig(_Strict):
    """Linear few-shot evaluation of the best checkpoint on a downstream data set (see analysis.fewshot)."""

    train: str | None = Field(None, description="manifest URL of the downstream split the k-shot sets come from")
    test: str | None = Field(None, description="manifest URL of the downstream test split")
    shots: tuple[int, ...] = (1, 5, 10, 25)
    seeds: int = Field(3, ge=1)
    l2_reg: float = Field(2.0**10, gt=0.0)
    train_samples: int | None = Field(
        65_000, gt=0, description="use the first N samples of the downstream train split (big_vision's"
        " 'train[:65000]' for ImageNet); null = all",
    )

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: tuple[int, ...]) -> tuple[int, ...]:
        if not shots or any(k < 1 for k in shots):
            raise ValueError(f"shots must be a non-empty list of positive integers, got {list(shots)}")
        return tuple(sorted(set(shots)))

    @model_validator(mode="after")
    def _both_or_neither(self) -> FewshotConfig:
        if (self.train is None) != (self.test is None):
            raise ValueError("give both fewshot.train and fewshot.test, or neither (no few-shot evaluation)")
        return self

    @property
    def enabled(self) -> bool:
        return self.train is not None


class FinetuneConfig(_Strict):
    """Fine-tuning after pre-training, as the paper's §3: momentum SGD 0.9, no weight decay, clip 1, cosine schedule
    with linear warm-up, a fresh zero-initialised head, softmax cross-entropy; top-1 on the downstream test split."""

    train: str | None = Field(
        None, description="manifest URL of the downstream fine-tuning split; null = no fine-tuning"
    )
    test: str | None = Field(None, description="manifest URL of the downstream test split (finetune/top1)")
    val: str | None = Field(
        None, description="manifest URL of a held-out downstream split that picks the best lr of a sweep (big_vision's"
        " minival, e.g. 2 % of the downstream train split); required when lr has several values: the test split only"
        " reports, it never selects",
    )
    steps: int = Field(500, gt=0)
    batch_size: int = Field(512, gt=0, description="global batch (paper: 512)")
    lr: tuple[float, ...] = Field(
        (0.003, 0.01, 0.03), description="one value, or several: a small sweep, the best by top-1 on finetune.val"
        " is kept (big_vision's transfer configs sweep 0.003/0.01/0.03)",
    )
    warmup_steps: int = Field(50, ge=0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    image_size: int | None = Field(
        None, gt=0, description="fine-tuning resolution; default the pre-training one. Mixer: a multiple K of it"
        " (token-mixing weights grow block-diagonally, Supplementary C)",
    )

    @field_validator("lr", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return (value,) if isinstance(value, (int, float)) else value

    @field_validator("lr")
    @classmethod
    def _positive(cls, lrs: tuple[float, ...]) -> tuple[float, ...]:
        if not lrs or any(lr <= 0 for lr in lrs):
            raise ValueError(f"lr must be a positive number or a non-empty list of them, got {list(lrs)}")
        return lrs

    @model_validator(mode="after")
    def _both_or_neither(self) -> FinetuneConfig:
        if (self.train is None) != (self.test is None):
            raise ValueError("give both finetune.train and finetune.test, or neither (no fine-tuning)")
        if self.val is not None and self.train is None:
            raise ValueError("finetune.val is given without finetune.train and finetune.test (no fine-tuning)")
        if self.val is not None and self.val.rstrip("/") == (self.test or "").rstrip("/"):
            raise ValueError(f"finetune.val is the test split ({self.val}): the lr would be chosen on the split that"
                             " reports top-1; hold out another part of the downstream data")
        if self.train is not None and len(self.lr) > 1 and self.val is None:
            raise ValueError(
                f"finetune.lr sweeps {len(self.lr)} values {list(self.lr)}: give finetune.val, a held-out split of the"
                " downstream data (big_vision's minival), to choose among them; choosing by finetune.test top-1 would"
                " report an optimistic test score")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"finetune.warmup_steps ({self.warmup_steps}) must be below finetune.steps ({self.steps})")
        return self

    @property
    def enabled(self) -> bool:
        return self.train is not None


class TrialConfig(_Strict):
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    fewshot: FewshotConfig = FewshotConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _head_bias_needs_sigmoid(self) -> TrialConfig:
        if self.train.loss == "softmax" and self.model.head_bias_init not in (None, 0.0):
            raise ValueError(
                f"model.head_bias_init: {self.model.head_bias_init} has no effect with train.loss: softmax (a"
                " constant added to every logit cancels in the softmax); use train.loss: sigmoid or drop it"
            )
        if self.optim.warmup_steps >= self.train.steps > 1:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.steps ({self.train.steps})"
            )
        return self


def head_bias(model: ModelConfig, loss: str, num_classes: int) -> float:
    """The initial head bias: the configured one, else -log(C) for sigmoid (initial p = 1/C) and 0 for softmax."""
    if model.head_bias_init is not None:
        return model.head_bias_init
    return -math.log(num_classes) if loss == "sigmoid" and num_classes > 1 else 0.0


def flat_defaults(cls: type[BaseModel] | None = None, prefix: str = "") -> dict[str, object]:
    """{"data.on_error": "raise", ...}: the default of every recipe field that has one, in :func:`flatten`'s form
    (``cls`` defaults to :class:`TrialConfig`; sections are walked even where the section itself is required)."""
    flat: dict[str, object] = {}
    for name, info in (cls or TrialConfig).model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            flat.update(flat_defaults(info.annotation, key + "."))
        elif not info.is_required():
            value = info.get_default(call_default_factory=True)
            flat[key] = list(value) if isinstance(value, tuple) else value
    return flat


def flatten(config: BaseModel, prefix: str = "") -> dict[str, object]:
    """Nested config -> {"optim.lr": 0.001, ...}: the form MLflow params and grid keys use."""
    flat: dict[str, object] = {}
    for name, value in config:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = list(value) if isinstance(value, tuple) else value
    return flat
