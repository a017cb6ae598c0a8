"""The resolved configuration of one trial: what a training worker needs, and nothing about Ray Tune or grids.

A study file's ``base:`` section is exactly a :class:`TrialConfig`; ``pipeline.spec`` adds the grid, resources
and tracking around it. Every field is validated here once, so a typo fails with the field's dotted name before
any Ray process starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt `weight_decey` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Upstream (pre-training) data: WebDataset shards described by a manifest per split."""

    train: str = Field(description="manifest URL (or its folder) of the training split; any fsspec URL")
    val: str = Field(description="manifest URL of the upstream validation split (early stopping)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="nested subset of the training split")
    crop_pad: int = Field(0, ge=0, description="random-crop augmentation: pad this many pixels, crop back")
    flip: bool = Field(False, description="random horizontal flip (off for digits: a flipped 2 is no 2)")
    shuffle_buffer: int = Field(256, ge=1)
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per training worker")


class ModelConfig(_Strict):
    variant: str = Field(description="a name from `mixer-study models`, e.g. B-16 or Micro-4")
    stoch_depth: float = Field(0.0, ge=0.0, lt=1.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    head_bias_init: float = 0.0

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, name: str) -> str:
        from workers.model import get_variant

        return get_variant(name).name  # raises ValueError listing the known names; canonicalises B/16 -> B-16


class OptimConfig(_Strict):
    """AdamW with decoupled weight decay on kernels only, linear warm-up then linear decay to 0."""

    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-4, ge=0.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0, description="clip gradients at this global L2 norm")


class TrainConfig(_Strict):
    steps: int = Field(gt=0, description="total optimiser steps (matched across data fractions)")
    batch_size: int = Field(gt=0, description="global batch size, split evenly over the workers")
    eval_every: int = Field(gt=0, description="validate on the val split every this many steps")
    checkpoint_every: int = Field(gt=0, description="checkpoint every this many steps (a multiple of eval_every)")
    log_every: int = Field(10, gt=0, description="log train loss/lr/throughput every this many steps")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast, fp32, or auto: bf16 where the hardware runs it fast (workers.precision)"
    )
    seed: int = 0
    keep_checkpoints: int = Field(2, ge=1, description="best checkpoints (by val/acc) kept on storage")

    @model_validator(mode="after")
    def _cadence(self) -> "TrainConfig":
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

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: tuple[int, ...]) -> tuple[int, ...]:
        if not shots or any(k < 1 for k in shots):
            raise ValueError(f"shots must be a non-empty list of positive integers, got {list(shots)}")
        return tuple(sorted(set(shots)))

    @model_validator(mode="after")
    def _both_or_neither(self) -> "FewshotConfig":
        if (self.train is None) != (self.test is None):
            raise ValueError("give both fewshot.train and fewshot.test, or neither (no few-shot evaluation)")
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
