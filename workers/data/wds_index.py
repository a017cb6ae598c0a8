"""Bring your own shards: manifests for existing WebDataset corpora, a class-sortedness check, and resharding.

Indexing (``mixer-study shards --from wds``)
--------------------------------------------
:func:`index_webdataset` takes a corpus such as ImageNet in WebDataset form (``.jpg``/``.jpeg``/``.png``/``.webp``
images, a ``.cls`` entry or a ``.json`` entry with a ``"label"`` (else ``"cls"``) integer, a brace pattern such as
``s3://bucket/imagenet/train-{000000..001023}.tar``) and writes ``<out_dir>/<split>/manifest.json`` for it without
rewriting any image: each tar is streamed once through fsspec for its sample count, sha256, class counts and the
images' sizes (read from the image headers, nothing is decoded). Shard URLs in that manifest are absolute, so the
manifest can live anywhere. ``image_size`` is the images' shorter side if all share it, else ``null`` (the study
must then set ``data.image_size``). The reader (``workers.data.reader``) takes a sample's ``.cls`` entry if it has
one and its ``.json`` label otherwise, so with ``label_key="json"`` a sample that also has a ``.cls`` entry must
agree with it (else indexing fails and advises ``--reshard``, which writes ``.cls``).

Sortedness check
----------------
Data fractions and few-shot sets are PREFIXES of a split (``workers.data.fractions``): they are unbiased only if the
split's order is random. Many corpora are written class by class. :func:`check_not_sorted` compares the class
histogram of the first ``m`` samples with the whole split's:

* ``m = min(N // 2, max(ceil(3 % of N), 10 * K))`` (``N`` samples, ``K`` classes: at least ~10 per class if the
  split is big enough, so that a random prefix is not noisy),
* statistic: total-variation distance ``TV = 1/2 * sum_c |prefix_c / m - all_c / N|`` (0: same mix, 1: disjoint
  classes; a class-sorted ImageNet gives ~0.97, a shuffled one ~0.06),
* threshold: ``max(0.2, 1.5 * q)`` with ``q`` the 99.9th percentile of TV for a uniformly random ``m``-subset of
  this very label multiset (1000 multivariate-hypergeometric draws, seeded: deterministic). The floor keeps
  mildly imbalanced but shuffled corpora through; the null quantile scales it up where a prefix is inherently noisy
  (few samples per class, or 2-3 classes where TV is not concentrated). A shuffled corpus exceeds it with
  probability well below 1e-3; a sorted one with ``N >= ~40 K`` exceeds it by far.

A corpus over the threshold is refused (:class:`SortedCorpusError`, a ``ValueError``) with the numbers and advice.

Resharding (``--reshard``)
--------------------------
:func:`reshard` writes the corpus as uniformly shuffled shards (a normal split folder: relative ``shard-*.tar``
URLs, keys ``f"{index:08d}"``, image bytes copied unchanged under their own extension plus a ``.cls`` label). A
uniform shuffle of a corpus larger than memory, with every source tar read once and sequentially: a two-pass
random-bucket shuffle (Rao/Sandelius). Pass 1 streams the corpus once and appends each sample to one of ``B``
temporary bucket files chosen uniformly at random, ``B = ceil(corpus bytes / bucket_bytes)``; pass 2 loads one
bucket at a time, shuffles it in memory and writes it out. Independent uniform bucket choice followed by a uniform
shuffle inside each bucket yields a uniformly random permutation. Memory: one bucket (~``bucket_bytes``) plus the
pass-1 write buffers (also bounded by ``bucket_bytes``); disk: one temporary copy of the corpus under ``tmp_dir``.
(A shuffle buffer would be memory-bounded too but only mixes locally: a class-sorted corpus stays sorted at the
scale of its prefixes. Random access by (shard, key) would need one ranged read per sample.)
"""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from webdataset.shardlists import expand_urls

from workers.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, join_url, normalize_url, write_manifest
from workers.data.shard_format import (
    IMAGE_EXTENSIONS,
    LABEL_KEYS,
    SHARD_PATTERN,
    HashingStream,
    sample_label,
    tar_samples,
    write_shard,
)

SORTED_PREFIX_FRACTION = 0.03  # the compared prefix: ~3 % of the split ...
SORTED_MIN_PER_CLASS = 10  # ... but at least this many samples per class where the split allows
SORTED_TV_FLOOR = 0.2  # refuse above max(floor, factor * 99.9th percentile of TV for a random prefix)
SORTED_NULL_FACTOR = 1.5
_NULL_DRAWS = 1000
DEFAULT_BUCKET_BYTES = 256 << 20


class SortedCorpusError(ValueError):
    """The corpus's order is not random (a prefix's class mix differs from the whole's): prefixes would be biased."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the corpus


def expand_pattern(urls_pattern: str) -> list[str]:
    """Shard URLs of a webdataset brace pattern ("dir/train-{000000..001023}.tar"; "::" joins several patterns).

    Local paths become absolute, so a manifest that lists them works from any working directory.
    """
    try:
        urls = expand_urls(urls_pattern)
    except ValueError as exc:  # braceexpand's UnbalancedBracesError
        raise ValueError(f"bad shard pattern {urls_pattern!r}: {exc}") from None
    if not urls or any(c in url for url in urls for c in "{}"):
        raise ValueError(f"bad shard pattern {urls_pattern!r}: expected e.g. 'dir/train-{{000000..001023}}.tar'")
    return [normalize_url(url) for url in urls]


def _check_exist(urls: list[str], urls_pattern: str) -> None:
    """Fail before streaming anything if shards are missing (one listing call per URL; cheap next to reading)."""
    missing = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.isfile(path):
            missing.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} shards of {urls_pattern!r} do not exist: {shown}")


@dataclass
class _ShardScan:
    url: str
    sha256: str = ""
    labels: list[int] = field(default_factory=list)
    shorter_sides: set[int] = field(default_factory=set)  # at most 2 kept: all we need is "one value or several"


Sink = Callable[[str, str, bytes, int], None]  # (key, image extension, image bytes, label)


def _image_shorter_side(image: bytes, where: str) -> int:
    try:
        with Image.open(io.BytesIO(image)) as img:  # parses the header only; nothing is decoded
            return min(img.size)
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"{where}: unreadable image ({exc})") from None


def _scan_shard(url: str, label_key: str, sink: Sink | None = None) -> _ShardScan:
    """Stream one tar once: sha256, labels in order, image sizes; hand each sample to ``sink`` if given."""
    scan = _ShardScan(url)
    with fsspec.open(url, "rb") as f:
        reader = HashingStream(f)
        try:
            for sample in tar_samples(url, reader):
                where = f"{url}: sample {sample['__key__']}"
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                label = sample_label(sample, label_key)
                if ext is None or label is None:
                    entry = ".cls entry" if label_key == "cls" else '.json entry with a "label" or "cls" integer'
                    present = sorted(k for k in sample if not k.startswith("__"))
                    raise ValueError(
                        f"{where} lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a label (--label-key "
                        f"{label_key}: a {entry}; entries present: {present})"
                    )
                if label < 0:
                    raise ValueError(f"{where}: negative label {label}")
                if label_key == "json" and "cls" in sample and sample_label(sample, "cls") != label:
                    raise ValueError(
                        f"{where}: its .json label {label} differs from its .cls entry "
                        f"{sample_label(sample, 'cls')}, and training reads .cls: use --label-key cls, or --reshard"
                        " (which writes the .json labels as .cls)"
                    )
                scan.labels.append(label)
                if len(scan.shorter_sides) < 2:
                    scan.shorter_sides.add(_image_shorter_side(sample[ext], where))
                if sink is not None:
                    sink(sample["__key__"], ext, sample[ext], label)
        except tarfile.TarError as exc:
            raise ValueError(f"{url}: not a readable tar file ({exc.args[0] if exc.args else exc})") from None
        scan.sha256 = reader.hexdigest_of_all()
    if not scan.labels:
        raise ValueError(f"{url}: no samples (an empty or non-WebDataset tar file)")
    return scan


def _read_class_names(classes: str | None, labels_max: int) -> list[str]:
    """Class names from a file (one per line, line i = label i), else "0" .. "K-1" for the labels seen."""
    if classes is None:
        return [str(i) for i in range(labels_max + 1)]
    with fsspec.open(normalize_url(classes), "r") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise ValueError(f"--classes {classes}: expected one non-empty class name per line (line i = label i)")
    if labels_max >= len(names):
        raise ValueError(f"the corpus has label {labels_max} but --classes {classes} names only {len(names)} classes")
    return names


def _image_size(scans: Sequence[_ShardScan]) -> int | None:
    sides = set().union(*(s.shorter_sides for s in scans))
    return sides.pop() if len(sides) == 1 else None


def _check_label_key(label_key: str) -> None:
    if label_key not in LABEL_KEYS:
        raise ValueError(f"label_key must be one of {', '.join(LABEL_KEYS)}, got {label_key!r}")


# ---------------------------------------------------------------------------------------------------------------
# Sortedness


@dataclass(frozen=True)
class Sortedness:
    prefix: int  # m: samples compared
    total: int  # N
    tv: float  # total-variation distance between the prefix's and the whole split's class histograms
    threshold: float  # refuse above this
    null_median: float  # TV of a random prefix of the same size: median ...
    null_q999: float  # ... and 99.9th percentile
    prefix_classes: int  # classes present in the prefix
    classes: int  # classes present in the split

    @property
    def looks_sorted(self) -> bool:
        return self.tv > self.threshold


def sortedness(labels: Sequence[int] | np.ndarray, seed: int = 0) -> Sortedness:
    """The sortedness statistic of a split's labels in order (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    counts = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    k = int((counts > 0).sum())
    m = min(n // 2, max(math.ceil(SORTED_PREFIX_FRACTION * n), SORTED_MIN_PER_CLASS * k))
    if m == 0 or k < 2:
        return Sortedness(m, n, 0.0, 1.0, 0.0, 0.0, k, k)
    whole = counts / n
    tv = 0.5 * float(np.abs(np.bincount(labels[:m], minlength=len(counts)) / m - whole).sum())
    draws = np.random.default_rng(seed).multivariate_hypergeometric(counts, m, size=_NULL_DRAWS)
    null = 0.5 * np.abs(draws / m - whole).sum(axis=1)
    q50, q999 = (float(q) for q in np.quantile(null, [0.5, 0.999]))
    threshold = max(SORTED_TV_FLOOR, SORTED_NULL_FACTOR * q999)
    return Sortedness(m, n, tv, threshold, q50, q999, int((np.bincount(labels[:m]) > 0).sum()), k)


def check_not_sorted(labels: Sequence[int] | np.ndarray, what: str) -> Sortedness:
    """Raise :class:`SortedCorpusError` if ``labels`` (a split's, in order) look class-sorted; else the statistic."""
    s = sortedness(labels)
    if s.looks_sorted:
        raise SortedCorpusError(
            f"{what} looks class-sorted: the class histogram of its first {s.prefix} of {s.total} samples differs "
            f"from the whole's by total-variation distance {s.tv:.3f} > threshold {s.threshold:.3f} (a random "
            f"prefix of that size: median {s.null_median:.3f}, 99.9 % below {s.null_q999:.3f}), and that prefix "
            f"holds {s.prefix_classes} of {s.classes} classes. Data fractions and few-shot sets are prefixes, so "
            "they would be biased: re-run with --reshard to write shuffled shards (or shuffle the corpus yourself)"
        )
    return s


# ---------------------------------------------------------------------------------------------------------------
# Indexing


def index_webdataset(
    urls_pattern: str,
    out_dir: str,
    split: str = "train",
    label_key: str = "cls",
    classes: str | None = None,
    check_sorted: bool = True,
) -> Manifest:
    """Write ``<out_dir>/<split>/manifest.json`` for an existing WebDataset corpus; images are not rewritten.

    ``label_key``: "cls" (the ``.cls`` entry) or "json" (the ``.json`` entry's "label", else "cls", integer).
    ``classes``: optional file (any fsspec URL) with one class name per line, line i naming label i; default
    "0" .. "K-1" with K = largest label + 1. Raises :class:`SortedCorpusError` (with ``check_sorted``) if the
    corpus looks class-sorted; nothing is written then.
    """
    _check_label_key(label_key)
    urls = expand_pattern(urls_pattern)
    _check_exist(urls, urls_pattern)
    scans = [_scan_shard(url, label_key) for url in urls]
    labels = np.fromiter((label for scan in scans for label in scan.labels), dtype=np.int64)
    names = _read_class_names(classes, int(labels.max()))
    folder = join_url(normalize_url(out_dir), split)
    if check_sorted:
        check_not_sorted(labels, f"the corpus {urls_pattern!r}")
    shards = [
        ShardInfo(scan.url, len(scan.labels), scan.sha256, np.bincount(scan.labels, minlength=len(names)).tolist())
        for scan in scans
    ]
    manifest = Manifest(
        url=join_url(folder, MANIFEST_NAME),
        split=split,
        shards=shards,
        class_names=names,
        image_size=_image_size(scans),
        num_samples=len(labels),
    )
    write_manifest(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Resharding


class _Buckets:
    """Pass 1 of the random-bucket shuffle: append samples to temporary bucket files, buffered within a budget."""

    def __init__(self, folder: str, count: int, budget_bytes: int, rng: random.Random):
        self.paths = [os.path.join(folder, f"bucket-{i:06d}.pkl") for i in range(count)]
        self.buffers: list[list[tuple[str, bytes, int]]] = [[] for _ in range(count)]
        self.buffered, self.budget, self.rng = 0, budget_bytes, rng

    def add(self, _key: str, ext: str, image: bytes, label: int) -> None:
        self.buffers[self.rng.randrange(len(self.paths))].append((ext, image, label))
        self.buffered += len(image)
        if self.buffered > self.budget:
            self.flush()

    def flush(self) -> None:
        for path, buffer in zip(self.paths, self.buffers, strict=True):
            if buffer:
                with open(path, "ab") as f:  # our own temporary files: pickle is safe here
                    pickle.dump(buffer, f, protocol=pickle.HIGHEST_PROTOCOL)
                buffer.clear()
        self.buffered = 0

    def shuffled(self) -> Any:
        """Pass 2: each bucket in turn, loaded whole and shuffled in memory."""
        for path in self.paths:
            if not os.path.exists(path):
                continue
            records: list[tuple[str, bytes, int]] = []
            with open(path, "rb") as f:
                while True:
                    try:
                        records.extend(pickle.load(f))
                    except EOFError:
                        break
            os.remove(path)
            self.rng.shuffle(records)
            yield from records


def reshard(
    urls_pattern: str,
    out_dir: str,
    split: str = "train",
    label_key: str = "cls",
    classes: str | None = None,
    samples_per_shard: int = 1000,
    seed: int = 0,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    tmp_dir: str | None = None,
) -> Manifest:
    """Write a WebDataset corpus as uniformly shuffled shards ``<out_dir>/<split>/shard-*.tar`` + manifest.

    Images are copied byte for byte (their own extension), labels written as ``.cls``; other entries (e.g. the
    ``.json`` metadata) are dropped. Memory-bounded two-pass random-bucket shuffle (module docstring); the
    temporary buckets (one copy of the corpus) go to a fresh folder under ``tmp_dir`` (default: the system's).
    """
    _check_label_key(label_key)
    if samples_per_shard <= 0 or bucket_bytes <= 0:
        raise ValueError(f"samples_per_shard and bucket_bytes must be > 0, got {samples_per_shard}, {bucket_bytes}")
    urls = expand_pattern(urls_pattern)
    _check_exist(urls, urls_pattern)
    total_bytes = 0
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        total_bytes += int(fs.size(path) or 0)
    rng = random.Random(f"reshard-{seed}")
    temp = tempfile.mkdtemp(prefix="mixer-reshard-", dir=tmp_dir)
    try:
        buckets = _Buckets(temp, max(1, math.ceil(total_bytes / bucket_bytes)), bucket_bytes, rng)
        scans = [_scan_shard(url, label_key, sink=buckets.add) for url in urls]
        buckets.flush()
        class_names = _read_class_names(classes, max(max(scan.labels) for scan in scans))
        folder = join_url(normalize_url(out_dir), split)
        fs, path = fsspec.core.url_to_fs(folder)
        fs.makedirs(path, exist_ok=True)
        shards: list[ShardInfo] = []
        pending: list[tuple[str, str, bytes, int]] = []

        def flush() -> None:
            name = SHARD_PATTERN.format(len(shards))
            sha = write_shard(join_url(folder, name), pending)  # images copied unchanged
            counts = np.bincount([label for *_, label in pending], minlength=len(class_names)).tolist()
            shards.append(ShardInfo(name, len(pending), sha, counts))
            pending.clear()

        for index, (ext, image, label) in enumerate(buckets.shuffled()):
            pending.append((f"{index:08d}", ext, image, label))
            if len(pending) == samples_per_shard:
                flush()
        if pending:
            flush()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    manifest = Manifest(
        url=join_url(folder, MANIFEST_NAME),
        split=split,
        shards=shards,
        class_names=class_names,
        image_size=_image_size(scans),
        num_samples=sum(s.num_samples for s in shards),
    )
    write_manifest(manifest)  # last: a split folder without a manifest is an interrupted write
    return manifest
