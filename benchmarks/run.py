"""Speed benchmarks behind ``mixer-study bench``: one plain-text table per section, everything also as JSON.

Sections
--------
1. ``matmul``: the measured matmul ceiling per dtype (``workers.training.throughput.measured_matmul_flops``) at the
bench's
   thread count. bf16 is always measured; where it is slow (a CPU without AMX/AVX512-BF16) it is marked so.
2. ``train_step`` and ``inference``: img/s (img/s/core on CPU), best over a batch-size sweep, with the achieved
   FLOP/s and the utilisation = achieved FLOP/s / the measured matmul FLOP/s of the same dtype (and, on a GPU
   with a known spec sheet, the MFU against it). The training step is the one trials run (``train_step_fn``:
   ``set_lr`` + autocast forward + the sigmoid loss + ``clip_by_global_norm`` + AdamW from ``build_optimizer``),
   on synthetic data already on the device; any family of ``workers.models.registry``.
3. ``loader``: samples/s of ONE loader process (``ShardDataset`` + ``make_loader``, ``num_workers=0``) on digits at
   16 px with the CPU studies' pad crop, and on synthetic 224 px JPEGs (256 px shorter side) with the paper's
   augmentation (inception crop, flip, RandAugment(2, 15)); then the loader-vs-in-memory step ratio of a small
   model and the number of loader processes a trial needs to keep its step fed.
4. ``orchestration`` (optional, a subprocess): a tiny real study through ``mixer-study run`` (embedded Ray Tune +
   Ray Train + MLflow), read back by ``analysis.timeline.study_goodput``: per-trial start-up/tail overhead, goodput.
5. ``fewshot``: ``analysis.features.extract_features`` on the digits split and ``linear_fewshot`` on synthetic
   features.

Torch timings on CPU run with ``torch.set_num_threads(threads)`` (1 by default, so numbers are per core). The
machine may be shared with other jobs, so absolute times are noisy: compare the RATIOS measured within one run
(utilisation, bf16/fp32, loader/in-memory). Interleaved measurements (loader, ratio) alternate their cases pass by
pass so that all of them see the same background load.

Time caps: a timing cell runs ``repeats`` timed calls, or fewer once ``cell_budget_s`` is spent (at least 3, or 2
when a call takes over 3 s); a batch sweep stops before a batch size whose step would take longer than
``max_step_s`` (extrapolated from the last one), and inference drops batch sizes whose call would take longer than
``max_call_s`` (estimated from the FLOPs and the measured matmul rate). The JSON records what ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.config import AugmentConfig, DataConfig, ModelConfig, OptimConfig, head_bias
from workers.models.registry import build_model, check_fits, forward_flops, get_variant, train_flops_per_image
from workers.training.optim import build_optimizer
from workers.training.precision import cpu_has_fast_bf16
from workers.training.trainer import optimizer_update

__all__ = [
    "BenchConfig",
    "bench_config",
    "quick_config",
    "run_benchmarks",
    "machine_info",
    "train_step_fn",
    "bench_matmul",
    "bench_train_step",
    "bench_inference",
    "bench_loader",
    "bench_orchestration",
    "bench_fewshot",
    "format_table",
]

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10  # as the digits shards the CPU studies train on
MIN_TIMED = 3
SLOW_CALL_S = 3.0
# bf16 autocast on a CPU without AMX/AVX512-BF16 ran training steps 4.7-11x slower than fp32 (docs/benchmarks.md):
# such a cell is skipped where this many times the fp32 step would exceed max_step_s.
SLOW_BF16_MIN_FACTOR = 4
DIGITS_SIZE = 16  # the demo's digits resolution
DIGITS_PAD = 1  # studies/demo.yaml: crop pad 1 at 16 px
CACHE_MB = DataConfig.model_fields["cache_mb"].default  # the trials' default memory cache (workers.data.reader)
PAPER_AUGMENT = AugmentConfig(crop="inception", flip=True, randaug=(2, 15))  # big_vision mlp_mixer_i1k.py
JPEG_SIZE = 224
JPEG_SHORTER_SIDE = 256
JPEG_SHAPES = ((256, 256), (256, 341), (341, 256), (256, 384))  # (height, width): shorter side 256, photo aspects

Write = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures; ``bench_config`` gives the defaults of a device, ``quick_config`` a tiny run."""

    variants: tuple[str, ...] = ("Micro-4", "Mini-4", "S-32")
    image_size: int = 32
    batch_sizes: tuple[int, ...] = (16, 64, 256)
    paper: bool = False  # also the paper's S-32 and B-16 at 224 px
    paper_variants: tuple[str, ...] = ("S-32", "B-16")
    paper_batch_sizes: tuple[int, ...] = (4, 16, 64)
    device: str = "cpu"
    threads: int = 1
    repeats: int = 10
    cell_budget_s: float = 6.0
    max_step_s: float = 5.0  # the batch sweep does not go on to a batch whose step would take longer
    max_call_s: float = 2.0  # inference batch sizes whose forward would take longer are left out
    compile: bool = False  # also time torch.compile'd steps at the best eager batch size
    matmul_size: int = 1024
    matmul_seconds: float = 0.3
    inference_batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    inference_seconds: float = 0.3
    loader_batch_size: int = 32  # the demo's per-rank batch (64 over 2 workers)
    loader_passes: int = 5
    jpeg_images: int = 64
    jpeg_batch_size: int = 16
    jpeg_passes: int = 3
    ratio_variant: str = "Micro-4"
    ratio_steps: int = 30
    ratio_passes: int = 3
    orchestration: bool = True
    orchestration_steps: int = 30
    orchestration_timeout_s: float = 1800.0
    fewshot_variant: str = "Micro-4"
    fewshot_train: int = 2000
    fewshot_test: int = 1000
    fewshot_dim: int = 512
    fewshot_shots: tuple[int, ...] = (1, 5, 10, 25)
    fewshot_seeds: int = 3

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA device")
    return torch.device(device)


def bench_config(device: str = "auto", **overrides: Any) -> BenchConfig:
    """The default run for ``device`` (auto: CUDA if present): GPU sweeps use larger batches and matmuls."""
    dev = resolve_device(device)
    base: dict[str, Any] = {"device": str(dev)}
    if dev.type == "cuda":
        base.update(batch_sizes=(256, 1024, 4096), paper_batch_sizes=(64, 256), matmul_size=8192,
                    inference_batch_sizes=(64, 256, 1024), max_step_s=2.0, max_call_s=1.0, cell_budget_s=3.0)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**base)


def quick_config(**overrides: Any) -> BenchConfig:
    """A run of seconds (the test's and ``--quick``'s): Nano-4 at 16 px, tiny sweeps, no orchestration."""
    values: dict[str, Any] = dict(
        variants=("Nano-4",), image_size=16, batch_sizes=(4, 8), paper=False, device="cpu", repeats=2,
        cell_budget_s=0.5, matmul_size=128, matmul_seconds=0.05, inference_batch_sizes=(1, 8),
        inference_seconds=0.05, loader_passes=2, jpeg_images=8, jpeg_batch_size=4, jpeg_passes=1,
        ratio_variant="Nano-4", ratio_steps=3, ratio_passes=1, orchestration=False, orchestration_steps=10,
        fewshot_variant="Nano-4", fewshot_train=200, fewshot_test=100, fewshot_dim=32, fewshot_shots=(1, 5),
        fewshot_seeds=2,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text table: header, a dashed rule, one line per row (cells already formatted)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _si(value: float, unit: str = "FLOP/s") -> str:
    """3 significant digits with an SI prefix: 27.4 GFLOP/s, 129 TFLOP/s."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _rate(value: float) -> str:
    """A rate for a table: thousands separated when >= 100, else 3 significant digits (a B-16 step on one core)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], repeats: int, budget_s: float, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` for up to ``repeats`` timed calls after up to ``warmup`` untimed ones.

    A warm-up call slower than 1 s ends the warm-up (one-time costs are amortised within it). Timing stops early
    once ``budget_s`` is spent and at least ``min(MIN_TIMED, repeats)`` calls are timed, or 2 when a warm-up call
    took more than ``SLOW_CALL_S``.
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


def _interleaved_medians(fns: dict[str, Callable[[], Any]], passes: int) -> dict[str, float]:
    """Median seconds of each function over ``passes`` rounds, calling them in turn within each round (after one
    untimed warm-up round), so that all of them see the same background load and their ratios hold."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, passes)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The SIMD flags that decide matmul speed (AVX2/FMA, AVX-512, bf16, AMX), as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 is a real option there: a CUDA GPU with bf16, or a CPU with AMX-BF16/AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """CPU model and flags, cores, library versions, bf16 support, GPU (if any), load average at the start."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "device": str(device),
        "bf16_fast_on_device": bf16_is_fast(device),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "torch_default_threads": torch.get_num_threads(),
        "torch_threads_used": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def _spec_peak(device: torch.device, precision: str) -> float | None:
    """The spec-sheet dense peak of a known GPU (``workers.training.throughput.GPU_PEAK_FLOPS``), else None."""
    from workers.training.throughput import GPU_PEAK_FLOPS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def _supported(variants: tuple[str, ...], image_size: int, write: Write) -> tuple[list[str], list[dict[str, str]]]:
    """Canonical names of the variants that fit ``image_size``, and the others with the reason."""
    kept, skipped = [], []
    for name in variants:
        v = get_variant(name)
        try:
            check_fits(v, image_size)
        except ValueError as error:
            skipped.append({"variant": v.name, "image_size": image_size, "reason": str(error)})
            write(f"[bench] skip {v.name} at {image_size} px: {error}")
            continue
        kept.append(v.name)
    return kept, skipped


def _cells(config: BenchConfig) -> list[tuple[str, int, tuple[int, ...]]]:
    """(variant, image size, batch sizes) of every model the run times: the default ones, then --paper's."""
    cells = [(v, config.image_size, config.batch_sizes) for v in config.variants]
    if config.paper:
        cells += [(v, 224, config.paper_batch_sizes) for v in config.paper_variants]
    return cells


# ----------------------------------------------------------------------------------------------------------------
# 1. Matmul ceiling


def bench_matmul(config: BenchConfig, device: torch.device, write: Write) -> dict:
    """FLOP/s of a square matmul in fp32 and bf16 on ``device`` at the bench's thread count."""
    from workers.training.throughput import measured_matmul_flops

    size, fast = config.matmul_size, bf16_is_fast(device)
    rows = []
    for precision in ("fp32", "bf16"):
        write(f"[bench] matmul {size}^3 {precision} on {device} ({config.threads} thread(s)) ...")
        flops = measured_matmul_flops(precision, config.threads, device, size=size, seconds=config.matmul_seconds)
        row = {"precision": precision, "flops_per_s": flops, "fast": precision == "fp32" or fast}
        peak = _spec_peak(device, precision)
        if peak:
            row["spec_peak_flops_per_s"] = peak
            row["fraction_of_spec"] = flops / peak
        rows.append(row)
    by = {r["precision"]: r["flops_per_s"] for r in rows}
    table = format_table(
        ["dtype", "matmul rate", "bf16 status", "of spec peak"],
        [[r["precision"], _si(r["flops_per_s"]), "" if r["precision"] == "fp32" else ("fast" if r["fast"] else
          "SLOW (no AMX/AVX512-BF16)"), f"{r['fraction_of_spec']:.2f}" if "fraction_of_spec" in r else ""]
         for r in rows])
    return {"size": size, "threads": config.threads, "device": str(device), "rows": rows,
            "flops_per_s": by, "bf16_over_fp32_rate": by["bf16"] / by["fp32"], "bf16_fast": fast, "table": table}


# ----------------------------------------------------------------------------------------------------------------
# 2. Training step and inference


def train_step_fn(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    num_classes: int,
    precision: str,
    device: torch.device,
    total_steps: int = 10_000,
    loss: str = "sigmoid",
    forward: Callable | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(images, labels) -> loss``: one optimiser update as ``workers.training.trainer.Trainer.train_step``
    makes it.

    The Trainer's step without mixup (off in the CPU studies): the batch to the device, one-hot targets, then the
    same ``workers.training.trainer.optimizer_update`` (schedule, autocast forward, sigmoid loss by default,
    backward, exact
    clipping, AdamW). ``forward`` replaces the model's call (a ``torch.compile``'d module); parameters and clipping
    stay on ``model``. The step counter wraps at
    ``total_steps`` so the schedule stays in range however long it is timed. tests/test_bench.py checks that it
    updates the weights exactly as the Trainer does.
    """
    forward = forward if forward is not None else model
    state = {"step": 0}

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        targets = F.one_hot(labels, num_classes).float()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        value, _ = optimizer_update(forward, model, optimizer, images, targets, state["step"] % total_steps,
                                    total_steps, optim, loss, autocast)
        state["step"] += 1
        return value

    return step


def _build(name: str, image_size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    bias = head_bias(ModelConfig(variant=name), "sigmoid", NUM_CLASSES)
    return build_model(name, image_size, NUM_CLASSES, head_bias_init=bias).to(device)


def _sweep(run_cell: Callable[[int], list[float]], batch_sizes: tuple[int, ...], max_step_s: float,
           write: Write, label: str) -> tuple[list[dict], list[int]]:
    """Time ``run_cell(batch)`` over ascending batch sizes; stop before one whose extrapolated step exceeds
    ``max_step_s`` (the first batch size always runs). Returns (cells, batch sizes left out)."""
    cells: list[dict] = []
    left_out: list[int] = []
    for batch in sorted(batch_sizes):
        if cells and cells[-1]["s_per_step"] * batch / cells[-1]["batch_size"] > max_step_s:
            left_out.append(batch)
            continue
        write(f"[bench] {label}, batch {batch} ...")
        times = run_cell(batch)
        seconds = statistics.median(times)
        cells.append({"batch_size": batch, "s_per_step": seconds, "img_per_s": batch / seconds,
                      "steps_timed": len(times)})
    return cells, left_out


def _rates(row: dict, flops_per_image: float, img_per_s: float, matmul: dict, device: torch.device,
           threads: int, precision: str) -> None:
    row["img_per_s"] = img_per_s
    if device.type == "cpu":
        row["img_per_s_per_core"] = img_per_s / threads
    row["achieved_flops_per_s"] = flops_per_image * img_per_s
    row["utilisation"] = row["achieved_flops_per_s"] / matmul["flops_per_s"][precision]
    peak = _spec_peak(device, precision)
    if peak:
        row["mfu_spec"] = row["achieved_flops_per_s"] / peak


def _train_rows(config: BenchConfig, device: torch.device, matmul: dict, name: str, image_size: int,
                batch_sizes: tuple[int, ...], write: Write) -> tuple[list[dict], list[dict]]:
    """(rows, skipped) of one model: fp32, then bf16 (the whole sweep where fast, else the smallest batch size, or
    nothing when that step would take too long), each followed by its compiled row if asked for."""
    fast = bf16_is_fast(device)
    optim = OptimConfig()  # the recipe's defaults: lr 1e-3, big_vision wd, clip 1.0
    flops = train_flops_per_image(name, image_size, NUM_CLASSES)
    model = _build(name, image_size, device)
    model.train()
    optimizer = build_optimizer(model, optim)
    params = sum(p.numel() for p in model.parameters())

    def run_cell(batch: int, precision: str, forward: Callable | None = None) -> list[float]:
        torch.manual_seed(batch)
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        step = train_step_fn(model, optimizer, optim, NUM_CLASSES, precision, device, forward=forward)

        def call() -> None:
            step(images, labels)
            _sync(device)

        return _time_calls(call, config.repeats, config.cell_budget_s)

    rows: list[dict] = []
    skipped: list[dict] = []
    fp32_at: dict[int, float] = {}
    for precision in ("fp32", "bf16"):
        sweep = batch_sizes if precision == "fp32" or fast else (min(batch_sizes),)
        if precision == "bf16" and not fast and fp32_at[sweep[0]] * SLOW_BF16_MIN_FACTOR > config.max_step_s:
            reason = (f"slow bf16 step skipped: at least {SLOW_BF16_MIN_FACTOR}x the fp32 step "
                      f"({fp32_at[sweep[0]]:.1f} s at batch {sweep[0]}) exceeds max_step_s {config.max_step_s:g}")
            write(f"[bench] {name} {image_size} px: {reason}")
            skipped.append({"variant": name, "image_size": image_size, "precision": precision, "reason": reason})
            continue
        label = f"train step {name} {image_size} px {precision}"
        cells, left_out = _sweep(lambda batch, p=precision: run_cell(batch, p), sweep, config.max_step_s, write,
                                 label)
        best = max(cells, key=lambda c: c["img_per_s"])
        row: dict[str, Any] = {
            "variant": name, "image_size": image_size, "precision": precision, "mode": "eager",
            "slow": precision == "bf16" and not fast, "params": params, "train_flops_per_image": flops,
            "best_batch_size": best["batch_size"], "ms_per_step": best["s_per_step"] * 1e3,
            "sweep": cells, "batch_sizes_left_out": left_out,
        }
        _rates(row, flops, best["img_per_s"], matmul, device, config.threads, precision)
        if precision == "fp32":
            fp32_at = {c["batch_size"]: c["s_per_step"] for c in cells}
        elif cells[0]["batch_size"] in fp32_at:
            row["time_over_fp32_same_batch"] = cells[0]["s_per_step"] / fp32_at[cells[0]["batch_size"]]
        rows.append(row)
        if config.compile and (precision == "fp32" or fast):
            write(f"[bench] {label} torch.compile, batch {best['batch_size']} ...")
            start = time.perf_counter()
            times = run_cell(best["batch_size"], precision, torch.compile(model))
            elapsed = time.perf_counter() - start
            seconds = statistics.median(times)
            compiled = {**{k: row[k] for k in ("variant", "image_size", "precision", "slow", "params",
                                               "train_flops_per_image", "best_batch_size")},
                        "mode": "compiled", "ms_per_step": seconds * 1e3, "steps_timed": len(times),
                        "compile_and_warmup_s": elapsed - sum(times),
                        "speedup_over_eager": best["s_per_step"] / seconds}
            _rates(compiled, flops, best["batch_size"] / seconds, matmul, device, config.threads, precision)
            rows.append(compiled)
    return rows, skipped


def bench_train_step(config: BenchConfig, device: torch.device, matmul: dict, write: Write) -> dict:
    """Training img/s per (variant, resolution, dtype), best over the batch sweep, with FLOP/s and utilisation.

    fp32 always; bf16 over the whole sweep where it is fast (``bf16_is_fast``), else only at the smallest batch
    size (marked slow) for its time ratio to fp32 at that batch size, and not at all where that step would take
    over ``max_step_s`` (``SLOW_BF16_MIN_FACTOR`` x the fp32 step). ``config.compile`` adds a compiled row for
    every fast dtype at that row's best eager batch size.
    """
    rows, skipped = [], []
    for name, image_size, batch_sizes in _cells(config):
        kept, skip = _supported((name,), image_size, write)
        skipped += skip
        for canonical in kept:
            more_rows, more_skipped = _train_rows(config, device, matmul, canonical, image_size, batch_sizes, write)
            rows += more_rows
            skipped += more_skipped
    per = "img/s/core" if device.type == "cpu" else "img/s"
    table = format_table(
        ["variant", "px", "dtype", "mode", "best batch", "ms/step", per, "FLOP/s", "util", "bf16/fp32 time",
         "batches (steps)"],
        [[r["variant"], str(r["image_size"]), r["precision"] + (" SLOW" if r["slow"] else ""), r["mode"],
          str(r["best_batch_size"]), f"{r['ms_per_step']:.1f}",
          _rate(r.get("img_per_s_per_core", r["img_per_s"])), _si(r["achieved_flops_per_s"]),
          f"{r['utilisation']:.2f}", f"{r['time_over_fp32_same_batch']:.2f}x" if "time_over_fp32_same_batch" in r
          else "", " ".join(f"{c['batch_size']}({c['steps_timed']})" for c in r.get("sweep", []))
          or f"compile {r.get('compile_and_warmup_s', 0):.0f} s"]
         for r in rows])
    return {"num_classes": NUM_CLASSES, "threads": config.threads, "device": str(device), "rows": rows,
            "skipped": skipped, "table": table,
            "notes": "train FLOPs = 3x forward (workers.models.registry.train_flops_per_image); util = "
                     "achieved FLOP/s / measured matmul FLOP/s of the same dtype (section matmul); bf16 SLOW rows: "
                     "one batch size only, bf16/fp32 time = step time ratio at that batch size"}


def _inference_batches(config: BenchConfig, fwd_flops: float, rate: float) -> tuple[tuple[int, ...], list[int]]:
    """Inference batch sizes whose estimated forward time (FLOPs / matmul rate) fits ``max_call_s``; the smallest
    always runs."""
    ordered = sorted(config.inference_batch_sizes)
    kept = tuple(b for b in ordered if b == ordered[0] or b * fwd_flops / rate <= config.max_call_s)
    return kept, [b for b in ordered if b not in kept]


def bench_inference(config: BenchConfig, device: torch.device, matmul: dict, write: Write) -> dict:
    """Best forward img/s (img/s/core on CPU) over the batch sweep per variant: fp32, and bf16 where it is fast."""
    from workers.training.throughput import inference_throughput

    precisions = ("fp32", "bf16") if bf16_is_fast(device) else ("fp32",)
    rows, skipped = [], []
    for name_in, image_size, _ in _cells(config):
        kept, skip = _supported((name_in,), image_size, write)
        skipped += skip
        if not kept:
            continue
        name = kept[0]
        model = _build(name, image_size, device)
        fwd = forward_flops(name, image_size, NUM_CLASSES)
        for precision in precisions:
            batches, left_out = _inference_batches(config, fwd, matmul["flops_per_s"][precision])
            write(f"[bench] inference {name} {image_size} px {precision}, batches {batches} ...")
            img_s, best_batch = inference_throughput(model, batch_sizes=batches, precision=precision, device=device,
                                                     seconds_per_batch_size=config.inference_seconds)
            row = {"variant": name, "image_size": image_size, "precision": precision, "best_batch_size": best_batch,
                   "batch_sizes": list(batches), "batch_sizes_left_out": left_out, "forward_flops_per_image": fwd}
            _rates(row, fwd, img_s, matmul, device, config.threads, precision)
            rows.append(row)
        del model
    per = "img/s/core" if device.type == "cpu" else "img/s"
    table = format_table(
        ["variant", "px", "dtype", per, "best batch", "FLOP/s", "util", "batches"],
        [[r["variant"], str(r["image_size"]), r["precision"], _rate(r.get("img_per_s_per_core", r["img_per_s"])),
          str(r["best_batch_size"]), _si(r["achieved_flops_per_s"]), f"{r['utilisation']:.2f}",
          ",".join(map(str, r["batch_sizes"]))] for r in rows])
    return {"seconds_per_batch_size": config.inference_seconds, "threads": config.threads, "device": str(device),
            "rows": rows, "skipped": skipped, "table": table}


# ----------------------------------------------------------------------------------------------------------------
# 3. Loader


def _drain(loader) -> int:
    return sum(len(labels) for _images, labels in loader)


def _synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 image: a smooth random colour field (bicubic from 6x8) plus mild per-pixel noise, so its
    JPEG has a photo's size and decode cost (pure noise would decode slower, a flat image faster)."""
    from PIL import Image

    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-12, 13, size=(height, width, 3)), 0, 255).astype(np.uint8)


def _write_jpegs(out_dir: str, count: int):
    from workers.data.writer import write_split

    rng = np.random.default_rng(0)
    samples = ((_synthetic_photo(rng, *JPEG_SHAPES[i % len(JPEG_SHAPES)]), i % NUM_CLASSES) for i in range(count))
    return write_split(samples, out_dir, "train", [str(c) for c in range(NUM_CLASSES)], image_size=JPEG_SHORTER_SIDE,
                       samples_per_shard=16, image_format="jpeg", jpeg_quality=90)


def _digits_section(config: BenchConfig, manifest, write: Write) -> dict:
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, decode_image, iter_samples, make_loader

    augment = AugmentConfig(crop="pad", pad=DIGITS_PAD)
    full, tenth = fraction_slices(manifest, 1.0), fraction_slices(manifest, 0.1)

    def reader(slices) -> Callable[[], int]:  # a new dataset per pass: a trial's first epoch (nothing cached)
        return lambda: _drain(make_loader(ShardDataset(slices, train=True, seed=0, augment=augment,
                                                       image_size=DIGITS_SIZE), config.loader_batch_size))

    # One dataset for every pass, with the trials' default memory cache, warmed by one pass first: the epochs after
    # a trial's first, which are most of them (the demo's subsets run 15 to 505 epochs).
    cached = make_loader(ShardDataset(full, train=True, seed=0, augment=augment, image_size=DIGITS_SIZE,
                                      cache_mb=CACHE_MB), config.loader_batch_size)
    _drain(cached)
    pngs = [image for _key, image, _label in iter_samples([manifest.shard_url(s) for s in manifest.shards])]
    n, n_tenth = manifest.num_samples, sum(s.num_samples for s in tenth)
    write(f"[bench] loader: digits {DIGITS_SIZE} px, {n} samples, {config.loader_passes} interleaved passes ...")
    seconds = _interleaved_medians({"reader": reader(full), "decode_only": lambda: [decode_image(p) for p in pngs],
                                    "tenth": reader(tenth), "cached": lambda: _drain(cached)}, config.loader_passes)
    return {
        "image_size": DIGITS_SIZE, "samples": n, "shards": len(manifest.shards), "crop_pad": DIGITS_PAD,
        "batch_size": config.loader_batch_size, "samples_per_s_per_process": n / seconds["reader"],
        "cached_samples_per_s_per_process": n / seconds["cached"], "cache_mb": CACHE_MB,
        "decode_only_samples_per_s": n / seconds["decode_only"],
        "reader_over_decode_only": seconds["decode_only"] / seconds["reader"],
        "fraction_0.1": {"samples": n_tenth, "shards_touched": len(tenth), "seconds": seconds["tenth"],
                         "time_ratio_over_full": seconds["tenth"] / seconds["reader"],
                         "sample_ratio_over_full": n_tenth / n},
        "seconds_full_pass": seconds["reader"],
    }


def _jpeg_section(config: BenchConfig, tmp: str, write: Write) -> dict:
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, decode_pil, iter_samples, make_loader

    write(f"[bench] loader: writing {config.jpeg_images} synthetic JPEGs ({JPEG_SHORTER_SIDE} px shorter side) ...")
    manifest = _write_jpegs(tmp, config.jpeg_images)
    slices = fraction_slices(manifest, 1.0)
    raw = [image for _key, image, _label in iter_samples([manifest.shard_url(s) for s in manifest.shards])]
    views = {"paper": (True, PAPER_AUGMENT), "inception_flip": (True, AugmentConfig(crop="inception", flip=True)),
             "eval": (False, AugmentConfig())}

    def reader(train: bool, augment: AugmentConfig) -> Callable[[], int]:
        return lambda: _drain(make_loader(ShardDataset(slices, train=train, seed=0, augment=augment,
                                                       image_size=JPEG_SIZE), config.jpeg_batch_size))

    fns: dict[str, Callable[[], Any]] = {k: reader(*v) for k, v in views.items()}
    fns["decode_only"] = lambda: [decode_pil(b) for b in raw]
    write(f"[bench] loader: {JPEG_SIZE} px JPEG views, {config.jpeg_passes} interleaved passes ...")
    seconds = _interleaved_medians(fns, config.jpeg_passes)
    n = manifest.num_samples
    rates = {k: n / s for k, s in seconds.items()}
    return {"image_size": JPEG_SIZE, "stored_shorter_side": JPEG_SHORTER_SIDE, "samples": n,
            "mean_jpeg_bytes": sum(map(len, raw)) / len(raw), "batch_size": config.jpeg_batch_size,
            "augment_paper": PAPER_AUGMENT.model_dump(mode="json", exclude_defaults=True),
            "samples_per_s_per_process": rates["paper"], "inception_flip_samples_per_s": rates["inception_flip"],
            "eval_view_samples_per_s": rates["eval"], "decode_only_samples_per_s": rates["decode_only"],
            "paper_over_inception_flip_time": seconds["paper"] / seconds["inception_flip"]}


def _ratio_section(config: BenchConfig, manifest, device: torch.device, loader_rate: float, write: Write) -> dict:
    """N steps fed by the real loader (in the training process, as ``data.loader_workers: 0``) vs N steps on one
    pre-built batch; the same model, optimiser and step, interleaved pass by pass."""
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, make_loader

    name = get_variant(config.ratio_variant).name
    model = _build(name, DIGITS_SIZE, device)
    optim = OptimConfig()
    step = train_step_fn(model, build_optimizer(model, optim), optim, NUM_CLASSES, "fp32", device)
    dataset = ShardDataset(fraction_slices(manifest, 1.0), train=True, seed=0, repeat=True,
                           augment=AugmentConfig(crop="pad", pad=DIGITS_PAD), image_size=DIGITS_SIZE,
                           cache_mb=CACHE_MB)
    batches: Iterator = iter(make_loader(dataset, config.loader_batch_size))
    fixed = next(batches)
    for _ in range(math.ceil(manifest.num_samples / config.loader_batch_size)):  # one epoch: the cache is warm
        next(batches)
    steps = config.ratio_steps

    def fed() -> None:
        for _ in range(steps):
            step(*next(batches))
        _sync(device)

    def in_memory() -> None:
        for _ in range(steps):
            step(*fixed)
        _sync(device)

    write(f"[bench] loader-fed vs in-memory: {name} {DIGITS_SIZE} px, {steps} steps x {config.ratio_passes} ...")
    seconds = _interleaved_medians({"loader": fed, "memory": in_memory}, config.ratio_passes)
    consumption = config.loader_batch_size * steps / seconds["memory"]
    return {"variant": name, "image_size": DIGITS_SIZE, "batch_size": config.loader_batch_size, "steps": steps,
            "cache_mb": CACHE_MB, "loader_fed_s": seconds["loader"], "in_memory_s": seconds["memory"],
            "ratio": seconds["loader"] / seconds["memory"],
            "predicted_ratio_serial": 1 + consumption / loader_rate,
            "step_consumption_img_per_s": consumption, "loader_samples_per_s_per_process": loader_rate,
            "loader_processes_needed": max(1, math.ceil(consumption / loader_rate))}


def bench_loader(config: BenchConfig, device: torch.device, train_rows: list[dict], write: Write) -> dict:
    """Per-process loader rates (digits 16 px, 224 px JPEG), the loader-vs-in-memory ratio, processes needed."""
    from workers.data.writer import shards_from_digits

    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        write(f"[bench] loader: writing digits shards ({DIGITS_SIZE} px) ...")
        manifest = shards_from_digits(str(Path(tmp) / "digits"), image_size=DIGITS_SIZE)["train"]
        digits = _digits_section(config, manifest, write)
        jpeg = _jpeg_section(config, str(Path(tmp) / "jpeg"), write)
        ratio = _ratio_section(config, manifest, device, digits["cached_samples_per_s_per_process"], write)
    jpeg_rate = jpeg["samples_per_s_per_process"]
    # Every timed 224 px training row (--paper): loader processes to keep its step fed with the paper's augment.
    needs = [{"variant": r["variant"], "precision": r["precision"], "mode": r["mode"], "step_img_per_s": r["img_per_s"],
              "loader_processes_needed": max(1, math.ceil(r["img_per_s"] / jpeg_rate))}
             for r in train_rows if r["image_size"] == JPEG_SIZE and not r["slow"]]
    rows = [
        [f"digits {DIGITS_SIZE} px, pad crop {DIGITS_PAD} (ShardDataset+loader)", f"{digits['samples']}",
         f"{digits['samples_per_s_per_process']:,.0f}", f"{digits['reader_over_decode_only']:.2f} of decode-only"],
        ["  PNG decode only (loop)", "", f"{digits['decode_only_samples_per_s']:,.0f}", ""],
        ["  later epochs (memory cache warm)", f"{digits['samples']}",
         f"{digits['cached_samples_per_s_per_process']:,.0f}",
         f"{digits['cached_samples_per_s_per_process'] / digits['samples_per_s_per_process']:.2f}x the first"],
        ["  read fraction 0.1", f"{digits['fraction_0.1']['samples']}",
         f"{digits['fraction_0.1']['samples'] / digits['fraction_0.1']['seconds']:,.0f}",
         f"time {digits['fraction_0.1']['time_ratio_over_full']:.3f} of full"],
        [f"JPEG {JPEG_SIZE} px, inception+flip+RandAugment(2,15)", f"{jpeg['samples']}",
         f"{jpeg_rate:,.0f}", f"{jpeg['paper_over_inception_flip_time']:.2f}x the time of no RandAugment"],
        ["  inception crop + flip only", "", f"{jpeg['inception_flip_samples_per_s']:,.0f}", ""],
        ["  eval view (resize 256, centre crop 224)", "", f"{jpeg['eval_view_samples_per_s']:,.0f}", ""],
        ["  JPEG decode only (full size)", "", f"{jpeg['decode_only_samples_per_s']:,.0f}", ""],
    ]
    ratio_rows = [[f"{ratio['variant']} {DIGITS_SIZE} px batch {ratio['batch_size']}, {ratio['steps']} steps (cached)",
                   f"{ratio['ratio']:.2f}", f"{ratio['predicted_ratio_serial']:.2f}",
                   f"{ratio['step_consumption_img_per_s']:,.0f}", f"{ratio['loader_samples_per_s_per_process']:,.0f}",
                   str(ratio["loader_processes_needed"])]]
    ratio_rows += [[f"{n['variant']} {JPEG_SIZE} px {n['precision']} {n['mode']} (paper augment)", "", "",
                    _rate(n["step_img_per_s"]), f"{jpeg_rate:,.0f}", str(n["loader_processes_needed"])]
                   for n in needs]
    table = (format_table(["loader (one process, num_workers=0)", "samples", "samples/s", "note"], rows) + "\n\n"
             + format_table(["step fed by the loader vs one in-memory batch", "ratio", "predicted", "step img/s",
                             "loader/s/proc", "procs needed"], ratio_rows))
    return {"digits": digits, "jpeg": jpeg, "in_memory_ratio": ratio, "paper_loader_needs": needs, "table": table,
            "notes": "ratio = loader-fed time / in-memory time for the same steps (<= 1.05: the loader is not the "
                     "bottleneck); predicted = 1 + step rate / loader rate (loader and step serial in one process); "
                     "procs needed = ceil(step img/s / one loader process's samples/s)"}


# ----------------------------------------------------------------------------------------------------------------
# 4. Orchestration


def orchestration_study(name: str, data: Path, steps: int) -> dict:
    """The tiny study: 2 trials (seeds) x 2 workers of Nano-4 on digits 16 px, few-shot on, as the demo is set up."""
    every = max(1, steps // 2)
    return {
        "name": name,
        "description": "mixer-study bench: orchestration overhead",
        "base": {
            "data": {"train": str(data / "train"), "val": str(data / "val"),
                     "augment": {"crop": "pad", "pad": DIGITS_PAD, "eval_crop_fraction": 1.0}},
            "model": {"variant": "Nano-4"},
            "optim": {"lr": 0.003, "warmup_steps": max(1, steps // 10)},
            "train": {"steps": steps, "batch_size": 64, "eval_every": every, "checkpoint_every": every,
                      "log_every": max(1, steps // 3)},
            "fewshot": {"train": str(data / "train"), "test": str(data / "test"), "shots": [1, 5, 10, 25],
                        "seeds": 3},
        },
        "grid": {"train.seed": [0, 1]},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    }


def bench_orchestration(config: BenchConfig, write: Write) -> dict:
    """Run the tiny study with ``mixer-study run`` in a subprocess (its own embedded Ray, so this process never
    holds one), then read the per-trial overhead and goodput back from its MLflow store."""
    import yaml

    from analysis.timeline import study_goodput
    from workers.data.writer import shards_from_digits

    name = "bench-orchestration"
    with tempfile.TemporaryDirectory(prefix="mixer-bench-orch-") as tmp:
        root = Path(tmp)
        shards_from_digits(str(root / "digits"), image_size=DIGITS_SIZE)
        study = orchestration_study(name, root / "digits", config.orchestration_steps)
        (root / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)  # an embedded Ray, as `make demo` runs
        command = [sys.executable, "-m", "pipeline.cli", "run", str(root / "study.yaml"), "--tracking-uri", uri,
                   "--storage", str(root / "runs")]
        write(f"[bench] orchestration: {len(study['grid']['train.seed'])} trials x 2 workers, Nano-4, "
              f"{config.orchestration_steps} steps, few-shot on (mixer-study run in a subprocess) ...")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=config.orchestration_timeout_s)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"orchestration study failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        cluster_cpus = float(os.cpu_count() or 1)  # an embedded Ray uses every logical CPU
        timeline, summary = study_goodput(uri, name, cluster_cpus=cluster_cpus)
    trials = timeline.to_dict(orient="records")
    result = {"study": study["grid"] | {"variant": "Nano-4", "steps": config.orchestration_steps,
                                        "workers_per_trial": 2, "cpus_per_worker": 1},
              "cluster_cpus": cluster_cpus, "subprocess_wall_s": wall,
              "outside_trials_s": wall - summary["study_wall_s"],  # Ray start/stop, Tune set-up, MLflow parent
              **summary, "trial_rows": trials}
    result["table"] = format_table(
        ["trial", "trial s", "queued s", "start-up s", "train s", "tail s", "overhead s"],
        [[t["trial"], f"{t['trial_s']:.1f}", f"{t['queued_s']:.1f}", f"{t['startup_s']:.1f}",
          f"{t['train_seconds']:.1f}", f"{t['tail_s']:.1f}", f"{t['overhead_s']:.1f}"] for t in trials]
        + [["median", "", f"{summary['median_queued_s']:.1f}", f"{summary['median_startup_s']:.1f}",
            f"{summary['median_train_s']:.1f}", f"{summary['median_tail_s']:.1f}",
            f"{summary['median_overhead_s']:.1f}"]],
    ) + (f"\nstudy wall {summary['study_wall_s']:.1f} s (first trial start to last trial end), goodput "
         f"{summary['goodput']:.3f} of {cluster_cpus:.0f} CPUs; mixer-study run took {wall:.1f} s in all")
    return result


# ----------------------------------------------------------------------------------------------------------------
# 5. Few-shot


def bench_fewshot(config: BenchConfig, device: torch.device, write: Write) -> dict:
    """``extract_features`` on the digits train split (a random-init model: speed only) and ``linear_fewshot`` per
    k on synthetic 10-class Gaussian features."""
    from analysis.features import extract_features
    from analysis.fewshot import linear_fewshot
    from workers.data.writer import shards_from_digits

    name = get_variant(config.fewshot_variant).name
    model = _build(name, DIGITS_SIZE, device)
    with tempfile.TemporaryDirectory(prefix="mixer-bench-fs-") as tmp:
        manifest = shards_from_digits(tmp, image_size=DIGITS_SIZE)["train"]
        write(f"[bench] few-shot: extract_features {name} on digits {DIGITS_SIZE} px ({manifest.num_samples}) ...")
        holder: dict[str, np.ndarray] = {}

        def extract() -> None:
            holder["x"], _ = extract_features(model, manifest.url, batch_size=256, crop_fraction=1.0)
            _sync(device)

        seconds = _interleaved_medians({"extract": extract}, 2)["extract"]
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


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def run_benchmarks(config: BenchConfig, out: str, write: Write = print) -> dict:
    """Run every section of ``config``, print their tables, write the results and machine info as JSON to ``out``.

    A failed orchestration study (a subprocess) is recorded in the JSON (``failed_sections``) rather than raised.
    """
    if config.repeats < 1 or config.threads < 1 or not config.batch_sizes or min(config.batch_sizes) < 1:
        raise ValueError(f"repeats, threads and batch sizes must be positive, got {config.repeats}, "
                         f"{config.threads}, {config.batch_sizes}")
    for name in (*config.variants, *config.paper_variants, config.ratio_variant, config.fewshot_variant):
        get_variant(name)  # unknown names fail before any timing
    device = resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    info = machine_info(device, config.threads)
    write(f"[bench] {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch_version']}, "
          f"device {device}{' (' + info['gpu_name'] + ')' if 'gpu_name' in info else ''}, fast bf16: "
          f"{info['bf16_fast_on_device']}; {config.threads} torch thread(s)")
    begin = time.perf_counter()
    sections: dict[str, Any] = {}
    try:
        torch.set_num_threads(config.threads)
        sections["matmul"] = bench_matmul(config, device, write)
        sections["train_step"] = bench_train_step(config, device, sections["matmul"], write)
        sections["inference"] = bench_inference(config, device, sections["matmul"], write)
        sections["loader"] = bench_loader(config, device, sections["train_step"]["rows"], write)
        sections["fewshot"] = bench_fewshot(config, device, write)
    finally:
        torch.set_num_threads(previous_threads)
    failed = []
    if config.orchestration:
        try:
            sections["orchestration"] = bench_orchestration(config, write)
        except (RuntimeError, subprocess.TimeoutExpired, LookupError, ValueError) as error:
            # A study on a shared machine can be killed from outside (another job's `ray stop`): keep the other
            # sections' numbers and say what happened instead of losing the run.
            write(f"[bench] orchestration FAILED: {error}")
            sections["orchestration"] = {"ran": False, "error": str(error)[-3000:]}
            failed.append("orchestration")
    else:
        sections["orchestration"] = {"ran": False, "reason": "orchestration off (--no-orchestration)"}
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {"machine": info, "config": config.as_dict(), **sections, "failed_sections": failed,
               "total_seconds": time.perf_counter() - begin}
    per = "img/s/core" if device.type == "cpu" else "img/s"
    titles = {
        "matmul": f"1. Matmul ceiling, {config.matmul_size}^3, {device}, {config.threads} thread(s)",
        "train_step": f"2a. Training step (set_lr + forward + sigmoid loss + clip + AdamW), {per} best over the batch"
                      " sweep; util = achieved / matmul FLOP/s of the same dtype",
        "inference": f"2b. Inference, {per} best over the batch sweep",
        "loader": "3. Loader (per process) and loader-vs-in-memory step ratio",
        "orchestration": "4. Orchestration: tiny study through mixer-study run (2 trials x 2 workers, Nano-4)",
        "fewshot": "5. Few-shot: feature extraction and linear solve",
    }
    for key, title in titles.items():
        if "table" not in sections[key]:
            continue
        write("")
        write(title)
        write(sections[key]["table"])
        for s in sections[key].get("skipped", []):
            write(f"  skipped {s['variant']} at {s['image_size']} px {s.get('precision', '')}: {s['reason']}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    write(f"\n[bench] done in {results['total_seconds']:.0f} s; results in {path}"
          + (f"; FAILED: {', '.join(failed)} (see the JSON)" if failed else ""))
    return results
