"""A plain timm-style PIL input pipeline, the yardstick of the loader section (timm itself is not installed here).

Written as ``timm/data/transforms.py`` (``RandomResizedCropAndInterpolation``), ``transforms_factory.py``
(``transforms_imagenet_train`` / ``_eval``) and ``auto_augment.py`` (``rand_augment_transform("rand-m15-n2")``)
do it, with PIL's ``ImageOps`` / ``ImageEnhance`` / ``transform`` per op: decode with ``convert("RGB")``;
random-resized crop (scale 0.08-1, log-uniform aspect 3/4-4/3, 10 attempts, else a central crop) resized with
``resize(BILINEAR)``; flip with p = 0.5; RandAugment: 2 ops drawn with replacement from timm's 15
(``_RAND_TRANSFORMS``: no Cutout), each applied with probability 0.5, magnitude 15 clipped to timm's
``magnitude_max`` default 10, fill = the ImageNet mean, bilinear resampling. The evaluation view: shorter side to
224 / 0.875 = 256 (bicubic), central 224 crop. Both end at an HxWx3 uint8 array, like our views; only the
time matters here, so the randomness comes from one ``random.Random``.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (124, 116, 104)  # timm's fill: the ImageNet mean (0.485, 0.456, 0.406) x 255, rounded
_AFFINE = {"resample": Image.Resampling.BILINEAR, "fillcolor": _FILL}
_LEVEL = 10.0  # timm: magnitude clipped to magnitude_max (default _LEVEL_DENOM = 10)


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value  # timm _randomly_negate


def _shear_x(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, _signed(0.3, rng), 0, 0, 1, 0), **_AFFINE)


def _shear_y(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, _signed(0.3, rng), 1, 0), **_AFFINE)


def _translate_x(img: Image.Image, rng: random.Random) -> Image.Image:
    pixels = _signed(0.45, rng) * img.size[0]  # translate_rel at level 10: 45 % of the width
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, pixels, 0, 1, 0), **_AFFINE)


def _translate_y(img: Image.Image, rng: random.Random) -> Image.Image:
    pixels = _signed(0.45, rng) * img.size[1]
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, pixels), **_AFFINE)


def _solarize_add(img: Image.Image, rng: random.Random) -> Image.Image:
    lut = [min(255, i + 110) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def _enhance(enhancer: Callable[[Image.Image], Any]) -> Callable[[Image.Image, random.Random], Image.Image]:
    return lambda img, rng: enhancer(img).enhance(1.9)  # level 10: 10 / 10 * 1.8 + 0.1


# timm's _RAND_TRANSFORMS at level 10 (rand-m15 clipped to 10).
TIMM_RAND_OPS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "AutoContrast": lambda img, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, rng: ImageOps.equalize(img),
    "Invert": lambda img, rng: ImageOps.invert(img),
    "Rotate": lambda img, rng: img.rotate(_signed(30.0, rng), resample=Image.Resampling.BILINEAR, fillcolor=_FILL),
    "Posterize": lambda img, rng: ImageOps.posterize(img, 4),  # _posterize_level_to_arg: int(10 / 10 * 4) bits
    "Solarize": lambda img, rng: ImageOps.solarize(img, 256),  # int(10 / 10 * 256): inverts nothing
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
_OP_NAMES = tuple(TIMM_RAND_OPS)


def _random_resized_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision/timm ``RandomResizedCrop.get_params``: (left, top, w, h)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    w = h = min(width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def timm_style_train_view(data: bytes, size: int, rng: random.Random) -> np.ndarray:
    """JPEG bytes -> random-resized crop, flip, RandAugment rand-m15-n2, as a size x size x 3 uint8 array.

    Args:
        data: the encoded image.
        size: the view's side.
        rng: every random draw.
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, w, h = _random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for _ in range(2):
        name = _OP_NAMES[rng.randrange(len(_OP_NAMES))]
        if rng.random() < 0.5:  # timm AugmentOp(prob=0.5)
            img = TIMM_RAND_OPS[name](img, rng)
    return np.asarray(img)


def timm_style_eval_view(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> shorter side ``size / 0.875`` (bicubic), central size x size crop, as a uint8 array.

    Args:
        data: the encoded image.
        size: the view's side.
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = round(size / 0.875) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))
