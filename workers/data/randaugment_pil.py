"""RandAugment's fast path (``data.augment.pixel_ops: fast``): the 16 ops of ``workers.data.randaugment`` on PIL
images, each one C call of Pillow, with the same op draws, arguments and rng consumption.

The exact path (``workers.data.randaugment``) reproduces TF's float32-then-truncate arithmetic on numpy arrays.
Here:

* the per-value ops (Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast, AutoContrast, Equalize) use
  the exact path's own 256-level tables through ``Image.point``: **the same bits**;
* Cutout pastes the fill colour into the same box: the same bits;
* Rotate, Shear and Translate are ``Image.transform(AFFINE, NEAREST)`` with the exact path's matrix, shifted so
  that Pillow's pixel-centre sampling (floor of the centre's image) picks TF's round-half-away source pixel
  (:func:`_affine`): the same pixels but where Pillow's fixed-point coordinates and TF's float32 ones fall on
  opposite sides of a half (a few in 10,000);
* Color is Pillow's ``ImageEnhance.Color`` formula (grey by ITU-R 601, rounded; TF's weights differ in the 4th
  digit and it truncates) and Sharpness a 3 x 3 box blur blended to the same SMOOTH kernel (:func:`_sharpness`),
  each blended by ``Image.blend`` (truncated and clipped, as TF): the grey or smoothed image is about a level off,
  times ``|1 - factor|`` after the blend.

``tests/test_augment.py`` bounds each op's and the whole view's pixel error against the exact path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from workers.data.randaugment import (
    RANDAUG_OPS,
    REPLACE_VALUE,
    RandAugment,
    autocontrast_tables,
    brightness,
    contrast_table,
    equalize_tables,
    invert,
    posterize,
    rotation_matrix,
    solarize,
    solarize_add,
)

_LEVELS = np.arange(256, dtype=np.uint8)  # every uint8 level: a per-value op applied to these is its table
_OP_NAMES = tuple(RANDAUG_OPS)  # the exact path's table order: the same index draws the same op


def _point(image: Image.Image, tables: list[np.ndarray | None]) -> Image.Image:
    """Channel c through ``tables[c]`` (None: unchanged), one ``Image.point`` call."""
    lut: list[int] = []
    for table in tables:
        lut += (_LEVELS if table is None else table).tolist()
    return image.point(lut)


def _same_table(table: np.ndarray) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.point(table.tolist() * 3)


def _histograms(image: Image.Image) -> np.ndarray:
    return np.asarray(image.histogram(), dtype=np.int64).reshape(3, 256)


def _affine(image: Image.Image, matrix: tuple[float, ...], tie_margin: float = 0.0) -> Image.Image:
    """The exact path's ``_transform`` (output (x, y) reads input round_half_away(a0 x + a1 y + a2, ...)).

    Pillow samples output pixel centres and takes the floor: it reads ``floor(a0 (x + .5) + a1 (y + .5) + c)``,
    which is ``floor(a0 x + a1 y + a2 + .5)`` with ``c = a2 + .5 - .5 (a0 + a1)``. Pillow steps its coordinates in
    16.16 fixed point, a little below the true value (up to ~0.002 px across 224 px), so a source coordinate that is
    exactly a half (a shear by 0.45 at every 20th row) rounds down where TF rounds it up; ``tie_margin`` (3e-3 for
    the shears: at integer magnitudes their coordinates are multiples of 0.01, never within it of a half but on one)
    moves those ties up. Rotations pass 0: their coordinates are not ties, and a margin would move the ones near a
    half. What remains: ties that TF's float32 arithmetic puts just below a half (at most 1 % of a shear's pixels,
    at some magnitudes; 0.01 % at 15).
    """
    a0, a1, a2, b0, b1, b2 = (float(m) for m in matrix)
    data = (a0, a1, a2 + 0.5 + tie_margin - 0.5 * (a0 + a1), b0, b1, b2 + 0.5 + tie_margin - 0.5 * (b0 + b1))
    return image.transform(image.size, Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST,
                           fillcolor=REPLACE_VALUE)


_TIE_MARGIN = 3e-3  # see _affine


def _blend_with(degenerate: Image.Image, image: Image.Image, factor: float) -> Image.Image:
    """TF ``blend(degenerate, image, factor)``: Pillow's ``Image.blend`` truncates and clips as TF does."""
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return image
    return Image.blend(degenerate, image, factor)


def _sharpness(image: Image.Image, factor: float) -> Image.Image:
    """TF ``blend(smooth(image), image, factor)``, SMOOTH = [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border kept.

    SMOOTH is ``4/13 image + 9/13 box3(image)``, so the blend is ``blend(box3(image), image, 1 + 9/13 (factor -
    1))``: Pillow's 3 x 3 box blur (a running sum) and one blend, a tenth of the time of ``filter(SMOOTH)``; the
    one-pixel border, which TF leaves unsmoothed, is then the image's own.
    """
    if factor == 1.0 or image.width < 3 or image.height < 3:
        return image
    sharpened = Image.blend(image.filter(ImageFilter.BoxBlur(1)), image, 1.0 + (factor - 1.0) * 9.0 / 13.0)
    out = image.copy()
    out.paste(sharpened.crop((1, 1, image.width - 1, image.height - 1)), (1, 1))
    return out


def _cutout(image: Image.Image, pad_size: int, center: tuple[int, int]) -> Image.Image:
    cy, cx = center
    box = (max(0, cx - pad_size), max(0, cy - pad_size), min(image.width, cx + pad_size),
           min(image.height, cy + pad_size))
    if box[0] >= box[2] or box[1] >= box[3]:
        return image
    out = image.copy()  # paste writes in place: the caller's image stays as it was
    out.paste(REPLACE_VALUE, box)
    return out


# name -> apply(image, *args), the arguments as the exact path's level_to_arg gives them.
PIL_OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda image: _point(image, autocontrast_tables(_histograms(image))),
    "Equalize": lambda image: _point(image, equalize_tables(_histograms(image))),
    "Invert": _same_table(invert(_LEVELS)),
    "Rotate": lambda image, degrees: _affine(image, rotation_matrix(image.height, image.width, degrees)),
    "Posterize": lambda image, bits: _same_table(posterize(_LEVELS, bits))(image),
    "Solarize": lambda image, threshold: _same_table(solarize(_LEVELS, threshold))(image),
    "Color": lambda image, factor: _blend_with(image.convert("L").convert("RGB"), image, factor),
    "Contrast": lambda image, factor: _same_table(contrast_table(image.width * image.height, factor))(image),
    "Brightness": lambda image, factor: _same_table(brightness(_LEVELS, factor))(image),
    "Sharpness": _sharpness,
    "ShearX": lambda image, level: _affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), _TIE_MARGIN),
    "ShearY": lambda image, level: _affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), _TIE_MARGIN),
    "TranslateX": lambda image, pixels: _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0)),
    "TranslateY": lambda image, pixels: _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels)),
    "Cutout": _cutout,
    "SolarizeAdd": lambda image, addition: _same_table(solarize_add(_LEVELS, addition))(image),
}
if tuple(PIL_OPS) != _OP_NAMES:  # every op of the exact table, in its order: an op missing here fails at import
    raise RuntimeError(f"PIL_OPS {tuple(PIL_OPS)} must list RANDAUG_OPS' ops in their order {_OP_NAMES}")


class RandAugmentPIL(RandAugment):
    """:class:`workers.data.randaugment.RandAugment` on an RGB PIL image: the same draws from ``rng`` (op index,
    then its arguments' sign, then Cutout's centre ``cy``, ``cx``) by construction, since the draws are the base
    class's; each op as one Pillow call (module docstring).

    Args:
        num_layers: ops in a row.
        magnitude: RandAugment's shared magnitude (``workers.data.randaugment.level_to_arg``).
    """

    def image_size(self, image: Image.Image) -> tuple[int, int]:
        return image.height, image.width

    def run_op(self, name: str, image: Image.Image, *args: object) -> Image.Image:
        return PIL_OPS[name](image, *args)
