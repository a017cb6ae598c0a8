"""MLP-Mixer (Tolstikhin et al., 2021) in PyTorch, plus its analytic size and cost.

Follows the official code (google-research/vision_transformer ``models_mixer.py`` and big_vision
``models/mlp_mixer.py``): a P×P stride-P convolution stem, N blocks of token mixing and channel
mixing, a final LayerNorm, global average pooling ("pre_logits") and a zero-initialised linear head.
No position embeddings: the token-mixing MLP is itself sensitive to token order. Registers the family "Mixer"
(kind "Mixer", unprefixed names) in ``workers.models.registry`` when imported.

Imports only torch, the standard library and ``workers.models`` layers and registry, because this module runs
inside Ray worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from workers.models.layers import Classifier, MlpBlock, drop_path, lecun_normal_, patch_tokens, reset_norms_
from workers.models.registry import Family, register_family

__all__ = [
    "FAMILY",
    "SIZES",
    "VARIANTS",
    "MixerBlock",
    "MixerSize",
    "MixerVariant",
    "MlpMixer",
    "check_fits",
    "forward_flops",
    "get_variant",
    "num_tokens",
    "param_count",
    "parse_variant",
]

_LN_EPS = 1e-6  # Flax LayerNorm default, used by the official Mixer code.


@dataclass(frozen=True)
class MixerSize:
    """Width and depth of one Mixer size ("B"); a variant adds the patch size P ("B/16")."""

    num_blocks: int
    hidden_dim: int  # C
    tokens_mlp_dim: int  # D_S
    channels_mlp_dim: int  # D_C


# Ordered from smallest to largest: the order of figures and tables. Nano, Micro and Mini are not from the
# paper: they exist for CPU work on 8..32 px inputs. S, B, L and H are the layers/C/D_S/D_C of the paper's
# Table 1, as big_vision's ``Model(variant=...)`` table.
SIZES: dict[str, MixerSize] = {
    "Nano": MixerSize(2, 32, 16, 64),
    "Micro": MixerSize(4, 64, 32, 128),
    "Mini": MixerSize(6, 128, 64, 256),
    "S": MixerSize(8, 512, 256, 2048),
    "B": MixerSize(12, 768, 384, 3072),
    "L": MixerSize(24, 1024, 512, 4096),
    "H": MixerSize(32, 1280, 640, 5120),
}


@dataclass(frozen=True)
class MixerVariant:
    """Hyper-parameters of one Mixer size and patch; ``name`` uses a dash ("B-16") as it appears in paths.

    ``size`` is the key in ``SIZES`` ("B"; "" for a hand-built variant outside the table). ``family`` is the
    model family, the same for every Mixer: figures draw one line per family and order variants by family,
    ``size_rank`` and decreasing patch size (ViT and BiT have their own classes: ``workers.models.registry``).
    """

    family: ClassVar[str] = "Mixer"
    kind: ClassVar[str] = "Mixer"  # the paper's figures group models as Mixer, attention (ViT), convolution (BiT)

    name: str
    num_blocks: int
    patch_size: int  # P
    hidden_dim: int  # C
    tokens_mlp_dim: int  # D_S
    channels_mlp_dim: int  # D_C
    description: str = ""
    size: str = ""

    @property
    def size_rank(self) -> int:
        """Position of ``size`` in ``SIZES``, small to large; ``len(SIZES)`` for a size outside the table."""
        return list(SIZES).index(self.size) if self.size in SIZES else len(SIZES)

    def shape_summary(self) -> str:
        """The shape for tables: "12 blocks, P 16, C 768, D_S 384, D_C 3072"."""
        return (f"{self.num_blocks} blocks, P {self.patch_size}, C {self.hidden_dim}, D_S {self.tokens_mlp_dim}, "
                f"D_C {self.channels_mlp_dim}")


def _variant(size: str, patch_size: int, description: str = "") -> MixerVariant:
    """The variant of ``SIZES[size]`` with ``patch_size`` px patches, named "SIZE-PATCH"."""
    s = SIZES[size]
    return MixerVariant(
        f"{size}-{patch_size}",
        s.num_blocks,
        patch_size,
        s.hidden_dim,
        s.tokens_mlp_dim,
        s.channels_mlp_dim,
        description or f"Mixer-{size}/{patch_size}: size {size} of the table with {patch_size} px patches",
        size,
    )


def _registry(*variants: MixerVariant) -> dict[str, MixerVariant]:
    return {v.name: v for v in variants}


# The named variants that `mixer-study models` lists, from smallest to largest. Any other size and patch
# ("S/8") is built by `get_variant` from the same table.
VARIANTS: dict[str, MixerVariant] = _registry(
    _variant("Nano", 4, "tiny smoke-test model for 8-32 px inputs (S=4..64)"),
    _variant("Micro", 4, "small CPU model for 16-32 px inputs (S=16..64)"),
    _variant("Micro", 2, "Micro-4 with 2 px patches, for 8-16 px inputs (S=16..64)"),
    _variant("Mini", 4, "largest CPU model, for 32 px inputs (S=64)"),
    _variant("S", 32, "paper Mixer-S/32, 224 px (S=49), 19.1M params"),
    _variant("S", 16, "paper Mixer-S/16, 224 px (S=196), 18.5M params"),
    _variant("B", 32, "paper Mixer-B/32, 224 px (S=49), 60.3M params"),
    _variant("B", 16, "paper Mixer-B/16, 224 px (S=196), 59.9M params"),
    _variant("L", 32, "paper Mixer-L/32, 224 px (S=49), 206.9M params"),
    _variant("L", 16, "paper Mixer-L/16, 224 px (S=196), 208.2M params"),
    _variant("H", 14, "paper Mixer-H/14, 224 px (S=256), 432.4M params"),
)

_VARIANT_NAME = re.compile(r"([A-Za-z]+)[/-]([0-9]+)")
_SIZE_BY_KEY = {size.casefold(): size for size in SIZES}


def parse_variant(name: str) -> MixerVariant:
    """Parse "SIZE/PATCH" or "SIZE-PATCH" ("B/16", "B-16", "S/8") as big_vision's ``Model(variant=...)``.

    SIZE is a key of ``SIZES`` (any letter case: "b/16" is "B-16"), PATCH any integer >= 1. A named variant
    (in ``VARIANTS``) is returned as registered, with its description; any other pair is built from the size
    table. Raises ``ValueError`` listing the sizes and examples for anything else (also for whitespace).
    """
    m = _VARIANT_NAME.fullmatch(name) if isinstance(name, str) else None
    size = _SIZE_BY_KEY.get(m.group(1).casefold()) if m else None
    if size is None:
        spaces = " without surrounding whitespace" if isinstance(name, str) and name != name.strip() else ""
        raise ValueError(
            f"unknown Mixer variant {name!r}: expected SIZE/PATCH or SIZE-PATCH{spaces} with SIZE one of "
            f"{', '.join(SIZES)} and PATCH an integer >= 1, e.g. B/16, B-16 or S/8; named variants: "
            f"{', '.join(VARIANTS)}"
        )
    patch_size = int(m.group(2))
    if patch_size < 1:
        raise ValueError(
            f"Mixer variant {name!r}: the patch size must be an integer >= 1, got {patch_size} "
            f"(sizes: {', '.join(SIZES)}; e.g. B/16, B-16 or S/8)"
        )
    canonical = f"{size}-{patch_size}"
    return VARIANTS[canonical] if canonical in VARIANTS else _variant(size, patch_size)


# The one parser of variant names: the model, config, plan, bench, results and figures all call it.
get_variant = parse_variant


def _as_variant(variant: MixerVariant | str) -> MixerVariant:
    return get_variant(variant) if isinstance(variant, str) else variant


def num_tokens(variant: MixerVariant | str, image_size: int) -> int:
    """Number of patches S = (image_size / P)^2 of a square image."""
    v = _as_variant(variant)
    return patch_tokens(image_size, v.patch_size, f"Mixer {v.name}")


def check_fits(variant: MixerVariant | str, image_size: int) -> None:
    """Raise ``ValueError`` unless square ``image_size`` inputs cut into whole P×P patches (the token MLP fixes S).

    Args:
        variant: a Mixer variant or its name.
        image_size: side of the square inputs.
    """
    num_tokens(variant, image_size)


def param_count(variant: MixerVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Number of parameters, computed from the layer shapes; ``num_classes=0`` means no head."""
    v = _as_variant(variant)
    s, c = num_tokens(v, image_size), v.hidden_dim
    stem = v.patch_size**2 * in_chans * c + c
    token_mlp = (s * v.tokens_mlp_dim + v.tokens_mlp_dim) + (v.tokens_mlp_dim * s + s)
    channel_mlp = (c * v.channels_mlp_dim + v.channels_mlp_dim) + (v.channels_mlp_dim * c + c)
    block = 2 * (2 * c) + token_mlp + channel_mlp  # two LayerNorms (scale and bias each)
    head = c * num_classes + num_classes
    return stem + v.num_blocks * block + 2 * c + head


def forward_flops(variant: MixerVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Forward FLOPs for one image, counting a multiply-add as 2 FLOPs.

    Counted: the stem convolution, both matmuls of every token- and channel-mixing MLP, and the head.
    Not counted (all O(S·C) per block, a few percent at most): bias additions, LayerNorms, GELUs,
    residual additions, stochastic-depth masks, global average pooling and dropout. This is the
    convention of ``torch.utils.flop_counter`` as well, so the two agree exactly.
    """
    v = _as_variant(variant)
    s, c = num_tokens(v, image_size), v.hidden_dim
    stem = s * (v.patch_size**2 * in_chans) * c
    token_mlp = c * (2 * s * v.tokens_mlp_dim)  # S -> D_S -> S, once per channel: linear in S
    channel_mlp = s * (2 * c * v.channels_mlp_dim)  # C -> D_C -> C, once per token
    head = c * num_classes
    return 2 * (stem + v.num_blocks * (token_mlp + channel_mlp) + head)


class MixerBlock(nn.Module):
    """Token mixing over the S patches, then channel mixing over the C channels, each residual."""

    def __init__(
        self, num_tokens: int, hidden_dim: int, tokens_mlp_dim: int, channels_mlp_dim: int, stoch_depth: float
    ) -> None:
        super().__init__()
        self.stoch_depth = stoch_depth
        self.norm1 = nn.LayerNorm(hidden_dim, eps=_LN_EPS)
        self.token_mixing = MlpBlock(num_tokens, tokens_mlp_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=_LN_EPS)
        self.channel_mixing = MlpBlock(hidden_dim, channels_mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        # (B, S, C) -> (B, C, S): the token MLP is shared by all channels and mixes along S.
        y = self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        # Separate masks for the two branches, as big_vision draws them.
        x = x + drop_path(y, self.stoch_depth, self.training)
        y = self.channel_mixing(self.norm2(x))
        return x + drop_path(y, self.stoch_depth, self.training)


class MlpMixer(Classifier):
    """MLP-Mixer classifier for square ``image_size`` inputs (the token MLP fixes S, so H, W too).

    The constructor, head, ``forward`` and ``set_grad_checkpointing`` are ``workers.models.layers.Classifier``'s:
    ``MlpMixer(variant, image_size, num_classes, in_chans=3, stoch_depth=0, dropout=0, head_bias_init=0)``.
    ``stoch_depth`` ramps linearly from 0 at the first block to its value at the last (big_vision's ramp).
    """

    parse_variant = staticmethod(parse_variant)
    variant: MixerVariant

    def _build(self, variant: MixerVariant, stoch_depth: float) -> int:
        v = variant
        self.num_tokens = num_tokens(v, self.image_size)
        self.stem = nn.Conv2d(self.in_chans, v.hidden_dim, kernel_size=v.patch_size, stride=v.patch_size)
        n = v.num_blocks
        self.blocks = nn.ModuleList(
            MixerBlock(
                self.num_tokens,
                v.hidden_dim,
                v.tokens_mlp_dim,
                v.channels_mlp_dim,
                stoch_depth * i / max(n - 1, 1),  # big_vision's ramp: 0 at the first block
            )
            for i in range(n)
        )
        self.norm = nn.LayerNorm(v.hidden_dim, eps=_LN_EPS)
        return v.hidden_dim

    def _init_weights(self) -> None:
        # Flax defaults, as the official code: lecun-normal kernels, zero biases, LayerNorm scale 1 and bias 0. The
        # loop covers the head too (then zeroed by Classifier): its draw keeps the random stream of earlier releases.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
        reset_norms_(self)

    def _input_note(self) -> str:
        return f"S={self.num_tokens} tokens"

    def _embed(self, x: Tensor) -> Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)  # (B, C, H/P, W/P) -> (B, S, C), row-major patches

    def _pool(self, x: Tensor) -> Tensor:
        return self.norm(x).mean(dim=1)

    def token_mixing_weights(self, block: int) -> Tensor:
        """Weight of the first token-mixing Linear of ``block``, shape (D_S, S), detached.

        Row d holds hidden unit d's weights over the S patches; reshaped to sqrt(S) x sqrt(S) it is
        the picture of the paper's Fig. 5.

        Args:
            block: index of the block.
        """
        return self.blocks[block].token_mixing.fc1.weight.detach()


_FAMILY_PREFIX = re.compile(r"^Mixer-", re.IGNORECASE)


def _parse_name(name: str) -> MixerVariant:
    """The registry's parser: ``parse_variant`` of the name without an optional "Mixer-" ("Mixer-B/16")."""
    return parse_variant(_FAMILY_PREFIX.sub("", name, count=1))


FAMILY = register_family(Family(
    name="Mixer", kind="Mixer", prefix="", syntax="SIZE/PATCH or SIZE-PATCH (B/16, B-16, Micro-4, S/8)",
    parse=_parse_name, model=MlpMixer, variants=VARIANTS, param_count=param_count, forward_flops=forward_flops,
    check_fits=check_fits, shape_summary=MixerVariant.shape_summary,
))
