"""The paper's augmentation, ported from big_vision's TF preprocessing to PIL/numpy (plus mixup on torch batches).

big_vision ``configs/mlp_mixer_i1k.py`` trains Mixer with
``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)`` and ``mixup=dict(p=0.5)``, and evaluates with
``resize_small(256)|central_crop(224)``. :func:`train_view` and :func:`eval_view` / :func:`eval_array` build those
views from a :class:`workers.config.AugmentConfig`; :func:`mixup` is ``big_vision/utils.py`` ``get_mixup``.

Conventions: crops and resizes (resampling) work on PIL images; pixel ops (pad crop, flip, RandAugment) on
HxWx3 uint8 numpy arrays, which is what TF's ops see. All randomness comes from the ``random.Random`` passed in,
so a (seed, epoch, slot) stream in the shard reader reproduces every view exactly.

Sources matched (``git show HEAD:<path>`` in the big_vision mirror):

* ``big_vision/pp/ops_image.py``: ``inception_crop`` / ``decode_jpeg_and_inception_crop`` (TF's
  ``sample_distorted_bounding_box`` + bilinear resize), ``resize_small``, ``central_crop``, ``flip_lr``.
* ``big_vision/pp/archive/randaug.py`` and ``big_vision/pp/archive/autoaugment.py``
  (``distort_image_with_randaugment``, forked from tensorflow/tpu's EfficientNet ``autoaugment.py``), with
  ``tensorflow_addons.image`` ``transform``/``rotate``/``translate`` for the geometric ops.
* ``big_vision/utils.py``: ``get_mixup``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from workers.config import AugmentConfig

# ---------------------------------------------------------------------------------------------------------------
# Crops and resizes (PIL)


def _generate_random_crop(
    width: int, height: int, area_min: float, area_max: float, aspect: float, rng: random.Random
) -> tuple[int, int, int, int] | None:
    """One attempt of TF's ``GenerateRandomCrop`` (``sample_distorted_bounding_box_op.cc``): (x, y, w, h) or None.

    TF draws the crop HEIGHT uniformly among the integers between the heights of the smallest and the largest
    allowed area at this aspect ratio (so the area, ~ height^2, is not uniform: its density ~ 1 / sqrt(area)
    leans towards small crops), sets
    ``width = round(height * aspect)``, nudges the height by one pixel if rounding left the area range, and gives
    up (returns None) if the constraints still fail. ``round`` is lrintf's round-half-to-even, as Python's.
    """
    min_area, max_area = area_min * width * height, area_max * width * height
    h = round(math.sqrt(min_area / aspect))
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:  # the widest crop must fit: largest max_h with round(max_h * aspect) <= width
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += rng.randrange(max_h - h + 1)  # closed range [h, max_h]
    w = round(h * aspect)
    area = w * h
    if area < min_area:  # rounding fell below the range: one pixel taller
        h += 1
        w = round(h * aspect)
        area = w * h
    if area > max_area:  # ... or above it: one pixel shorter
        h -= 1
        w = round(h * aspect)
        area = w * h
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    # TF's Uniform(n) is [0, n): a crop smaller than the image never touches its bottom/right edge (kept as is).
    y = rng.randrange(height - h) if h < height else 0
    x = rng.randrange(width - w) if w < width else 0
    return x, y, w, h


def sample_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    area_min: float = 0.05,
    area_max: float = 1.0,
    aspect: tuple[float, float] = (0.75, 1.33),
    max_attempts: int = 100,
) -> tuple[int, int, int, int]:
    """(x, y, w, h) of an inception crop: TF ``sample_distorted_bounding_box`` as big_vision calls it.

    big_vision passes no boxes, ``min_object_covered=0`` and ``use_image_if_no_bounding_boxes=True``, so each of
    the ``max_attempts`` (TF default 100) draws an aspect ratio w/h UNIFORMLY (not log-uniformly as torchvision's
    RandomResizedCrop does) in ``aspect`` and tries :func:`_generate_random_crop`; if all fail, the whole image.
    ``aspect`` defaults to big_vision's ``ratio_min=0.75, ratio_max=1.33`` (TF's own default too), not 4/3.
    """
    if not 0.0 < area_min <= area_max <= 1.0:
        raise ValueError(f"need 0 < area_min <= area_max <= 1, got {area_min}, {area_max}")
    for _ in range(max_attempts):
        ratio = aspect[0] + rng.random() * (aspect[1] - aspect[0])
        box = _generate_random_crop(width, height, area_min, area_max, ratio, rng)
        if box is not None:
            return box
    return 0, 0, width, height


def inception_crop(
    image: Image.Image,
    size: int,
    rng: random.Random,
    area_min: float = 0.05,
    area_max: float = 1.0,
    aspect: tuple[float, float] = (0.75, 1.33),
) -> Image.Image:
    """Random-resized crop (big_vision ``decode_jpeg_and_inception_crop(size)``), bilinearly resized to size x size.

    The crop is cut out first and then resized, as TF's ``tf.slice`` + ``tf.image.resize``, so the bilinear
    taps clamp at the crop's edges, not the image's. big_vision resizes with ``antialias=False``: a plain bilinear
    interpolation at half-pixel centres, which PIL's ``transform(EXTENT, BILINEAR)`` computes (``resize`` would
    low-pass filter when shrinking), truncating to uint8 as TF's cast does. Difference left: PIL interpolates in
    double precision, TF in float32 (a level off where a value lands within float32 error of an integer).
    """
    x, y, w, h = sample_crop_box(image.width, image.height, rng, area_min, area_max, aspect)
    crop = image.crop((x, y, x + w, y + h))
    return crop.transform((size, size), Image.Transform.EXTENT, (0, 0, w, h), resample=Image.Resampling.BILINEAR)


def resize_small(image: Image.Image, smaller_size: int) -> Image.Image:
    """Resize so the shorter side is ``smaller_size``, keeping the aspect ratio (big_vision ``resize_small``).

    Each side is ``round(side * smaller_size / min(h, w))`` (TF's round-half-to-even, as Python's ``round``).
    big_vision's default method is "area" without antialias, i.e. box averaging when shrinking: PIL's BOX filter.
    """
    w, h = image.size
    factor = smaller_size / min(w, h)
    new_size = (round(w * factor), round(h * factor))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BOX)


def central_crop(image: Image.Image, size: int) -> Image.Image:
    """The central size x size crop (big_vision ``central_crop``: offsets ``(h - size) // 2``, ``(w - size) // 2``)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"central_crop({size}) of a {w}x{h} image: the image is smaller than the crop")
    left, top = (w - size) // 2, (h - size) // 2
    if (left, top, w, h) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def eval_view(image: Image.Image, size: int, crop_fraction: float) -> Image.Image:
    """Evaluation view: shorter side to ``round(size / crop_fraction)``, then the central size x size crop.

    big_vision's ``resize_small(256)|central_crop(224)`` is ``crop_fraction=0.875``; 1.0 resizes the shorter side
    to ``size`` and crops the longer one to a square.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return central_crop(resize_small(image, round(size / crop_fraction)), size)


def pad_crop(image: np.ndarray, pad: int, rng: random.Random) -> np.ndarray:
    """Pad ``pad`` pixels on every side (reflect; edge when the image is too small to reflect) and crop back.

    The CIFAR-style crop the digits studies use; the same draws (top, then left) as the shard reader's former
    ``_random_crop_flip``, so a seed gives the same views as before.
    """
    if pad <= 0:
        return image
    h, w = image.shape[:2]
    mode = "reflect" if pad < min(h, w) else "edge"
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    # The window of np.pad(image, pad, mode) at (top, left), gathered in one indexing op: np.pad itself cost about
    # a sixth of a 16 px sample's loading time (docs/benchmarks.md).
    return image[_padded_index(h, pad, top, mode)[:, None], _padded_index(w, pad, left, mode)[None, :]]


@functools.lru_cache(maxsize=4096)
def _padded_index(n: int, pad: int, start: int, mode: str) -> np.ndarray:
    """Source indices of positions ``start .. start + n - 1`` of an axis of length ``n`` padded by ``pad`` on both
    sides: numpy's "reflect" (mirror, the edge not repeated; needs pad < n) or "edge" (clamp)."""
    index = np.arange(start - pad, start - pad + n)
    if mode == "reflect":
        index = np.abs(index)
        index = np.where(index > n - 1, 2 * (n - 1) - index, index)
    else:
        index = np.clip(index, 0, n - 1)
    index.flags.writeable = False  # shared by every call (cached)
    return index


def flip_lr(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Left-right flip with probability 1/2 (big_vision ``flip_lr`` = ``tf.image.random_flip_left_right``)."""
    return image[:, ::-1] if rng.random() < 0.5 else image


# ---------------------------------------------------------------------------------------------------------------
# RandAugment ops: big_vision/pp/archive/autoaugment.py, op by op, on HxWx3 uint8 arrays.
# TF does the float maths in float32 and casts to uint8 by truncation; so does this port.

_MAX_LEVEL = 10.0  # the magnitude that maps to each op's "full" strength; larger magnitudes extrapolate (no clip)
_REPLACE = (128, 128, 128)  # fill of pixels that geometric ops and cutout uncover (RandAugment's replace_value)
_TRANSLATE_CONST = 100  # RandAugment HParams(cutout_const=40, translate_const=100): absolute pixels
_CUTOUT_CONST = 40


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """``image1 + factor * (image2 - image1)``: interpolate for factor in (0, 1) (truncated), else clip to [0, 255]."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    a = image1.astype(np.float32)
    temp = a + np.float32(factor) * (image2.astype(np.float32) - a)
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def _rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
    """HxW uint8 as ``tf.image.rgb_to_grayscale`` on uint8: weights (0.2989, 0.587, 0.114) on [0, 1] floats, then
    ``convert_image_dtype`` back, which multiplies by 255.5 and truncates."""
    flt = image.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = flt @ np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    return (gray * np.float32(255.5)).astype(np.uint8)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255] (``im * scale - lo * scale``, float32, clipped, truncated)."""
    out = image.copy()
    for c in range(3):
        channel = image[:, :, c]
        lo, hi = np.float32(channel.min()), np.float32(channel.max())
        if hi > lo:
            scale = np.float32(255.0) / (hi - lo)
            offset = -lo * scale
            out[:, :, c] = np.clip(channel.astype(np.float32) * scale + offset, 0.0, 255.0).astype(np.uint8)
    return out


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL-style histogram equalisation per channel, exactly TF's integer LUT.

    ``step = (sum(nonzero histogram) - its last entry) // 255``; ``lut = (cumsum + step // 2) // step`` shifted
    right by one (prepending 0), clipped to 255; a channel with step 0 (one value dominating) is left as is.
    """
    out = image.copy()
    for c in range(3):
        channel = image[:, :, c]
        hist = np.bincount(channel.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            continue
        lut = (np.cumsum(hist) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
        out[:, :, c] = lut[channel]
    return out


def invert(image: np.ndarray) -> np.ndarray:
    """``255 - image``."""
    return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top ``bits`` bits: ``(x >> shift) << shift`` with ``shift = 8 - bits``, computed as TF does it.

    TF converts ``shift`` to the image's uint8 (wrapping modulo 256) and its shift kernels clamp the shift to
    [0, 7]: bits 0 (magnitude < 2.5) keeps 1 bit, not 0, and bits > 8 (magnitude >= 22.5) wraps to a large shift
    and also keeps 1 bit.
    """
    shift = min((8 - bits) % 256, 7)
    return (image >> shift) << shift


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert the pixels >= ``threshold``.

    TF compares the uint8 image with ``threshold`` converted to uint8, i.e. modulo 256 (big_vision issue #110):
    RandAugment's magnitude 15 gives threshold 384, which acts as 128, and magnitude 10 gives 256 = 0, which
    inverts everything.
    """
    return np.where(image < threshold % 256, image, 255 - image)


def solarize_add(image: np.ndarray, addition: int = 0, threshold: int = 128) -> np.ndarray:
    """Add ``addition`` (int64 maths, clipped to [0, 255]) to the pixels below ``threshold``."""
    added = np.clip(image.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(image < threshold % 256, added, image)


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
    hist = np.bincount(_rgb_to_grayscale(image).ravel(), minlength=256)
    mean = np.float32(hist.sum()) / np.float32(256.0)
    degenerate = np.full_like(image, np.uint8(np.clip(mean, 0.0, 255.0)))
    return blend(degenerate, image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: factor 0 is black, 1 the image, > 1 brighter (clipped)."""
    return blend(np.zeros_like(image), image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, valid part, border pixels kept)."""
    h, w = image.shape[:2]
    if h < 3 or w < 3:
        return image
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / np.float32(13.0)
    img = image.astype(np.float32)
    smooth = np.zeros((h - 2, w - 2, 3), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            smooth += kernel[dy, dx] * img[dy : dy + h - 2, dx : dx + w - 2]
    degenerate = image.copy()
    degenerate[1:-1, 1:-1] = np.clip(smooth, 0.0, 255.0).astype(np.uint8)
    return blend(degenerate, image, factor)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's std::round (half away from zero), which TF's nearest interpolation uses; np.round is half-to-even."""
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v)).astype(np.int64)


def _transform(image: np.ndarray, matrix: tuple[float, ...], replace: tuple[int, int, int]) -> np.ndarray:
    """``tfa.image.transform`` (NEAREST) of ``wrap(image)`` followed by ``unwrap(., replace)``.

    ``matrix`` = (a0, a1, a2, b0, b1, b2) maps each OUTPUT pixel (x, y) (integer coordinates, no half-pixel
    offset) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2), computed in float32 as the TF kernel does,
    rounded half away from zero; points outside the image get ``replace`` (TF: alpha channel 0 -> replace).
    """
    h, w = image.shape[:2]
    a0, a1, a2, b0, b1, b2 = (np.float32(m) for m in matrix)
    xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    in_x = _round_half_away((a0 * xs + a1 * ys) + a2)  # (a0 x + a1 y) + a2: the kernel's float32 order
    in_y = _round_half_away((b0 * xs + b1 * ys) + b2)
    inside = (in_x >= 0) & (in_x < w) & (in_y >= 0) & (in_y < h)
    # One extra "pixel" holds the fill and every outside point indexes it: a single take() does the whole gather
    # (about twice as fast as boolean-mask indexing, which matters at ~3 ms per op on 224 px).
    source = np.concatenate([image.reshape(-1, 3), np.asarray(replace, dtype=np.uint8)[None]])
    return source.take(np.where(inside, in_y * w + in_x, h * w), axis=0)


def rotate(image: np.ndarray, degrees: float, replace: tuple[int, int, int] = _REPLACE) -> np.ndarray:
    """``tfa.image.rotate`` by ``degrees`` about the image centre (positive: counter-clockwise on screen).

    tfa's ``angles_to_projective_transforms``: input = (cos x - sin y + x_off, sin x + cos y + y_off) with offsets
    that keep the centre ((w - 1) / 2, (h - 1) / 2) fixed; cos/sin in float32 as TF.
    """
    h, w = image.shape[:2]
    radians = np.float32(degrees) * np.float32(math.pi / 180.0)  # float32 product, as the TF graph
    cos, sin = np.cos(radians), np.sin(radians)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / np.float32(2.0)
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / np.float32(2.0)
    return _transform(image, (cos, -sin, x_off, sin, cos, y_off), replace)


def shear_x(image: np.ndarray, level: float, replace: tuple[int, int, int] = _REPLACE) -> np.ndarray:
    """Shear along x: output (x, y) reads input (x + level * y, y) (TF matrix [1, level, 0; 0, 1, 0])."""
    return _transform(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), replace)


def shear_y(image: np.ndarray, level: float, replace: tuple[int, int, int] = _REPLACE) -> np.ndarray:
    """Shear along y: output (x, y) reads input (x, level * x + y)."""
    return _transform(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), replace)


def translate_x(image: np.ndarray, pixels: float, replace: tuple[int, int, int] = _REPLACE) -> np.ndarray:
    """``tfa translate(wrap(image), [-pixels, 0])``: output (x, y) reads input (x + pixels, y), i.e. the content
    moves LEFT by ``pixels`` (right for negative), uncovered columns get ``replace``."""
    return _transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), replace)


def translate_y(image: np.ndarray, pixels: float, replace: tuple[int, int, int] = _REPLACE) -> np.ndarray:
    """Output (x, y) reads input (x, y + pixels): the content moves UP by ``pixels``."""
    return _transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), replace)


def cutout(
    image: np.ndarray, pad_size: int, center: tuple[int, int], replace: tuple[int, int, int] = _REPLACE
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

    def apply_op(self, name: str, image: np.ndarray, rng: random.Random) -> np.ndarray:
        """Apply one op at this magnitude (random sign, then cutout centre, drawn from ``rng``)."""
        args = level_to_arg(name, self.magnitude, rng)
        op = RANDAUG_OPS[name]
        if op.random_centre:
            h, w = image.shape[:2]
            args = (*args, (rng.randrange(h), rng.randrange(w)))
        return op.apply(image, *args)

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        for _ in range(self.num_layers):
            image = self.apply_op(_RANDAUG_NAMES[rng.randrange(len(_RANDAUG_NAMES))], image, rng)
        return image


# ---------------------------------------------------------------------------------------------------------------
# Views


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def needed_shorter_side(size: int, cfg: AugmentConfig, train: bool) -> int:
    """The decoded shorter side a view of ``size`` px needs without upsampling what the stored image holds.

    Readers may decode JPEGs at reduced scale (``Image.draft``) down to this. Eval and crop "none":
    ``round(size / eval_crop_fraction)``; crop "pad": ``size``; inception: ``size / sqrt(area_min)``, so that even
    the smallest crop (big_vision decodes it at full resolution) is not starved of pixels.
    """
    if train and cfg.crop == "inception":
        return math.ceil(size / math.sqrt(cfg.area_min))
    if train and cfg.crop == "pad":
        return size
    return round(size / cfg.eval_crop_fraction)


def train_view(image: Image.Image | np.ndarray, size: int, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """The training view, size x size x 3 uint8: crop, then flip, then RandAugment (big_vision's pp order).

    crop "inception": :func:`inception_crop` (area ``cfg.area_min``..1); "pad": a non-square or other-size image
    is first brought to size x size by :func:`eval_view` at crop fraction 1, then :func:`pad_crop`; "none": the
    evaluation view (:func:`eval_view` at ``cfg.eval_crop_fraction``). ``image`` may be an RGB HxWx3 uint8 array
    (the shard reader's memory cache holds them so): it is never written to.
    """
    if isinstance(image, np.ndarray):
        if cfg.crop == "pad" and image.shape[:2] == (size, size):
            return _flip_randaug(pad_crop(image, cfg.pad, rng), cfg, rng)
        image = Image.fromarray(image)
    image = _rgb(image)
    if cfg.crop == "inception":
        array = np.asarray(inception_crop(image, size, rng, area_min=cfg.area_min))
    elif cfg.crop == "pad":
        if image.size != (size, size):
            image = eval_view(image, size, 1.0)
        array = pad_crop(np.asarray(image), cfg.pad, rng)
    else:
        array = np.asarray(eval_view(image, size, cfg.eval_crop_fraction))
    return _flip_randaug(array, cfg, rng)


def _flip_randaug(array: np.ndarray, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    if cfg.flip:
        array = flip_lr(array, rng)
    if cfg.randaug is not None:
        array = RandAugment(*cfg.randaug)(array, rng)
    return np.ascontiguousarray(array, dtype=np.uint8)


def eval_array(image: Image.Image | np.ndarray, size: int, cfg: AugmentConfig) -> np.ndarray:
    """The deterministic view for validation, test and few-shot: :func:`eval_view` as a size x size x 3 uint8
    (``image``: a PIL image or an RGB HxWx3 uint8 array)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.ascontiguousarray(np.asarray(eval_view(_rgb(image), size, cfg.eval_crop_fraction)), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Mixup


def mixup(
    images: torch.Tensor, targets: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """big_vision ``get_mixup``: ONE ``a ~ Beta(p, p)`` per batch, ``a = max(a, 1 - a)``, and every row becomes
    ``a * row_i + (1 - a) * row_{i-1}`` (the batch rolled by one along dim 0), images and targets alike.

    ``targets`` must be float (one-hot or already soft, shape (B, C)); integer labels cannot be mixed. ``a`` is
    drawn from a seed taken from ``generator`` (so the global RNG is untouched, the result is a function of the
    generator's state, and ranks whose generators are seeded alike draw the same ``a``, as big_vision's one rng
    for the whole global batch). In DDP each rank rolls its own local batch. ``p <= 0`` returns the inputs.
    """
    if p <= 0:
        return images, targets
    if not targets.is_floating_point():
        raise ValueError(f"mixup needs float (one-hot or soft) targets, got {targets.dtype}: one-hot them first")
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and targets ({targets.shape[0]}) differ in batch size")
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    a = float(np.random.default_rng(seed).beta(p, p))
    a = max(a, 1.0 - a)
    mixed_images = a * images + (1.0 - a) * torch.roll(images, shifts=1, dims=0)
    mixed_targets = a * targets + (1.0 - a) * torch.roll(targets, shifts=1, dims=0)
    return mixed_images, mixed_targets
