"""Section 5, ``fewshot``: the cost of the paper's linear few-shot evaluation that every trial ends with.

``analysis.features.extract_features`` runs a random-init model (speed only) over the digits train split, and
``analysis.fewshot.linear_fewshot`` fits per k on synthetic 10-class Gaussian features. Reading the tables: the
first gives samples/s of the feature extraction; the second, per number of shots, the training samples ``n``,
``ms/fit`` (one seed: standardising, the ridge solve and scoring the test set) and the accuracy on the synthetic
features (a sanity check, not a result), then the total over every k and seed.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from benchmarks.common import (
    DIGITS_SIZE,
    NUM_CLASSES,
    BenchConfig,
    Write,
    build_bench_model,
    format_table,
    interleaved_medians,
    sync_device,
)
from workers.models.registry import get_variant


def bench_fewshot(config: BenchConfig, device: torch.device, write: Write) -> dict:
    """``extract_features`` on the digits train split (a random-init model: speed only) and ``linear_fewshot`` per
    k on synthetic 10-class Gaussian features."""
    from analysis.features import extract_features
    from analysis.fewshot import linear_fewshot
    from workers.data.writer import shards_from_digits

    name = get_variant(config.fewshot_variant).name
    model = build_bench_model(name, DIGITS_SIZE, device)
    with tempfile.TemporaryDirectory(prefix="mixer-bench-fs-") as tmp:
        manifest = shards_from_digits(tmp, image_size=DIGITS_SIZE)["train"]
        write(f"[bench] few-shot: extract_features {name} on digits {DIGITS_SIZE} px ({manifest.num_samples}) ...")
        holder: dict[str, np.ndarray] = {}

        def extract() -> None:
            holder["x"], _ = extract_features(model, manifest.url, batch_size=256, crop_fraction=1.0)
            sync_device(device)

        seconds = interleaved_medians({"extract": extract}, 2)["extract"]
    n, dim = holder["x"].shape
    features = {"variant": name, "image_size": DIGITS_SIZE, "samples": n, "dim": dim, "seconds": seconds,
                "samples_per_s": n / seconds}

    k_classes, seeds = NUM_CLASSES, tuple(range(config.fewshot_seeds))
    write(f"[bench] few-shot: linear_fewshot N={config.fewshot_train}, d={config.fewshot_dim} ...")
    rng = np.random.default_rng(0)
    means = rng.normal(size=(k_classes, config.fewshot_dim))
    train_y, test_y = np.arange(config.fewshot_train) % k_classes, np.arange(config.fewshot_test) % k_classes
    train_x = means[train_y] + 3.0 * rng.normal(size=(config.fewshot_train, config.fewshot_dim))
    test_x = means[test_y] + 3.0 * rng.normal(size=(config.fewshot_test, config.fewshot_dim))
    linear_fewshot(train_x, train_y, test_x, test_y, shots=(1,), seeds=(0,))  # warm-up
    rows = []
    for k in config.fewshot_shots:
        start = time.perf_counter()
        result = linear_fewshot(train_x, train_y, test_x, test_y, shots=(k,), seeds=seeds)
        elapsed = time.perf_counter() - start
        rows.append({"shots": k, "n": k * k_classes, "seconds_all_seeds": elapsed,
                     "ms_per_fit": elapsed / len(seeds) * 1e3, "accuracy": result[k]["mean"]})
    total = sum(r["seconds_all_seeds"] for r in rows)
    table = format_table(["extract_features", "samples", "seconds", "samples/s"],
                         [[f"{name} {DIGITS_SIZE} px, d={dim}", str(n), f"{seconds:.2f}", f"{n / seconds:,.0f}"]])
    table += "\n\n" + format_table(
        ["shots", "n", "ms/fit", "accuracy"],
        [[str(r["shots"]), str(r["n"]), f"{r['ms_per_fit']:.1f}", f"{r['accuracy']:.3f}"] for r in rows]
        + [["all", "", f"{total * 1e3:.1f} total", ""]])
    return {"features": features,
            "solve": {"train_samples": config.fewshot_train, "test_samples": config.fewshot_test,
                      "dim": config.fewshot_dim, "num_classes": k_classes, "seeds": len(seeds), "rows": rows,
                      "total_seconds": total},
            "table": table,
            "notes": "solve: synthetic features; ms/fit includes standardising and scoring the test set; "
                     "ridge_weights solves the smaller of the n x n and d x d systems"}
