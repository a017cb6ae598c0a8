"""What every benchmark section shares: the run's configuration, timing, machine description and table formatting.

Timing: torch timings on CPU run with ``torch.set_num_threads(threads)`` (1 by default, so numbers are per core).
The machine may be shared with other jobs, so absolute times are noisy: compare the RATIOS measured within one run
(utilisation, bf16/fp32, loader/in-memory). ``interleaved_medians`` alternates its cases pass by pass so that all
of them see the same background load; ``time_calls`` runs ``repeats`` timed calls, or fewer once ``cell_budget_s``
is spent (at least 3, or 2 when a call takes over 3 s).

Tables are plain text, right-aligned (``format_table``); rates have 3 significant digits with an SI prefix
(``format_si``), or thousands separators from 100 up (``format_rate``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.config import ModelConfig, head_bias
from workers.models.registry import build_model, check_fits, get_variant
from workers.training.precision import cpu_has_fast_bf16
from workers.training.throughput import cpu_model

NUM_CLASSES = 10  # as the digits shards the CPU studies train on
MIN_TIMED = 3
SLOW_CALL_S = 3.0
DIGITS_SIZE = 16  # the loader and orchestration rows read digits at 16 px (the demo did before the generated corpus)
DIGITS_PAD = 1  # the crop those rows use (the digits-era demo recipe, kept so the rows compare across revisions)

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
    # > 0: each trial of the orchestration study also fine-tunes (3 lrs x this many steps, as model_scale.yaml does)
    orchestration_finetune_steps: int = 0
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
    """``auto`` -> CUDA if present, else CPU; a CUDA device torch cannot see is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA device")
    return torch.device(device)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text table: header, a dashed rule, one line per row (cells already formatted)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def format_si(value: float, unit: str = "FLOP/s") -> str:
    """3 significant digits with an SI prefix: 27.4 GFLOP/s, 129 TFLOP/s."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_rate(value: float) -> str:
    """A rate for a table: thousands separated when >= 100, else 3 significant digits (a B-16 step on one core)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def sync_device(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer around a call measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, budget_s: float, warmup: int = 2) -> list[float]:
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


def interleaved_medians(fns: dict[str, Callable[[], Any]], passes: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function over ``passes`` rounds, calling them in turn within each round (after one
    untimed warm-up round), so that all of them see the same background load and their ratios hold. ``clock``:
    wall time by default; ``time.process_time`` gives this process's CPU seconds (per-core rates on a busy host)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, passes)):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
        "cpu_model": cpu_model(),  # with gpu_name: the device kind (analysis.ledger)
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


def spec_peak(device: torch.device, precision: str) -> float | None:
    """The spec-sheet dense peak of a known GPU (``workers.training.throughput.GPU_PEAK_FLOPS``), else None."""
    from workers.training.throughput import GPU_PEAK_FLOPS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def supported_variants(
    variants: tuple[str, ...], image_size: int, write: Write
) -> tuple[list[str], list[dict[str, str]]]:
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


def model_cells(config: BenchConfig) -> list[tuple[str, int, tuple[int, ...]]]:
    """(variant, image size, batch sizes) of every model the run times: the default ones, then --paper's."""
    cells = [(v, config.image_size, config.batch_sizes) for v in config.variants]
    if config.paper:
        cells += [(v, 224, config.paper_batch_sizes) for v in config.paper_variants]
    return cells


def build_bench_model(name: str, image_size: int, device: torch.device) -> torch.nn.Module:
    """The model every section times, built as a trial builds it (seed 0, the sigmoid loss's head bias).

    Args:
        name: a variant of any family in ``workers.models.registry``.
        image_size: input resolution in pixels.
        device: where the model goes.
    """
    torch.manual_seed(0)
    bias = head_bias(ModelConfig(variant=name), "sigmoid", NUM_CLASSES)
    return build_model(name, image_size, NUM_CLASSES, head_bias_init=bias).to(device)


def add_rates(row: dict, flops_per_image: float, img_per_s: float, matmul: dict, device: torch.device,
              threads: int, precision: str) -> None:
    """Add img/s (and img/s/core on CPU), achieved FLOP/s, utilisation and, on a known GPU, MFU to a result row.

    Args:
        row: the section's result row, updated in place.
        flops_per_image: training or forward FLOPs of one image.
        img_per_s: the measured rate.
        matmul: the matmul section's result (its ``flops_per_s`` per dtype is the utilisation's denominator).
        device: where it ran.
        threads: torch threads on CPU (img/s/core = img/s / threads).
        precision: ``fp32`` or ``bf16``.
    """
    row["img_per_s"] = img_per_s
    if device.type == "cpu":
        row["img_per_s_per_core"] = img_per_s / threads
    row["achieved_flops_per_s"] = flops_per_image * img_per_s
    row["utilisation"] = row["achieved_flops_per_s"] / matmul["flops_per_s"][precision]
    peak = spec_peak(device, precision)
    if peak:
        row["mfu_spec"] = row["achieved_flops_per_s"] / peak
