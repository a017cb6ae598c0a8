"""workers.data: shard writing/reading round trips, nested fractions, rank partitioning, s3:// via a moto server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from workers import data
from workers.data import (
    ShardDataset,
    decode_image,
    fraction_slices,
    iter_samples,
    load_manifest,
    make_loader,
    shards_from_digits,
    shards_from_imagefolder,
    subset_size,
    verify_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def _keys(n: int) -> set[str]:
    return {f"{i:08d}" for i in range(n)}


def _pixels_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


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
    expected = Counter((_pixels_hash(data._digits_image(img, 16)), int(y)) for img, y in zip(raw.images, raw.target))

    seen = Counter()
    for split, manifest in digits.items():
        loaded = load_manifest(os.path.dirname(manifest.url))  # the folder works as well as the file
        assert loaded == manifest and loaded.num_classes == 10 and loaded.image_size == 16
        assert all(s.num_samples == 25 for s in manifest.shards[:-1])
        verify_manifest(loaded)
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
    a = data.split_indices(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    assert a == data.split_indices(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    assert sorted(sum(a.values(), [])) == list(range(100))
    assert [len(a[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    for cls, size in Counter(labels).items():  # stratified: per class within 2 of the target fraction
        assert abs(Counter(labels[a["train"]])[cls] - 0.7 * size) <= 2
        assert abs(Counter(labels[a["val"]])[cls] - 0.1 * size) <= 2
    tiny = data.split_indices(np.repeat(np.arange(4), 4), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    assert all(tiny.values()), "tiny classes still fill every split"
    assert a["train"] != sorted(a["train"]), "order inside a split is shuffled"
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_indices(labels, {"train": 0.5}, seed=0)


def test_corrupted_shard_fails_verification(digits, tmp_path):
    folder = tmp_path / "val"
    shutil.copytree(os.path.dirname(digits["val"].url), folder)
    manifest = load_manifest(str(folder))
    verify_manifest(manifest)
    shard = folder / "shard-000003.tar"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-000003.tar") as err:
        verify_manifest(manifest)
    assert "shard-000002" not in str(err.value)
    (folder / "shard-000005.tar").unlink()
    with pytest.raises(ValueError, match="shard-000005.tar: missing"):
        verify_manifest(manifest)


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
        verify_manifest(manifest)
        labels = []
        for _key, png, label in iter_samples([manifest.shard_url(s) for s in manifest.shards]):
            image = decode_image(png)
            assert image.shape == (8, 8, 3)
            assert int(image.reshape(-1, 3).mean(0).argmax()) == label  # red -> cat, green -> dog, blue -> emu
            labels.append(label)
        assert Counter(labels) == {0: 2, 1: 2, 2: 2}


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
        ds = ShardDataset(slices, train=True, rank=rank, world_size=4, repeat=True, crop_pad=2, flip=True)
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
def s3_endpoint():
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with pytest.MonkeyPatch.context() as mp:
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"moto server did not start on {endpoint}")
                    time.sleep(0.2)
            for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1"}.items():
                mp.setenv(var, value)
            mp.delenv("AWS_PROFILE", raising=False)
            # what FSSPEC_S3_ENDPOINT_URL does when set before fsspec is imported
            mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
            s3fs.S3FileSystem.clear_instance_cache()
            fsspec.filesystem("s3").mkdir("shards")
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture(scope="module")
def s3_digits(s3_endpoint):
    """Digits shards written straight to s3://shards/digits through fsspec."""
    return shards_from_digits("s3://shards/digits", image_size=12, samples_per_shard=100, seed=1)


def test_s3_round_trip(s3_digits):
    manifests = s3_digits
    train = load_manifest("s3://shards/digits/train")
    assert train == manifests["train"] and train.url == "s3://shards/digits/train/manifest.json"
    assert train.shard_url(train.shards[1]) == "s3://shards/digits/train/shard-000001.tar"
    verify_manifest(train)

    slices = fraction_slices(train, 0.5)
    per_rank = _rank_keys(slices, world_size=2, train=True, seed=0)
    _assert_partition(per_rank, subset_size(train, 0.5))
    images, labels = next(iter(make_loader(ShardDataset(slices, train=False), batch_size=4)))
    assert images.shape == (4, 3, 12, 12) and labels.shape == (4,)


def test_s3_endpoint_from_environment(s3_endpoint, s3_digits):
    """The documented way for Ray workers: FSSPEC_S3_ENDPOINT_URL in a fresh process's environment."""
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(REPO)}
    code = "from workers.data import load_manifest; print(load_manifest('s3://shards/digits/val').num_samples)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == s3_digits["val"].num_samples
