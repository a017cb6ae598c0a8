"""workers.data.manifest / writer / shard_format / fractions / reader: shard writing/reading round trips, nested
fractions, rank partitioning, s3:// via a moto server."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from workers.config import AugmentConfig
from workers.data import writer as shard_writer
from workers.data.fractions import fraction_slices, subset_size
from workers.data.manifest import Manifest, load_manifest
from workers.data.reader import ShardDataset, decode_image, epoch_share, iter_samples, make_loader
from workers.data.shard_format import ChecksumError, DataError, read_shard
from workers.data.writer import shards_from_digits, shards_from_imagefolder

REPO = Path(__file__).resolve().parents[1]


def _keys(n: int) -> set[str]:
    return {f"{i:08d}" for i in range(n)}


def _pixels_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _assert_checksums(manifest: Manifest) -> None:
    """Every shard's sha256, computed here independently of the writer, is the manifest's."""
    for shard in manifest.shards:
        with fsspec.open(manifest.shard_url(shard), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard.sha256, shard.url


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return shards_from_digits(str(tmp_path_factory.mktemp("digits")), image_size=16, samples_per_shard=25, seed=0)


def _rank_keys(slices, world_size, num_workers=0, **kwargs) -> list[list[str]]:
    """One non-repeating pass per rank (through a real DataLoader); the keys each rank saw."""
    per_rank = []
    for rank in range(world_size):
        ds = ShardDataset(slices, rank=rank, world_size=world_size, return_keys=True, **kwargs)
        keys = []
        for _images, _labels, batch_keys in make_loader(ds, batch_size=16, num_workers=num_workers):
            keys.extend(batch_keys)
        per_rank.append(keys)
    return per_rank


def _assert_partition(per_rank: list[list[str]], n: int) -> None:
    assert sum(len(k) for k in per_rank) == n, [len(k) for k in per_rank]
    assert set().union(*map(set, per_rank)) == _keys(n)
    assert all(per_rank), "every rank gets data"


# ---------------------------------------------------------------------------------------------------------------


def test_digits_round_trip(digits):
    from sklearn.datasets import load_digits

    assert set(digits) == {"train", "val", "test"}
    assert sum(m.num_samples for m in digits.values()) == 1797
    raw = load_digits()
    expected = Counter((_pixels_hash(shard_writer._digits_image(img, 16)), int(y))
                       for img, y in zip(raw.images, raw.target))

    seen = Counter()
    for split, manifest in digits.items():
        loaded = load_manifest(os.path.dirname(manifest.url))  # the folder works as well as the file
        assert loaded == manifest and loaded.num_classes == 10 and loaded.image_size == 16
        assert all(s.num_samples == 25 for s in manifest.shards[:-1])
        _assert_checksums(loaded)
        samples = list(iter_samples([manifest.shard_url(s) for s in manifest.shards]))
        assert [k for k, _, _ in samples] == sorted(_keys(manifest.num_samples))
        labels = [y for _, _, y in samples]
        assert set(labels) == set(range(10)), f"{split} is stratified: every class present"
        for _, png, y in samples:
            image = decode_image(png)
            assert image.shape == (16, 16, 3) and image.dtype == np.uint8
            seen[(_pixels_hash(image), y)] += 1
    assert seen == expected

    # brace patterns expand like webdataset's
    val = digits["val"]
    pattern = os.path.dirname(val.url) + f"/shard-{{000000..{len(val.shards) - 1:06d}}}.tar"
    assert sum(1 for _ in iter_samples(pattern)) == val.num_samples


def test_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    a = shard_writer.split_indices(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    assert a == shard_writer.split_indices(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    assert sorted(sum(a.values(), [])) == list(range(100))
    assert [len(a[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    for cls, size in Counter(labels).items():  # stratified: per class within 2 of the target fraction
        assert abs(Counter(labels[a["train"]])[cls] - 0.7 * size) <= 2
        assert abs(Counter(labels[a["val"]])[cls] - 0.1 * size) <= 2
    tiny = shard_writer.split_indices(np.repeat(np.arange(4), 4), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    assert all(tiny.values()), "tiny classes still fill every split"
    assert a["train"] != sorted(a["train"]), "order inside a split is shuffled"
    with pytest.raises(ValueError, match="sum to 1"):
        shard_writer.split_indices(labels, {"train": 0.5}, seed=0)


def test_reader_names_each_corrupted_or_missing_shard(digits, tmp_path):
    folder = tmp_path / "val"
    shutil.copytree(os.path.dirname(digits["val"].url), folder)
    manifest = load_manifest(str(folder))
    shard = folder / "shard-000003.tar"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF  # inside a PNG's bytes: the tar still reads, only the checksum tells
    shard.write_bytes(bytes(raw))
    (folder / "shard-000005.tar").unlink()
    problems: list[DataError] = []
    for info in manifest.shards:
        list(read_shard(manifest.shard_url(info), info.num_samples, info.sha256,
                        on_error=lambda error, _lost: problems.append(error)))
    assert [type(p) for p in problems] == [ChecksumError, DataError], problems
    assert "shard-000003.tar: sha256" in str(problems[0]) and "shard-000005.tar: unreadable" in str(problems[1])


def _make_imagefolder(root: Path) -> dict[str, str]:
    """3 classes (solid red/green/blue images of different sizes, PNG and JPEG); returns file name -> class."""
    colours = {"cat": (220, 20, 20), "dog": (20, 220, 20), "emu": (20, 20, 220)}
    truth = {}
    for c, (name, colour) in enumerate(colours.items()):
        (root / name).mkdir(parents=True)
        for i in range(4):
            size = (12 + 3 * i, 10 + 2 * c)
            ext = "png" if i % 2 else "jpg"
            Image.new("RGB", size, colour).save(root / name / f"{name}{i}.{ext}")
            truth[f"{name}{i}.{ext}"] = name
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    return truth


def test_imagefolder_round_trip(tmp_path):
    _make_imagefolder(tmp_path / "images")
    manifests = shards_from_imagefolder(
        str(tmp_path / "images"), str(tmp_path / "shards"), image_size=8, samples_per_shard=2,
        split_fractions={"train": 0.5, "test": 0.5},
    )
    assert {s: m.num_samples for s, m in manifests.items()} == {"train": 6, "test": 6}
    for manifest in manifests.values():
        assert manifest.class_names == ["cat", "dog", "emu"]
        assert [s.num_samples for s in manifest.shards] == [2, 2, 2]
        _assert_checksums(manifest)
        labels = []
        for _key, png, label in iter_samples([manifest.shard_url(s) for s in manifest.shards]):
            image = decode_image(png)
            assert min(image.shape[:2]) == 8 and image.shape[2] == 3  # shorter side 8, aspect kept
            assert int(image.reshape(-1, 3).mean(0).argmax()) == label  # red -> cat, green -> dog, blue -> emu
            labels.append(label)
        assert Counter(labels) == {0: 2, 1: 2, 2: 2}


def test_imagefolder_keeps_aspect_as_jpeg_and_reader_augments(tmp_path):
    """Non-square photos are stored with shorter side = image_size, uncropped, as JPEG; the reader's inception
    crop + flip + RandAugment view then yields image_size x image_size tensors in [-1, 1]."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            # 300 wide x 200 high, a horizontal ramp so that a crop would show in the stored pixels
            ramp = np.linspace(0, 255, 300)[None, :, None] * np.ones((200, 1, 3))
            noise = rng.integers(0, 20, (200, 300, 3))
            pixels = np.clip(ramp * (0.5 + 0.5 * c) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{name}{i}.jpg", quality=95)
    manifests = shards_from_imagefolder(
        str(tmp_path / "images"), str(tmp_path / "shards"), image_size=64, samples_per_shard=3,
        split_fractions={"train": 0.5, "test": 0.5}, image_format="jpeg", jpeg_quality=90,
    )
    train = manifests["train"]
    assert train.image_size == 64 and train.num_samples == 4
    samples = list(iter_samples([train.shard_url(s) for s in train.shards]))
    for _key, data, _label in samples:
        assert data[:3] == b"\xff\xd8\xff", "stored as JPEG"
        image = decode_image(data)
        assert image.shape == (64, 96, 3), "shorter side 64, aspect 3:2 kept, nothing cropped"
        left, right = image[:, :8].mean(), image[:, -8:].mean()
        assert right - left > 60, "the whole ramp is there, not a central crop of it"
    with fsspec.open(train.shard_url(train.shards[0]), "rb") as f:
        names = tarfile.open(fileobj=f).getnames()
    assert any(n.endswith(".jpg") for n in names) and not any(n.endswith(".png") for n in names)

    augment = AugmentConfig(crop="inception", flip=True, randaug=(2, 15))
    slices = fraction_slices(train, 1.0)
    ds = ShardDataset(slices, train=True, seed=1, augment=augment, image_size=32, return_keys=True)
    views = list(ds)
    assert len(views) == 4
    for image, _label, _key in views:
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    again = [image for image, _, _ in ShardDataset(slices, train=True, seed=1, augment=augment, image_size=32,
                                                  return_keys=True)]
    assert all(torch.equal(a, b) for a, b in zip(again, [v[0] for v in views], strict=True)), "deterministic per seed"
    images, labels = next(iter(make_loader(ShardDataset(slices, train=False, augment=augment, image_size=32), 4)))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)


def test_decode_drafts_large_jpegs_but_never_below_the_needed_side():
    y, x = np.mgrid[0:600, 0:1000]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert decode_image(data).shape == (600, 1000, 3)
    assert decode_image(data, shorter_side=150).shape == (150, 250, 3)  # 1/4 scale in the IDCT
    assert decode_image(data, shorter_side=151).shape == (300, 500, 3)  # 1/4 would give 150 < 151: 1/2
    assert decode_image(data, shorter_side=400).shape == (600, 1000, 3)  # less than 2x: full decode
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    assert decode_image(png.getvalue(), shorter_side=150).shape == (600, 1000, 3)  # PNG: always full size


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-root"):
        shards_from_imagefolder(str(tmp_path / "missing-root"), str(tmp_path / "out"), image_size=8)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        shards_from_imagefolder(str(tmp_path / "flat"), str(tmp_path / "out"), image_size=8)

    _make_imagefolder(tmp_path / "images")
    (tmp_path / "images" / "fox").mkdir()
    with pytest.raises(ValueError, match=r"images/fox contains no"):
        shards_from_imagefolder(str(tmp_path / "images"), str(tmp_path / "out"), image_size=8)
    (tmp_path / "images" / "fox" / "broken.png").write_bytes(b"definitely not a png")
    for i in range(3):
        Image.new("RGB", (9, 9), (128, 128, 128)).save(tmp_path / "images" / "fox" / f"ok{i}.png")
    with pytest.raises(ValueError, match=r"cannot read image file .*fox/broken\.png"):
        shards_from_imagefolder(str(tmp_path / "images"), str(tmp_path / "out"), image_size=8, samples_per_shard=2)


def test_nested_fractions_touch_few_shards(digits, monkeypatch):
    train = digits["train"]
    opened: list[str] = []
    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda url, *a, **k: opened.append(url) or real_open(url, *a, **k))

    subsets, touched = {}, {}
    for f in (0.03, 0.1, 0.3, 1.0):
        n = subset_size(train, f)
        assert n == round(f * train.num_samples)
        slices = fraction_slices(train, f)
        assert sum(s.num_samples for s in slices) == n
        opened.clear()
        ds = ShardDataset(slices, train=False, return_keys=True)
        subsets[f] = [key for _, _, key in ds]
        touched[f] = len(set(opened))
        assert sorted(subsets[f]) == sorted(_keys(n)) and len(subsets[f]) == n
        assert touched[f] == -(-n // 25)  # ceil(n / samples_per_shard) shards, no more
    assert set(subsets[0.03]) < set(subsets[0.1]) < set(subsets[0.3]) < set(subsets[1.0])
    assert touched[0.03] == 2 and touched[1.0] == len(train.shards) == 51
    assert touched[0.03] < touched[0.1] < touched[0.3] < touched[1.0]
    assert subset_size(train, 1e-6) == 1


@pytest.mark.parametrize(
    "split, fraction, world_size, num_workers, train",
    [
        ("val", 1.0, 2, 0, False),  # 8 slices >= 2 slots: whole shards per rank
        ("train", 0.3, 2, 2, True),  # 16 slices, 2 ranks x 2 DataLoader workers, shuffled
        ("train", 0.03, 2, 2, True),  # 2 slices < 4 slots: sample-level partitioning
        ("val", 1.0, 3, 3, False),  # 8 slices < 9 slots
    ],
)
def test_ranks_see_disjoint_data(digits, split, fraction, world_size, num_workers, train):
    manifest = digits[split]
    slices = fraction_slices(manifest, fraction)
    per_rank = _rank_keys(slices, world_size, num_workers, train=train, seed=3, shuffle_buffer=32)
    _assert_partition(per_rank, subset_size(manifest, fraction))
    if not train:  # deterministic order
        assert per_rank == _rank_keys(slices, world_size, num_workers, train=train)


def test_train_epochs_reshuffle_but_still_partition(digits):
    slices = fraction_slices(digits["train"], 0.2)
    n = subset_size(digits["train"], 0.2)
    datasets = [ShardDataset(slices, train=True, rank=r, world_size=2, seed=5, return_keys=True) for r in range(2)]
    epochs = [[[key for _, _, key in ds] for ds in datasets] for _ in range(2)]  # each iter() is the next epoch
    for per_rank in epochs:
        _assert_partition(per_rank, n)
    assert epochs[0] != epochs[1]


def test_repeat_gives_equal_steps_on_uneven_partition(digits):
    slices = fraction_slices(digits["train"], 0.1)  # 126 samples: 25, 25, 25, 25, 25, 1 -> uneven over 4 ranks
    assert [s.num_samples for s in slices] == [25, 25, 25, 25, 25, 1]
    for rank in range(4):
        ds = ShardDataset(slices, train=True, rank=rank, world_size=4, repeat=True,
                          augment=AugmentConfig(crop="pad", pad=2, flip=True))
        batches = iter(make_loader(ds, batch_size=8))
        for _ in range(50):
            images, labels = next(batches)
            assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)
        assert images.dtype == np.float32 or str(images.dtype) == "torch.float32"
        assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert str(labels.dtype) == "torch.int64"


def test_too_many_slots_is_an_error(digits):
    tiny = fraction_slices(digits["val"], 0.01)  # 2 samples
    with pytest.raises(ValueError, match="no samples"):
        ShardDataset(tiny, train=False, world_size=3)
    ds = ShardDataset(tiny, train=False, world_size=1)
    with pytest.raises(ValueError, match="no samples"):
        next(iter(make_loader(ds, batch_size=1, num_workers=3)))


# ---------------------------------------------------------------------------------------------------------------
# Every pass exact under DDP: uneven shards [25, 25, 4], 2 ranks x 2 DataLoader workers, several passes


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """54 samples in shards of 25, 25 and 4: whole-shard dealing would give slots very different epoch lengths."""
    samples = [(np.full((4, 4, 3), i, np.uint8), i % 3) for i in range(54)]
    folder = str(tmp_path_factory.mktemp("uneven"))
    manifest = shard_writer.write_split(samples, folder, "train", ["a", "b", "c"], 4, 25)
    assert [s.num_samples for s in manifest.shards] == [25, 25, 4]
    return manifest


def test_epoch_share_tiles_every_epoch_and_never_drifts():
    for n, slots in [(54, 4), (54, 2), (7, 7), (10, 3), (1000, 64)]:
        for epoch in range(2 * slots):
            shares = [epoch_share(n, s, slots, epoch) for s in range(slots)]
            assert [start for start, _ in shares] == list(itertools.accumulate([c for _, c in shares][:-1], initial=0))
            assert sum(c for _, c in shares) == n and max(c for _, c in shares) - min(c for _, c in shares) <= 1
            done = [sum(epoch_share(n, s, slots, e)[1] for e in range(epoch + 1)) for s in range(slots)]
            assert max(done) - min(done) <= 1, "cumulative counts stay within one sample of each other"


def _slot_streams(slices, world_size: int, workers: int, batch_size: int, enough) -> dict[int, list[str]]:
    """Keys per slot (rank * workers + worker) from real DataLoader processes over a repeating stream.

    A rank's loader takes batches from its workers strictly in turn, so batch j came from worker j % workers.
    ``enough(slot, keys)`` says when a slot has produced enough; reading stops once every slot of the rank has.
    """
    streams: dict[int, list[str]] = {}
    for rank in range(world_size):
        ds = ShardDataset(slices, train=True, rank=rank, world_size=world_size, seed=7, repeat=True, shuffle_buffer=16,
                          return_keys=True)
        mine = [[] for _ in range(workers)]
        for j, (_images, _labels, keys) in enumerate(make_loader(ds, batch_size, num_workers=workers)):
            mine[j % workers].extend(keys)
            if all(enough(rank * workers + w, mine[w]) for w in range(workers)):
                break
        streams.update({rank * workers + w: keys for w, keys in enumerate(mine)})
    return streams


def test_every_epoch_is_exact_across_slots(uneven):
    """For each epoch e the 4 slots' epoch-e streams are disjoint and cover the subset exactly once."""
    slices, n, slots, epochs = fraction_slices(uneven, 1.0), uneven.num_samples, 4, 6
    sizes = {s: [epoch_share(n, s, slots, e)[1] for e in range(epochs)] for s in range(slots)}
    assert {c for counts in sizes.values() for c in counts} == {13, 14}, "uneven: slots' epochs differ in length"
    streams = _slot_streams(slices, 2, 2, batch_size=5, enough=lambda s, keys: len(keys) >= sum(sizes[s]))
    for e in range(epochs):
        union = []
        for s, keys in streams.items():
            start = sum(sizes[s][:e])
            union += keys[start : start + sizes[s][e]]
        assert len(union) == n and set(union) == _keys(n), f"epoch {e}"
    first = [streams[s][: sizes[s][0]] for s in range(slots)]
    second = [streams[s][sizes[s][0] : sizes[s][0] + sizes[s][1]] for s in range(slots)]
    assert first != second and [set(k) for k in first] != [set(k) for k in second], "epochs reshuffle"


def test_flat_ddp_stream_counts_every_sample_equally(uneven):
    """What DDP sees: every rank takes the same number of batches. Whenever each slot has produced m samples, the
    counts differ by at most one, and when m * slots is a multiple of n they are all exactly m * slots / n.

    (Dealing whole shards round robin gave counts of 350-380 where 355 is exact on this data.)"""
    slices, n, workers, batch_size = fraction_slices(uneven, 1.0), uneven.num_samples, 2, 9
    batches_per_rank = 36  # 18 per worker: 162 samples per slot, 12 passes over the 54 samples
    per_rank = []
    for rank in range(2):
        ds = ShardDataset(slices, train=True, rank=rank, world_size=2, seed=11, repeat=True, shuffle_buffer=16,
                          return_keys=True)
        batches = iter(make_loader(ds, batch_size, num_workers=workers))
        per_rank.append([list(next(batches)[2]) for _ in range(batches_per_rank)])
    exact = 0
    for b in range(workers, batches_per_rank + 1, workers):  # b batches per rank: every slot produced m samples
        m = b // workers * batch_size
        seen = Counter(k for rank_batches in per_rank for batch in rank_batches[:b] for k in batch)
        counts = [seen[k] for k in sorted(_keys(n))]
        assert set(seen) <= _keys(n) and max(counts) - min(counts) <= 1, (b, seen)
        if m * 4 % n == 0:
            assert set(counts) == {m * 4 // n}, (b, seen)
            exact += 1
    assert exact == 6  # m = 27, 54, ..., 162


def test_epochs_advance_in_step_in_persistent_workers_and_set_epoch_reaches_them(uneven):
    ds = ShardDataset(fraction_slices(uneven, 1.0), train=True, seed=2, shuffle_buffer=8, return_keys=True)
    loader = make_loader(ds, batch_size=4, num_workers=2)

    def one_pass() -> list[str]:
        return [key for _images, _labels, keys in loader for key in keys]

    next(iter(loader))  # epoch 0, abandoned after one batch: both workers still move on to epoch 1 together
    passes = [one_pass(), one_pass()]  # epochs 1 and 2
    for keys in passes:
        assert sorted(keys) == sorted(_keys(uneven.num_samples))
    assert passes[0] != passes[1]
    ds.set_epoch(1)  # after the workers started: shared memory, so it reaches them
    assert [one_pass(), one_pass()] == passes
    fresh = ShardDataset(fraction_slices(uneven, 1.0), train=True, seed=2, shuffle_buffer=8, return_keys=True)
    fresh.set_epoch(2)  # before the workers start
    assert [key for _images, _labels, keys in make_loader(fresh, 4, num_workers=2) for key in keys] == passes[1]


def test_bad_input(tmp_path, digits):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_manifest(str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_manifest(f"file://{missing}/manifest.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/manifest\.json.*not JSON"):
        load_manifest(str(tmp_path / "bad"))
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"split": "train"}))
    with pytest.raises(ValueError, match=r"bad/manifest\.json: expected .*shards"):
        load_manifest(str(tmp_path / "bad"))
    for fraction in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            fraction_slices(digits["val"], fraction)
        with pytest.raises(ValueError, match="fraction"):
            subset_size(digits["val"], fraction)


# ---------------------------------------------------------------------------------------------------------------
# s3:// against a local moto server



@pytest.fixture(scope="module")
def s3_digits(s3_endpoint):
    """Digits shards written straight to s3://shards/digits through fsspec."""
    return shards_from_digits("s3://shards/digits", image_size=12, samples_per_shard=100, seed=1)


def test_s3_round_trip(s3_digits):
    manifests = s3_digits
    train = load_manifest("s3://shards/digits/train")
    assert train == manifests["train"] and train.url == "s3://shards/digits/train/manifest.json"
    assert train.shard_url(train.shards[1]) == "s3://shards/digits/train/shard-000001.tar"
    _assert_checksums(train)

    slices = fraction_slices(train, 0.5)
    per_rank = _rank_keys(slices, world_size=2, train=True, seed=0)
    _assert_partition(per_rank, subset_size(train, 0.5))
    images, labels = next(iter(make_loader(ShardDataset(slices, train=False), batch_size=4)))
    assert images.shape == (4, 3, 12, 12) and labels.shape == (4,)


def test_s3_endpoint_from_environment(s3_endpoint, s3_digits):
    """The documented way for Ray workers: FSSPEC_S3_ENDPOINT_URL in a fresh process's environment."""
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(REPO)}
    code = "from workers.data.manifest import load_manifest; print(load_manifest('s3://shards/digits/val').num_samples)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == s3_digits["val"].num_samples
