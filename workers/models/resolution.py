"""Moving a pre-trained model to the fine-tuning resolution, per family, as the papers do it.

The patch size P is kept, so a higher resolution means more tokens. Per family:

* **Mixer** (Tolstikhin et al. 2021, §3 "Fine-tuning" and Supplementary C): the resolution grows by an integer
  factor K, the number of tokens from S to S' = K²S and the token-mixing MLP's hidden width from D_S to K²·D_S.
  Supplementary C, quoted: "To this end we split the input sequence into K² equal parts, each one of the original
  length S, and initialize the new MLP so that it processes all these parts independently in parallel with the
  pre-trained MLP. [...] Assume the token sequence for the resized input image is a concatenation of K² token
  sequences of length S each, computed by splitting the input into K × K equal parts spatially. We then
  initialize W1' with a block-diagonal matrix that has copies of W1 on its main diagonal. Other parameters of the
  MLP are handled analogously." See :func:`mixer_to_resolution`.
* **ViT** (Dosovitskiy et al. 2021, §3.2): "we perform 2D interpolation of the pre-trained position embeddings,
  according to their location in the original image". The official code (google-research/vision_transformer
  ``vit_jax/checkpoint.py`` ``load_pretrained``; big_vision ``models/vit.py`` ``resample_posemb``) reshapes the
  grid part to (g, g, C), calls ``scipy.ndimage.zoom(grid, (g'/g, g'/g, 1), order=1)`` and puts the class token's
  entry back in front unchanged. See :func:`resample_pos_embed`.
* **BiT** (ResNet): convolutions and global pooling work at any resolution; the weights do not change (the
  model is rebuilt for the new ``image_size`` it records and checks).

:func:`to_resolution` dispatches by duck typing: an :class:`~workers.models.mixer.MlpMixer` is a Mixer, a model with a
``pos_embed`` Parameter is a ViT, anything else is resolution-agnostic (BiT).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.mixer import MixerVariant, MlpMixer
from workers.models.registry import build_model

__all__ = [
    "GroupedPatchStem",
    "grouped_token_order",
    "mixer_to_resolution",
    "resample_pos_embed",
    "resolution_factor",
    "to_resolution",
    "vit_to_resolution",
]


# -- Mixer ---------------------------------------------------------------------------------------------------------


def grouped_token_order(grid: int, k: int) -> Tensor:
    """The token order of Supplementary C, as a gather index into the row-major patch grid of side K·g.

    The (K·g) x (K·g) patch grid of the larger image is split spatially into K x K contiguous sub-grids of
    g x g patches each (g = sqrt(S), the pre-training grid side): sub-grid (a, b), a = block row, b = block
    column, holds the patches (a·g + i, b·g + j), 0 <= i, j < g, i.e. exactly the patches of the sub-image
    ``image[a·g·P : (a+1)·g·P, b·g·P : (b+1)·g·P]`` (contiguous blocks, NOT strided every K-th patch). The token
    sequence is the concatenation of the K² sub-grids in row-major order of (a, b), each in the row-major order of
    its own g x g patches, which is the order the pre-trained model saw the S tokens of one image in:

        grouped position  t' = (a·K + b)·g² + i·g + j   <-   row-major position  (a·g + i)·K·g + (b·g + j)

    Returns ``order`` (K²g² int64) with ``order[t']`` = that row-major position; ``tokens[:, order]`` turns
    row-major tokens into grouped ones, and group q = a·K + b is ``t'`` in [q·S, (q+1)·S).
    """
    if grid < 1 or k < 1:
        raise ValueError(f"grid side and K must be >= 1, got grid={grid}, K={k}")
    a, b, i, j = torch.meshgrid(*(torch.arange(n) for n in (k, k, grid, grid)), indexing="ij")
    return ((a * grid + i) * (k * grid) + (b * grid + j)).reshape(-1)


class GroupedPatchStem(nn.Conv2d):
    """The Mixer stem (P x P stride-P convolution) that emits its tokens in the grouped order of Supplementary C.

    Weights and state_dict keys are the plain stem's (``weight``, ``bias``); ``token_order`` is a non-persistent
    buffer (derived from the shapes). The output (B, C, K²·g, g) is the K² sub-grids of g x g tokens stacked
    vertically, so ``MlpMixer.forward_features``' row-major ``flatten(2)`` yields the concatenation of the K²
    sub-sequences of :func:`grouped_token_order`. Every layer after the stem is per token (LayerNorm, channel MLP,
    residuals) or the token MLP (built for this order), and global average pooling forgets the order: reordering
    the tokens is a relabelling, not a change of the function class.
    """

    token_order: Tensor

    def __init__(self, in_chans: int, hidden_dim: int, patch_size: int, grid: int, k: int) -> None:
        super().__init__(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.grid, self.k = grid, k
        self.register_buffer("token_order", grouped_token_order(grid, k), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # (B, C, K·g, K·g)
        if y.shape[-2:] != (self.k * self.grid,) * 2:
            raise ValueError(f"grouped stem built for a {self.k * self.grid}^2 patch grid, got {tuple(y.shape[-2:])}")
        tokens = y.flatten(2).index_select(2, self.token_order)  # (B, C, K²g²) in the grouped order
        return tokens.view(y.shape[0], y.shape[1], self.k * self.k * self.grid, self.grid)


def resolution_factor(old_size: int, new_size: int) -> int:
    """K = new_size / old_size for Mixer, which must be a positive integer (Supplementary C: S' = K²S, K in N)."""
    if new_size <= 0 or new_size % old_size:
        raise ValueError(
            f"Mixer fine-tuning resolution {new_size} is not an integer multiple K of the pre-training resolution"
            f" {old_size}: the token-mixing weights grow block-diagonally to S' = K²S tokens (paper Supplementary"
            f" C), so only {old_size} x K for K = 1, 2, 3, ... works (e.g. {2 * old_size})"
        )
    return new_size // old_size


def _grouped_variant(v: MixerVariant, k: int) -> MixerVariant:
    """``v`` with the token-mixing hidden width D_S -> K²·D_S. The name (``B-16@2x``) is not a parsable variant,
    so nothing can rebuild this model from the name alone by mistake with the pre-training width."""
    return dataclasses.replace(
        v, name=f"{v.name}@{k}x", tokens_mlp_dim=k * k * v.tokens_mlp_dim,
        description=f"{v.name} at {k}x resolution: token-mixing width {k * k} x D_S, tokens in {k}x{k} sub-grids",
    )


@torch.no_grad()
def mixer_to_resolution(model: MlpMixer, image_size: int) -> MlpMixer:
    """A new Mixer for ``image_size`` = K x ``model.image_size`` inputs, initialised as Supplementary C says.

    With g = sqrt(S) and S' = K²S tokens in the order of :func:`grouped_token_order` (K x K contiguous
    sub-grids), every token-mixing MLP becomes, per block,

        W1' = diag(W1, ..., W1)  (K²·D_S x K²·S),   b1' = [b1; ...; b1]  (K² copies)
        W2' = diag(W2, ..., W2)  (K²·S x K²·D_S),   b2' = [b2; ...; b2]

    so W2'·GELU(W1'·x + b1') + b2' applied to the concatenation x = [x_1; ...; x_K²] is the concatenation of the
    pre-trained MLP applied to each x_q: at initialisation the K² token groups, each the S patches of one sub-image,
    are mixed exactly as the pre-trained model mixed the S patches of one image. Everything else (stem, LayerNorms,
    channel MLPs, final norm, head, stochastic-depth rates, dropout) is copied. K = 1 returns ``model`` itself.
    Raises ``ValueError`` for a resolution that is not an integer multiple of the pre-training one.
    """
    if isinstance(model.stem, GroupedPatchStem):
        raise ValueError("this Mixer was already moved to another resolution; convert the pre-trained model instead")
    k = resolution_factor(model.image_size, image_size)
    if k == 1:
        return model
    v = model.variant
    new = MlpMixer(_grouped_variant(v, k), image_size=image_size, num_classes=model.num_classes,
                   in_chans=model.in_chans)
    grid = model.image_size // v.patch_size
    new.stem = GroupedPatchStem(model.in_chans, v.hidden_dim, v.patch_size, grid, k)
    for old_block, new_block in zip(model.blocks, new.blocks, strict=True):
        new_block.stoch_depth = old_block.stoch_depth
    new.head_drop.p = model.head_drop.p
    reference = next(model.parameters())
    new.to(device=reference.device, dtype=reference.dtype)  # before loading: a float64 model stays exact

    copies = k * k
    state = {}
    for name, value in model.state_dict().items():
        if ".token_mixing.fc" in name and name.endswith(".weight"):
            value = torch.block_diag(*[value] * copies)  # fc1: (K²D_S, K²S); fc2: (K²S, K²D_S)
        elif ".token_mixing.fc" in name and name.endswith(".bias"):
            value = value.repeat(copies)  # b1' (K²D_S), b2' (K²S): one copy per group
        state[name] = value.clone()
    new.load_state_dict(state)  # strict: every parameter accounted for, shapes checked
    return new.train(model.training)


# -- ViT -----------------------------------------------------------------------------------------------------------


def _pair(grid: int | Sequence[int]) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid sides must be >= 1, got {grid}")
    return int(h), int(w)


def resample_pos_embed(pos_embed: Tensor, old_grid: int | Sequence[int], new_grid: int | Sequence[int],
                       num_prefix_tokens: int = 1) -> Tensor:
    """ViT position embeddings (1, prefix + H·W, C) resampled to a new patch grid (1, prefix + H'·W', C).

    As the official code (``vit_jax/checkpoint.py`` ``load_pretrained``, big_vision ``resample_posemb``): the
    first ``num_prefix_tokens`` entries (the class token's) are kept as they are; the grid entries, row-major
    over (H, W), are interpolated bilinearly in 2-D. ``scipy.ndimage.zoom(order=1)`` with its default
    ``grid_mode=False`` maps output index o to input coordinate o·(n - 1)/(n' - 1) (the corner entries stay put),
    which is ``F.interpolate(mode="bilinear", align_corners=True)``; a single-row/column source is replicated.
    Computed in float64 when the input is float64, else float32, and returned in the input's dtype.
    Unchanged grids return ``pos_embed`` itself.
    """
    (h, w), (h2, w2) = _pair(old_grid), _pair(new_grid)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, C), got {tuple(pos_embed.shape)}")
    if num_prefix_tokens < 0 or pos_embed.shape[1] != num_prefix_tokens + h * w:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} tokens, not {num_prefix_tokens} prefix + {h}x{w} grid")
    if (h, w) == (h2, w2):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    grid = grid.reshape(1, h, w, -1).permute(0, 3, 1, 2).to(dtype)  # (1, C, H, W)
    grid = F.interpolate(grid, size=(h2, w2), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h2 * w2, -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _rebuild(model: nn.Module, image_size: int, state: dict[str, Tensor]) -> nn.Module:
    """``model``'s family and variant built for ``image_size`` by ``workers.models.registry.build_model``, loaded with
    ``state`` (strict), on ``model``'s device and dtype, in its train/eval mode."""
    reference = next(model.parameters())
    new = build_model(model.variant, image_size, model.num_classes, in_chans=getattr(model, "in_chans", 3))
    new.to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state)
    return new.train(model.training)


@torch.no_grad()
def vit_to_resolution(model: nn.Module, image_size: int) -> nn.Module:
    """A ViT (a ``pos_embed`` Parameter (1, prefix + g², C), ``image_size`` and ``variant.patch_size``, as
    ``workers.models.vit.VisionTransformer``) for ``image_size`` inputs: the same weights, the grid part of
    ``pos_embed`` resampled by :func:`resample_pos_embed` (the ``num_prefix_tokens`` class-token rows kept). Rebuilt
    through ``workers.models.registry`` when the model has a registry variant (so every size-derived attribute is
    right), else a
    copy with the new ``pos_embed`` and ``image_size``. Same size: ``model`` itself."""
    old_size = int(model.image_size)
    if image_size == old_size:
        return model
    variant = getattr(model, "variant", None)
    patch = getattr(variant, "patch_size", None) or getattr(model, "patch_size", None)
    if not patch:
        raise ValueError(f"{type(model).__name__}: no patch size (model.variant.patch_size or model.patch_size)")
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"ViT fine-tuning resolution {image_size} is not a positive multiple of the patch size"
                         f" {patch}")
    old_grid, new_grid = old_size // patch, image_size // patch
    prefix = getattr(model, "num_prefix_tokens", model.pos_embed.shape[1] - old_grid**2)
    pos_embed = resample_pos_embed(model.pos_embed.detach(), old_grid, new_grid, prefix)
    if variant is not None and getattr(variant, "family", None) == "ViT":
        return _rebuild(model, image_size, {**model.state_dict(), "pos_embed": pos_embed})
    new = copy.deepcopy(model)
    new.pos_embed = nn.Parameter(pos_embed.clone())
    new.image_size = image_size
    return new


# -- dispatch ------------------------------------------------------------------------------------------------------


def to_resolution(model: nn.Module, image_size: int) -> nn.Module:
    """``model`` moved to ``image_size`` by family, by duck typing: an ``MlpMixer`` (:func:`mixer_to_resolution`,
    K integer), a model with a ``pos_embed`` Parameter (ViT: :func:`vit_to_resolution`), anything else (BiT: a
    ResNet runs at any resolution) the same weights, rebuilt through the registry for the new ``image_size`` it
    records and checks. Same size: ``model`` itself."""
    if isinstance(model, MlpMixer):
        return mixer_to_resolution(model, image_size)
    if isinstance(getattr(model, "pos_embed", None), Tensor):
        return vit_to_resolution(model, image_size)
    if getattr(model, "image_size", image_size) == image_size:
        return model
    if getattr(getattr(model, "variant", None), "family", None):
        return _rebuild(model, image_size, model.state_dict())
    model.image_size = image_size  # a resolution-agnostic model outside the registry: only the recorded size
    return model
