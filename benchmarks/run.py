"""The runner behind ``mixer-study bench``: every section in turn, one plain-text table each, everything as JSON.

Sections, one module each (its docstring says how to read its table):

1. ``benchmarks.matmul``: the measured matmul ceiling per dtype, the denominator of every utilisation.
2. ``benchmarks.train_step`` and ``benchmarks.inference``: img/s (img/s/core on CPU), best over a batch-size sweep,
   with the achieved FLOP/s and the utilisation against that ceiling, of the step trials run.
3. ``benchmarks.loader``: samples/s of one loader process, and the loader-vs-in-memory step ratio.
4. ``benchmarks.orchestration`` (optional, a subprocess): a tiny real study, its per-trial overhead and goodput.
5. ``benchmarks.fewshot``: feature extraction and the linear few-shot solve.

``bench_config`` gives a device's defaults, ``quick_config`` a run of seconds; ``run_benchmarks`` runs them and
writes the JSON (the machine, the configuration, every section, what ran and what was left out).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchConfig, Write, machine_info, resolve_device
from benchmarks.fewshot import bench_fewshot
from benchmarks.inference import bench_inference
from benchmarks.loader import bench_loader
from benchmarks.matmul import bench_matmul
from benchmarks.orchestration import bench_orchestration
from benchmarks.train_step import bench_train_step
from workers.models.registry import get_variant


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
        "orchestration": "4. Orchestration: tiny study through mixer-study run (6 trials x 1 worker, Nano-4)",
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
