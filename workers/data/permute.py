"""The input permutations of the paper's permutation study (Fig. 4): one fixed pixel permutation for every image.

Tolstikhin et al. (2021, §3.4, Fig. 4) train Mixer-B/16 and a ResNet (BiT-R50x1) on three versions of the data:

* ``none``: the original images;
* ``patches``: the order of the P x P patches shuffled AND the pixels inside every patch permuted, with one
  permutation shared by all patches;
* ``pixels``: the pixels of the whole image permuted.

The same permutation is used for every image of every split (train, val, few-shot), so the task stays learnable.

Convention. A permutation is a flat *gather* index ``perm`` over the ``H * W`` pixel positions in row-major order
(``flat = y * W + x``), shared by all channels: the permuted image is ``out.flat[i] = image.flat[perm[i]]``
(per channel), which :func:`apply_permutation` computes.

``patches`` with patch size P on an N x N image (g = N / P patches per side, S = g^2 patches): draw a patch order
``sigma`` (a permutation of the S patches, row-major) and a within-patch order ``tau`` (a permutation of the P^2
pixel positions of a patch, row-major). Output pixel (Y, X) lies in patch ``j = (Y // P) * g + X // P`` at
position ``q = (Y % P) * P + X % P``; it is taken from patch ``sigma[j]`` at position ``tau[q]``:

    perm[(Y, X)] = ((sigma[j] // g) * P + tau[q] // P) * N + (sigma[j] % g) * P + tau[q] % P

Why Mixer is invariant to this (the property ``tests/test_permute.py`` checks): Mixer's stem is a P x P stride-P
convolution, token ``j`` of the permuted image is ``W . x'_j = sum_q W[:, :, q] x[:, sigma[j], tau[q]]``, so a
stem kernel permuted like the pixels (``W'[:, :, q] = W[:, :, tau[q]]``) maps the permuted image to the original
tokens in the order ``sigma``: ``T'_j = T_{sigma[j]}``. Token mixing is an MLP over the token axis, so permuting
fc1's input columns and fc2's output rows (and fc2's bias) by ``sigma`` commutes with the reordering, channel
mixing and LayerNorm act per token, and global average pooling forgets the order. Hence a Mixer trained on
``patches`` data can represent exactly the functions one trained on the originals can (the same initialisation
distribution too: lecun-normal is invariant to permuting fan-in), and the paper's curves for (a) and (b) match.
A ResNet's convolutions and pooling rely on pixel neighbourhoods across patch borders, so it loses accuracy under
``patches``, and both lose under ``pixels`` (Mixer ~45 %, ResNet ~75 % in the paper).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from workers.config import DataConfig

Mode = Literal["none", "patches", "pixels"]
MODES: tuple[str, ...] = ("none", "patches", "pixels")


class PermuteSpec(NamedTuple):
    """What fixes one permutation: (mode, patch size P of ``patches``, seed); the data.permute* config fields."""

    mode: str
    patch: int
    seed: int


def permute_spec(data: DataConfig) -> PermuteSpec | None:
    """The permutation a trial's data config asks for, or None for ``data.permute: none`` (the original images)."""
    if data.permute == "none":
        return None
    return PermuteSpec(data.permute, data.permute_patch, data.permute_seed)


def _check(mode: str, image_size: int, patch: int, seed: int) -> None:
    if mode not in MODES:
        raise ValueError(f"data.permute must be one of {', '.join(MODES)}, got {mode!r}")
    if image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if seed < 0:
        raise ValueError(f"data.permute_seed must be >= 0, got {seed}")
    if mode == "patches" and (patch <= 0 or image_size % patch):
        raise ValueError(
            f"data.permute_patch = {patch} must be a positive divisor of the image size {image_size} for"
            " data.permute: patches (the image is cut into whole P x P patches; the paper uses 16 at 224 px)"
        )


def patch_permutations(image_size: int, patch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, tau) of ``patches``: the order of the S = (N/P)^2 patches and the shared order of the P^2 pixels
    inside a patch, both row-major gather indices (new patch j is old patch sigma[j]; new position q inside a
    patch is old position tau[q]). :func:`permutation` composes them into the flat pixel index."""
    _check("patches", image_size, patch, seed)
    rng = np.random.default_rng(seed)
    grid = image_size // patch
    return rng.permutation(grid * grid), rng.permutation(patch * patch)


def _patches_index(sigma: np.ndarray, tau: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """The flat gather index of the module docstring's formula, for every output pixel (Y, X) at once."""
    grid = image_size // patch
    y, x = np.divmod(np.arange(image_size * image_size), image_size)
    j = (y // patch) * grid + x // patch  # output patch
    q = (y % patch) * patch + x % patch  # position inside it
    src_patch, src_pos = sigma[j], tau[q]
    src_y = (src_patch // grid) * patch + src_pos // patch
    src_x = (src_patch % grid) * patch + src_pos % patch
    return src_y * image_size + src_x


@functools.lru_cache(maxsize=32)
def permutation(mode: str, image_size: int, patch: int, seed: int) -> np.ndarray:
    """The flat gather index (length N^2, read-only int64) of ``mode`` on N x N images, a function of its arguments.

    ``none``: the identity; ``patches``: see :func:`patch_permutations` (P = ``patch`` must divide N);
    ``pixels``: a uniformly random permutation of all N^2 positions (``patch`` is not used). Deterministic: numpy's
    PCG64 ``default_rng(seed)`` draws, cached per arguments (every image of a split reuses one array).
    """
    _check(mode, image_size, patch, seed)
    if mode == "none":
        perm = np.arange(image_size * image_size)
    elif mode == "patches":
        perm = _patches_index(*patch_permutations(image_size, patch, seed), image_size, patch)
    else:
        perm = np.random.default_rng(seed).permutation(image_size * image_size)
    perm = perm.astype(np.int64)
    perm.flags.writeable = False  # shared through the cache
    return perm


def apply_permutation(image: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``image`` (H x W or H x W x C) with its pixels moved by the flat gather index ``perm``: ``out.flat[i] =
    image.flat[perm[i]]`` over the H * W positions, every channel alike. Returns a new array, same dtype."""
    h, w = image.shape[:2]
    if perm.shape != (h * w,):
        raise ValueError(f"a permutation of {perm.size} pixel positions cannot permute a {h} x {w} image")
    return image.reshape(h * w, *image.shape[2:])[perm].reshape(image.shape)
