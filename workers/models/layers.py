"""Parts every model family shares (timm's ``layers/``): stochastic depth, the MLP block, lecun-normal init,
``Variant`` (what every family's variant has) and ``Classifier``, the base class of every family's model.

``Classifier`` holds what a family's model would otherwise repeat: the constructor bookkeeping (variant,
image_size, num_classes, in_chans, argument checks), the dropout + zero-initialised head, gradient checkpointing, the
input-size check and the block loop. A family writes only its body, in four hooks:

- ``_build(variant, stoch_depth) -> width``: create the stem, ``self.blocks`` (an ``nn.ModuleList`` run in order)
  and the final norm, in the order their parameters are drawn; return the width C of pre_logits;
- ``_init_weights()``: initialise the body (the head exists by then and is zeroed after this);
- ``_embed(images) -> block input`` and ``_pool(last block output) -> pre_logits (B, C)``;

and, if it likes, ``_input_note()``: its reason in the wrong-input-size error ("S=196 tokens").

Parameter creation and init order fix the random stream: the base creates the head after ``_build`` and zeroes it
after ``_init_weights``, so a family's parameters and state_dict keys are those of its own hand-written model.

Imports only torch and the standard library: it runs inside Ray worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Classifier", "MlpBlock", "Variant", "check_classifier_args", "drop_path", "lecun_normal_", "patch_tokens",
           "reset_norms_"]

# jax.nn.initializers.variance_scaling(..., "truncated_normal") divides the std by the std of a unit
# normal truncated to [-2, 2], so that the *truncated* distribution has the requested variance.
_TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978


@runtime_checkable
class Variant(Protocol):
    """What every family's variant has (each family's is a frozen dataclass with its own shape fields besides)."""

    family: ClassVar[str]  # the family's registry name ("Mixer", "ViT", "BiT")
    kind: ClassVar[str]  # the paper's grouping in its figures ("Mixer", "attention", "convolution")

    @property
    def name(self) -> str:
        """Canonical name; it names the family too ("B-16", "ViT-B/16", "BiT-R50x1")."""

    @property
    def size(self) -> str:
        """The size in the family's table ("B", "R50x1"; "" for a hand-built variant)."""

    @property
    def size_rank(self) -> float:
        """One order across families, small to large (the Mixer sizes' ranks, Nano 0 ... H 6)."""

    @property
    def patch_size(self) -> int | None:
        """P of a patch-based family; None for a convolutional one."""

    @property
    def description(self) -> str:
        """One line for `mixer-study models`."""


def lecun_normal_(weight: Tensor) -> Tensor:
    """In-place lecun-normal init as jax's ``variance_scaling(1, "fan_in", "truncated_normal")``.

    Args:
        weight: a Linear (out, in) or Conv2d (out, in, kh, kw) weight; its fan-in is in (x kh x kw).
    """
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD_CORRECTION
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def reset_norms_(module: nn.Module) -> None:
    """Scale 1 and bias 0 in every LayerNorm and GroupNorm of ``module`` (Flax's defaults; draws no random numbers).

    Args:
        module: the model whose norms to reset, in place.
    """
    for m in module.modules():
        if isinstance(m, nn.LayerNorm | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def patch_tokens(image_size: int, patch_size: int, label: str) -> int:
    """Number of P×P patches S = (image_size / P)^2 of a square image; ``ValueError`` unless P divides it.

    Args:
        image_size: side of the square inputs.
        patch_size: P.
        label: the variant as the error names it ("Mixer B-16", "ViT-B/16").
    """
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"image_size {image_size} is not a positive multiple of the patch size P={patch_size} of {label}"
        )
    return (image_size // patch_size) ** 2


def check_classifier_args(stoch_depth: float, dropout: float, num_classes: int) -> None:
    """The constructor checks every model family makes, in one wording.

    Args:
        stoch_depth: drop rate of the last block, in [0, 1).
        dropout: dropout rate on pre_logits, in [0, 1).
        num_classes: classes of the head, >= 0 (0: no head).
    """
    if not 0.0 <= stoch_depth < 1.0:
        raise ValueError(f"stoch_depth must be in [0, 1), got {stoch_depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero the whole residual branch of each example with probability ``rate``.

    As big_vision's ``_stoch_depth_mask``: one Bernoulli draw per example (broadcast over the other axes),
    and kept branches are NOT rescaled by 1/(1-rate) (timm's DropPath does rescale). Eval mode, or
    ``rate == 0``, multiplies by 1.0 (returns ``x`` itself), as big_vision's deterministic path.

    Args:
        x: a residual branch's output, examples along the first axis.
        rate: drop probability in [0, 1].
        training: False returns ``x`` unchanged.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop_path rate must be in [0, 1], got {rate}")
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep


class MlpBlock(nn.Module):
    """Linear -> GELU -> Linear over the last axis.

    Args:
        dim: input and output width.
        hidden_dim: width between the two Linears.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        # Flax's nn.gelu defaults to the tanh approximation; match it.
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Classifier(nn.Module):
    """Base of every family's model: ``forward(images) -> (logits, {"pre_logits": ...})`` as big_vision's models.

    A subclass sets ``parse_variant`` (its family's name parser, for a variant given by name) and implements the
    hooks of the module docstring. ``stoch_depth`` is the drop rate of the last block (families ramp it from 0 at
    the first); ``dropout`` applies to pre_logits before the head; ``head_bias_init`` is the constant initial
    bias of the zero-initialised head (big_vision uses e.g. -6.9 ~ -log(1000) so that initial sigmoid outputs
    are ~1/1000); ``num_classes=0`` builds no head, and ``forward`` then returns pre_logits as its logits.

    Args:
        variant: the family's variant, or its name.
        image_size: side of the square inputs the model takes.
        num_classes: classes of the head (0: no head).
        in_chans: input channels.
        stoch_depth: stochastic-depth rate of the last block, in [0, 1).
        dropout: dropout rate on pre_logits, in [0, 1).
        head_bias_init: constant initial bias of the head.
    """

    parse_variant: ClassVar[Callable[[str], Any]]
    blocks: nn.ModuleList

    def __init__(self, variant: Variant | str, image_size: int, num_classes: int, in_chans: int = 3,
                 stoch_depth: float = 0.0, dropout: float = 0.0, head_bias_init: float = 0.0) -> None:
        super().__init__()
        check_classifier_args(stoch_depth, dropout, num_classes)
        self.variant = type(self).parse_variant(variant) if isinstance(variant, str) else variant
        self.image_size = image_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        width = self._build(self.variant, stoch_depth)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        with torch.no_grad():
            # The in-place init ops are no-ops on meta tensors, so this also runs under torch.device("meta").
            self._init_weights()
            if isinstance(self.head, nn.Linear):
                # Zero head: every class starts at the same logit, and early gradients stay small.
                nn.init.zeros_(self.head.weight)
                nn.init.constant_(self.head.bias, head_bias_init)

    def _build(self, variant: Any, stoch_depth: float) -> int:
        """Create the body (stem, ``self.blocks``, final norm); return the width of pre_logits.

        Args:
            variant: the parsed variant.
            stoch_depth: the rate of the last block.
        """
        raise NotImplementedError

    def _init_weights(self) -> None:
        """Initialise the body's parameters (runs under ``torch.no_grad``; the head is zeroed afterwards)."""
        raise NotImplementedError

    def _embed(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> the first block's input.

        Args:
            x: a batch of ``image_size`` square images.
        """
        raise NotImplementedError

    def _pool(self, x: Tensor) -> Tensor:
        """The last block's output -> pre_logits (B, C).

        Args:
            x: the last block's output.
        """
        raise NotImplementedError

    def _input_note(self) -> str:
        """What the input-size error adds in parentheses after "built for NxN inputs" (a family's reason)."""
        return ""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block in training mode (timm's API): activations are recomputed in the backward
        pass instead of stored. The RNG state is replayed, so stochastic-depth masks match the forward pass.

        Args:
            enable: False stores activations again.
        """
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> pre_logits (B, C).

        Args:
            x: a batch of ``image_size`` square images.
        """
        if x.shape[-2:] != (self.image_size, self.image_size):
            v, note = self.variant, self._input_note()
            # "Mixer B-16", "ViT-B/16": the family's name unless the variant's name starts with it.
            label = v.name if v.name.casefold().startswith(v.family.casefold()) else f"{v.family} {v.name}"
            raise ValueError(
                f"{label} was built for {self.image_size}x{self.image_size} inputs{f' ({note})' if note else ''}, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self._embed(x)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return self._pool(x)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images -> (logits (B, num_classes), {"pre_logits": (B, C)}), as big_vision's models.

        Args:
            x: a batch of ``image_size`` square images.
        """
        pre_logits = self.forward_features(x)
        return self.head(self.head_drop(pre_logits)), {"pre_logits": pre_logits}
