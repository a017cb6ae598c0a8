"""BiT: ResNet-v2 with GroupNorm and weight-standardised convolutions (Kolesnikov et al., ECCV 2020), uniform API.

As big_vision ``models/bit_paper.py`` ("BiT models as in the paper (ResNet V2)") and timm ``resnetv2.py``
(``resnetv2_50x1_bit`` ...), whose parameter counts these match:

- root: a 7×7 stride-2 weight-standardised convolution (no bias, no norm: the units are pre-activation), then a
  3×3 stride-2 max-pool (padding 1, -inf padded as Flax's ``max_pool``);
- stages of pre-activation bottleneck units, stage i with mid width ``width·2^i`` and output 4× that, the first
  unit of stages 2.. striding by 2 in its 3×3 convolution::

      y = relu(GN(x));  shortcut = conv1x1_stride(y) if the shape changes else x
      out = shortcut + conv1x1(relu(GN(conv3x3_stride(relu(GN(conv1x1(y)))))))

- a final GroupNorm + ReLU, global average pooling ("pre_logits") and a zero-initialised linear head.

GroupNorm: 32 groups, eps 1e-5 (big_vision's ``GroupNorm``, timm's ``GroupNormAct``). Weight standardisation
(``StdConv2d``) normalises each output channel's kernel over (c_in, k, k) before the convolution:
ŵ = (w - mean) / sqrt(var + eps), eps 1e-10 as big_vision ``bit_paper.StdConv`` (timm uses 1e-8).
Depths 26/50/101/152/200 are big_vision ``bit.get_block_desc``; width factor x1..x4 multiplies all widths
(R50x1: width 64).

The CPU variants (not from the paper) swap the root for a 3×3 stride-1 convolution without max-pool, so 16-32 px
inputs keep their resolution into stage 1, and use three narrow stages sized to Mixer Micro-4 / Mini-4.

Cost per image, 2 FLOPs per multiply-add over every convolution (what ``torch.utils.flop_counter`` counts):
2·H_out·W_out·C_out·C_in·k² each, plus 2·C·K for the head. Not counted: GroupNorm, ReLU, pooling, residual
additions, and the weight standardisation (O(parameters), independent of the batch).

Registers the family "BiT" (kind "convolution", prefix "BiT-") in ``workers.models.registry`` when imported.

Imports only torch, the standard library and ``workers.models`` (layers, registry, the Mixer sizes): this module runs
inside Ray worker processes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.layers import Classifier, drop_path, lecun_normal_, reset_norms_
from workers.models.mixer import SIZES as MIXER_SIZES
from workers.models.mixer import get_variant as mixer_variant
from workers.models.mixer import param_count as mixer_param_count
from workers.models.registry import Family, register_family

__all__ = [
    "BLOCKS",
    "FAMILY",
    "VARIANTS",
    "BiTVariant",
    "PreActBottleneck",
    "ResNetV2",
    "StdConv2d",
    "check_fits",
    "forward_flops",
    "param_count",
    "parse_variant",
]

_GN_EPS = 1e-5
_WS_EPS = 1e-10

# Units per stage for each depth (big_vision ``bit.get_block_desc``): depth = 3 x units + 2 (root and head).
BLOCKS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


@dataclass(frozen=True)
class BiTVariant:
    """One ResNet-v2: units per stage, root width (stage i has mid width ``width·2^i``), root type and GN groups.

    ``stem`` is "imagenet" (7×7/2 convolution + 3×3/2 max-pool, the paper's) or "cpu" (3×3/1, no pool).
    ``size`` is "R50x1"-style for the paper's models, "Micro"/"Mini" for the CPU ones. ``patch_size`` is None.
    """

    family: ClassVar[str] = "BiT"
    kind: ClassVar[str] = "convolution"  # the paper's figures group models as Mixer, attention, convolution
    patch_size: ClassVar[None] = None  # no patches: the uniform variant API has the attribute, as None

    name: str
    blocks: tuple[int, ...]
    width: int
    stem: str = "imagenet"
    num_groups: int = 32
    description: str = ""
    size: str = ""

    @property
    def num_blocks(self) -> int:
        """Residual units in all stages (each has three convolutions)."""
        return sum(self.blocks)

    @property
    def depth(self) -> int:
        """Layers as ResNet names count them: 3 per unit + root + head (R50 -> 50)."""
        return 3 * self.num_blocks + 2

    @property
    def total_stride(self) -> int:
        """Input pixels per pixel of the last feature map, per side: root (4 or 1) x 2 per stage after the first."""
        return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.blocks) - 1)

    @property
    def size_rank(self) -> float:
        """Order across families, small to large: CPU sizes as the Mixer's (Micro 1, Mini 2); a paper model at the
        Mixer size of the same parameter count (224 px, 1000 classes), log-interpolated between S=3 ... H=6."""
        if self.size in MIXER_SIZES:
            return float(list(MIXER_SIZES).index(self.size))
        return _ladder_rank(param_count(self, 224, 1000))

    def shape_summary(self) -> str:
        """The shape for tables: "50 layers, units 3/4/6/3, widths 64-2048, imagenet root"."""
        units = "/".join(map(str, self.blocks))
        return f"{self.depth} layers, units {units}, widths {self.width}-{_out_chans(self)}, {self.stem} root"


@functools.cache
def _ladder() -> tuple[tuple[float, float], ...]:
    """(log parameters, rank) of the paper's Mixer sizes S/16, B/16, L/16, H/14 at 224 px with 1000 classes."""
    names = ("S-16", "B-16", "L-16", "H-14")
    return tuple(
        (math.log(mixer_param_count(mixer_variant(n), 224, 1000)), float(list(MIXER_SIZES).index(n.split("-")[0])))
        for n in names
    )


def _ladder_rank(params: int) -> float:
    """Piecewise-linear in log(params) through the ladder's points, extended linearly past both ends."""
    ladder, x = _ladder(), math.log(params)
    i = 1 + sum(x > p for p, _ in ladder[1:-1])  # segment (i-1, i)
    (x0, r0), (x1, r1) = ladder[i - 1], ladder[i]
    return r0 + (r1 - r0) * (x - x0) / (x1 - x0)


def _paper(depth: int, width_factor: int, description: str = "") -> BiTVariant:
    size = f"R{depth}x{width_factor}"
    return BiTVariant(
        f"BiT-{size}", BLOCKS[depth], 64 * width_factor, "imagenet", 32,
        description or f"BiT-{size}: ResNet-v2 {depth} layers, widths x{width_factor}", size,
    )


# The named variants (`mixer-study models` lists them), small to large. CPU ones: params with a 10-class head, the
# same at any input size (Mixer Micro-4 has 75,530 / 88,010 at 16 / 32 px, Mini-4 419,178 / 456,330).
# Paper ones: the BiT paper's released models; parameters with a 1000-class head (timm's counts).
VARIANTS: dict[str, BiTVariant] = {
    v.name: v
    for v in (
        BiTVariant("BiT-Micro", (3, 3, 3), 8, "cpu", 4,
                   "CPU ResNet-v2 (29 layers, widths 8-128) beside Mixer Micro-4: 79,826 params at 10 classes",
                   "Micro"),
        BiTVariant("BiT-Mini", (4, 4, 4), 16, "cpu", 8,
                   "CPU ResNet-v2 (38 layers, widths 16-256) beside Mixer Mini-4: 404,954 params at 10 classes",
                   "Mini"),
        _paper(50, 1, "paper BiT-R50x1 (ResNet-50 v2), 25.5M params"),
        _paper(101, 1, "BiT-R101x1, 44.5M params"),
        _paper(50, 3, "paper BiT-R50x3, 217.3M params"),
        _paper(152, 2, "BiT-R152x2, 236.3M params"),
        _paper(101, 3, "BiT-R101x3, 387.9M params"),
        _paper(152, 4, "BiT-R152x4, 936.5M params"),
    )
}

_PAPER_NAME = re.compile(r"BiT-R([0-9]+)x([0-9]+)", re.IGNORECASE)
_CPU_NAME = re.compile(r"BiT-([A-Za-z]+)", re.IGNORECASE)
_CPU_BY_KEY = {v.size.casefold(): v for v in VARIANTS.values() if v.stem == "cpu"}


def parse_variant(name: str) -> BiTVariant:
    """Parse "BiT-R{depth}x{width}" ("BiT-R50x1", "bit-r101x3"; depth in ``BLOCKS``, width >= 1) or a CPU size
    ("BiT-Micro", "BiT-Mini"). Raises ``ValueError`` listing the depths, CPU sizes and examples."""
    paper = _PAPER_NAME.fullmatch(name) if isinstance(name, str) else None
    if paper and int(paper.group(1)) in BLOCKS and int(paper.group(2)) >= 1:
        depth, width_factor = int(paper.group(1)), int(paper.group(2))
        canonical = f"BiT-R{depth}x{width_factor}"
        return VARIANTS[canonical] if canonical in VARIANTS else _paper(depth, width_factor)
    cpu = _CPU_NAME.fullmatch(name) if isinstance(name, str) else None
    if cpu and cpu.group(1).casefold() in _CPU_BY_KEY:
        return _CPU_BY_KEY[cpu.group(1).casefold()]
    raise ValueError(
        f"unknown BiT variant {name!r}: expected BiT-R{{DEPTH}}x{{WIDTH}} with DEPTH one of "
        f"{', '.join(map(str, BLOCKS))} and WIDTH an integer >= 1 (e.g. BiT-R50x1, BiT-R152x4), or a CPU size "
        f"BiT-{' / BiT-'.join(v.size for v in _CPU_BY_KEY.values())}; named variants: {', '.join(VARIANTS)}"
    )


def _as_variant(variant: BiTVariant | str) -> BiTVariant:
    return parse_variant(variant) if isinstance(variant, str) else variant


def check_fits(variant: BiTVariant | str, image_size: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` is at least the total stride (32 for the paper's models, 4 for
    the CPU ones): below it the last stages would convolve a 1×1 map of padding-dominated pixels."""
    v = _as_variant(variant)
    if image_size < v.total_stride:
        raise ValueError(
            f"image_size {image_size} is below the total stride {v.total_stride} of {v.name} "
            f"({v.stem} root and {len(v.blocks)} stages): use inputs of at least {v.total_stride} px"
        )


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _units(v: BiTVariant) -> Iterator[tuple[int, int, int]]:
    """(in channels, mid channels, stride) of every unit in order; each outputs 4 x mid channels."""
    c = v.width
    for i, count in enumerate(v.blocks):
        mid = v.width * 2**i
        for j in range(count):
            yield c, mid, 2 if i > 0 and j == 0 else 1
            c = 4 * mid


def _out_chans(v: BiTVariant) -> int:
    return 4 * v.width * 2 ** (len(v.blocks) - 1)


def _stem_shape(v: BiTVariant) -> tuple[int, int, int]:
    """(kernel, stride, padding) of the root convolution."""
    return (7, 2, 3) if v.stem == "imagenet" else (3, 1, 1)


def param_count(variant: BiTVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Number of parameters (independent of ``image_size``, kept for the uniform signature); ``num_classes=0``
    means no head. Per unit: GN(in) 2·in, 1×1 in·mid, GN 2·mid, 3×3 9·mid², GN 2·mid, 1×1 mid·4mid, and a 1×1
    projection in·4mid where the shape changes; convolutions have no bias."""
    v = _as_variant(variant)
    k = _stem_shape(v)[0]
    total = k * k * in_chans * v.width
    for c, mid, stride in _units(v):
        out = 4 * mid
        total += 2 * c + c * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out
        if c != out or stride != 1:
            total += c * out
    c = _out_chans(v)
    return total + 2 * c + c * num_classes + num_classes


def forward_flops(variant: BiTVariant | str, image_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Forward FLOPs for one ``image_size`` × ``image_size`` image (module docstring), as torch's counter counts."""
    v = _as_variant(variant)
    check_fits(v, image_size)
    k, s, p = _stem_shape(v)
    h = _conv_out(image_size, k, s, p)
    macs = h * h * k * k * in_chans * v.width
    if v.stem == "imagenet":
        h = _conv_out(h, 3, 2, 1)  # max-pool
    for c, mid, stride in _units(v):
        out = 4 * mid
        ho = _conv_out(h, 3, stride, 1)
        macs += h * h * c * mid + ho * ho * 9 * mid * mid + ho * ho * mid * out
        if c != out or stride != 1:
            macs += ho * ho * c * out  # 1×1 stride-s projection: the same output grid as the 3×3 convolution
        h = ho
    return 2 * (macs + _out_chans(v) * num_classes)


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019; BiT): each output channel's kernel is standardised over
    (c_in, kh, kw) before use, ŵ = (w - mean) / sqrt(var + eps) (biased variance, as big_vision's ``standardize``).

    An ``nn.Conv2d`` subclass holding the raw ``weight``, so ``workers.training.optim.decay_mask`` decays it as a
    kernel.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 eps: float = _WS_EPS) -> None:
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=padding, bias=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (self.weight - mean) * torch.rsqrt(var + self.eps), None)


class PreActBottleneck(nn.Module):
    """ResNet-v2 bottleneck unit (big_vision ``bit_paper.ResidualUnit``), stochastic depth on its residual branch."""

    def __init__(self, in_chans: int, mid_chans: int, stride: int, num_groups: int, stoch_depth: float) -> None:
        super().__init__()
        out_chans = 4 * mid_chans
        self.stoch_depth = stoch_depth
        self.norm1 = nn.GroupNorm(num_groups, in_chans, eps=_GN_EPS)
        self.downsample = (
            StdConv2d(in_chans, out_chans, 1, stride) if in_chans != out_chans or stride != 1 else None
        )
        self.conv1 = StdConv2d(in_chans, mid_chans, 1)
        self.norm2 = nn.GroupNorm(num_groups, mid_chans, eps=_GN_EPS)
        self.conv2 = StdConv2d(mid_chans, mid_chans, 3, stride, padding=1)
        self.norm3 = nn.GroupNorm(num_groups, mid_chans, eps=_GN_EPS)
        self.conv3 = StdConv2d(mid_chans, out_chans, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(x))
        shortcut = self.downsample(y) if self.downsample is not None else x  # the projection sees the pre-activation
        y = self.conv1(y)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return shortcut + drop_path(y, self.stoch_depth, self.training)


class ResNetV2(Classifier):
    """BiT classifier with every family's constructor and API (``workers.models.layers.Classifier``).

    ``stoch_depth`` drops each unit's residual branch per example, the rate ramped linearly over all units from 0
    to ``stoch_depth`` (timm's ResNetV2 ``drop_path_rate`` ramp; big_vision's BiT has none; 0 reproduces BiT).
    ``dropout`` applies to pre_logits, ``head_bias_init`` is the constant bias of the zero-initialised head,
    ``num_classes=0`` builds no head. Inputs must be ``image_size`` square (the FLOPs accounting assumes it); the
    weights themselves fit any resolution, so a model rebuilt at another size loads the same state_dict.
    """

    parse_variant = staticmethod(parse_variant)
    variant: BiTVariant

    def _build(self, variant: BiTVariant, stoch_depth: float) -> int:
        v = variant
        check_fits(v, self.image_size)
        if v.width % v.num_groups:
            raise ValueError(f"{v.name}: GroupNorm with {v.num_groups} groups needs widths divisible by it, "
                             f"got root width {v.width}")
        k, s, p = _stem_shape(v)
        root = [StdConv2d(self.in_chans, v.width, k, s, padding=p)]
        if v.stem == "imagenet":
            root.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*root)
        units = list(_units(v))
        n = len(units)
        self.blocks = nn.ModuleList(
            PreActBottleneck(c, mid, stride, v.num_groups, stoch_depth * i / max(n - 1, 1))
            for i, (c, mid, stride) in enumerate(units)
        )
        self.norm = nn.GroupNorm(v.num_groups, _out_chans(v), eps=_GN_EPS)
        return _out_chans(v)

    def _init_weights(self) -> None:
        # Flax defaults, as big_vision: lecun-normal kernels (scale-free after standardisation), GroupNorm scale 1 and
        # bias 0 (the zero head kernel: Classifier's).
        for m in self.modules():
            if isinstance(m, StdConv2d):
                lecun_normal_(m.weight)
        reset_norms_(self)

    def _input_note(self) -> str:
        return "rebuild it at that size: the state_dict does not depend on it"

    def _embed(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def _pool(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(x)).mean(dim=(2, 3))  # mean over positions of relu(GN(last stage))


FAMILY = register_family(Family(
    name="BiT", kind="convolution", prefix="BiT-",
    syntax="BiT-R{DEPTH}x{WIDTH} or a CPU size (BiT-R50x1, BiT-R152x4, BiT-Micro)", parse=parse_variant,
    model=ResNetV2, variants=VARIANTS, param_count=param_count, forward_flops=forward_flops,
    check_fits=check_fits, shape_summary=BiTVariant.shape_summary,
))
