"""Image data sets as WebDataset shards: writing them, nested data fractions, and per-rank streaming.

Layout
------
One folder per split, written by :func:`write_split`::

    <out_dir>/<split>/shard-000000.tar     WebDataset samples {"__key__": "00000000", "png": ..., "cls": b"3"}
    <out_dir>/<split>/shard-000001.tar     (``samples_per_shard`` samples each; the last one may be shorter)
    <out_dir>/<split>/manifest.json        split, image_size, class_names, num_samples,
                                           shards: [{url: "shard-000000.tar", num_samples, sha256}, ...]

Keys are the sample's position in the split (``f"{index:08d}"``), so shard ``k`` holds keys
``k*samples_per_shard ...``. Shard URLs in the manifest are relative to the manifest's folder, so a split
folder can be copied anywhere (local disk, ``s3://bucket/dir``, ``gs://...``, ``https://...``) unchanged.
All I/O goes through ``fsspec`` and tar files are read/written with ``webdataset``.

Sharding and shuffling
----------------------
The builders (:func:`shards_from_digits`, :func:`shards_from_imagefolder`) shuffle the whole data set ONCE
(seeded) before splitting (stratified by class) and sharding. The order inside a split is therefore random, so
every prefix of a split is an unbiased random sample of it.

Data fractions
--------------
The subset for fraction ``f`` of a split with ``N`` samples is its first ``n = max(1, round(f * N))`` samples in
shard order (:func:`subset_size`, :func:`fraction_slices`). Granularity is one sample; subsets are nested
(``f1 < f2`` implies ``subset(f1) ⊂ subset(f2)``), and reading one touches only the first
``ceil(n / samples_per_shard)`` shards (the last one only up to its ``n``-th sample), so cost grows with ``f``.

Partitioning across ranks and DataLoader workers
------------------------------------------------
A :class:`ShardDataset` stream is consumed by ``world_size * num_loader_workers`` *slots*; slot
``rank * num_loader_workers + worker_id`` is one (rank, DataLoader worker) pair.

* ``len(slices) >= slots``: whole slices are dealt round robin (slot ``s`` reads slices ``s, s + slots, ...`` of the
  epoch's slice order). Each shard is read by exactly one slot.
* otherwise (few shards, many slots): every slot reads all slices but keeps only the samples whose running index
  in the subset satisfies ``index % slots == slot``. Still disjoint and complete, at the price of every slot
  reading the whole subset.

Either way the slots are disjoint and together cover the subset exactly once per pass. With ``train=True`` the
slice order is reshuffled every epoch (seeded by ``seed + epoch``, identically on every rank, so the rule above
still partitions), then samples pass through a per-slot shuffle buffer and the augmentations. Slots may get
different numbers of samples (by up to about a shard); with ``repeat=True`` the stream is infinite, so every rank can take the
same fixed number of batches and DDP never waits on a rank that ran out. A slot that would receive no samples at
all (subset smaller than the number of slots) is an error.

S3 (and other object stores) at a custom endpoint
-------------------------------------------------
``s3://`` URLs use ``s3fs`` with the usual AWS credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``~/.aws``, instance roles). To point them at MinIO, Ceph, moto or another S3 API, either

* set ``FSSPEC_S3_ENDPOINT_URL=http://host:9000`` in the environment of every process (fsspec reads
  ``FSSPEC_<PROTOCOL>_<KWARG>`` variables when it is imported and passes them to ``s3fs.S3FileSystem``; with Ray,
  put it in the job's ``runtime_env={"env_vars": {...}}``), or
* set ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), which botocore reads when s3fs creates its client, or
* in code, before the first s3 access: ``fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = "http://..."``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
_TAR_MTIME = 0  # fixed tar entry timestamps: the same data gives byte-identical shards and checksums


# ----------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    url: str  # as stored in the manifest: relative to the manifest's folder
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    url: str  # absolute fsspec URL of manifest.json
    split: str
    shards: list[ShardInfo]
    class_names: list[str]
    image_size: int
    num_samples: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def folder(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def shard_url(self, shard: ShardInfo) -> str:
        """Absolute URL of a shard: the manifest's folder + the shard's relative URL."""
        if "://" in shard.url or shard.url.startswith("/"):
            return shard.url
        return f"{self.folder}/{shard.url}"


def _normalize_url(url: str) -> str:
    """Local paths (and file://) become absolute paths; other fsspec URLs are kept, without a trailing slash."""
    url = os.fspath(url)
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/") if not url.endswith("://") else url


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "split": manifest.split,
        "image_size": manifest.image_size,
        "class_names": list(manifest.class_names),
        "num_samples": manifest.num_samples,
        "shards": [{"url": s.url, "num_samples": s.num_samples, "sha256": s.sha256} for s in manifest.shards],
    }


def _manifest_from_json(url: str, doc: Any) -> Manifest:
    expected = "a JSON object with split, image_size, class_names, num_samples and shards [{url, num_samples, sha256}]"
    try:
        shards = [ShardInfo(str(s["url"]), int(s["num_samples"]), str(s["sha256"])) for s in doc["shards"]]
        manifest = Manifest(
            url=url,
            split=str(doc["split"]),
            shards=shards,
            class_names=[str(c) for c in doc["class_names"]],
            image_size=int(doc["image_size"]),
            num_samples=int(doc["num_samples"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid manifest {url}: expected {expected} ({type(exc).__name__}: {exc})") from exc
    if not shards or manifest.num_samples != sum(s.num_samples for s in shards):
        raise ValueError(
            f"invalid manifest {url}: num_samples={manifest.num_samples} but the {len(shards)} shards hold "
            f"{sum(s.num_samples for s in shards)} samples (expected at least one shard and matching counts)"
        )
    if any(s.num_samples <= 0 for s in shards) or not manifest.class_names or manifest.image_size <= 0:
        raise ValueError(f"invalid manifest {url}: empty shard, no class names or non-positive image_size")
    return manifest


def load_manifest(url: str) -> Manifest:
    """Load ``manifest.json`` from its URL or its folder's URL (local path, file://, s3://, gs://, http(s)://)."""
    url = _normalize_url(url)
    manifest_url = url if url.endswith(".json") else _join(url, MANIFEST_NAME)
    try:
        with fsspec.open(manifest_url, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no data-set manifest at {manifest_url} (from {url!r}): expected a split folder containing "
            f"{MANIFEST_NAME} as written by workers.data.write_split, or the manifest's own URL"
        ) from exc
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid manifest {manifest_url}: not JSON ({exc})") from exc
    return _manifest_from_json(manifest_url, doc)


def _sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(manifest: Manifest) -> None:
    """Recompute every shard's sha256; raise ValueError naming each missing or corrupted shard."""
    problems = []
    for shard in manifest.shards:
        url = manifest.shard_url(shard)
        try:
            actual = _sha256_of(url)
        except FileNotFoundError:
            problems.append(f"{url}: missing")
            continue
        if actual != shard.sha256:
            problems.append(f"{url}: sha256 {actual} != {shard.sha256} in the manifest")
    if problems:
        raise ValueError(f"{len(problems)} bad shard(s) in {manifest.url}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Writing


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(png: bytes) -> np.ndarray:
    """Decode PNG/JPEG bytes to an HxWx3 uint8 array."""
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class _HashingWriter:
    """Write-through file wrapper that computes the sha256 of everything written (tar streams only call write)."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)


def _write_shard(url: str, samples: list[tuple[str, np.ndarray, int]], image_size: int) -> str:
    with fsspec.open(url, "wb") as f:
        out = _HashingWriter(f)
        with wds.TarWriter(out, encoder=False, mtime=_TAR_MTIME) as tar:
            for key, image, label in samples:
                if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
                    raise ValueError(
                        f"sample {key}: expected a uint8 array of shape ({image_size}, {image_size}, 3), "
                        f"got {image.dtype} {image.shape}"
                    )
                tar.write({"__key__": key, "png": encode_png(image), "cls": str(int(label)).encode("ascii")})
    return out.digest.hexdigest()


def write_split(
    samples: Iterable[tuple[np.ndarray, int]],
    out_dir: str,
    split: str,
    class_names: list[str],
    image_size: int,
    samples_per_shard: int,
) -> Manifest:
    """Write (uint8 HxWx3 image, label) pairs, in the given order, as ``<out_dir>/<split>/shard-*.tar`` + manifest.

    ``samples`` may be a lazy iterable; one shard's worth is held in memory at a time. The manifest is written
    last, so a split folder without one is an interrupted write.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    folder = _join(_normalize_url(out_dir), split)
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)

    shards: list[ShardInfo] = []
    pending: list[tuple[str, np.ndarray, int]] = []

    def flush() -> None:
        name = SHARD_PATTERN.format(len(shards))
        sha = _write_shard(_join(folder, name), pending, image_size)
        shards.append(ShardInfo(name, len(pending), sha))
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
        url=_join(folder, MANIFEST_NAME),
        split=split,
        shards=shards,
        class_names=list(class_names),
        image_size=image_size,
        num_samples=sum(s.num_samples for s in shards),
    )
    with fsspec.open(manifest.url, "w") as f:
        json.dump(_manifest_to_json(manifest), f, indent=1)
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
    root = _normalize_url(root)
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
            raise ValueError(f"class folder {_join(root, name)} contains no .jpg/.jpeg/.png images")
        files.extend((p if is_local else fs.unstrip_protocol(p), label) for p in images)
    return [name for name, _ in class_dirs], files


def _load_resized(url: str, image_size: int) -> np.ndarray:
    """Read an image file, resize its shorter side to image_size, centre-crop to image_size x image_size, RGB."""
    try:
        with fsspec.open(url, "rb") as f, Image.open(f) as img:
            img = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"cannot read image file {url}: {exc}") from exc
    w, h = img.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return np.asarray(img.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def shards_from_imagefolder(
    root: str,
    out_dir: str,
    image_size: int,
    samples_per_shard: int = 1000,
    seed: int = 0,
    split_fractions: dict[str, float] | None = None,
) -> dict[str, Manifest]:
    """An ImageFolder tree (``root/<class>/*.jpg|jpeg|png``, classes sorted) as shuffled, stratified shards."""
    class_names, files = _list_imagefolder(root)
    labels = np.array([label for _, label in files])
    splits = split_indices(labels, split_fractions or DEFAULT_SPLITS, seed)
    return {
        split: write_split(
            ((_load_resized(files[i][0], image_size), files[i][1]) for i in idx),
            out_dir, split, class_names, image_size, samples_per_shard,
        )
        for split, idx in splits.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _read_shard(url: str, limit: int | None = None) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) of the first ``limit`` (default: all) samples of one shard, streamed via fsspec."""
    if limit is not None and limit <= 0:
        return
    count = 0
    with fsspec.open(url, "rb") as stream:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            image = next((sample[ext] for ext in ("png", "jpg", "jpeg", "webp") if ext in sample), None)
            if image is None or "cls" not in sample:
                raise ValueError(f"shard {url}: sample {sample['__key__']} lacks an image or a cls entry")
            yield sample["__key__"], image, int(sample["cls"])
            count += 1
            if limit is not None and count >= limit:
                return
    if limit is not None and count < limit:
        raise ValueError(f"shard {url} holds {count} samples, fewer than the {limit} the manifest promised")


def iter_samples(urls: str | list[str]) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) from shard URLs or a brace pattern ("dir/shard-{000000..000003}.tar").

    A string is expanded webdataset-style (braces; "::" separates several patterns).
    """
    for url in expand_urls(urls) if isinstance(urls, str) else list(urls):
        yield from _read_shard(url)


@dataclass(frozen=True)
class ShardSlice:
    url: str  # absolute shard URL
    num_samples: int  # read this many samples from the start of the shard


def subset_size(manifest: Manifest, fraction: float) -> int:
    """Number of samples in the nested subset for ``fraction``: ``max(1, round(fraction * N))``."""
    if isinstance(fraction, bool) or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"data fraction must be in (0, 1], got {fraction!r}")
    return min(manifest.num_samples, max(1, round(float(fraction) * manifest.num_samples)))


def fraction_slices(manifest: Manifest, fraction: float) -> list[ShardSlice]:
    """The first ``subset_size(manifest, fraction)`` samples in shard order, as per-shard prefixes."""
    remaining = subset_size(manifest, fraction)
    slices = []
    for shard in manifest.shards:
        if remaining <= 0:
            break
        take = min(shard.num_samples, remaining)
        slices.append(ShardSlice(manifest.shard_url(shard), take))
        remaining -= take
    return slices


def _slot() -> tuple[int, int]:
    """(DataLoader worker id, number of workers) of the calling process; (0, 1) outside DataLoader workers."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: keep ``buffer_size`` items, emit a random one for each new item, then drain."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _random_crop_flip(image: np.ndarray, pad: int, flip: bool, rng: random.Random) -> np.ndarray:
    if pad > 0:
        h, w = image.shape[:2]
        mode = "reflect" if pad < min(h, w) else "edge"
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
        top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        image = padded[top : top + h, left : left + w]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class ShardDataset(IterableDataset):
    """Stream (image (3,H,W) float32 in [-1, 1], label int) from shard slices, partitioned over ranks and workers.

    ``return_keys=True`` appends each sample's ``__key__`` (for tests and debugging).

    See the module docstring for the partitioning rule. Each ``iter()`` in a process is one pass (epoch) and
    advances that process's epoch counter, so with persistent DataLoader workers each epoch gets a new order;
    ``set_epoch`` sets the counter explicitly (before workers start). With ``repeat=True`` one ``iter()`` is an
    endless sequence of epochs.
    """

    def __init__(
        self,
        slices: list[ShardSlice],
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        repeat: bool = False,
        shuffle_buffer: int = 256,
        crop_pad: int = 0,
        flip: bool = False,
        return_keys: bool = False,
    ):
        super().__init__()
        self.slices = list(slices)
        if not self.slices or any(s.num_samples <= 0 for s in self.slices):
            raise ValueError("ShardDataset needs at least one slice, each with num_samples > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if shuffle_buffer < 0 or crop_pad < 0:
            raise ValueError("shuffle_buffer and crop_pad must be >= 0")
        self.train, self.rank, self.world_size, self.seed = train, rank, world_size, seed
        self.repeat, self.shuffle_buffer, self.crop_pad, self.flip = repeat, shuffle_buffer, crop_pad, flip
        self.return_keys = return_keys
        self.num_samples = sum(s.num_samples for s in self.slices)
        self._check_slots(world_size)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _check_slots(self, num_slots: int) -> None:
        if self.num_samples < num_slots:
            raise ValueError(
                f"the subset has {self.num_samples} samples but {num_slots} data slots (world_size {self.world_size}"
                " x DataLoader workers) would read it, so some slot would get no samples: use a larger fraction,"
                " fewer workers or fewer ranks"
            )

    def slot_records(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple[str, bytes, int]]:
        """One epoch of raw (key, image bytes, label) for one slot, before shuffling and augmentation."""
        order = list(range(len(self.slices)))
        if self.train:
            random.Random(f"slices-{self.seed + epoch}").shuffle(order)
        if len(self.slices) >= num_slots:  # whole slices, round robin
            for i in order[slot::num_slots]:
                yield from _read_shard(self.slices[i].url, self.slices[i].num_samples)
        else:  # every slot reads everything, keeps every num_slots-th sample
            index = 0
            for i in order:
                for record in _read_shard(self.slices[i].url, self.slices[i].num_samples):
                    if index % num_slots == slot:
                        yield record
                    index += 1

    def _epoch_samples(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple]:
        records = self.slot_records(slot, num_slots, epoch)
        rng = random.Random(f"samples-{self.seed}-{epoch}-{slot}")
        if self.train and self.shuffle_buffer > 1:
            records = _shuffled(records, self.shuffle_buffer, rng)
        for key, image_bytes, label in records:
            image = decode_image(image_bytes)
            if self.train:
                image = _random_crop_flip(image, self.crop_pad, self.flip, rng)
            yield (to_tensor(image), label, key) if self.return_keys else (to_tensor(image), label)

    def __iter__(self) -> Iterator[tuple]:
        worker_id, num_workers = _slot()
        num_slots = self.world_size * num_workers
        self._check_slots(num_slots)
        slot = self.rank * num_workers + worker_id
        while True:
            epoch, self._epoch = self._epoch, self._epoch + 1
            yield from self._epoch_samples(slot, num_slots, epoch)
            if not self.repeat:
                return


def make_loader(dataset: ShardDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """DataLoader over a ShardDataset: drops the last partial batch of repeating (training) streams only."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=dataset.repeat,
        persistent_workers=num_workers > 0,
    )
