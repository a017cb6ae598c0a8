"""The shard format: WebDataset tar files of (key, image bytes, label) samples, and their sha256 checksums.

The one place that writes and reads shard tars; the writer (``workers.data.writer``), the per-rank reader
(``workers.data.reader``), nested fractions (``workers.data.fractions``) and the corpus indexer/resharder
(``workers.data.wds_index``) all go through it.

A sample is a group of tar entries sharing a key: ``<key>.<image extension>`` (the image file's bytes, one of
:data:`IMAGE_EXTENSIONS`, first match wins) and a label, either ``<key>.cls`` (an integer as text) or ``<key>.json``
(a ``"label"``, else ``"cls"``, integer: ImageNet-style corpora). Shards written here hold ``.cls`` labels, and every
tar entry has the timestamp :data:`TAR_MTIME`, so the same samples give byte-identical shards and checksums. A
shard's sha256 (the manifest's ``sha256``) is computed as it streams, when written and when read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import fsspec
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

SHARD_PATTERN = "shard-{:06d}.tar"  # shard file names of a split folder, numbered from 0
TAR_MTIME = 0  # fixed tar entry timestamps: the same data gives byte-identical shards and checksums
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # sample entries read as the image, first match wins
LABEL_KEYS = ("cls", "json")

Record = tuple[str, bytes, int]  # (key, image bytes, label): one sample as read from a shard


class HashingStream:
    """Pass-through file wrapper computing the sha256 of every byte read or written through it (tarfile's stream
    mode only calls ``read``; ``webdataset.TarWriter`` only calls ``write``).

    Args:
        f: the open binary file (any fsspec file) to read from or write to.
    """

    def __init__(self, f: BinaryIO):
        self.f, self.digest = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def hexdigest_of_all(self) -> str:
        """The file's sha256: when reading, hash whatever was left unread (the rest of the shard, end-of-archive
        padding) first."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def write_shard(url: str, samples: Iterable[tuple[str, str, bytes, int]]) -> str:
    """Write one shard tar of samples and return its sha256.

    Args:
        url: where to write the tar (any fsspec URL).
        samples: (key, image extension such as "png" or "jpg", image file bytes, label) in order; may be lazy
            (an exception it raises stops the write).
    """
    with fsspec.open(url, "wb") as f:
        out = HashingStream(f)
        with wds.TarWriter(out, encoder=False, mtime=TAR_MTIME) as tar:
            for key, ext, image, label in samples:
                tar.write({"__key__": key, ext: image, "cls": str(int(label)).encode("ascii")})
    return out.digest.hexdigest()


def tar_samples(url: str, stream: BinaryIO | HashingStream) -> Iterator[dict]:
    """The samples of one open tar stream, each a dict of its entries by extension plus ``"__key__"``.

    Args:
        url: the tar's URL, for webdataset's error messages.
        stream: the open stream (read sequentially, once).
    """
    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def sample_label(sample: dict, label_key: str = "cls") -> int | None:
    """A WebDataset sample's label, or None if it has no such entry. Malformed entries raise ValueError.

    Args:
        sample: a sample from :func:`tar_samples`.
        label_key: ``"cls"``: the ``.cls`` entry (an integer as text); ``"json"``: the ``"label"`` (else ``"cls"``)
            integer of the ``.json`` entry (as ImageNet-style corpora store it).
    """
    if label_key not in LABEL_KEYS:
        raise ValueError(f"label_key must be one of {LABEL_KEYS}, got {label_key!r}")
    raw = sample.get(label_key)
    if raw is None:
        return None
    try:
        if label_key == "cls":
            return int(raw)
        doc = json.loads(raw)
        value = next((doc[f] for f in ("label", "cls") if isinstance(doc, dict) and f in doc), None)
        if value is None:
            return None
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"sample {sample.get('__key__')}: unreadable .{label_key} label ({exc})") from None


class DataError(RuntimeError):
    """A shard or sample that cannot be used. The message names the shard's URL and, where known, the sample's key;
    it is plain text, so it crosses process boundaries (DataLoader workers, Ray's error reports) intact."""


class ChecksumError(DataError):
    """A shard whose sha256 is not the manifest's."""


OnError = Callable[[DataError, int], None]  # (the problem, samples lost) -> None, or raise


def raise_error(error: DataError, lost: int) -> None:
    """The strict :data:`OnError` policy: every problem stops the read."""
    raise error


_VERIFIED: set[tuple[str, str]] = set()  # (url, sha256) this process has checked: each shard is hashed once


def read_shard(url: str, limit: int | None = None, sha256: str | None = None,
               on_error: OnError = raise_error) -> Iterator[Record]:
    """(key, image bytes, label) of the first ``limit`` samples of one shard, streamed via fsspec.

    The label is the ``.cls`` entry if the sample has one, else the ``.json`` entry's (see :func:`sample_label`).
    Every problem (a truncated or unreadable tar, a sample without image or label, fewer samples than promised, a
    checksum mismatch) goes to ``on_error`` as a :class:`DataError` with the samples it costs: the default raises;
    a skipping policy records it, and reading goes on with the next sample (or the next shard).

    Args:
        url: the shard's URL (any fsspec URL).
        limit: read this many samples from the start (None: all).
        sha256: the manifest's checksum; the first read of the shard in this process hashes it as it streams (and
            the rest of the file after ``limit``), and a mismatch is reported when the shard ends. None: no check.
        on_error: the problem policy (see above).
    """
    if limit is not None and limit <= 0:
        return
    count, key = 0, None
    check = sha256 if sha256 and (url, sha256) not in _VERIFIED else None
    try:
        with fsspec.open(url, "rb") as raw:
            stream = HashingStream(raw) if check else raw
            for sample in tar_samples(url, stream):
                key = sample["__key__"]
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                try:
                    label = sample_label(sample, "cls") if "cls" in sample else sample_label(sample, "json")
                except ValueError as exc:
                    label, image = None, None
                    reason = str(exc)
                else:
                    reason = (f"lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a label (.cls, or .json with a "
                              '"label" or "cls" integer)')
                count += 1
                if image is None or label is None:
                    on_error(DataError(f"shard {url}: sample {key} {reason}"), 1)
                else:
                    yield key, image, label
                if limit is not None and count >= limit:
                    break
            got = stream.hexdigest_of_all() if check else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated tar, a lost connection: name the shard and where
        where = f"after sample {key}" if key else "before its first sample"
        expected = f" of the {limit} the manifest promises" if limit else ""
        failure = DataError(f"shard {url}: unreadable {where} ({count} samples read{expected}): "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    else:
        failure = None
    if failure is not None:  # reported outside the except block: the user sees this error, not a chain
        on_error(failure, max((limit or count) - count, 0))
        return
    if limit is not None and count < limit:
        on_error(DataError(f"shard {url} ends after sample {key} with {count} samples, fewer than the {limit} the "
                           "manifest promises (a truncated or rewritten shard)"), limit - count)
    if check:
        if got != check:
            on_error(ChecksumError(f"shard {url}: sha256 {got} differs from the manifest's {check}: the shard is "
                                   "corrupt or was changed after the manifest was written (data.verify_checksums: "
                                   "false skips this check)"), 0)
        else:
            _VERIFIED.add((url, check))

