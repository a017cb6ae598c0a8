"""A generated image corpus that does not saturate and transfers (``mixer-study shards --from synthetic``).

What makes a class
------------------
A class is an *object*: 2 or 3 parts of a shared vocabulary of 8 (bar, ring, cross, corner, dots, checker,
diagonal, arc; ``workers.data.synthetic_render``) in a class-specific arrangement (2 parts: above, left-of,
up-left-of, down-left-of; 3 parts: an L or a triangle) with a class-specific colour per part (8 palette colours).
Its name says so: ``ring-above-bar/red-blue``, ``cross-dots-arc-in-an-L/green-white-cyan``. Classes come in
confusable pairs: each set of parts gives two classes with the same parts that differ only in the arrangement
(or order) or only in the colours, so the label is in how local parts relate, not in which colours are present.

What varies within a class
--------------------------
The object's position (anywhere it stays mostly inside the image), scale (0.8-1.25), rotation (+-0.3 rad),
per-part colour jitter (+-0.08 per channel) and brightness (0.85-1.1); 1-3 distractor parts of the same vocabulary
in random colours at random places under the object; a smooth random background (a two-colour gradient plus one
slow wave); Gaussian pixel noise (sigma 0.04).

Pre-training and transfer tasks
-------------------------------
The class *design* is fixed (it does not depend on ``seed``): the 84 sets of 2 or 3 distinct parts are shuffled
once with a constant; pre-training classes take sets from the front, transfer classes from the back, so no
transfer class shares a set of parts (hence an arrangement or a name) with a pre-training class, while both use the
same parts and colours (features transfer, as in the paper's JFT -> ImageNet). ``seed`` draws the images.

Determinism
-----------
Image ``i`` of a split is a pure function of ``(seed, split, i)`` (its own ``SeedSequence``); the split's labels
are a seeded permutation of a balanced label list. The same arguments therefore write byte-identical shards, and
splits never share an image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from workers.data.manifest import Manifest, join_url, normalize_url
from workers.data.synthetic_render import (
    COLOUR_NAMES,
    PALETTE_RGB,
    PART_NAMES,
    PartLayer,
    background,
    render,
)
from workers.data.writer import write_split

IMAGE_SIZES = (16, 64)  # allowed stored sizes, inclusive
DEFAULT_SIZE = 32_000  # pre-training train images
DEFAULT_PRETRAIN_CLASSES = 64
DEFAULT_TRANSFER_CLASSES = 16
TRANSFER_PER_CLASS = {"train": 100, "val": 50, "test": 100}  # at the default size; scaled down with --size
DESIGN_SEED = 20210504  # fixes the class design for every --seed (the paper's arXiv date)
RENDER_CHUNK = 512  # images drawn per vectorised batch

# Arrangements: part centres in units of the spacing (x right, y down), and how the class name spells them.
LAYOUTS: dict[str, tuple[tuple[tuple[float, float], ...], str]] = {
    "above": (((0.0, -0.5), (0.0, 0.5)), "{0}-above-{1}"),
    "left-of": (((-0.5, 0.0), (0.5, 0.0)), "{0}-left-of-{1}"),
    "up-left-of": (((-0.4, -0.4), (0.4, 0.4)), "{0}-up-left-of-{1}"),
    "down-left-of": (((-0.4, 0.4), (0.4, -0.4)), "{0}-down-left-of-{1}"),
    "L": (((-0.45, -0.45), (-0.45, 0.45), (0.45, 0.45)), "{0}-{1}-{2}-in-an-L"),
    "triangle": (((0.0, -0.45), (-0.5, 0.4), (0.5, 0.4)), "{0}-{1}-{2}-in-a-triangle"),
}
PART_RADIUS = 0.13  # a part's radius at scale 1, in image units (2 px of a 16 px image)
SPACING = 0.30  # distance between part centres at offset 1, in image units
SCALE_RANGE = (0.8, 1.25)
MAX_ROTATION = 0.3  # radians either way
COLOUR_JITTER = 0.08
BRIGHTNESS_RANGE = (0.85, 1.1)
MAX_DISTRACTORS = 3
NOISE_SIGMA = 0.04
OVERFLOW = 0.1  # the object may reach this fraction of its extent outside the image

# Fixed codes of the five splits: the second number of every image's SeedSequence, so splits never share images.
SPLIT_CODES = {("pretrain", "train"): 1, ("pretrain", "val"): 2,
               ("transfer", "train"): 3, ("transfer", "val"): 4, ("transfer", "test"): 5}


@dataclass(frozen=True)
class ClassSpec:
    """One class: which parts (ids into ``PART_NAMES``), in which layout slots, in which colours (``COLOUR_NAMES``).

    Args:
        parts: part id per layout slot.
        layout: a key of ``LAYOUTS`` with as many slots as parts.
        colours: colour id per layout slot.
    """

    parts: tuple[int, ...]
    layout: str
    colours: tuple[int, ...]

    @property
    def name(self) -> str:
        spelled = LAYOUTS[self.layout][1].format(*(PART_NAMES[p] for p in self.parts))
        return f"{spelled}/{'-'.join(COLOUR_NAMES[c] for c in self.colours)}"


def _part_sets() -> list[tuple[int, ...]]:
    """Every set of 2 or 3 distinct parts, in the fixed shuffled order of the class design."""
    sets = [s for k in (2, 3) for s in itertools.combinations(range(len(PART_NAMES)), k)]
    order = np.random.default_rng(DESIGN_SEED).permutation(len(sets))
    return [sets[i] for i in order]


def _class_pair(part_set: tuple[int, ...], rng: np.random.Generator) -> list[ClassSpec]:
    """Two confusable classes of one set of parts: same parts; then same colours in another arrangement or order,
    or the same arrangement in other colours."""
    layouts = [name for name, (offsets, _) in LAYOUTS.items() if len(offsets) == len(part_set)]
    parts = tuple(int(p) for p in rng.permutation(part_set))
    colours = tuple(int(c) for c in rng.choice(len(COLOUR_NAMES), size=len(parts), replace=False))
    first = ClassSpec(parts, layouts[rng.integers(len(layouts))], colours)
    if rng.random() < 0.5:
        while True:  # another arrangement or order (a reordering that looks the same is a new draw)
            candidate = ClassSpec(tuple(int(p) for p in rng.permutation(parts)), layouts[rng.integers(len(layouts))],
                                  colours)
            if (candidate.parts, candidate.layout) != (first.parts, first.layout):
                return [first, candidate]
    while True:
        others = tuple(int(c) for c in rng.choice(len(COLOUR_NAMES), size=len(parts), replace=False))
        if others != colours:
            return [first, ClassSpec(parts, first.layout, others)]


def design_classes(num_pretrain: int, num_transfer: int) -> tuple[list[ClassSpec], list[ClassSpec]]:
    """The pre-training and transfer classes (fixed for given counts; no set of parts is in both).

    Pre-training classes are drawn two per part set from the front of the fixed shuffled list, transfer classes
    from the back, so adding pre-training classes never changes the transfer classes.

    Args:
        num_pretrain: pre-training classes, >= 2.
        num_transfer: transfer classes, >= 2.
    """
    sets = _part_sets()
    pretrain_sets, transfer_sets = -(-num_pretrain // 2), -(-num_transfer // 2)
    if pretrain_sets + transfer_sets > len(sets):
        raise ValueError(f"--pretrain-classes + --transfer-classes must be at most {2 * len(sets)} (two classes per "
                         f"set of parts, {len(sets)} sets), got {num_pretrain} + {num_transfer}")

    def classes(part_sets: list[tuple[int, ...]], count: int, stream: int) -> list[ClassSpec]:
        rng = np.random.default_rng([DESIGN_SEED, stream])
        return [spec for s in part_sets for spec in _class_pair(s, rng)][:count]

    pretrain = classes(sets[:pretrain_sets], num_pretrain, 1)
    transfer = classes(sets[len(sets) - transfer_sets:], num_transfer, 2)
    names = [c.name for c in pretrain + transfer]
    assert len(set(names)) == len(names), "class names must be unique across the corpus"
    return pretrain, transfer


def split_sizes(size: int, num_pretrain: int, num_transfer: int) -> dict[tuple[str, str], int]:
    """Images per split: ``size`` pre-training train images, 10 % of that for val (at least one per class), and
    100/50/100 transfer images per class at the default size, scaled down in proportion (at least 2/1/2)."""
    per_class = min(TRANSFER_PER_CLASS["train"], max(2, size * TRANSFER_PER_CLASS["train"] // DEFAULT_SIZE))
    return {
        ("pretrain", "train"): size,
        ("pretrain", "val"): max(num_pretrain, round(size / 10)),
        ("transfer", "train"): per_class * num_transfer,
        ("transfer", "val"): max(1, per_class // 2) * num_transfer,
        ("transfer", "test"): per_class * num_transfer,
    }


def split_labels(seed: int, split: tuple[str, str], num_samples: int, num_classes: int) -> np.ndarray:
    """Balanced labels of a split (class sizes within one) in a seeded random order."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 0])
    return rng.permutation(np.arange(num_samples) % num_classes)


# Columns of an image's uniform numbers (each in [0, 1)).
_CENTRE_X, _CENTRE_Y, _SCALE, _ROTATION = 0, 1, 2, 3  # of the object
_JITTER = slice(4, 13)  # colour jitter, 3 slots x RGB
_BRIGHTNESS = 13
_DISTRACTOR_COUNT = 14
_DISTRACTORS = slice(15, 15 + 6 * MAX_DISTRACTORS)  # per distractor: part, colour, x, y, scale, rotation
_BACKGROUND = slice(33, 39)  # two colours
_WAVE = slice(39, 44)
_NUM_UNIFORMS = 44


def _image_numbers(seed: int, split_code: int, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The uniform numbers and the pixel noise of one image: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, split_code, 1, index])
    return rng.random(_NUM_UNIFORMS), rng.standard_normal((image_size, image_size, 3))


def _between(low: float, high: float, unit: np.ndarray) -> np.ndarray:
    return low + (high - low) * unit


def render_images(specs: list[ClassSpec], labels: np.ndarray, uniforms: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """B x P x P x 3 uint8 images of the given classes from their numbers (no randomness inside).

    Args:
        specs: the task's classes (index = label).
        labels: B labels.
        uniforms: B x ``_NUM_UNIFORMS`` numbers in [0, 1) (:func:`_image_numbers`).
        noise: B x P x P x 3 standard normal pixel noise.
    """
    count, image_size = len(labels), noise.shape[1]
    scale = _between(*SCALE_RANGE, uniforms[:, _SCALE])
    angle = _between(-MAX_ROTATION, MAX_ROTATION, uniforms[:, _ROTATION])
    slots = max(len(LAYOUTS[s.layout][0]) for s in specs)
    offsets = np.zeros((count, slots, 2))
    parts = np.zeros((count, slots), dtype=np.int64)
    colour_ids = np.zeros((count, slots), dtype=np.int64)
    in_class = np.zeros((count, slots), dtype=bool)
    for label, spec in enumerate(specs):
        chosen = labels == label
        n = len(spec.parts)
        offsets[chosen, :n] = LAYOUTS[spec.layout][0]
        parts[chosen, :n], colour_ids[chosen, :n], in_class[chosen, :n] = spec.parts, spec.colours, True

    # keep the object's bounding circle (all but OVERFLOW of it) inside the image
    reach = (np.hypot(offsets[..., 0], offsets[..., 1]).max(axis=1) * SPACING + PART_RADIUS) * scale
    margin = np.minimum(reach * (1 - OVERFLOW), 0.5)
    centre_x = _between(margin, 1 - margin, uniforms[:, _CENTRE_X])
    centre_y = _between(margin, 1 - margin, uniforms[:, _CENTRE_Y])

    base = background(_between(0.05, 0.55, uniforms[:, _BACKGROUND][:, :3]),
                      _between(0.05, 0.55, uniforms[:, _BACKGROUND][:, 3:]), uniforms[:, _WAVE], image_size)
    layers = []
    distractors = uniforms[:, _DISTRACTORS].reshape(count, MAX_DISTRACTORS, 6)
    how_many = 1 + np.floor(uniforms[:, _DISTRACTOR_COUNT] * MAX_DISTRACTORS)
    for k in range(MAX_DISTRACTORS):
        d = distractors[:, k]
        layers.append(PartLayer(
            part=np.floor(d[:, 0] * len(PART_NAMES)).astype(np.int64),
            x=_between(0.05, 0.95, d[:, 2]), y=_between(0.05, 0.95, d[:, 3]),
            radius=PART_RADIUS * _between(*SCALE_RANGE, d[:, 4]),
            angle=_between(-MAX_ROTATION, MAX_ROTATION, d[:, 5]),
            colour=PALETTE_RGB[np.floor(d[:, 1] * len(COLOUR_NAMES)).astype(np.int64)],
            visible=k < how_many,
        ))
    cos, sin = np.cos(angle), np.sin(angle)
    jitter = _between(-COLOUR_JITTER, COLOUR_JITTER, uniforms[:, _JITTER]).reshape(count, 3, 3)
    brightness = _between(*BRIGHTNESS_RANGE, uniforms[:, _BRIGHTNESS])[:, None]
    for slot in range(slots):
        dx, dy = offsets[:, slot, 0] * SPACING * scale, offsets[:, slot, 1] * SPACING * scale
        layers.append(PartLayer(
            part=parts[:, slot], x=centre_x + cos * dx - sin * dy, y=centre_y + sin * dx + cos * dy,
            radius=PART_RADIUS * scale, angle=angle,
            colour=np.clip(PALETTE_RGB[colour_ids[:, slot]] * brightness + jitter[:, slot], 0.0, 1.0),
            visible=in_class[:, slot],
        ))
    return render(base, layers, NOISE_SIGMA * noise)


def generate_split(seed: int, split: tuple[str, str], specs: list[ClassSpec], num_samples: int, image_size: int,
                   start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(image, label) of samples ``start..stop`` of a split, drawn ``RENDER_CHUNK`` at a time.

    Args:
        seed: the corpus seed (>= 0).
        split: (task, split), a key of ``SPLIT_CODES``.
        specs: the task's classes.
        num_samples: the split's size (it fixes the labels).
        image_size: P of the P x P images.
        start, stop: the range of sample indices to draw (default: all).
    """
    labels = split_labels(seed, split, num_samples, len(specs))
    stop = num_samples if stop is None else stop
    for first in range(start, stop, RENDER_CHUNK):
        indices = range(first, min(first + RENDER_CHUNK, stop))
        numbers = [_image_numbers(seed, SPLIT_CODES[split], i, image_size) for i in indices]
        images = render_images(specs, labels[first:first + len(indices)],
                               np.stack([u for u, _ in numbers]), np.stack([n for _, n in numbers]))
        yield from zip(images, labels[first:first + len(indices)].tolist(), strict=True)


def check_arguments(size: int, image_size: int, seed: int, num_pretrain: int, num_transfer: int) -> None:
    """Raise ValueError naming the flag, the value and what is allowed, for any argument out of range."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise ValueError(f"--image-size must be in {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]} for --from synthetic, "
                         f"got {image_size}")
    for flag, value in (("--pretrain-classes", num_pretrain), ("--transfer-classes", num_transfer)):
        if value < 2:
            raise ValueError(f"{flag} must be >= 2, got {value}")
    if size < num_pretrain:
        raise ValueError(f"--size must be >= --pretrain-classes ({num_pretrain}: one image per class), got {size}")


def shards_from_synthetic(
    out_dir: str,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    image_size: int = 16,
    samples_per_shard: int = 250,
    num_pretrain: int = DEFAULT_PRETRAIN_CLASSES,
    num_transfer: int = DEFAULT_TRANSFER_CLASSES,
) -> dict[str, Manifest]:
    """Write the corpus: ``out_dir/pretrain/{train,val}`` and ``out_dir/transfer/{train,val,test}`` (PNG shards).

    Args:
        out_dir: output folder (any fsspec URL).
        seed: draws the images (not the classes); same arguments -> byte-identical shards.
        size: pre-training train images (the other splits follow, :func:`split_sizes`).
        image_size: P of the P x P RGB images, 16..64.
        samples_per_shard: samples per tar shard.
        num_pretrain, num_transfer: classes of the two tasks.

    Returns:
        The manifests by ``"task/split"``.
    """
    check_arguments(size, image_size, seed, num_pretrain, num_transfer)
    tasks = dict(zip(("pretrain", "transfer"), design_classes(num_pretrain, num_transfer), strict=True))
    out_dir = normalize_url(out_dir)
    manifests = {}
    for (task, split), count in split_sizes(size, num_pretrain, num_transfer).items():
        specs = tasks[task]
        manifests[f"{task}/{split}"] = write_split(
            generate_split(seed, (task, split), specs, count, image_size), join_url(out_dir, task), split,
            [spec.name for spec in specs], image_size, samples_per_shard,
        )
    return manifests
