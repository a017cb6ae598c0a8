"""RandAugment as big_vision runs it: the 16 ops of ``big_vision/pp/archive/autoaugment.py``, op by op, on HxWx3
uint8 numpy arrays, the op table keyed by name, the magnitude -> arguments mapping and :class:`RandAugment`.

``distort_image_with_randaugment`` (``big_vision/pp/archive/randaug.py``, forked from tensorflow/tpu's EfficientNet
``autoaugment.py``), with ``tensorflow_addons.image`` ``transform``/``rotate``/``translate`` for the geometric ops.
TF does the float maths in float32 and casts to uint8 by truncation; so does this port. All randomness comes from
the ``random.Random`` passed in. ``workers.data.augment`` composes these ops into the training view.

Speed without changing a bit: an op whose output pixel is a function of that pixel's value alone (and of
numbers fixed per image: a channel's histogram, the image size) is the TF formula evaluated once on the 256
possible values and applied as a look-up table (:func:`_lookup`); the geometric ops cache their source-pixel map
per (image size, matrix), since RandAugment's fixed magnitude gives each op only two matrices (one per sign). The
per-op tests check each op against an independent computation of the TF formula; ``tests/test_augment.py`` pins
the loader's batches to those of the plain per-pixel port.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

_MAX_LEVEL = 10.0  # the magnitude that maps to each op's "full" strength; larger magnitudes extrapolate (no clip)
REPLACE_VALUE = (128, 128, 128)  # fill of pixels that geometric ops and cutout uncover (RandAugment's replace_value)
_TRANSLATE_CONST = 100  # RandAugment HParams(cutout_const=40, translate_const=100): absolute pixels
_CUTOUT_CONST = 40
_VALUES = np.arange(256, dtype=np.uint8)  # every uint8 level: an op evaluated on these is its look-up table
_VALUES.flags.writeable = False


def _lookup(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[image]`` for a 256-entry uint8 table shared by the channels (``take``: faster than indexing)."""
    return table.take(image)


def _lookup_per_channel(image: np.ndarray, tables: list[np.ndarray | None]) -> np.ndarray:
    """Channel ``c`` through ``tables[c]`` (None: the channel as it is)."""
    out = image.copy()
    for c, table in enumerate(tables):
        if table is not None:
            out[:, :, c] = table.take(image[:, :, c])
    return out


def _histograms(image: np.ndarray) -> np.ndarray:
    """3 x 256 pixel counts per channel (PIL's C histogram: a tenth of the time of three ``np.bincount``)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).histogram(), dtype=np.int64).reshape(3, 256)


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """``image1 + factor * (image2 - image1)``: interpolate for factor in (0, 1) (truncated), else clip to [0, 255]."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    # In place in one float32 buffer: a fresh 224 px float array costs its page faults, as much as the arithmetic.
    a = image1.astype(np.float32)
    temp = image2.astype(np.float32)
    np.subtract(temp, a, out=temp)
    np.multiply(temp, np.float32(factor), out=temp)
    np.add(a, temp, out=temp)
    if not 0.0 < factor < 1.0:
        np.clip(temp, 0.0, 255.0, out=temp)
    return temp.astype(np.uint8)


def _rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
    """HxW uint8 as ``tf.image.rgb_to_grayscale`` on uint8: weights (0.2989, 0.587, 0.114) on [0, 1] floats, then
    ``convert_image_dtype`` back, which multiplies by 255.5 and truncates."""
    flt = image.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = flt @ np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    return (gray * np.float32(255.5)).astype(np.uint8)


def autocontrast_tables(histograms: np.ndarray) -> list[np.ndarray | None]:
    """AutoContrast's table per channel from its 256-bin histogram (None: a constant channel, left as is).

    Per channel, [min, max] stretches to [0, 255] (``im * scale - lo * scale``, float32, clipped, truncated).

    Args:
        histograms: 3 x 256 pixel counts (one row per channel).
    """
    tables: list[np.ndarray | None] = []
    for hist in histograms:
        present = np.flatnonzero(hist)
        lo, hi = np.float32(present[0]), np.float32(present[-1])
        if hi > lo:
            scale = np.float32(255.0) / (hi - lo)
            offset = -lo * scale
            tables.append(np.clip(_VALUES.astype(np.float32) * scale + offset, 0.0, 255.0).astype(np.uint8))
        else:
            tables.append(None)
    return tables


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255] (:func:`autocontrast_tables`)."""
    return _lookup_per_channel(image, autocontrast_tables(_histograms(image)))


def equalize_tables(histograms: np.ndarray) -> list[np.ndarray | None]:
    """Equalize's table per channel from its 256-bin histogram (None: the channel is left as is).

    PIL-style histogram equalisation, exactly TF's integer LUT: ``step = (sum(nonzero histogram) - its last
    entry) // 255``; ``lut = (cumsum + step // 2) // step`` shifted right by one (prepending 0), clipped to 255; a
    channel with step 0 (one value dominating) is left as is.

    Args:
        histograms: 3 x 256 pixel counts (one row per channel).
    """
    tables: list[np.ndarray | None] = []
    for hist in histograms:
        nonzero = hist[hist != 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            tables.append(None)
            continue
        lut = (np.cumsum(hist) + step // 2) // step
        tables.append(np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8))
    return tables


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL-style histogram equalisation per channel, exactly TF's integer LUT (:func:`equalize_tables`)."""
    return _lookup_per_channel(image, equalize_tables(_histograms(image)))


def invert(image: np.ndarray) -> np.ndarray:
    """``255 - image``."""
    return _lookup(image, 255 - _VALUES)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top ``bits`` bits: ``(x >> shift) << shift`` with ``shift = 8 - bits``, computed as TF does it.

    TF converts ``shift`` to the image's uint8 (wrapping modulo 256) and its shift kernels clamp the shift to
    [0, 7]: bits 0 (magnitude < 2.5) keeps 1 bit, not 0, and bits > 8 (magnitude >= 22.5) wraps to a large shift
    and also keeps 1 bit.
    """
    shift = min((8 - bits) % 256, 7)
    return _lookup(image, (_VALUES >> shift) << shift)


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert the pixels >= ``threshold``.

    TF compares the uint8 image with ``threshold`` converted to uint8, i.e. modulo 256 (big_vision issue #110):
    RandAugment's magnitude 15 gives threshold 384, which acts as 128, and magnitude 10 gives 256 = 0, which
    inverts everything.
    """
    return _lookup(image, np.where(_VALUES < threshold % 256, _VALUES, 255 - _VALUES))


def solarize_add(image: np.ndarray, addition: int = 0, threshold: int = 128) -> np.ndarray:
    """Add ``addition`` (int64 maths, clipped to [0, 255]) to the pixels below ``threshold``."""
    added = np.clip(_VALUES.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return _lookup(image, np.where(_VALUES < threshold % 256, added, _VALUES))


def color(image: np.ndarray, factor: float) -> np.ndarray:
    """Saturation: blend from the grey version (factor 0) through the image (1) and beyond."""
    degenerate = np.repeat(_rgb_to_grayscale(image)[:, :, None], 3, axis=2)
    return blend(degenerate, image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a constant grey image, as TF's ``contrast`` builds it.

    TF sums a 256-bin histogram of the grey image and divides by 256: that is the PIXEL COUNT / 256, not the mean
    grey level (a known quirk of tensorflow/tpu's autoaugment that big_vision kept). The constant is therefore
    ``min(255, trunc(H * W / 256))``: 196 at 224 x 224, 4 at 32 x 32.
    """
    return _lookup(image, contrast_table(image.shape[0] * image.shape[1], factor))


def contrast_table(num_pixels: int, factor: float) -> np.ndarray:
    """Contrast's 256-level table for an image of ``num_pixels`` pixels (:func:`contrast`).

    Args:
        num_pixels: H * W (TF's "mean" is this count / 256).
        factor: the blend factor.
    """
    mean = np.float32(num_pixels) / np.float32(256.0)  # the histogram's sum: the pixel count
    degenerate = np.full_like(_VALUES, np.uint8(np.clip(mean, 0.0, 255.0)))
    return blend(degenerate, _VALUES, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: factor 0 is black, 1 the image, > 1 brighter (clipped)."""
    return _lookup(image, blend(np.zeros_like(_VALUES), _VALUES, factor))


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, valid part, border pixels kept)."""
    h, w = image.shape[:2]
    if h < 3 or w < 3:
        return image
    # The float32 sum of kernel[dy, dx] * pixel over the 3 x 3 window in row-major order, as TF's conv: the eight
    # 1/13 products are one array (computed once, not per tap), the sum starts from the first tap (0 + x = x), and
    # the buffers are reused in place (fresh 224 px float arrays cost their page faults).
    edge = image.astype(np.float32)
    centre = edge[1:-1, 1:-1] * (np.float32(5.0) / np.float32(13.0))
    np.multiply(edge, np.float32(1.0) / np.float32(13.0), out=edge)
    smooth = edge[: h - 2, : w - 2].copy()
    for dy, dx in ((0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
        smooth += centre if (dy, dx) == (1, 1) else edge[dy : dy + h - 2, dx : dx + w - 2]
    np.clip(smooth, 0.0, 255.0, out=smooth)
    degenerate = image.copy()
    degenerate[1:-1, 1:-1] = smooth  # float32 -> uint8 on assignment truncates, as astype
    return blend(degenerate, image, factor)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's std::round (half away from zero), which TF's nearest interpolation uses; np.round is half-to-even."""
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _source_pixels(h: int, w: int, matrix: tuple[float, ...]) -> np.ndarray:
    """For each output pixel of an h x w ``_transform`` by ``matrix``: the flat index ``y * w + x`` of the input
    pixel it reads, or ``h * w`` (the fill) where that falls outside. Cached: a function of its arguments only."""
    a0, a1, a2, b0, b1, b2 = (np.float32(m) for m in matrix)
    xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    in_x = _round_half_away((a0 * xs + a1 * ys) + a2)  # (a0 x + a1 y) + a2: the kernel's float32 order
    in_y = _round_half_away((b0 * xs + b1 * ys) + b2)
    inside = (in_x >= 0) & (in_x < w) & (in_y >= 0) & (in_y < h)
    index = np.where(inside, in_y * w + in_x, h * w)
    index.flags.writeable = False  # shared by every call (cached)
    return index


def _transform(image: np.ndarray, matrix: tuple[float, ...], replace: tuple[int, int, int]) -> np.ndarray:
    """``tfa.image.transform`` (NEAREST) of ``wrap(image)`` followed by ``unwrap(., replace)``.

    ``matrix`` = (a0, a1, a2, b0, b1, b2) maps each OUTPUT pixel (x, y) (integer coordinates, no half-pixel
    offset) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2), computed in float32 as the TF kernel does,
    rounded half away from zero; points outside the image get ``replace`` (TF: alpha channel 0 -> replace).
    """
    h, w = image.shape[:2]
    index = _source_pixels(h, w, tuple(float(m) for m in matrix))  # float32 -> float -> float32 is exact
    # One extra "pixel" holds the fill and every outside point indexes it: a single take() does the whole gather,
    # on 3-byte items (a pixel as one void scalar: faster than take(axis=0) on an N x 3 array).
    source = np.empty((h * w + 1, 3), dtype=np.uint8)
    source[:-1] = image.reshape(-1, 3)
    source[-1] = replace
    return source.view(np.dtype((np.void, 3)))[:, 0].take(index).view(np.uint8).reshape(h, w, 3)


def rotate(image: np.ndarray, degrees: float, replace: tuple[int, int, int] = REPLACE_VALUE) -> np.ndarray:
    """``tfa.image.rotate`` by ``degrees`` about the image centre (positive: counter-clockwise on screen)."""
    h, w = image.shape[:2]
    return _transform(image, rotation_matrix(h, w, degrees), replace)


def rotation_matrix(h: int, w: int, degrees: float) -> tuple[float, ...]:
    """The (a0, a1, a2, b0, b1, b2) output -> input map of :func:`rotate` on an h x w image.

    tfa's ``angles_to_projective_transforms``: input = (cos x - sin y + x_off, sin x + cos y + y_off) with offsets
    that keep the centre ((w - 1) / 2, (h - 1) / 2) fixed; cos/sin in float32 as TF.

    Args:
        h: image height.
        w: image width.
        degrees: the rotation angle.
    """
    radians = np.float32(degrees) * np.float32(math.pi / 180.0)  # float32 product, as the TF graph
    cos, sin = np.cos(radians), np.sin(radians)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / np.float32(2.0)
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / np.float32(2.0)
    return (cos, -sin, x_off, sin, cos, y_off)


def shear_x(image: np.ndarray, level: float, replace: tuple[int, int, int] = REPLACE_VALUE) -> np.ndarray:
    """Shear along x: output (x, y) reads input (x + level * y, y) (TF matrix [1, level, 0; 0, 1, 0])."""
    return _transform(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), replace)


def shear_y(image: np.ndarray, level: float, replace: tuple[int, int, int] = REPLACE_VALUE) -> np.ndarray:
    """Shear along y: output (x, y) reads input (x, level * x + y)."""
    return _transform(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), replace)


def translate_x(image: np.ndarray, pixels: float, replace: tuple[int, int, int] = REPLACE_VALUE) -> np.ndarray:
    """``tfa translate(wrap(image), [-pixels, 0])``: output (x, y) reads input (x + pixels, y), i.e. the content
    moves LEFT by ``pixels`` (right for negative), uncovered columns get ``replace``."""
    return _transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), replace)


def translate_y(image: np.ndarray, pixels: float, replace: tuple[int, int, int] = REPLACE_VALUE) -> np.ndarray:
    """Output (x, y) reads input (x, y + pixels): the content moves UP by ``pixels``."""
    return _transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), replace)


def cutout(
    image: np.ndarray, pad_size: int, center: tuple[int, int], replace: tuple[int, int, int] = REPLACE_VALUE
) -> np.ndarray:
    """Fill rows [cy - pad_size, cy + pad_size) x cols [cx - pad_size, cx + pad_size) (clipped) with ``replace``.

    TF draws the centre (cy, cx) uniformly in [0, h) x [0, w); :class:`RandAugment` does the drawing here.
    """
    h, w = image.shape[:2]
    cy, cx = center
    out = image.copy()
    out[max(0, cy - pad_size) : min(h, cy + pad_size), max(0, cx - pad_size) : min(w, cx + pad_size)] = replace
    return out


LevelToArgs = Callable[[float, random.Random], tuple]  # (level = magnitude / _MAX_LEVEL, rng) -> the op's arguments


def _signed(scale: float) -> LevelToArgs:
    """``+-level * scale``, the sign flipped with probability 1/2 (TF ``_randomly_negate_tensor``: one rng draw)."""
    return lambda level, rng: (level * scale if rng.random() < 0.5 else -(level * scale),)


def _truncated(scale: int) -> LevelToArgs:
    """``int(level * scale)`` (posterize bits, solarize thresholds, cutout half-size)."""
    return lambda level, rng: (int(level * scale),)


def _enhance_factor(level: float, rng: random.Random) -> tuple:
    """TF ``_enhance_level_to_arg``: a blend factor in [0.1, 1.9] at magnitudes 0..10."""
    return (level * 1.8 + 0.1,)


@dataclass(frozen=True)
class RandAugOp:
    """One RandAugment op: its arguments at a level (autoaugment.py ``level_to_arg``) and how it applies them.

    Args:
        apply: ``apply(image, *args)`` -> image; with ``random_centre`` also a last ``(cy, cx)`` argument.
        level_to_args: (level, rng) -> args, ``level = magnitude / _MAX_LEVEL``, unclipped as TF.
        random_centre: draw a centre uniformly over the image after the args (TF's cutout), ``cy`` then ``cx``.
    """

    apply: Callable[..., np.ndarray]
    level_to_args: LevelToArgs = lambda level, rng: ()  # the ops without arguments
    random_centre: bool = False


# The op table, in distort_image_with_randaugment's available_ops order: RandAugment draws an index into it.
RANDAUG_OPS: dict[str, RandAugOp] = {
    "AutoContrast": RandAugOp(autocontrast),
    "Equalize": RandAugOp(equalize),
    "Invert": RandAugOp(invert),
    "Rotate": RandAugOp(rotate, _signed(30.0)),
    "Posterize": RandAugOp(posterize, _truncated(4)),
    "Solarize": RandAugOp(solarize, _truncated(256)),
    "Color": RandAugOp(color, _enhance_factor),
    "Contrast": RandAugOp(contrast, _enhance_factor),
    "Brightness": RandAugOp(brightness, _enhance_factor),
    "Sharpness": RandAugOp(sharpness, _enhance_factor),
    "ShearX": RandAugOp(shear_x, _signed(0.3)),
    "ShearY": RandAugOp(shear_y, _signed(0.3)),
    "TranslateX": RandAugOp(translate_x, _signed(float(_TRANSLATE_CONST))),
    "TranslateY": RandAugOp(translate_y, _signed(float(_TRANSLATE_CONST))),
    "Cutout": RandAugOp(cutout, _truncated(_CUTOUT_CONST), random_centre=True),
    "SolarizeAdd": RandAugOp(solarize_add, _truncated(110)),
}
_RANDAUG_NAMES = tuple(RANDAUG_OPS)  # the table's order, indexable


def level_to_arg(name: str, magnitude: float, rng: random.Random) -> tuple:
    """The op's arguments at ``magnitude`` (autoaugment.py ``level_to_arg`` with RandAugment's HParams).

    No clipping above ``_MAX_LEVEL`` = 10, as TF: magnitude 15 is rotate +-45 deg, shear +-0.45,
    translate +-150 px, enhance factor 2.8, posterize 6 bits, solarize threshold 384 (acts as 128), solarize_add
    165, cutout half-size 60 px. Translate and cutout are absolute pixels (tuned for 224 px images).

    Args:
        name: a key of :data:`RANDAUG_OPS`.
        magnitude: RandAugment's magnitude (10 = each op's "full" strength).
        rng: draws the random sign of rotate, shear and translate.
    """
    op = RANDAUG_OPS.get(name)
    if op is None:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUG_OPS)}")
    return op.level_to_args(magnitude / _MAX_LEVEL, rng)


class RandAugment:
    """``distort_image_with_randaugment(image, num_layers, magnitude)`` on an HxWx3 uint8 array.

    Each of ``num_layers`` layers picks one of the 16 :data:`RANDAUG_OPS` uniformly (with replacement across
    layers) and ALWAYS applies it at the shared magnitude: the TF code draws a probability in [0.2, 0.8] per op
    but never uses it (``tf.cond`` only tests the op index), so neither does this port. Geometric ops and cutout
    fill with grey 128.
    ``num_layers`` ops in a row, at ``magnitude`` (see :func:`level_to_arg`).
    """

    def __init__(self, num_layers: int, magnitude: float):
        if num_layers < 0 or magnitude < 0:
            raise ValueError(f"RandAugment needs num_layers >= 0 and magnitude >= 0, got {num_layers}, {magnitude}")
        self.num_layers, self.magnitude = int(num_layers), float(magnitude)

    def image_size(self, image: np.ndarray) -> tuple[int, int]:
        """(height, width) of an image of this implementation."""
        return image.shape[:2]

    def run_op(self, name: str, image: np.ndarray, *args: object) -> np.ndarray:
        """Op ``name`` with its drawn arguments, on an image of this implementation."""
        return RANDAUG_OPS[name].apply(image, *args)

    def apply_op(self, name: str, image: np.ndarray, rng: random.Random) -> np.ndarray:
        """Apply one op at this magnitude (random sign, then cutout centre, drawn from ``rng``)."""
        args = level_to_arg(name, self.magnitude, rng)
        if RANDAUG_OPS[name].random_centre:
            h, w = self.image_size(image)
            args = (*args, (rng.randrange(h), rng.randrange(w)))
        return self.run_op(name, image, *args)

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        for _ in range(self.num_layers):
            image = self.apply_op(_RANDAUG_NAMES[rng.randrange(len(_RANDAUG_NAMES))], image, rng)
        return image
