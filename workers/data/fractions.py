"""Nested data fractions of a split: the first ``round(f * N)`` samples in shard order, as per-shard prefixes.

Data fractions
--------------
The subset for fraction ``f`` of a split with ``N`` samples is its first ``n = max(1, round(f * N))`` samples in
shard order (:func:`subset_size`, :func:`fraction_slices`). Granularity is one sample; subsets are nested
(``f1 < f2`` implies ``subset(f1) ⊂ subset(f2)``), and reading one touches only the first
``ceil(n / samples_per_shard)`` shards (the last one only up to its ``n``-th sample), so cost grows with ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.data.manifest import Manifest
from workers.data.shard_format import read_shard


@dataclass(frozen=True)
class ShardSlice:
    url: str  # absolute shard URL
    num_samples: int  # read this many samples from the start of the shard
    sha256: str | None = None  # the manifest's checksum of the whole shard (verified as it is read)


def subset_size(manifest: Manifest, fraction: float) -> int:
    """Number of samples in the nested subset for ``fraction``: ``max(1, round(fraction * N))``."""
    if isinstance(fraction, bool) or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"data fraction must be in (0, 1], got {fraction!r}")
    return min(manifest.num_samples, max(1, round(float(fraction) * manifest.num_samples)))


def fraction_slices(manifest: Manifest, fraction: float) -> list[ShardSlice]:
    """The first ``subset_size(manifest, fraction)`` samples in shard order, as per-shard prefixes."""
    return prefix_slices(manifest, subset_size(manifest, fraction))


def prefix_slices(manifest: Manifest, num_samples: int | None) -> list[ShardSlice]:
    """The first ``num_samples`` samples (all for None) in shard order, as per-shard prefixes (big_vision's
    ``split[:N]``)."""
    remaining = manifest.num_samples if num_samples is None else min(num_samples, manifest.num_samples)
    slices = []
    for shard in manifest.shards:
        if remaining <= 0:
            break
        take = min(shard.num_samples, remaining)
        slices.append(ShardSlice(manifest.shard_url(shard), take, shard.sha256 or None))
        remaining -= take
    return slices


def class_counts(manifest: Manifest, num_samples: int) -> list[int] | None:
    """Samples per class (index = label) among the split's first ``num_samples`` samples, exactly.

    Whole shards come from the manifest's per-shard ``class_counts``; of a partly covered last shard only the
    labels of its first samples are read (one streamed shard). None if the manifest has no class counts (written
    before they existed): then the histogram is not known without reading the whole prefix.
    """
    if not 0 <= num_samples <= manifest.num_samples:
        raise ValueError(f"num_samples must be in [0, {manifest.num_samples}], got {num_samples}")
    if any(shard.class_counts is None for shard in manifest.shards):
        return None
    totals = [0] * manifest.num_classes
    remaining = num_samples
    for shard in manifest.shards:
        if remaining <= 0:
            break
        if remaining >= shard.num_samples:
            totals = [t + c for t, c in zip(totals, shard.class_counts, strict=True)]
        else:
            for _key, _image, label in read_shard(manifest.shard_url(shard), remaining):
                if not 0 <= label < len(totals):
                    raise ValueError(f"{manifest.shard_url(shard)}: label {label} outside [0, {len(totals)})")
                totals[label] += 1
        remaining -= shard.num_samples
    return totals
