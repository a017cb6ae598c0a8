"""Drawing the synthetic corpus's images: the part vocabulary, the palette, and a vectorised renderer.

Every part is a signed distance function of its local coordinates ``(u, v)`` (units of the part's radius, ``v``
pointing down): negative inside, positive outside. A batch of parts is drawn by turning the distance into an
antialiased coverage (``0.5 - distance in pixels``, clipped to [0, 1]) and blending the part's colour over the
image, so a part looks the same at any resolution and sub-pixel position. :func:`render` draws a batch of images
from numbers alone (no randomness inside): the generator (``workers.data.synthetic``) draws the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 1.0, 0.3)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.hypot(u, v) - 0.7) - 0.25


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_box(u, v, 1.0, 0.28), _box(u, v, 0.28, 1.0))


def _corner(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # an L: a vertical stroke on the left joined to a horizontal stroke at the bottom
    return np.minimum(_box(u + 0.7, v, 0.3, 1.0), _box(u, v - 0.7, 1.0, 0.3))


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(np.hypot(u - 0.6, v), np.hypot(u + 0.6, v)) - 0.4


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # a 2x2 checker patch: the top-left and bottom-right quarters of the square filled
    filled = (u < 0) == (v < 0)
    to_edge = np.minimum(np.abs(u), np.abs(v))
    return np.maximum(_box(u, v, 1.0, 1.0), np.where(filled, -to_edge, to_edge))


def _diagonal(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u - v) * np.sqrt(0.5) - 0.3, _box(u, v, 0.9, 0.9))


def _arc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # the upper half of a ring (a cap), its centre shifted down so the stroke sits in the middle of the part
    return np.maximum(np.abs(np.hypot(u, v - 0.35) - 0.8) - 0.25, v - 0.35)


# The part vocabulary shared by every class of both tasks (the order is the part's id).
PARTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "bar": _bar,
    "ring": _ring,
    "cross": _cross,
    "corner": _corner,
    "dots": _dots,
    "checker": _checker,
    "diagonal": _diagonal,
    "arc": _arc,
}
PART_NAMES = tuple(PARTS)

# Saturated part colours (RGB in [0, 1]); backgrounds are kept darker and greyer so parts stand out.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)


@dataclass(frozen=True)
class PartLayer:
    """One part per image of a batch, all drawn in one pass (arrays of length B, ``colour`` B x 3).

    Args:
        part: part id per image (index into ``PART_NAMES``).
        x, y: the part's centre in image units ([0, 1] across the image, y down).
        radius: the part's radius in image units.
        angle: rotation in radians.
        colour: RGB in [0, 1].
        visible: False where an image has no part in this layer (e.g. fewer distractors).
    """

    part: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    colour: np.ndarray
    visible: np.ndarray


def coverage(layer: PartLayer, image_size: int) -> np.ndarray:
    """B x P x P antialiased coverage in [0, 1] of one layer's parts on P x P pixel centres."""
    centres = (np.arange(image_size) + 0.5) / image_size
    dx = centres[None, None, :] - layer.x[:, None, None]
    dy = centres[None, :, None] - layer.y[:, None, None]
    cos, sin = np.cos(layer.angle)[:, None, None], np.sin(layer.angle)[:, None, None]
    radius = layer.radius[:, None, None]
    u = (cos * dx + sin * dy) / radius
    v = (cos * dy - sin * dx) / radius
    distance = np.empty_like(u)
    for part_id, sdf in enumerate(PARTS.values()):
        chosen = layer.part == part_id
        if chosen.any():
            distance[chosen] = sdf(u[chosen], v[chosen])
    # distance in radius units -> pixels; a pixel half inside an edge gets half the colour
    alpha = np.clip(0.5 - distance * radius * image_size, 0.0, 1.0)
    return alpha * layer.visible[:, None, None]


def background(colour_a: np.ndarray, colour_b: np.ndarray, wave: np.ndarray, image_size: int) -> np.ndarray:
    """B x P x P x 3 smooth backgrounds: a linear gradient from ``colour_a`` to ``colour_b`` plus one slow wave.

    Args:
        colour_a, colour_b: B x 3 RGB at the two ends of the gradient.
        wave: B x 5 numbers in [0, 1): gradient direction, wave direction, wave frequency, wave phase, amplitude.
        image_size: P.
    """
    centres = (np.arange(image_size) + 0.5) / image_size
    x, y = centres[None, None, :], centres[None, :, None]

    def along(turn: np.ndarray) -> np.ndarray:
        angle = 2 * np.pi * turn[:, None, None]
        return np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)

    ramp = np.clip(along(wave[:, 0]) + 0.5, 0.0, 1.0)[..., None]
    frequency, phase = (0.5 + wave[:, 2])[:, None, None], (2 * np.pi * wave[:, 3])[:, None, None]
    ripple = (0.12 * wave[:, 4])[:, None, None] * np.sin(2 * np.pi * frequency * along(wave[:, 1]) + phase)
    return colour_a[:, None, None, :] * (1 - ramp) + colour_b[:, None, None, :] * ramp + ripple[..., None]


def render(base: np.ndarray, layers: list[PartLayer], noise: np.ndarray) -> np.ndarray:
    """Blend the layers over ``base`` (B x P x P x 3, in order: later layers on top), add ``noise``, quantise.

    Returns B x P x P x 3 uint8.
    """
    image = base.copy()
    for layer in layers:
        alpha = coverage(layer, base.shape[1])[..., None]
        image = image * (1 - alpha) + alpha * layer.colour[:, None, None, :]
    return np.round(np.clip(image + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
