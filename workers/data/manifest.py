"""Data-set manifests: one ``manifest.json`` per split describing its WebDataset shards, and checking them.

Layout
------
One folder per split, written by :func:`write_split`::

    <out_dir>/<split>/shard-000000.tar     WebDataset samples {"__key__": "00000000", "png": ..., "cls": b"3"}
    <out_dir>/<split>/shard-000001.tar     (``samples_per_shard`` samples each; the last one may be shorter)
    <out_dir>/<split>/manifest.json        split, image_size, class_names, num_samples,
                                           shards: [{url: "shard-000000.tar", num_samples, sha256,
                                                     class_counts: [samples of class 0, 1, ...]}, ...]

Keys are the sample's position in the split (``f"{index:08d}"``), so shard ``k`` holds keys
``k*samples_per_shard ...``. Shard URLs in the manifest are relative to the manifest's folder, so a split
folder can be copied anywhere (local disk, ``s3://bucket/dir``, ``gs://...``, ``https://...``) unchanged.

Manifests of existing WebDataset corpora (``workers.data.wds_index``, ``mixer-study shards --from wds``) list their
shards by absolute URL instead and may have ``image_size: null`` (images of varying size: the study then sets
``data.image_size``). ``class_counts`` is optional (manifests written before it existed lack it).
All I/O goes through ``fsspec`` and tar files are read/written with ``webdataset``.

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

import json
import os
from dataclasses import dataclass
from typing import Any

import fsspec

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    url: str  # as stored in the manifest: relative to the manifest's folder, or absolute
    num_samples: int
    sha256: str
    # samples per class (index = label), so the class histogram of any prefix of the split is known without
    # reading it (workers.data.fractions.class_counts); None in manifests written before the field existed
    class_counts: list[int] | None = None


@dataclass(frozen=True)
class Manifest:
    url: str  # absolute fsspec URL of manifest.json
    split: str
    shards: list[ShardInfo]
    class_names: list[str]
    image_size: int | None  # None: images of varying size (then the study must set data.image_size)
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


def normalize_url(url: str) -> str:
    """Local paths (and file://) become absolute paths; other fsspec URLs are kept, without a trailing slash."""
    url = os.fspath(url)
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/") if not url.endswith("://") else url


def join_url(folder: str, *names: str) -> str:
    """``folder/name/...`` for a folder URL (local path, file://, s3://, ...) with or without a trailing slash."""
    return "/".join([folder.rstrip("/"), *names])


def _manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "split": manifest.split,
        "image_size": manifest.image_size,
        "class_names": list(manifest.class_names),
        "num_samples": manifest.num_samples,
        "shards": [
            {"url": s.url, "num_samples": s.num_samples, "sha256": s.sha256}
            | ({} if s.class_counts is None else {"class_counts": list(s.class_counts)})
            for s in manifest.shards
        ],
    }


def _shard_from_json(doc: Any) -> ShardInfo:
    counts = doc.get("class_counts")
    return ShardInfo(
        str(doc["url"]), int(doc["num_samples"]), str(doc["sha256"]),
        None if counts is None else [int(c) for c in counts],
    )


def _manifest_from_json(url: str, doc: Any) -> Manifest:
    expected = (
        "a JSON object with split, image_size (int or null), class_names, num_samples and"
        " shards [{url, num_samples, sha256, optional class_counts}]"
    )
    try:
        shards = [_shard_from_json(s) for s in doc["shards"]]
        manifest = Manifest(
            url=url,
            split=str(doc["split"]),
            shards=shards,
            class_names=[str(c) for c in doc["class_names"]],
            image_size=None if doc["image_size"] is None else int(doc["image_size"]),
            num_samples=int(doc["num_samples"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"invalid manifest {url}: expected {expected} ({type(exc).__name__}: {exc})") from exc
    if not shards or manifest.num_samples != sum(s.num_samples for s in shards):
        raise ValueError(
            f"invalid manifest {url}: num_samples={manifest.num_samples} but the {len(shards)} shards hold "
            f"{sum(s.num_samples for s in shards)} samples (expected at least one shard and matching counts)"
        )
    if any(s.num_samples <= 0 for s in shards) or not manifest.class_names or (manifest.image_size or 1) <= 0:
        raise ValueError(f"invalid manifest {url}: empty shard, no class names or non-positive image_size")
    for s in shards:
        if s.class_counts is not None and (
            len(s.class_counts) != manifest.num_classes
            or any(c < 0 for c in s.class_counts)
            or sum(s.class_counts) != s.num_samples
        ):
            raise ValueError(
                f"invalid manifest {url}: shard {s.url} has class_counts {s.class_counts}, expected "
                f"{manifest.num_classes} non-negative counts summing to its num_samples={s.num_samples}"
            )
    return manifest


def write_manifest(manifest: Manifest) -> None:
    """Write ``manifest.json`` at ``manifest.url`` (creating its folder). Writers call it last, so a split folder
    without a manifest is an interrupted write."""
    fs, path = fsspec.core.url_to_fs(manifest.folder)
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(manifest.url, "w") as f:
        json.dump(_manifest_to_json(manifest), f, indent=1)


def load_manifest(url: str) -> Manifest:
    """Load ``manifest.json`` from its URL or its folder's URL (local path, file://, s3://, gs://, http(s)://)."""
    url = normalize_url(url)
    manifest_url = url if url.endswith(".json") else join_url(url, MANIFEST_NAME)
    try:
        with fsspec.open(manifest_url, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no data-set manifest at {manifest_url} (from {url!r}): expected a split folder containing "
            f"{MANIFEST_NAME} as written by workers.data.writer.write_split, or the manifest's own URL"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - credentials, permissions, network: one clear error naming the URL
        raise OSError(f"cannot read the data-set manifest {manifest_url}: {type(exc).__name__}: {exc}"
                      f"{_access_hint(manifest_url)}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid manifest {manifest_url}: not JSON ({exc})") from exc
    return _manifest_from_json(manifest_url, doc)


def _access_hint(url: str) -> str:
    """What to check when ``url`` cannot be read, by its scheme."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    hints = {
        "s3": "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, for a non-AWS "
              "store, the endpoint (AWS_ENDPOINT_URL)",
        "gs": "check the credentials (GOOGLE_APPLICATION_CREDENTIALS)",
        "file": "check that the path exists and is readable",
    }
    return f"; {hints.get(scheme, 'check the URL and its credentials')}"

