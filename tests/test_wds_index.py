"""workers.data.wds_index and `mixer-study shards --from wds`: manifests for existing WebDataset corpora (.cls or .json
labels, local and s3://), the class-sortedness check, --reshard, and what fractions/ShardDataset make of them."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import cli_env, run_cli
from workers.data.fractions import class_counts, fraction_slices, subset_size
from workers.data.manifest import Manifest, load_manifest
from workers.data.reader import ShardDataset, iter_samples
from workers.data.wds_index import SortedCorpusError, check_not_sorted, index_webdataset, reshard, sortedness


def _jpeg(label: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40 * label, 255 - 40 * label, 128)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_corpus(
    root: str, labels: list[int], per_shard: int, label_mode: str = "cls", sizes: list[tuple[int, int]] | None = None
) -> tuple[str, list[tuple[str, int]]]:
    """ImageNet-style tars at ``root/train-{000000..}.tar`` written with webdataset's TarWriter; returns the brace
    pattern and [(key, label)] in corpus order. label_mode "cls": .jpg + .cls; "json": .jpeg + .json {"label": ..}."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    truth, shards = [], (len(labels) + per_shard - 1) // per_shard
    for s in range(shards):
        with fsspec.open(f"{root}/train-{s:06d}.tar", "wb") as f, wds.TarWriter(f, encoder=False) as tar:
            for i in range(s * per_shard, min(len(labels), (s + 1) * per_shard)):
                key, label = f"n{labels[i]:04d}_{i:05d}", labels[i]
                size = sizes[i] if sizes else (10, 10)
                if label_mode == "cls":
                    sample = {"__key__": key, "jpg": _jpeg(label, size), "cls": str(label).encode()}
                else:
                    meta = {"label": label, "synset": f"n{label:04d}", "width": size[0]}
                    sample = {"__key__": key, "jpeg": _jpeg(label, size), "json": json.dumps(meta).encode()}
                tar.write(sample)
                truth.append((key, label))
    return f"{root}/train-{{000000..{shards - 1:06d}}}.tar", truth


def _shuffled_labels(n: int, classes: int, seed: int = 0) -> list[int]:
    labels = [i % classes for i in range(n)]
    random.Random(seed).shuffle(labels)
    return labels


def _assert_checksums(manifest: Manifest) -> None:
    """Every shard's sha256, computed here independently of the indexer, is the manifest's."""
    for shard in manifest.shards:
        with fsspec.open(manifest.shard_url(shard), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard.sha256, shard.url


def _read_keys_labels(manifest, fraction: float, image_size: int = 8) -> list[tuple[str, int]]:
    ds = ShardDataset(fraction_slices(manifest, fraction), train=False, image_size=image_size, return_keys=True)
    out = []
    for image, label, key in ds:
        assert tuple(image.shape) == (3, image_size, image_size)
        out.append((key, label))
    return out


def _check_index(manifest, pattern: str, truth: list[tuple[str, int]], per_shard: int) -> None:
    loaded = load_manifest(manifest.url)
    assert loaded == manifest
    _assert_checksums(loaded)
    assert manifest.num_samples == len(truth)
    sizes = [len(truth[i : i + per_shard]) for i in range(0, len(truth), per_shard)]
    assert [s.num_samples for s in manifest.shards] == sizes
    for k, shard in enumerate(manifest.shards):
        url = manifest.shard_url(shard)
        assert url == shard.url and url.endswith(f"train-{k:06d}.tar"), "absolute shard URLs"
        with fsspec.open(url, "rb") as f:
            assert shard.sha256 == hashlib.sha256(f.read()).hexdigest()
        chunk = truth[k * per_shard : (k + 1) * per_shard]
        assert shard.class_counts == [Counter(y for _, y in chunk)[c] for c in range(manifest.num_classes)]
    # fractions: nested prefixes in corpus order, labels as in the corpus, exact class counts (partial last shard)
    for fraction in (0.1, 0.5, 1.0):
        n = subset_size(manifest, fraction)
        assert _read_keys_labels(manifest, fraction) == truth[:n]
        assert class_counts(manifest, n) == [Counter(y for _, y in truth[:n])[c] for c in range(manifest.num_classes)]
    assert [k for k, _, _ in iter_samples(pattern)] == [k for k, _ in truth]


# ---------------------------------------------------------------------------------------------------------------


def test_index_cls_corpus(tmp_path):
    pattern, truth = _write_corpus(str(tmp_path / "corpus"), _shuffled_labels(53, 4), per_shard=20)
    manifest = index_webdataset(pattern, str(tmp_path / "index"), split="train")
    assert manifest.url == str(tmp_path / "index" / "train" / "manifest.json")
    assert manifest.class_names == ["0", "1", "2", "3"] and manifest.image_size == 10
    _check_index(manifest, pattern, truth, per_shard=20)
    assert list((tmp_path / "index" / "train").iterdir()) == [tmp_path / "index" / "train" / "manifest.json"]


def test_index_json_labels_class_names_and_varying_sizes(tmp_path):
    labels = _shuffled_labels(45, 3, seed=1)
    sizes = [(12 + i % 5, 10 + i % 3) for i in range(45)]
    pattern, truth = _write_corpus(str(tmp_path / "corpus"), labels, per_shard=16, label_mode="json", sizes=sizes)
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\nshark\n\n")
    with pytest.raises(ValueError, match=r"lacks an image .* or a label .*--label-key cls.*'jpeg', 'json'"):
        index_webdataset(pattern, str(tmp_path / "index"))
    classes = str(tmp_path / "classes.txt")
    manifest = index_webdataset(pattern, str(tmp_path / "index"), label_key="json", classes=classes)
    assert manifest.class_names == ["tench", "goldfish", "shark"]
    assert manifest.image_size is None, "shorter sides 10..12: the study must set data.image_size"
    assert json.loads(Path(manifest.url).read_text())["image_size"] is None
    _check_index(manifest, pattern, truth, per_shard=16)

    (tmp_path / "two.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(ValueError, match=r"label 2 but --classes .*two\.txt names only 2 classes"):
        index_webdataset(pattern, str(tmp_path / "index"), label_key="json", classes=str(tmp_path / "two.txt"))


def test_json_label_disagreeing_with_cls_is_refused(tmp_path):
    with fsspec.open(str(tmp_path / "x-000000.tar"), "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        tar.write({"__key__": "a", "jpg": _jpeg(1, (8, 8)), "cls": b"1", "json": b'{"label": 2}'})
    with pytest.raises(ValueError, match=r"\.json label 2 differs from its \.cls entry 1.*--reshard"):
        index_webdataset(str(tmp_path / "x-{000000..000000}.tar"), str(tmp_path / "out"), label_key="json")


def test_old_manifests_without_class_counts_still_load(tmp_path):
    pattern, truth = _write_corpus(str(tmp_path / "corpus"), _shuffled_labels(30, 3), per_shard=10)
    manifest = index_webdataset(pattern, str(tmp_path / "index"))
    doc = json.loads(Path(manifest.url).read_text())
    for shard in doc["shards"]:
        del shard["class_counts"]
    Path(manifest.url).write_text(json.dumps(doc))
    old = load_manifest(manifest.url)
    assert all(s.class_counts is None for s in old.shards) and class_counts(old, 15) is None
    doc["shards"][0]["class_counts"] = [1, 2, 3]
    Path(manifest.url).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"class_counts \[1, 2, 3\], expected 3 non-negative counts summing to"):
        load_manifest(manifest.url)


def test_sortedness_statistic():
    rng = np.random.default_rng(0)
    for classes, n in [(2, 200), (3, 60), (10, 1797), (100, 5000), (1000, 30000)]:
        for seed in range(3):
            shuffled = np.random.default_rng(seed).permutation(np.arange(n) % classes)
            assert not sortedness(shuffled).looks_sorted, (classes, n, seed, sortedness(shuffled))
        s = sortedness(np.sort(np.arange(n) % classes))
        assert s.looks_sorted and s.prefix_classes < classes, (classes, n, s)
    imbalanced = rng.permutation(np.repeat(np.arange(5), [500, 100, 50, 20, 5]))
    assert not sortedness(imbalanced).looks_sorted
    blocks = np.concatenate([rng.permutation(np.arange(500) % 5 + 5 * b) for b in range(20)])  # sorted by superclass
    assert sortedness(blocks).looks_sorted
    assert not sortedness([0] * 50).looks_sorted and not sortedness([]).looks_sorted


def test_sorted_corpus_is_refused_and_reshard_fixes_it(tmp_path):
    labels = sorted(_shuffled_labels(90, 5))
    pattern, truth = _write_corpus(str(tmp_path / "corpus"), labels, per_shard=25)
    with pytest.raises(SortedCorpusError, match=r"total-variation distance 0\.\d+ > threshold .*--reshard") as err:
        index_webdataset(pattern, str(tmp_path / "index"))
    assert "that prefix holds 3 of 5 classes" in str(err.value)
    assert not (tmp_path / "index" / "train" / "manifest.json").exists(), "nothing written for a refused corpus"
    index_webdataset(pattern, str(tmp_path / "unchecked"), check_sorted=False)  # the caller's explicit choice

    out = reshard(pattern, str(tmp_path / "shuffled"), samples_per_shard=20, seed=3, bucket_bytes=3000,
                  tmp_dir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mixer-reshard-")] == [], "buckets removed"
    assert load_manifest(str(tmp_path / "shuffled" / "train")) == out
    _assert_checksums(out)
    assert [s.url for s in out.shards] == [f"shard-{k:06d}.tar" for k in range(5)]
    assert [s.num_samples for s in out.shards] == [20, 20, 20, 20, 10] and out.image_size == 10
    samples = list(iter_samples([out.shard_url(s) for s in out.shards]))
    assert [k for k, _, _ in samples] == [f"{i:08d}" for i in range(90)]
    source = Counter((hashlib.sha1(img).hexdigest(), y) for _, img, y in iter_samples(pattern))
    assert Counter((hashlib.sha1(img).hexdigest(), y) for _, img, y in samples) == source, "images copied unchanged"
    out_labels = [y for _, _, y in samples]
    check_not_sorted(out_labels, "the resharded split")
    assert out_labels != labels
    for shard, start in zip(out.shards, range(0, 90, 20), strict=True):
        assert shard.class_counts == [out_labels[start : start + 20].count(c) for c in range(5)]
    again = reshard(pattern, str(tmp_path / "again"), samples_per_shard=20, seed=3, bucket_bytes=3000)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in out.shards], "deterministic for a seed"
    index_webdataset(str(tmp_path / "shuffled" / "train" / "shard-{000000..000004}.tar"), str(tmp_path / "reindex"))


def test_cli_wds(tmp_path):
    env = cli_env(tmp_path)
    for bad, why in [("train-{000000..000003.tar", "bad shard pattern"), ("gone-{000000..000001}.tar", "do not exist")]:
        args = ["shards", "--from", "wds", "--root", str(tmp_path / bad), "--out", str(tmp_path / "out")]
        result = run_cli(args, env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("mixer-study shards: error: ") and why in result.stderr, result.stderr

    sorted_pattern, _ = _write_corpus(str(tmp_path / "sorted"), sorted(_shuffled_labels(60, 3)), per_shard=20)
    refused = run_cli(["shards", "--from", "wds", "--root", sorted_pattern, "--out", str(tmp_path / "a")], env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "total-variation distance" in refused.stderr and "--reshard" in refused.stderr

    done = run_cli(["shards", "--from", "wds", "--root", sorted_pattern, "--out", str(tmp_path / "b"), "--split", "val",
                    "--reshard", "--samples-per-shard", "25"], env)
    assert done.returncode == 0, done.stderr
    assert "60 samples in    3 shards, 3 classes, 10px" in done.stdout
    assert [s.num_samples for s in load_manifest(str(tmp_path / "b" / "val")).shards] == [25, 25, 10]

    labels = _shuffled_labels(40, 4)
    json_pattern, _ = _write_corpus(str(tmp_path / "json"), labels, per_shard=15, label_mode="json",
                                    sizes=[(10 + i % 2, 11) for i in range(40)])
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    done = run_cli(["shards", "--from", "wds", "--root", json_pattern, "--out", str(tmp_path / "c"), "--label-key",
                    "json", "--classes", str(tmp_path / "names.txt")], env)
    assert done.returncode == 0, done.stderr
    assert "40 samples in    3 shards, 4 classes, images of varying size" in done.stdout
    assert load_manifest(str(tmp_path / "c" / "train")).class_names == ["a", "b", "c", "d"]


@pytest.mark.usefixtures("s3_endpoint")
def test_index_on_s3():
    pattern, truth = _write_corpus("s3://shards/wds-corpus", _shuffled_labels(47, 3, seed=2), per_shard=20)
    assert pattern == "s3://shards/wds-corpus/train-{000000..000002}.tar"
    manifest = index_webdataset(pattern, "s3://shards/wds-index", split="train")
    assert manifest.url == "s3://shards/wds-index/train/manifest.json"
    assert manifest.shards[1].url == "s3://shards/wds-corpus/train-000001.tar"
    _check_index(manifest, pattern, truth, per_shard=20)
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 shards .*train-000003\.tar"):
        index_webdataset("s3://shards/wds-corpus/train-{000000..000003}.tar", "s3://shards/x")
