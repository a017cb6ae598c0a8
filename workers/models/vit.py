"""Vision Transformer (Dosovitskiy et al., ICLR 2021) in PyTorch, with every family's API
(``workers.models.layers.Classifier``). Registers the family "ViT" (kind "attention", prefix "ViT-") when imported.

The ViT of the paper and of google-research/vision_transformer ``vit_jax/models_vit.py`` (the architecture timm's
``vision_transformer.py`` ports, and whose parameter counts timm reports): a P×P stride-P convolution stem, a
learned class token prepended to the S patch tokens, a learned position embedding over all S+1 tokens, N pre-LN
encoder blocks ``x += MHSA(LN(x)); x += MLP(LN(x))``, a final LayerNorm (eps 1e-6, Flax's default) and a
zero-initialised linear head on the class token. Sizes Ti/S/B/L/H as big_vision ``models/vit.py``
``decode_variant`` (Table 2 of Zhai et al. 2021, "Scaling Vision Transformers"; Ti from DeiT).

Differences from big_vision's current ``vit.py``, on purpose (the paper's ViT, and timm's counts): the class token
("tok" pooling) rather than global average pooling, and the position embedding covers the class token as well
((1, S+1, C), added after the class token is prepended; big_vision adds a (1, S, C) one before). big_vision's
``vit.py`` has no stochastic depth; ``stoch_depth`` here is the Mixer's (big_vision ``mlp_mixer.py``): a rate ramped
linearly from 0 at the first block to ``stoch_depth`` at the last (as timm's ``drop_path_rate`` ramp), one
per-example mask per residual branch, no 1/(1-p) rescale.

Cost per image, T = S + 1 tokens, C width, D MLP width, 2 FLOPs per multiply-add (what
``torch.utils.flop_counter`` counts: matmuls, convolutions and attention's two batched matmuls)::

    2 * [ S·P²·c_in·C                                       stem
          + N · ( T·C·3C + T·C·C + 2·T·D·C                  qkv, out projection, MLP: linear in T
                  + 2·T²·C )                                QKᵀ and AV over all heads: quadratic in T
          + C·K ]                                           head

The T² term has no parameters, which is why "6 x parameters x tokens" underestimates ViT's training compute at
high resolution: with D = 4C it is T / (6C + T) of a block's FLOPs, 4 % for B/16 at 224 px, 47 % at 1024 px.

Imports only torch, the standard library and ``workers.models`` (layers, registry, the Mixer size table): this module
runs inside Ray worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.layers import Classifier, MlpBlock, drop_path, lecun_normal_, patch_tokens, reset_norms_
from workers.models.mixer import SIZES as MIXER_SIZES
from workers.models.registry import Family, register_family

__all__ = [
    "FAMILY",
    "SIZES",
    "VARIANTS",
    "Attention",
    "ViTBlock",
    "ViTSize",
    "ViTVariant",
    "VisionTransformer",
    "check_fits",
    "forward_flops",
    "num_tokens",
    "param_count",
    "parse_variant",
]

_LN_EPS = 1e-6  # Flax LayerNorm default, as the official ViT code.
_POSEMB_STD = 0.02  # vit_jax models_vit.py: AddPositionEmbs(posemb_init=nn.initializers.normal(stddev=0.02))


@dataclass(frozen=True)
class ViTSize:
    """Width and depth of one ViT size ("B"); a variant adds the patch size P ("B/16")."""

    num_blocks: int  # encoder blocks
    hidden_dim: int  # C
    mlp_dim: int  # D
    num_heads: int  # heads; C / heads is the head dimension


# Small to large. Ti..H: big_vision ``vit.py`` ``decode_variant`` (ViT paper Table 1 for B/L/H). Nano, Micro and
# Mini are the Mixer CPU sizes' layers, C and D_C (workers.models.mixer.SIZES), with heads dividing C (head dim 16-32).
SIZES: dict[str, ViTSize] = {
    "Nano": ViTSize(2, 32, 64, 2),
    "Micro": ViTSize(4, 64, 128, 2),
    "Mini": ViTSize(6, 128, 256, 4),
    "Ti": ViTSize(12, 192, 768, 3),
    "S": ViTSize(12, 384, 1536, 6),
    "B": ViTSize(12, 768, 3072, 12),
    "L": ViTSize(24, 1024, 4096, 16),
    "H": ViTSize(32, 1280, 5120, 16),
}

# Global size rank (workers.models.registry sorts all families by it): a ViT size has the rank of the Mixer size of the
# same letter (Nano 0 ... H 6, workers.models.mixer.SIZES); Ti (5.7M parameters) sits between Mini and S.
_SIZE_RANK: dict[str, float] = {size: float(i) for i, size in enumerate(MIXER_SIZES) if size in SIZES} | {"Ti": 2.5}


@dataclass(frozen=True)
class ViTVariant:
    """Hyper-parameters of one ViT size and patch; ``name`` is "ViT-SIZE/PATCH" ("ViT-B/16").

    ``size`` is the key in ``SIZES`` ("" for a hand-built variant outside the table).
    """

    family: ClassVar[str] = "ViT"
    kind: ClassVar[str] = "attention"  # the paper's figures group models as Mixer, attention, convolution

    name: str
    num_blocks: int
    patch_size: int  # P
    hidden_dim: int  # C
    mlp_dim: int  # D
    num_heads: int
    description: str = ""
    size: str = ""

    def shape_summary(self) -> str:
        """The shape for tables: "12 blocks, P 16, C 768, MLP 3072, 12 heads"."""
        return (f"{self.num_blocks} blocks, P {self.patch_size}, C {self.hidden_dim}, MLP {self.mlp_dim}, "
                f"{self.num_heads} heads")

    @property
    def size_rank(self) -> float:
        """Order across families, small to large (the Mixer size ranks; see ``_SIZE_RANK``)."""
        return _SIZE_RANK.get(self.size, float(len(MIXER_SIZES)))


def _variant(size: str, patch_size: int, description: str = "") -> ViTVariant:
    s = SIZES[size]
    return ViTVariant(
        f"ViT-{size}/{patch_size}", s.num_blocks, patch_size, s.hidden_dim, s.mlp_dim, s.num_heads,
        description or f"ViT-{size}/{patch_size}: size {size} of the table with {patch_size} px patches", size,
    )


# The named variants (`mixer-study models` lists them), small to large; any other SIZE/PATCH parses as well.
# Parameter counts with a 1000-class head at 224 px (timm's counts of the same models).
VARIANTS: dict[str, ViTVariant] = {
    v.name: v
    for v in (
        _variant("Nano", 4, "ViT beside Mixer Nano-4 (its layers, C and D_C), for 8-32 px inputs"),
        _variant("Micro", 4, "ViT beside Mixer Micro-4 (its layers, C and D_C), for 16-32 px inputs"),
        _variant("Mini", 4, "ViT beside Mixer Mini-4 (its layers, C and D_C), for 32 px inputs"),
        _variant("Ti", 16, "ViT-Ti/16 (DeiT-Ti), 224 px (S=196), 5.7M params"),
        _variant("S", 32, "ViT-S/32, 224 px (S=49), 22.9M params"),
        _variant("S", 16, "ViT-S/16, 224 px (S=196), 22.1M params"),
        _variant("B", 32, "paper ViT-B/32, 224 px (S=49), 88.2M params"),
        _variant("B", 16, "paper ViT-B/16, 224 px (S=196), 86.6M params"),
        _variant("L", 32, "paper ViT-L/32, 224 px (S=49), 306.5M params"),
        _variant("L", 16, "paper ViT-L/16, 224 px (S=196), 304.3M params"),
        _variant("H", 14, "paper ViT-H/14, 224 px (S=256), 632.0M params"),
    )
}

_VARIANT_NAME = re.compile(r"ViT-([A-Za-z]+)[/-]([0-9]+)", re.IGNORECASE)
_SIZE_BY_KEY = {size.casefold(): size for size in SIZES}


def parse_variant(name: str) -> ViTVariant:
    """Parse "ViT-SIZE/PATCH" or "ViT-SIZE-PATCH" ("ViT-B/16", "vit-b-16", "ViT-S/8"), SIZE a key of ``SIZES``.

    Named variants are returned as registered; any other size and patch is built from the table. Raises
    ``ValueError`` listing the sizes and examples.
    """
    m = _VARIANT_NAME.fullmatch(name) if isinstance(name, str) else None
    size = _SIZE_BY_KEY.get(m.group(1).casefold()) if m else None
    patch_size = int(m.group(2)) if m else 0
    if size is None or patch_size < 1:
        raise ValueError(
            f"unknown ViT variant {name!r}: expected ViT-SIZE/PATCH or ViT-SIZE-PATCH with SIZE one of "
            f"{', '.join(SIZES)} and PATCH an integer >= 1, e.g. ViT-B/16, ViT-B-16 or ViT-Micro/4; named variants: "
            f"{', '.join(VARIANTS)}"
        )
    canonical = f"ViT-{size}/{patch_size}"
    return VARIANTS[canonical] if canonical in VARIANTS else _variant(size, patch_size)


def _as_variant(variant: ViTVariant | str) -> ViTVariant:
    return parse_variant(variant) if isinstance(variant, str) else variant


def num_tokens(variant: ViTVariant | str, image_size: int) -> int:
    """Number of patches S = (image_size / P)^2 (the class token not included)."""
    v = _as_variant(variant)
    return patch_tokens(image_size, v.patch_size, v.name)


def check_fits(variant: ViTVariant | str, image_size: int) -> None:
    """Raise ``ValueError`` unless square ``image_size`` inputs cut into whole P×P patches."""
    num_tokens(variant, image_size)


def param_count(variant: ViTVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Number of parameters, from the layer shapes; ``num_classes=0`` means no head.

    stem P²·c_in·C + C; class token C; position embedding (S+1)·C; per block two LayerNorms 4C, qkv C·3C + 3C,
    out projection C² + C, MLP 2·C·D + D + C; final LayerNorm 2C; head C·K + K.
    """
    v = _as_variant(variant)
    t, c, d = num_tokens(v, image_size) + 1, v.hidden_dim, v.mlp_dim
    stem = v.patch_size**2 * in_chans * c + c
    block = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * d + d) + (d * c + c)
    head = c * num_classes + num_classes
    return stem + c + t * c + v.num_blocks * block + 2 * c + head


def forward_flops(variant: ViTVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Forward FLOPs for one image (the module docstring's formula), as ``torch.utils.flop_counter`` counts them.

    Not counted (O(T·C) per block): biases, LayerNorms, GELU, softmax, the 1/sqrt(d) scale, residual additions.
    """
    v = _as_variant(variant)
    s = num_tokens(v, image_size)
    t, c, d = s + 1, v.hidden_dim, v.mlp_dim
    stem = s * (v.patch_size**2 * in_chans) * c
    linear = t * c * 3 * c + t * c * c + 2 * t * c * d  # qkv, out projection, MLP
    attention = 2 * t * t * c  # QKᵀ (T×T per head, over head_dim) and AV, summed over heads: 2·T²·C multiply-adds
    return 2 * (stem + v.num_blocks * (linear + attention) + c * num_classes)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(Q Kᵀ / sqrt(d)) V per head, heads concatenated, then projected.

    Q, K, V come from one Linear(C, 3C) (timm's layout; the same parameters as Flax's separate query/key/value
    DenseGeneral layers). ``F.scaled_dot_product_attention`` picks the fused kernel of the device.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT width C={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, c))


class ViTBlock(nn.Module):
    """Pre-LN encoder block: x += MHSA(LN(x)); x += MLP(LN(x)), each branch with its own stochastic-depth mask."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, stoch_depth: float) -> None:
        super().__init__()
        self.stoch_depth = stoch_depth
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = MlpBlock(dim, mlp_dim)  # Linear -> GELU (tanh, Flax's default) -> Linear

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.stoch_depth, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.stoch_depth, self.training)


class VisionTransformer(Classifier):
    """ViT classifier for square ``image_size`` inputs (the position embedding fixes S, so H and W too).

    The constructor and API of every family (``workers.models.layers.Classifier``): ``stoch_depth`` (rate of the
    last block, ramped from 0), ``dropout`` on pre_logits, ``head_bias_init`` (constant initial bias of the
    zero-initialised head), ``num_classes=0`` for no head, ``forward -> (logits, {"pre_logits"})``,
    ``set_grad_checkpointing``.

    Parameters outside Linear/Conv layers, so never weight-decayed (``workers.training.optim.decay_mask``, as
    big_vision's ``.*/kernel$`` mask): ``cls_token`` (1, 1, C), zeros, the class token's own parameter; ``pos_embed``
    (1, S+1, C), normal(0.02), row 0 for the class token then the S patches row-major: the only parameter that
    depends on ``image_size`` (for another resolution resample its grid rows, big_vision ``resample_posemb``).
    """

    num_prefix_tokens: ClassVar[int] = 1  # the class token
    parse_variant = staticmethod(parse_variant)
    variant: ViTVariant

    def _build(self, variant: ViTVariant, stoch_depth: float) -> int:
        v, c = variant, variant.hidden_dim
        self.num_tokens = num_tokens(v, self.image_size)  # S patches; the sequence has S + 1 tokens
        self.patch_embed = nn.Conv2d(self.in_chans, c, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens + 1, c))
        n = v.num_blocks
        self.blocks = nn.ModuleList(
            ViTBlock(c, v.mlp_dim, v.num_heads, stoch_depth * i / max(n - 1, 1)) for i in range(n)
        )
        self.norm = nn.LayerNorm(c, eps=_LN_EPS)
        return c

    def _init_weights(self) -> None:
        # vit_jax models_vit.py / big_vision vit.py: lecun-normal patch embedding (Flax Conv default), Xavier-uniform
        # Dense kernels with zero attention biases and normal(1e-6) MLP biases, zero class token, normal(0.02)
        # position embedding (the zero head kernel: Classifier's).
        lecun_normal_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed, std=_POSEMB_STD)
        nn.init.zeros_(self.cls_token)
        for block in self.blocks:
            c = block.attn.proj.in_features
            for part in block.attn.qkv.weight.split(c):  # Q, K and V as three (C, C) kernels, as Flax's
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
        reset_norms_(self)

    def _input_note(self) -> str:
        return f"S={self.num_tokens} patches"

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, S, C), row-major patches
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def _pool(self, x: Tensor) -> Tensor:
        return self.norm(x)[:, 0]  # the final LayerNorm's class-token output


FAMILY = register_family(Family(
    name="ViT", kind="attention", prefix="ViT-",
    syntax="ViT-SIZE/PATCH or ViT-SIZE-PATCH (ViT-B/16, ViT-B-16, ViT-Micro/4)", parse=parse_variant,
    model=VisionTransformer, variants=VARIANTS, param_count=param_count, forward_flops=forward_flops,
    check_fits=check_fits, shape_summary=ViTVariant.shape_summary,
))
