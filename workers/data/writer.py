"""Writing image data sets as shuffled WebDataset shards with a manifest per split (``mixer-study shards``).

Sharding and shuffling
----------------------
The builders (:func:`shards_from_digits`, :func:`shards_from_imagefolder`) shuffle the whole data set ONCE
(seeded) before splitting (stratified by class) and sharding. The order inside a split is therefore random, so
every prefix of a split is an unbiased random sample of it.

Stored size
-----------
A split's ``image_size`` (manifest) is the stored SHORTER side. ImageFolder images keep their aspect ratio and are
not cropped, so the reader's random-resized (inception) crops and evaluation central crops (``workers.data.augment``)
see the whole picture, as big_vision's do on the raw JPEGs; keep the shorter side >= 1.14 x the training size
(256 for 224, big_vision's eval resize). Digits are square (8x8 upscaled). Samples are PNG (lossless, ``png``
key) or JPEG (``jpg`` key, ``jpeg_quality``; several times smaller for photographs).
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Iterable, Iterator
from typing import Literal

import fsspec
import numpy as np
from PIL import Image

from workers.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, join_url, normalize_url, write_manifest
from workers.data.shard_format import SHARD_PATTERN, write_shard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # image files an ImageFolder tree may hold
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}

ImageFormat = Literal["png", "jpeg"]
_SAMPLE_EXTENSION = {"png": "png", "jpeg": "jpg"}  # webdataset keys: the reader accepts png, jpg, jpeg, webp


def encode_image(image: np.ndarray, image_format: ImageFormat = "png", jpeg_quality: int = 95) -> bytes:
    """HxWx3 uint8 -> PNG or JPEG bytes (PIL's default 4:2:0 chroma subsampling, as most photo JPEGs)."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check_format(image_format: str, jpeg_quality: int) -> None:
    if image_format not in _SAMPLE_EXTENSION:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")


def _write_shard(
    url: str,
    samples: list[tuple[str, np.ndarray, int]],
    image_size: int,
    image_format: ImageFormat = "png",
    jpeg_quality: int = 95,
) -> str:
    """Encode (key, image, label) samples and write them as one shard; returns its sha256."""
    ext = _SAMPLE_EXTENSION[image_format]

    def encoded() -> Iterator[tuple[str, str, bytes, int]]:
        for key, image, label in samples:
            shape = image.shape
            if image.dtype != np.uint8 or len(shape) != 3 or shape[2] != 3 or min(shape[:2]) != image_size:
                raise ValueError(
                    f"sample {key}: expected a uint8 HxWx3 array with shorter side {image_size}, "
                    f"got {image.dtype} {image.shape}"
                )
            yield key, ext, encode_image(image, image_format, jpeg_quality), label

    return write_shard(url, encoded())


def write_split(
    samples: Iterable[tuple[np.ndarray, int]],
    out_dir: str,
    split: str,
    class_names: list[str],
    image_size: int,
    samples_per_shard: int,
    image_format: ImageFormat = "png",
    jpeg_quality: int = 95,
) -> Manifest:
    """Write (uint8 HxWx3 image, label) pairs, in the given order, as ``<out_dir>/<split>/shard-*.tar`` + manifest.

    ``image_size`` is the stored shorter side every image must have (any aspect ratio); it becomes the manifest's
    ``image_size``. Images are stored as ``image_format`` ("png": key ``png``; "jpeg": key ``jpg`` at
    ``jpeg_quality``). ``samples`` may be a lazy iterable; one shard's worth is held in memory at a time. The
    manifest is written last, so a split folder without one is an interrupted write.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    _check_format(image_format, jpeg_quality)
    folder = join_url(normalize_url(out_dir), split)
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)

    shards: list[ShardInfo] = []
    pending: list[tuple[str, np.ndarray, int]] = []

    def flush() -> None:
        name = SHARD_PATTERN.format(len(shards))
        sha = _write_shard(join_url(folder, name), pending, image_size, image_format, jpeg_quality)
        counts = np.bincount([label for _, _, label in pending], minlength=len(class_names)).tolist()
        shards.append(ShardInfo(name, len(pending), sha, counts))  # class_counts: exact prefix histograms
        pending.clear()

    index = 0
    for index, (image, label) in enumerate(samples):
        if not 0 <= int(label) < len(class_names):
            raise ValueError(f"sample {index}: label {label} outside [0, {len(class_names)})")
        pending.append((f"{index:08d}", np.asarray(image), int(label)))
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"split {split!r}: no samples to write")

    manifest = Manifest(
        url=join_url(folder, MANIFEST_NAME),
        split=split,
        shards=shards,
        class_names=list(class_names),
        image_size=image_size,
        num_samples=sum(s.num_samples for s in shards),
    )
    write_manifest(manifest)
    return manifest


def split_indices(labels: np.ndarray, split_fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Shuffle once with ``seed``, then split stratified by class; each split keeps the shuffled order.

    Stratification: walk the samples class by class (each class in shuffled order) and deal each one to the split
    furthest below its target fraction so far. Every split's size is then within one sample of
    ``fraction * N`` and within two of ``fraction * class size`` per class, and small splits still get samples
    when classes are tiny.
    """
    if not split_fractions or any(f <= 0 for f in split_fractions.values()):
        raise ValueError(f"split_fractions must be non-empty and positive, got {split_fractions}")
    if not math.isclose(sum(split_fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must sum to 1, got {split_fractions}")
    labels = np.asarray(labels)
    names, fractions = list(split_fractions), list(split_fractions.values())
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = order[np.argsort(labels[order], kind="stable")]
    split_of = np.empty(len(labels), dtype=np.int64)
    assigned = [0] * len(names)
    for dealt, index in enumerate(by_class.tolist(), start=1):
        s = max(range(len(names)), key=lambda i: fractions[i] * dealt - assigned[i])
        assigned[s] += 1
        split_of[index] = s
    result = {name: order[split_of[order] == i].tolist() for i, name in enumerate(names)}
    for name, idx in result.items():
        if not idx:
            raise ValueError(f"split {name!r} would be empty ({len(labels)} samples, fractions {split_fractions})")
    return result


def _digits_image(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """8x8 grey levels 0..16 -> image_size x image_size x 3 uint8 (PIL bilinear upscaling)."""
    grey = np.round(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def shards_from_digits(
    out_dir: str,
    image_size: int = 16,
    samples_per_shard: int = 25,
    seed: int = 0,
    split_fractions: dict[str, float] | None = None,
) -> dict[str, Manifest]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes; no download) as shuffled, stratified shards."""
    from sklearn.datasets import load_digits  # lazy: workers reading shards do not need scikit-learn

    digits = load_digits()
    labels = np.asarray(digits.target)
    splits = split_indices(labels, split_fractions or DEFAULT_SPLITS, seed)
    class_names = [str(c) for c in range(10)]
    return {
        split: write_split(
            ((_digits_image(digits.images[i], image_size), int(labels[i])) for i in idx),
            out_dir, split, class_names, image_size, samples_per_shard,
        )
        for split, idx in splits.items()
    }


def _list_imagefolder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(image URL, label)]) of ``root/<class>/*.{jpg,jpeg,png}``, with clear errors."""
    root = normalize_url(root)
    fs, path = fsspec.core.url_to_fs(root)
    is_local = "://" not in root
    if not fs.isdir(path):
        raise FileNotFoundError(f"image folder root {root} does not exist or is not a directory")
    class_dirs = sorted(
        (posixpath.basename(e["name"].rstrip("/")), e["name"].rstrip("/"))
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    )
    if not class_dirs:
        raise ValueError(f"no class folders in {root}: expected {root}/<class_name>/*.jpg|jpeg|png")
    files: list[tuple[str, int]] = []
    for label, (name, class_path) in enumerate(class_dirs):
        images = sorted(
            e["name"]
            for e in fs.ls(class_path, detail=True)
            if e["type"] == "file" and e["name"].lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise ValueError(f"class folder {join_url(root, name)} contains no .jpg/.jpeg/.png images")
        files.extend((p if is_local else fs.unstrip_protocol(p), label) for p in images)
    return [name for name, _ in class_dirs], files


def _load_resized(url: str, image_size: int) -> np.ndarray:
    """Read an image file as RGB with its SHORTER side resized to image_size, aspect ratio kept, nothing cropped.

    Downscaling is PIL's antialiased bilinear; a JPEG much larger than needed is first decoded at 1/2..1/8 scale
    (``draft``) to no less than twice the target, PIL ``thumbnail``'s reducing_gap=2 rule, which keeps the
    quality of a full decode at a fraction of its cost.
    """
    try:
        with fsspec.open(url, "rb") as f, Image.open(f) as img:
            w, h = img.size
            if img.format == "JPEG" and min(w, h) >= 4 * image_size:
                img.draft("RGB", (2 * image_size * w // min(w, h), 2 * image_size * h // min(w, h)))
            img = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"cannot read image file {url}: {exc}") from exc
    w, h = img.size
    scale = image_size / min(w, h)
    # the shorter side exactly image_size, the longer one rounded (and never below it)
    if w <= h:
        new_size = (image_size, max(image_size, round(h * scale)))
    else:
        new_size = (max(image_size, round(w * scale)), image_size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def shards_from_imagefolder(
    root: str,
    out_dir: str,
    image_size: int,
    samples_per_shard: int = 1000,
    seed: int = 0,
    split_fractions: dict[str, float] | None = None,
    image_format: ImageFormat = "png",
    jpeg_quality: int = 95,
) -> dict[str, Manifest]:
    """An ImageFolder tree (``root/<class>/*.jpg|jpeg|png``, classes sorted) as shuffled, stratified shards.

    Every image is stored with its shorter side resized to ``image_size`` and its aspect ratio kept (no crop), as
    ``image_format`` ("png" or "jpeg" at ``jpeg_quality``); keep ``image_size`` >= 1.14 x the training size.
    """
    _check_format(image_format, jpeg_quality)
    class_names, files = _list_imagefolder(root)
    labels = np.array([label for _, label in files])
    splits = split_indices(labels, split_fractions or DEFAULT_SPLITS, seed)
    return {
        split: write_split(
            ((_load_resized(files[i][0], image_size), files[i][1]) for i in idx),
            out_dir, split, class_names, image_size, samples_per_shard, image_format, jpeg_quality,
        )
        for split, idx in splits.items()
    }
