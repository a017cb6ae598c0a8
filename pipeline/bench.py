"""Speed benchmarks behind ``mixer-study bench``: one plain-text table per section, everything also as JSON.

Sections
--------
1. Training step (forward + backward + AdamW step) per variant, fp32 vs bf16 autocast, on one thread.
2. Inference throughput, img/s/core (``workers.throughput.inference_throughput``, fp32, best batch size).
3. Data path: WebDataset shard reader (``ShardDataset`` + ``make_loader``) vs decoding the same PNGs in a loop,
   and the wall time of reading a nested fraction 0.1 vs the whole split.
4. Few-shot: ``analysis.fewshot.linear_fewshot`` on synthetic features.

Torch timings run with ``torch.set_num_threads(1)`` so they are per core. The machine may be shared with other jobs
(a Ray study, say), so absolute times are noisy: the numbers to compare are the RATIOS measured within one run
(bf16/fp32, reader/decode-only, fraction 0.1/1.0). Absolute numbers are reported as well, labelled as such.

Slow cells (a bf16 step can take 10+ s on a CPU without AMX/AVX512-BF16) are capped by a per-cell time budget:
each cell runs ``repeats`` timed steps, or fewer once the budget is spent (at least 3, or 2 when one step takes
over 3 s); the JSON records how many steps each median is over.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.config import OptimConfig
from workers.model import build_model, get_variant, train_flops_per_image
from workers.optim import build_optimizer
from workers.precision import cpu_has_fast_bf16

__all__ = [
    "run_benchmarks",
    "machine_info",
    "bench_train_step",
    "bench_matmul",
    "bench_inference",
    "bench_data",
    "bench_fewshot",
    "format_table",
]

NUM_CLASSES = 10  # as the digits shards the CPU studies train on
CELL_BUDGET_S = 6.0  # per (variant, precision) cell: stop timing after this once MIN_TIMED steps are done
MIN_TIMED = 3
SLOW_CALL_S = 3.0
MATMUL_SIZE = 512  # square matmul, fp32 vs bf16 autocast: the raw kernel ratio behind the step ratio
INFERENCE_BATCH_SIZES = (1, 8, 32, 128)
INFERENCE_SECONDS = 0.3  # per batch size
DATA_IMAGE_SIZE = 16
DATA_BATCH_SIZE = 32
DATA_CROP_PAD = 2  # as studies/model_scale.yaml and data_fraction.yaml
DATA_PASSES = 5  # interleaved passes per data measurement (median reported)
FEWSHOT_SHOTS = (1, 5, 10, 25)
FEWSHOT_SEEDS = (0, 1, 2)
FEWSHOT_TRAIN, FEWSHOT_TEST, FEWSHOT_DIM = 2000, 1000, 512

Write = Callable[[str], Any]


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text table: header, a dashed rule, one line per row (cells already formatted)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2, budget_s: float = CELL_BUDGET_S) -> list[float]:
    """Seconds per call of ``fn`` for up to ``repeats`` timed calls after up to ``warmup`` untimed ones.

    A warm-up call slower than 1 s ends the warm-up (one-time costs are amortised within it). Timing stops early
    once ``budget_s`` is spent and at least ``min(MIN_TIMED, repeats)`` calls are timed, or 2 when a warm-up call
    took more than ``SLOW_CALL_S`` (a bf16 step of a large variant), to keep the default run within minutes.
    """
    slowest = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start)
        if slowest > 1.0:
            break
    min_timed = min(2 if slowest > SLOW_CALL_S else MIN_TIMED, repeats)
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < max(1, repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= min_timed and time.perf_counter() - begin >= budget_s:
            break
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, library versions, bf16 support and the load average when the run started."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "torch_default_threads": torch.get_num_threads(),
        "torch_threads_used": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _supported(variants: list[str], image_size: int, write: Write) -> tuple[list[str], list[dict[str, str]]]:
    """Variants whose patch size divides ``image_size``, and the skipped ones with the reason."""
    kept, skipped = [], []
    for name in variants:
        v = get_variant(name)
        if image_size % v.patch_size:
            reason = f"image size {image_size} not divisible by patch size {v.patch_size}"
            skipped.append({"variant": v.name, "reason": reason})
            write(f"[bench] skip {v.name}: {reason}")
        else:
            kept.append(v.name)
    return kept, skipped


# ----------------------------------------------------------------------------------------------------------------
# 1. Training step


def _train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, labels, bf16: bool):
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _matmul_fn(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            a @ b

    return call


def bench_matmul(repeats: int, write: Write, size: int = MATMUL_SIZE) -> dict:
    """One ``size``-cubed matmul, fp32 vs under bf16 autocast: the raw kernel speed behind the step ratio."""
    write(f"[bench] matmul {size}x{size}x{size} fp32 vs bf16 autocast ...")
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2 * size**3
    seconds = {}
    for precision in ("fp32", "bf16"):
        seconds[precision] = statistics.median(_time_calls(_matmul_fn(a, b, precision == "bf16"), repeats,
                                                           budget_s=2.0))
    return {"size": size, "fp32_ms": seconds["fp32"] * 1e3, "bf16_ms": seconds["bf16"] * 1e3,
            "fp32_gflops_per_s": flops / seconds["fp32"] / 1e9, "bf16_gflops_per_s": flops / seconds["bf16"] / 1e9,
            "bf16_over_fp32": seconds["bf16"] / seconds["fp32"]}


def bench_train_step(variants: list[str], image_size: int, batch_size: int, repeats: int, write: Write) -> dict:
    """Median ms per training step in fp32 and under bf16 autocast, per variant, one thread."""
    kept, skipped = _supported(variants, image_size, write)
    rows = []
    for name in kept:
        torch.manual_seed(0)
        model = build_model(name, image_size, NUM_CLASSES)
        model.train()
        optimizer = build_optimizer(model, OptimConfig())  # the recipe's optimiser (big_vision wd semantics)
        images = torch.randn(batch_size, 3, image_size, image_size)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,))
        flops = train_flops_per_image(name, image_size, NUM_CLASSES)
        cell: dict[str, list[float]] = {}
        for precision in ("fp32", "bf16"):
            write(f"[bench] train step {name} {precision} (batch {batch_size}) ...")
            cell[precision] = _time_calls(_train_step_fn(model, optimizer, images, labels, precision == "bf16"),
                                          repeats)
        fp32_s, bf16_s = statistics.median(cell["fp32"]), statistics.median(cell["bf16"])
        rows.append({
            "variant": name,
            "params": sum(p.numel() for p in model.parameters()),
            "train_gflops_per_image": flops / 1e9,
            "fp32_ms_per_step": fp32_s * 1e3,
            "bf16_ms_per_step": bf16_s * 1e3,
            "bf16_over_fp32": bf16_s / fp32_s,
            "fp32_achieved_gflops_per_s": flops * batch_size / fp32_s / 1e9,
            "fp32_steps_timed": len(cell["fp32"]),
            "bf16_steps_timed": len(cell["bf16"]),
        })
    matmul = bench_matmul(repeats, write)
    table = format_table(
        ["variant", "params", "GFLOPs/img", "fp32 ms/step", "bf16 ms/step", "bf16/fp32", "fp32 GFLOP/s", "steps"],
        [[r["variant"], f"{r['params']:,}", f"{r['train_gflops_per_image']:.4f}", f"{r['fp32_ms_per_step']:.1f}",
          f"{r['bf16_ms_per_step']:.1f}", f"{r['bf16_over_fp32']:.2f}x", f"{r['fp32_achieved_gflops_per_s']:.2f}",
          f"{r['fp32_steps_timed']}/{r['bf16_steps_timed']}"] for r in rows]
        + [[f"matmul {matmul['size']}^3", "", f"{2 * matmul['size'] ** 3 / 1e9:.4f}", f"{matmul['fp32_ms']:.2f}",
            f"{matmul['bf16_ms']:.2f}", f"{matmul['bf16_over_fp32']:.2f}x", f"{matmul['fp32_gflops_per_s']:.2f}",
            ""]],
    )
    return {"batch_size": batch_size, "image_size": image_size, "num_classes": NUM_CLASSES, "rows": rows,
            "skipped": skipped, "matmul": matmul, "table": table,
            "notes": "GFLOPs/img = train FLOPs = 3x forward (matmuls and stem only); median over the timed steps "
                     "(steps = fp32/bf16 counts); ms/step and GFLOP/s are absolute, per core; the matmul row is one "
                     "square matmul (GFLOPs per call, ms per call), the kernel-level bf16/fp32 ratio"}


# ----------------------------------------------------------------------------------------------------------------
# 2. Inference throughput


def bench_inference(variants: list[str], image_size: int, write: Write) -> dict:
    """Best fp32 forward img/s/core over ``INFERENCE_BATCH_SIZES``, per variant."""
    from workers.throughput import inference_throughput

    kept, skipped = _supported(variants, image_size, write)
    threads = torch.get_num_threads()
    rows = []
    for name in kept:
        write(f"[bench] inference {name} fp32 ...")
        torch.manual_seed(0)
        model = build_model(name, image_size, NUM_CLASSES)
        img_s, best_batch = inference_throughput(model, batch_sizes=INFERENCE_BATCH_SIZES,
                                                 seconds_per_batch_size=INFERENCE_SECONDS, precision="fp32")
        rows.append({"variant": name, "img_per_s_per_core": img_s / threads, "best_batch_size": best_batch})
    table = format_table(["variant", "img/s/core", "best batch"],
                         [[r["variant"], f"{r['img_per_s_per_core']:.0f}", str(r["best_batch_size"])] for r in rows])
    return {"image_size": image_size, "precision": "fp32", "batch_sizes": list(INFERENCE_BATCH_SIZES),
            "seconds_per_batch_size": INFERENCE_SECONDS, "rows": rows, "skipped": skipped, "table": table}


# ----------------------------------------------------------------------------------------------------------------
# 3. Data path


def _read_pass(slices, batch_size: int) -> int:
    """One pass through ShardDataset + make_loader as training reads it; returns the number of samples."""
    from workers.config import AugmentConfig
    from workers.shard_reader import ShardDataset, make_loader

    dataset = ShardDataset(slices, train=True, seed=0, augment=AugmentConfig(crop="pad", pad=DATA_CROP_PAD))
    return sum(len(labels) for _images, labels in make_loader(dataset, batch_size))


def _interleaved_medians(fns: dict[str, Callable[[], Any]], passes: int) -> dict[str, float]:
    """Median seconds of each function over ``passes`` rounds, calling them in turn within each round.

    Interleaving exposes all of them to the same background load, so their ratios hold on a shared machine.
    """
    for fn in fns.values():
        fn()  # warm-up: file cache, imports
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(passes):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_data(write: Write) -> dict:
    """Shard reader vs decode-only samples/s on the digits train split, and fraction 0.1 vs 1.0 read time."""
    from workers.fractions import fraction_slices
    from workers.shard_reader import decode_image, iter_samples
    from workers.shard_writer import shards_from_digits

    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        write(f"[bench] data: writing digits shards ({DATA_IMAGE_SIZE} px) ...")
        start = time.perf_counter()
        manifest = shards_from_digits(tmp, image_size=DATA_IMAGE_SIZE)["train"]
        write_s = time.perf_counter() - start
        n = manifest.num_samples
        full = fraction_slices(manifest, 1.0)
        tenth = fraction_slices(manifest, 0.1)

        pngs = [image for _key, image, _label in iter_samples([manifest.shard_url(s) for s in manifest.shards])]
        write(f"[bench] data: reader (fraction 1.0 and 0.1) vs decode-only, {n} samples, {DATA_PASSES} passes ...")
        seconds = _interleaved_medians({
            "reader": lambda: _read_pass(full, DATA_BATCH_SIZE),
            "decode_only": lambda: [decode_image(png) for png in pngs],
            "tenth": lambda: _read_pass(tenth, DATA_BATCH_SIZE),
        }, DATA_PASSES)
        n_tenth = sum(s.num_samples for s in tenth)

    reader_s, decode_s, tenth_s = seconds["reader"], seconds["decode_only"], seconds["tenth"]
    full_s = reader_s  # the reader measurement is the fraction-1.0 read
    reader_sps, decode_sps = n / reader_s, n / decode_s
    result = {
        "image_size": DATA_IMAGE_SIZE, "train_samples": n, "shards": len(manifest.shards),
        "batch_size": DATA_BATCH_SIZE, "crop_pad": DATA_CROP_PAD, "write_seconds_all_splits": write_s,
        "reader_samples_per_s": reader_sps, "decode_only_samples_per_s": decode_sps,
        "reader_over_decode_only": reader_sps / decode_sps,
        "fraction": {
            "0.1": {"samples": n_tenth, "shards_touched": len(tenth), "seconds": tenth_s},
            "1.0": {"samples": n, "shards_touched": len(full), "seconds": full_s},
            "time_ratio_0.1_over_1.0": tenth_s / full_s,
            "sample_ratio_0.1_over_1.0": n_tenth / n,
        },
    }
    result["table"] = format_table(
        ["measurement", "samples", "seconds", "samples/s", "ratio"],
        [["reader, fraction 1.0 (ShardDataset+loader)", str(n), f"{reader_s:.3f}", f"{reader_sps:.0f}",
          f"{result['reader_over_decode_only']:.2f} (reader/decode-only)"],
         ["decode-only (PNG loop)", str(n), f"{decode_s:.3f}", f"{decode_sps:.0f}", ""],
         ["read fraction 0.1", str(n_tenth), f"{tenth_s:.3f}", f"{n_tenth / tenth_s:.0f}",
          f"{tenth_s / full_s:.3f} (time 0.1/1.0)"]],
    )
    return result


# ----------------------------------------------------------------------------------------------------------------
# 4. Few-shot


def bench_fewshot(write: Write) -> dict:
    """Wall time of ``linear_fewshot`` per k (3 seeds each) on synthetic 10-class Gaussian features.

    ``ridge_weights`` solves whichever Gram system is smaller (n x n or d x d) and has no option to force the
    d x d one, so the n x n vs d x d comparison is not measured here; only the end-to-end evaluation is.
    """
    from analysis.fewshot import linear_fewshot

    write(f"[bench] few-shot: linear_fewshot N={FEWSHOT_TRAIN}, d={FEWSHOT_DIM}, {NUM_CLASSES} classes ...")
    rng = np.random.default_rng(0)
    means = rng.normal(size=(NUM_CLASSES, FEWSHOT_DIM))
    train_y = np.arange(FEWSHOT_TRAIN) % NUM_CLASSES
    test_y = np.arange(FEWSHOT_TEST) % NUM_CLASSES
    train_x = means[train_y] + 3.0 * rng.normal(size=(FEWSHOT_TRAIN, FEWSHOT_DIM))
    test_x = means[test_y] + 3.0 * rng.normal(size=(FEWSHOT_TEST, FEWSHOT_DIM))
    linear_fewshot(train_x, train_y, test_x, test_y, shots=(1,), seeds=(0,))  # warm-up
    rows = []
    for k in FEWSHOT_SHOTS:
        start = time.perf_counter()
        result = linear_fewshot(train_x, train_y, test_x, test_y, shots=(k,), seeds=FEWSHOT_SEEDS)
        seconds = time.perf_counter() - start
        rows.append({"shots": k, "n": k * NUM_CLASSES, "seconds_all_seeds": seconds,
                     "ms_per_fit": seconds / len(FEWSHOT_SEEDS) * 1e3, "accuracy": result[k]["mean"]})
    total = sum(r["seconds_all_seeds"] for r in rows)
    table = format_table(["shots", "n", "ms/fit", "accuracy"],
                         [[str(r["shots"]), str(r["n"]), f"{r['ms_per_fit']:.1f}", f"{r['accuracy']:.3f}"]
                          for r in rows] + [["all", "", f"{total * 1e3:.1f} total", ""]])
    return {"train_samples": FEWSHOT_TRAIN, "test_samples": FEWSHOT_TEST, "dim": FEWSHOT_DIM,
            "num_classes": NUM_CLASSES, "seeds": list(FEWSHOT_SEEDS), "rows": rows, "total_seconds": total,
            "table": table,
            "notes": "synthetic features; ms/fit includes standardising and scoring the test set; "
                     "ridge_weights has no switch to force the d x d system, so only linear_fewshot is timed"}


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def run_benchmarks(
    variants: list[str],
    image_size: int,
    batch_size: int,
    out: str,
    repeats: int = 10,
    write: Write = print,
) -> dict:
    """Run all four sections, print their tables, write the results (and machine info) as JSON to ``out``."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be positive, got {repeats} and {batch_size}")
    for name in variants:
        get_variant(name)  # unknown names fail before any timing
    previous_threads = torch.get_num_threads()
    info = machine_info(threads=1)
    write(f"[bench] {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch_version']}, "
          f"fast bf16: {info['cpu_has_fast_bf16']}; timing on 1 thread (per core)")
    begin = time.perf_counter()
    torch.set_num_threads(1)
    try:
        sections = {
            "train_step": bench_train_step(variants, image_size, batch_size, repeats, write),
            "inference": bench_inference(variants, image_size, write),
            "data": bench_data(write),
            "fewshot": bench_fewshot(write),
        }
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "machine": info,
        "config": {"variants": list(variants), "image_size": image_size, "batch_size": batch_size,
                   "repeats": repeats},
        **sections,
        "total_seconds": time.perf_counter() - begin,
    }
    titles = {
        "train_step": f"Training step, forward+backward+AdamW, batch {batch_size}, {image_size} px, 1 thread "
                      "(ms and GFLOP/s absolute; bf16/fp32 is the ratio to compare)",
        "inference": f"Inference throughput, fp32, {image_size} px, best of batch sizes {INFERENCE_BATCH_SIZES}",
        "data": f"Data path, digits {DATA_IMAGE_SIZE} px train split, batch {DATA_BATCH_SIZE}, crop pad "
                f"{DATA_CROP_PAD}, median of passes",
        "fewshot": f"Few-shot, linear_fewshot, N={FEWSHOT_TRAIN} train / {FEWSHOT_TEST} test, d={FEWSHOT_DIM}, "
                   f"{NUM_CLASSES} classes, {len(FEWSHOT_SEEDS)} seeds",
    }
    for key, title in titles.items():
        write("")
        write(title)
        write(sections[key]["table"])
        for s in sections[key].get("skipped", []):
            write(f"  skipped {s['variant']}: {s['reason']}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    write(f"\n[bench] done in {results['total_seconds']:.0f} s; results in {path}")
    return results
