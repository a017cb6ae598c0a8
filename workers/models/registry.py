"""The registry of model families (timm's ``@register_model``, one entry per family): a family module describes itself
in a ``Family`` and calls ``register_family`` when imported; ``workers/models/__init__.py`` imports the built-in
ones (Mixer, ViT, BiT), one line each. This module knows no family by name.

Every caller that takes a variant name (config validation, plan, trainer, checkpoints, CLI, results, figures) goes
through here, so a study grid can mix families: ``model.variant: [B-16, ViT-B/16, BiT-R50x1]``.

Names: a family's names start with its ``prefix`` ("ViT-B/16", "BiT-R50x1"); one family may have the empty prefix
and takes every name no other prefix claims (Mixer: "B-16", "B/16", "Micro-4"; its parser accepts "Mixer-B/16"
too). A variant is a frozen dataclass with what ``layers.Variant`` lists (``name``, ``family``, ``kind``,
``size``, ``size_rank``, ``patch_size``, ``description``); a model is a ``layers.Classifier``.

Imports only the standard library and ``workers.models.layers`` (torch): it runs inside Ray worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.models.layers import Classifier, Variant

__all__ = [
    "FAMILIES",
    "NAMED_VARIANTS",
    "Family",
    "Model",
    "Variant",
    "build_model",
    "check_fits",
    "forward_flops",
    "get_family",
    "get_variant",
    "param_count",
    "register_family",
    "shape_summary",
    "train_flops_per_image",
    "unregister_family",
]

# Every family's model subclasses it: the type callers hold (checkpoints, throughput, features).
Model = Classifier


@dataclass(frozen=True)
class Family:
    """What a family tells the registry about itself.

    Args:
        name: the family's name, also every variant's ``family`` ("Mixer", "ViT", "BiT").
        kind: the paper's grouping in its figures ("Mixer", "attention", "convolution").
        prefix: how its names start ("ViT-"); "" for the one family that takes unprefixed names.
        syntax: its names' syntax with examples, for error messages and `mixer-study models`.
        parse: name -> variant; raises ``ValueError`` listing the family's sizes and named variants.
        model: its ``Classifier`` subclass, constructed as ``model(variant, image_size, num_classes, **kwargs)``.
        variants: the named variants `mixer-study models` lists, small to large.
        param_count: (variant, image_size, num_classes, in_chans) -> parameters, equal to the module's count.
        forward_flops: (variant, image_size, num_classes, in_chans) -> forward FLOPs per image, as torch counts.
        check_fits: (variant, image_size) -> None; raises ``ValueError`` naming the rule the size breaks.
        shape_summary: variant -> its shape in the family's own terms, for tables.
    """

    name: str
    kind: str
    prefix: str
    syntax: str
    parse: Callable[[str], Any]
    model: type[Classifier]
    variants: dict[str, Any]
    param_count: Callable[[Any, int, int, int], int]
    forward_flops: Callable[[Any, int, int, int], int]
    check_fits: Callable[[Any, int], None]
    shape_summary: Callable[[Any], str]


# In registration order: the built-in families register in the paper's order (Mixer, attention, convolution), and
# figures and `mixer-study models` follow it.
FAMILIES: dict[str, Family] = {}

# What `mixer-study models` lists: every family's named variants, family by family, each small to large.
NAMED_VARIANTS: dict[str, Variant] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (after those registered before it) and return it.

    Args:
        family: the family's description; its name, prefix and named variants must be new to the registry.
    """
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = next((f.name for f in FAMILIES.values() if f.prefix.casefold() == family.prefix.casefold()), None)
    if taken:
        raise ValueError(f"model family {family.name!r}: prefix {family.prefix!r} is already {taken}'s")
    clash = sorted(set(family.variants) & set(NAMED_VARIANTS))
    if clash:
        raise ValueError(f"model family {family.name!r}: variant names already registered: {', '.join(clash)}")
    FAMILIES[family.name] = family
    NAMED_VARIANTS.update(family.variants)
    return family


def unregister_family(name: str) -> None:
    """Remove the family ``name`` and its named variants (a family a test or a plugin registered for a while).

    Args:
        name: the family's name.
    """
    family = FAMILIES.pop(name)
    for variant in family.variants:
        del NAMED_VARIANTS[variant]


def _families_help() -> str:
    return "; ".join(f"{f.name} ({f.kind}): {f.syntax}" for f in FAMILIES.values())


def _family_of_name(name: str) -> Family:
    """The family whose prefix starts ``name`` (case-insensitive; the longest such prefix), else the unprefixed one."""
    matches = [f for f in FAMILIES.values() if name[:len(f.prefix)].casefold() == f.prefix.casefold()]
    if not matches:
        raise ValueError(f"unknown model variant {name!r}: no family's prefix starts it. Model families: "
                         f"{_families_help()}")
    return max(matches, key=lambda f: len(f.prefix))


def get_variant(name: str | Variant) -> Variant:
    """The variant of any family named ``name`` (a variant of a registered family is returned as is).

    The prefix picks the family ("ViT-...", "BiT-...", case-insensitive; no prefix: Mixer), whose parser then reads
    the name. Raises ``ValueError`` with that parser's message (the sizes and named variants of the family) and the
    syntax of every family.

    Args:
        name: a variant name or object.
    """
    if isinstance(name, Variant) and name.family in FAMILIES:
        return name
    if not isinstance(name, str):
        raise ValueError(f"model variant must be a name, got {name!r} ({type(name).__name__}); families: "
                         f"{_families_help()}")
    try:
        return _family_of_name(name).parse(name)
    except ValueError as error:
        raise ValueError(f"{error}. Model families: {_families_help()}") from None


def get_family(variant: str | Variant) -> Family:
    """The ``Family`` of a variant or name.

    Args:
        variant: a variant name or object.
    """
    return FAMILIES[get_variant(variant).family]


def build_model(name_or_variant: str | Variant, image_size: int, num_classes: int, **kwargs: Any) -> Model:
    """The model of any family.

    Args:
        name_or_variant: a variant name or object.
        image_size: side of the square inputs.
        num_classes: classes of the head (0: none).
        **kwargs: in_chans, stoch_depth, dropout, head_bias_init: the ``Classifier`` constructor's.
    """
    v = get_variant(name_or_variant)
    return FAMILIES[v.family].model(v, image_size, num_classes, **kwargs)


def check_fits(variant: str | Variant, image_size: int) -> None:
    """Raise ``ValueError`` (naming the rule) unless the variant takes square ``image_size`` inputs.

    Mixer and ViT: a positive multiple of the patch size P. BiT: at least its total stride (32, CPU sizes 4).

    Args:
        variant: a variant name or object.
        image_size: side of the square inputs.
    """
    v = get_variant(variant)
    FAMILIES[v.family].check_fits(v, image_size)


def param_count(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Number of parameters from the layer shapes. Equals the module's count.

    Args:
        variant: a variant name or object.
        image_size: side of the square inputs.
        num_classes: classes of the head (0: none).
        in_chans: input channels.
    """
    v = get_variant(variant)
    return FAMILIES[v.family].param_count(v, image_size, num_classes, in_chans)


def forward_flops(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Forward FLOPs per image (2 per multiply-add over matmuls, convolutions and attention's QKᵀ/AV): exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts for the module (attention counted as batched matmuls or
    SDPA: on CPU, torch 2.13's counter has no formula for the fused CPU kernel; count on meta or the math backend).

    Args:
        variant, image_size, num_classes, in_chans: as ``param_count``'s.
    """
    v = get_variant(variant)
    return FAMILIES[v.family].forward_flops(v, image_size, num_classes, in_chans)


def train_flops_per_image(variant: str | Variant, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Training FLOPs per image: 3x forward (backward ~ 2x forward: gradients of activations and of weights).

    Args:
        variant, image_size, num_classes, in_chans: as ``param_count``'s.
    """
    return 3 * forward_flops(variant, image_size, num_classes, in_chans)


def shape_summary(variant: str | Variant) -> str:
    """The variant's shape in its family's own terms, for tables ("12 blocks, P 16, C 768, D_S 384, D_C 3072").

    Args:
        variant: a variant name or object.
    """
    v = get_variant(variant)
    return FAMILIES[v.family].shape_summary(v)
