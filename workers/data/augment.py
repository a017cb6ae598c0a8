"""The paper's augmentation, ported from big_vision's TF preprocessing to PIL/numpy (plus mixup on torch batches).

big_vision ``configs/mlp_mixer_i1k.py`` trains Mixer with
``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)`` and ``mixup=dict(p=0.5)``, and evaluates with
``resize_small(256)|central_crop(224)``. :func:`train_view` and :func:`eval_view` / :func:`eval_array` build those
views from a :class:`workers.config.AugmentConfig`; :func:`mixup` is ``big_vision/utils.py`` ``get_mixup``.

RandAugment's op table and ops are in ``workers.data.randaugment`` (re-exported here).

Conventions: crops and resizes (resampling) work on PIL images; pixel ops (pad crop, flip, RandAugment) on
HxWx3 uint8 numpy arrays, which is what TF's ops see. ``pixel_ops: fast`` (:func:`_fast_train_view`) instead
resizes the crop with torch's uint8 kernel and runs RandAugment as Pillow calls on the PIL image, with the same
draws. All randomness comes from the ``random.Random`` passed in, so a (seed, epoch, slot) stream in the shard
reader reproduces every view exactly.

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
import warnings

import numpy as np
import torch
from PIL import Image

from workers.config import AugmentConfig

# RandAugment lives in workers.data.randaugment; its op table and ops are re-exported here so that this module stays
# the one place the views, their ops and mixup are imported from.
from workers.data.randaugment import (
    RANDAUG_OPS,
    RandAugment,
    RandAugOp,
    autocontrast,
    blend,
    brightness,
    color,
    contrast,
    cutout,
    equalize,
    invert,
    level_to_arg,
    posterize,
    rotate,
    sharpness,
    shear_x,
    shear_y,
    solarize,
    solarize_add,
    translate_x,
    translate_y,
)
from workers.data.randaugment_pil import RandAugmentPIL

__all__ = [
    "RANDAUG_OPS", "RandAugOp", "RandAugment", "autocontrast", "blend", "brightness", "central_crop", "color",
    "contrast", "cutout", "equalize", "eval_array", "eval_view", "flip_lr", "inception_crop", "invert",
    "level_to_arg", "mixup", "needed_shorter_side", "pad_crop", "posterize", "resize_small", "rotate",
    "sample_crop_box", "sharpness", "shear_x", "shear_y", "solarize", "solarize_add", "train_view", "translate_x",
    "translate_y", "uint8_tensor",
]

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
    interpolation at half-pixel centres. A crop that is shrunk along either side goes through PIL's
    ``transform(EXTENT, BILINEAR)``, which computes exactly that (``resize`` would low-pass filter when
    shrinking), truncating to uint8 as TF's cast does; PIL interpolates in double precision, TF in float32 (a
    level off where a value lands within float32 error of an integer). A crop enlarged along both sides (most
    crops of a photo stored near the view's size) goes through PIL's ``resize(BILINEAR)``: at these scales its
    triangle filter has the same two taps and weights, but it rounds to the nearest level where TF truncates, so
    a pixel may be one level higher (half a level on average, docs/benchmarks.md "Loader"); it costs a fifth of
    the ``transform``.
    """
    x, y, w, h = sample_crop_box(image.width, image.height, rng, area_min, area_max, aspect)
    crop = image.crop((x, y, x + w, y + h))
    if w <= size and h <= size:
        return crop.resize((size, size), Image.Resampling.BILINEAR)
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
        if cfg.crop == "pad" and image.shape[:2] == (size, size) and cfg.pixel_ops == "exact":
            return _flip_randaug(pad_crop(image, cfg.pad, rng), cfg, rng)
        image = Image.fromarray(image)
    image = _rgb(image)
    if cfg.pixel_ops == "fast":
        return _fast_train_view(image, size, cfg, rng)
    if cfg.crop == "inception":
        crop = inception_crop(image, size, rng, area_min=cfg.area_min)
        if cfg.flip and rng.random() < 0.5:  # flip_lr's one draw, as a PIL transpose (C) of the uint8 image
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _randaug(np.asarray(crop), cfg, rng)
    if cfg.crop == "pad":
        if image.size != (size, size):
            image = eval_view(image, size, 1.0)
        array = pad_crop(np.asarray(image), cfg.pad, rng)
    else:
        array = np.asarray(eval_view(image, size, cfg.eval_crop_fraction))
    return _flip_randaug(array, cfg, rng)


def _fast_train_view(image: Image.Image, size: int, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """``pixel_ops: fast``: the same draws as the exact path (crop box, flip, ops), each step one C call.

    The inception crop is :func:`_resized_crop` (torch); the flip a PIL transpose; RandAugment
    :class:`RandAugmentPIL` on the PIL image; one array at the end.
    """
    if cfg.crop == "inception":
        image = _resized_crop(image, sample_crop_box(image.width, image.height, rng, area_min=cfg.area_min), size)
    elif cfg.crop == "pad":
        if image.size != (size, size):
            image = eval_view(image, size, 1.0)
        image = Image.fromarray(pad_crop(np.asarray(image), cfg.pad, rng))
    else:
        image = eval_view(image, size, cfg.eval_crop_fraction)
    if cfg.flip and rng.random() < 0.5:  # flip_lr's one draw
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.randaug is not None:
        image = RandAugmentPIL(*cfg.randaug)(image, rng)
    return np.asarray(image)


def _resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The (x, y, w, h) crop bilinearly resized to size x size by torch's uint8 kernel (channels-last).

    ``F.interpolate(bilinear, align_corners=False, antialias=False)`` of the crop is TF's ``tf.image.resize``
    of ``tf.slice`` (half-pixel centres, taps clamped at the crop's edges, no low-pass when shrinking), rounded to
    the nearest level where TF truncates: against the exact path, enlarged crops (which that path also rounds)
    differ in about 0.1 % of values by one level, shrunk ones are up to 2 levels higher, half a level on average
    (docs/benchmarks.md). Half the time of Pillow's ``resize(BILINEAR, box=)``, the arrays in and out included.
    """
    x, y, w, h = box
    pixels = uint8_tensor(np.asarray(image))[y : y + h, x : x + w].permute(2, 0, 1).unsqueeze(0)
    pixels = pixels.contiguous(memory_format=torch.channels_last)  # the layout of torch's vectorised uint8 kernel
    resized = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                                              antialias=False)
    return Image.fromarray(resized[0].permute(1, 2, 0).numpy())


def uint8_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of a uint8 array that may be read-only (a PIL image's, the reader's memory cache's)
    without torch's warning: the caller must not write to the tensor (the views and ``to_tensor`` only read it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def _flip_randaug(array: np.ndarray, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    if cfg.flip:
        array = flip_lr(array, rng)
    return _randaug(array, cfg, rng)


def _randaug(array: np.ndarray, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
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
