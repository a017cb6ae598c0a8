"""Corrupt data as a trial meets it: a truncated shard, undecodable image bytes, a sample without label, a shard
whose checksum is not the manifest's. Policy ``data.on_error``: raise names the shard URL and the sample key in a
plain error that survives pickling (DataLoader workers, Ray); skip drops what cannot be read and counts it."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from workers.data.fractions import fraction_slices
from workers.data.manifest import load_manifest
from workers.data.reader import ShardDataset, make_loader
from workers.data.shard_format import ChecksumError, DataError
from workers.data.writer import shards_from_digits


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    shards_from_digits(str(out), image_size=8, samples_per_shard=25, seed=0)
    return out / "val"  # 8 shards of 25 (the last one shorter)


def _copy(clean: Path, tmp_path: Path) -> tuple[Path, Path]:
    split = tmp_path / "val"
    shutil.copytree(clean, split)
    return split, split / "shard-000001.tar"


def _rewrite(shard: Path, change) -> str:
    """Rewrite ``shard`` with ``change(name, data) -> data | None`` (None drops the member); returns the key of the
    first changed sample."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    changed = None
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            new = change(member.name, data) if changed is None else data
            if new is not data:
                changed = member.name.split(".")[0]
            if new is None:
                continue
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))
    return changed


def _read_all(split: Path, num_workers: int = 0, **kwargs) -> tuple[int, ShardDataset]:
    dataset = ShardDataset(fraction_slices(load_manifest(str(split)), 1.0), train=False, **kwargs)
    count = sum(len(labels) for _images, labels in make_loader(dataset, 16, num_workers))
    return count, dataset


def test_clean_split_reads_whole_with_checksums_verified(clean: Path) -> None:
    count, dataset = _read_all(clean, on_error="skip")
    assert count == load_manifest(str(clean)).num_samples and dataset.problem_counts() == (0, 0)


def test_truncated_shard(clean: Path, tmp_path: Path) -> None:
    split, shard = _copy(clean, tmp_path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"shard {shard} ends after sample \S+ with \d+ samples, fewer than the 25"):
        _read_all(split, verify_checksums=False)
    total = load_manifest(str(split)).num_samples
    count, dataset = _read_all(split, on_error="skip", verify_checksums=False)
    skipped, _ = dataset.problem_counts()
    assert 0 < skipped < 25 and count == total - skipped  # the rest of the shard, nothing else


BAD_SAMPLES = {
    # one sample's image bytes replaced, or its label entry dropped: (change of a tar member, the error after the key)
    "undecodable image": (lambda name, data: b"not an image" if name.endswith(".png") else data,
                          ": undecodable image"),
    "missing label": (lambda name, data: None if name.endswith(".cls") else data, " lacks an image .* or a label"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_bad_sample(clean: Path, tmp_path: Path, case: str) -> None:
    change, message = BAD_SAMPLES[case]
    split, shard = _copy(clean, tmp_path)
    key = _rewrite(shard, change)
    with pytest.raises(DataError, match=rf"shard {shard}: sample {key}{message}"):
        _read_all(split, verify_checksums=False)
    count, dataset = _read_all(split, on_error="skip", verify_checksums=False)
    assert dataset.problem_counts() == (1, 0) and count == load_manifest(str(split)).num_samples - 1


def test_checksum_mismatch(clean: Path, tmp_path: Path) -> None:
    split, shard = _copy(clean, tmp_path)
    expected = next(s.sha256 for s in load_manifest(str(split)).shards if s.url.endswith(shard.name))
    shard.write_bytes(shard.read_bytes() + b"\0" * 1024)  # readable as tar, but not the shard the manifest hashed
    with pytest.raises(ChecksumError, match=rf"shard {shard}: sha256 [0-9a-f]{{64}} differs from the manifest's "
                                            rf"{expected}"):
        _read_all(split)
    count, _ = _read_all(split, verify_checksums=False)  # the switch
    assert count == load_manifest(str(split)).num_samples
    count, dataset = _read_all(split, on_error="skip")
    assert dataset.problem_counts() == (0, 1) and count == load_manifest(str(split)).num_samples


def test_errors_cross_process_boundaries_intact(clean: Path, tmp_path: Path) -> None:
    split, shard = _copy(clean, tmp_path)
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError) as error:  # raised in a DataLoader worker, re-raised here
        _read_all(split, num_workers=2, verify_checksums=False)
    assert f"shard {shard}" in str(error.value) and "DataError" in str(error.value)
    again = pickle.loads(pickle.dumps(error.value))  # as Ray ships a worker's error to the driver
    assert str(again) == str(error.value)
    count, dataset = _read_all(split, num_workers=2, on_error="skip", verify_checksums=False)
    skipped, _ = dataset.problem_counts()  # counted in the workers, read here
    assert skipped > 0 and count == load_manifest(str(split)).num_samples - skipped


def test_fewer_shards_than_ranks_times_loader_workers(clean: Path) -> None:
    """One shard, 2 ranks x 2 loader workers: every sample is read exactly once (slots read ranges of shards)."""
    manifest = load_manifest(str(clean))
    slices = fraction_slices(manifest, 20 / manifest.num_samples)  # the first 20 samples: one shard
    assert len(slices) == 1
    keys = []
    for rank in range(2):
        dataset = ShardDataset(slices, train=False, rank=rank, world_size=2, return_keys=True)
        for _images, _labels, batch_keys in make_loader(dataset, 4, num_workers=2):
            keys += batch_keys
    assert len(keys) == 20 == len(set(keys))


# --- the memory cache (workers.data.reader): what it keeps, and that it changes nothing ---------------------------


def _epochs(dataset: ShardDataset, epochs: int) -> list[list[tuple[str, bytes]]]:
    """Keys and pixel bytes of ``epochs`` passes, one ``iter()`` each."""
    return [[(key, image.numpy().tobytes()) for image, _label, key in dataset] for _ in range(epochs)]


@pytest.mark.parametrize("train", [True, False])
def test_cache_changes_nothing_and_reads_no_storage_after_the_first_pass(clean: Path, tmp_path: Path,
                                                                          train: bool) -> None:
    from workers.config import AugmentConfig

    split, _ = _copy(clean, tmp_path)
    slices = fraction_slices(load_manifest(str(split)), 1.0)
    kwargs = dict(train=train, seed=3, shuffle_buffer=16, augment=AugmentConfig(crop="pad", pad=1, flip=True),
                  image_size=8, return_keys=True)
    plain, cached = ShardDataset(slices, **kwargs), ShardDataset(slices, cache_mb=1, **kwargs)
    first = _epochs(cached, 1)
    for tar in split.glob("*.tar"):  # storage gone: only the cache can serve the next passes
        tar.unlink()
    later = _epochs(cached, 2)
    shutil.rmtree(split)
    shutil.copytree(clean, split)
    assert first + later == _epochs(plain, 3)  # the same samples, order, augmentation draws and pixels
    assert len({key for key, _ in first[0]}) == sum(s.num_samples for s in slices)
    if train:
        assert later[0] != first[0]  # a new epoch: reshuffled, re-augmented (so the equality above means something)
    # Without room in the cache the second pass reads storage again.
    tiny = ShardDataset(slices, cache_mb=0.0001, **kwargs)
    _epochs(tiny, 1)
    for tar in split.glob("*.tar"):
        tar.unlink()
    with pytest.raises(DataError, match="unreadable"):
        _epochs(tiny, 1)


def test_cache_keeps_no_shard_that_reported_a_problem(clean: Path, tmp_path: Path) -> None:
    split, shard = _copy(clean, tmp_path)
    shard.write_bytes(shard.read_bytes() + b"\0" * 1024)  # its checksum no longer matches the manifest's
    dataset = ShardDataset(fraction_slices(load_manifest(str(split)), 1.0), train=False, on_error="skip",
                           cache_mb=1, return_keys=True)
    for expected in (1, 2):  # each pass reads the corrupt shard again and reports it again
        assert len(_epochs(dataset, 1)[0]) == load_manifest(str(split)).num_samples
        assert dataset.problem_counts() == (0, expected)
    assert str(shard) not in dataset._cached_records and len(dataset._cached_records) == 7
