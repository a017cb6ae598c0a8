"""The generated corpus (``mixer-study shards --from synthetic``): deterministic per (seed, split, index), disjoint
pre-training and transfer classes, balanced classes, manifests and checksums the readers accept, and bad flags
refused with exit 2. Tiny sizes: the whole file runs in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from workers.data.fractions import class_counts
from workers.data.manifest import load_manifest
from workers.data.reader import decode_image
from workers.data.shard_format import read_shard
from workers.data.synthetic import (
    DEFAULT_PRETRAIN_CLASSES,
    DEFAULT_TRANSFER_CLASSES,
    design_classes,
    generate_split,
    shards_from_synthetic,
    split_sizes,
)

SPLITS = ("pretrain/train", "pretrain/val", "transfer/train", "transfer/val", "transfer/test")
TINY = {"size": 24, "num_pretrain": 6, "num_transfer": 4, "samples_per_shard": 10}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "seed0"
    shards_from_synthetic(str(out), seed=0, **TINY)
    return out


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes_and_another_seed_other_images(corpus: Path, tmp_path: Path) -> None:
    shards_from_synthetic(str(tmp_path / "again"), seed=0, **TINY)
    shards_from_synthetic(str(tmp_path / "seed1"), seed=1, **TINY)
    first, again, other = (_tar_bytes(root) for root in (corpus, tmp_path / "again", tmp_path / "seed1"))
    assert first == again  # every shard and manifest, byte for byte
    assert sorted(first) == sorted(other)  # the same files ...
    shards = [name for name in first if name.endswith(".tar")]
    assert all(first[name] != other[name] for name in shards)  # ... with other images


def test_an_image_depends_only_on_seed_split_and_index() -> None:
    specs, _ = design_classes(6, 4)
    whole = list(generate_split(3, ("pretrain", "train"), specs, 20, 16))
    middle = list(generate_split(3, ("pretrain", "train"), specs, 20, 16, start=7, stop=12))
    for (image, label), (expected, expected_label) in zip(middle, whole[7:12], strict=True):
        assert label == expected_label and np.array_equal(image, expected)
    val = [image for image, _ in generate_split(3, ("pretrain", "val"), specs, 20, 16)]
    assert not any(np.array_equal(a, b) for a, b in zip(val, [image for image, _ in whole], strict=True))


@pytest.mark.parametrize(("num_pretrain", "num_transfer"), [(DEFAULT_PRETRAIN_CLASSES, DEFAULT_TRANSFER_CLASSES),
                                                            (150, 18)])
def test_transfer_classes_share_no_parts_set_or_name_with_pretraining(num_pretrain: int, num_transfer: int) -> None:
    pretrain, transfer = design_classes(num_pretrain, num_transfer)
    assert (len(pretrain), len(transfer)) == (num_pretrain, num_transfer)
    names = [c.name for c in pretrain + transfer]
    assert len(set(names)) == len(names)
    assert not {frozenset(c.parts) for c in pretrain} & {frozenset(c.parts) for c in transfer}
    # the transfer task does not change when the pre-training task grows
    assert [c.name for c in design_classes(2, num_transfer)[1]] == [c.name for c in transfer]


def test_manifests_read_back_balanced_with_disjoint_classes(corpus: Path) -> None:
    manifests = {split: load_manifest(str(corpus / split)) for split in SPLITS}
    sizes = split_sizes(TINY["size"], TINY["num_pretrain"], TINY["num_transfer"])
    for split, manifest in manifests.items():
        assert manifest.num_samples == sizes[tuple(split.split("/"))] and manifest.image_size == 16
        labels = []
        for shard in manifest.shards:  # every shard's checksum verified as it streams
            for _key, data, label in read_shard(manifest.shard_url(shard), sha256=shard.sha256):
                assert decode_image(data).shape == (16, 16, 3)
                labels.append(label)
        counts = np.bincount(labels, minlength=manifest.num_classes)
        assert counts.tolist() == class_counts(manifest, manifest.num_samples)
        assert counts.max() - counts.min() <= 1, f"{split}: classes not balanced: {counts.tolist()}"
    pretrain, transfer = manifests["pretrain/train"].class_names, manifests["transfer/train"].class_names
    assert manifests["pretrain/val"].class_names == pretrain and manifests["transfer/test"].class_names == transfer
    assert len(pretrain) == TINY["num_pretrain"] and len(transfer) == TINY["num_transfer"]
    assert not set(pretrain) & set(transfer)


def test_cli_writes_the_five_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["shards", "--from", "synthetic", "--out", str(tmp_path), "--size", "8", "--pretrain-classes", "4",
          "--transfer-classes", "2", "--image-size", "20", "--seed", "5"])
    printed = capsys.readouterr().out
    for split in SPLITS:
        assert load_manifest(str(tmp_path / split)).image_size == 20
        assert split in printed


@pytest.mark.parametrize(("flags", "named"), [
    (["--size", "0"], "--size must be >= --pretrain-classes (64: one image per class), got 0"),
    (["--image-size", "12"], "--image-size must be in 16..64 for --from synthetic, got 12"),
    (["--image-size", "65"], "--image-size must be in 16..64 for --from synthetic, got 65"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--transfer-classes", "1"], "--transfer-classes must be >= 2, got 1"),
    (["--pretrain-classes", "160", "--size", "200"], "--pretrain-classes + --transfer-classes must be at most 168"),
])
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], named: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--from", "synthetic", "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written
