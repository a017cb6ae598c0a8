"""One registry of model families (timm-style): Mixer (``workers.models.mixer``), ViT (``workers.models.vit``), BiT
(``workers.models.bit``).

Every caller that takes a variant name (config validation, plan, trainer, checkpoints, CLI, results, figures) goes
through here, so a study grid can mix families: ``model.variant: [B-16, ViT-B/16, BiT-R50x1]``.

Names: a Mixer keeps its bare name ("B-16", "B/16", "Micro-4"; "Mixer-B/16" is accepted too); the other families
carry their prefix ("ViT-B/16" or "ViT-B-16", "BiT-R50x1", "BiT-Micro"). Every variant object has ``name``
(canonical), ``family`` ("Mixer" | "ViT" | "BiT"), ``kind`` ("Mixer" | "attention" | "convolution": the paper's
grouping in its figures), ``size``, ``size_rank`` (one order across families, small to large: the Mixer sizes'
ranks, Nano 0 ... H 6, with other families placed by size letter or parameter count), ``patch_size`` (None for
BiT) and ``description``. Every model has the constructor ``(variant, image_size, num_classes, in_chans=3,
stoch_depth=0, dropout=0, head_bias_init=0)``, the attributes ``variant``, ``image_size``, ``num_classes``, and
``forward_features -> pre_logits``, ``forward -> (logits, {"pre_logits": ...})``, ``set_grad_checkpointing``.

Imports only torch and the standard library (through the family modules): it runs inside Ray worker processes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.models import bit, mixer, vit
from workers.models.bit import BiTVariant, ResNetV2
from workers.models.mixer import MixerVariant, MlpMixer
from workers.models.vit import VisionTransformer, ViTVariant

__all__ = [
    "FAMILIES",
    "KINDS",
    "NAMED_VARIANTS",
    "Family",
    "Model",
    "Variant",
    "build_model",
    "check_fits",
    "get_family",
    "forward_flops",
    "get_variant",
    "param_count",
    "shape_summary",
    "train_flops_per_image",
]

Variant = MixerVariant | ViTVariant | BiTVariant
Model = MlpMixer | VisionTransformer | ResNetV2


@dataclass(frozen=True)
class Family:
    """What the registry needs of one family: its parser, model class, size/cost functions and fit rule."""

    name: str
    kind: str
    prefix: str  # how names of the family start ("" for Mixer)
    syntax: str  # for error messages
    parse: Callable[[str], Variant]
    model: type[Model]
    variants: dict[str, Variant]
    param_count: Callable[..., int]
    forward_flops: Callable[..., int]
    check_fits: Callable[[Any, int], None]


def _mixer_fits(variant: MixerVariant, image_size: int) -> None:
    mixer.num_tokens(variant, image_size)  # a whole number of P×P patches (the token MLP fixes S)


# In the paper's order: Mixer, attention, convolution. Figures and `mixer-study models` follow it.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("Mixer", "Mixer", "", "SIZE/PATCH or SIZE-PATCH (B/16, B-16, Micro-4, S/8)", mixer.parse_variant,
               MlpMixer, mixer.VARIANTS, mixer.param_count, mixer.forward_flops, _mixer_fits),
        Family("ViT", "attention", "ViT-", "ViT-SIZE/PATCH or ViT-SIZE-PATCH (ViT-B/16, ViT-B-16, ViT-Micro/4)",
               vit.parse_variant, VisionTransformer, vit.VARIANTS, vit.param_count, vit.forward_flops,
               vit.check_fits),
        Family("BiT", "convolution", "BiT-", "BiT-R{DEPTH}x{WIDTH} or a CPU size (BiT-R50x1, BiT-R152x4, BiT-Micro)",
               bit.parse_variant, ResNetV2, bit.VARIANTS, bit.param_count, bit.forward_flops, bit.check_fits),
    )
}
KINDS: tuple[str, ...] = tuple(f.kind for f in FAMILIES.values())  # ("Mixer", "attention", "convolution")

# What `mixer-study models` lists: every family's named variants, family by family, each small to large.
NAMED_VARIANTS: dict[str, Variant] = {name: v for f in FAMILIES.values() for name, v in f.variants.items()}

_MIXER_PREFIX = re.compile(r"Mixer-", re.IGNORECASE)


def _families_help() -> str:
    return "; ".join(f"{f.name} ({f.kind}): {f.syntax}" for f in FAMILIES.values())


def get_variant(name: str | Variant) -> Variant:
    """The variant of any family named ``name`` (a variant object is returned as is).

    The prefix picks the family ("ViT-...", "BiT-...", case-insensitive; "Mixer-..." or no prefix: Mixer), whose
    parser then reads the rest. Raises ``ValueError`` with that parser's message (the sizes and named variants of
    the family) and the syntax of every family.
    """
    if isinstance(name, MixerVariant | ViTVariant | BiTVariant):
        return name
    if not isinstance(name, str):
        raise ValueError(f"model variant must be a name, got {name!r} ({type(name).__name__}); families: "
                         f"{_families_help()}")
    fam = next((f for f in FAMILIES.values() if f.prefix and name[:len(f.prefix)].casefold() == f.prefix.casefold()),
               FAMILIES["Mixer"])
    bare = _MIXER_PREFIX.sub("", name, count=1) if fam.name == "Mixer" else name
    try:
        return fam.parse(bare)
    except ValueError as error:
        raise ValueError(f"{error}. Model families: {_families_help()}") from None


def get_family(variant: str | Variant) -> Family:
    """The ``Family`` of a variant or name."""
    return FAMILIES[get_variant(variant).family]


def build_model(name_or_variant: str | Variant, image_size: int, num_classes: int, **kwargs: Any) -> Model:
    """The model of any family; ``kwargs`` (in_chans, stoch_depth, dropout, head_bias_init) go to its constructor."""
    v = get_variant(name_or_variant)
    return FAMILIES[v.family].model(v, image_size, num_classes, **kwargs)


def check_fits(variant: str | Variant, image_size: int) -> None:
    """Raise ``ValueError`` (naming the rule) unless the variant takes square ``image_size`` inputs.

    Mixer and ViT: a positive multiple of the patch size P. BiT: at least its total stride (32, CPU sizes 4).
    """
    v = get_variant(variant)
    FAMILIES[v.family].check_fits(v, image_size)


def param_count(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Number of parameters from the layer shapes (``num_classes=0``: no head). Equals the module's count."""
    v = get_variant(variant)
    return FAMILIES[v.family].param_count(v, image_size, num_classes, in_chans)


def forward_flops(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Forward FLOPs per image (2 per multiply-add over matmuls, convolutions and attention's QKᵀ/AV): exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts for the module (attention counted as batched matmuls or
    SDPA: on CPU, torch 2.13's counter has no formula for the fused CPU kernel; count on meta or the math backend).
    """
    v = get_variant(variant)
    return FAMILIES[v.family].forward_flops(v, image_size, num_classes, in_chans)


def train_flops_per_image(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Training FLOPs per image: 3x forward (backward ~ 2x forward: gradients of activations and of weights)."""
    return 3 * forward_flops(variant, image_size, num_classes, in_chans)


def shape_summary(variant: str | Variant) -> str:
    """The variant's shape in its family's own terms, for tables ("12 blocks, P 16, C 768, D_S 384, D_C 3072")."""
    v = get_variant(variant)
    if isinstance(v, MixerVariant):
        return (f"{v.num_blocks} blocks, P {v.patch_size}, C {v.hidden_dim}, D_S {v.tokens_mlp_dim}, "
                f"D_C {v.channels_mlp_dim}")
    if isinstance(v, ViTVariant):
        return f"{v.num_blocks} blocks, P {v.patch_size}, C {v.hidden_dim}, MLP {v.mlp_dim}, {v.num_heads} heads"
    widths = f"{v.width}-{4 * v.width * 2 ** (len(v.blocks) - 1)}"
    return f"{v.depth} layers, units {'/'.join(map(str, v.blocks))}, widths {widths}, {v.stem} root"
