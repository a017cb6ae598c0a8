"""Section 2a, ``train_step``: training img/s per (variant, resolution, dtype), best over a batch-size sweep.

The step is the one trials run (``train_step_fn`` calls ``workers.training.trainer.optimizer_update``: ``set_lr``,
autocast forward, the sigmoid loss, exact global-norm clipping, AdamW from ``build_optimizer``), on synthetic data
already on the device; any family of ``workers.models.registry``. tests/test_bench.py checks that it updates the
weights exactly as ``Trainer.train_step`` does.

Reading the table: ``img/s/core`` (``img/s`` on a GPU) and ``ms/step`` at the ``best batch``; ``FLOP/s`` = train
FLOPs (3x forward) x img/s; ``util`` = that over the matmul ceiling of the same dtype (section 1): the fraction of
what this machine's matmul can do. A ``bf16 SLOW`` row ran only the smallest batch size, and ``bf16/fp32 time`` is
its step time over fp32's at that batch size. ``batches (steps)`` lists each batch size run with the number of
timed steps; a sweep stops before a batch size whose step would take longer than ``max_step_s`` (extrapolated
from the last one). A ``compiled`` row (``--compile``) is ``torch.compile``'d at the eager row's best batch size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    NUM_CLASSES,
    BenchConfig,
    Write,
    add_rates,
    bf16_is_fast,
    build_bench_model,
    format_rate,
    format_si,
    format_table,
    model_cells,
    supported_variants,
    sync_device,
    time_calls,
)
from workers.config import OptimConfig
from workers.models.registry import train_flops_per_image
from workers.training.optim import build_optimizer
from workers.training.trainer import optimizer_update

# bf16 autocast on a CPU without AMX/AVX512-BF16 ran training steps 4.7-11x slower than fp32 (docs/benchmarks.md):
# such a cell is skipped where this many times the fp32 step would exceed max_step_s.
SLOW_BF16_MIN_FACTOR = 4


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
    backward, exact clipping, AdamW). ``forward`` replaces the model's call (a ``torch.compile``'d module);
    parameters and clipping stay on ``model``. The step counter wraps at ``total_steps`` so the schedule stays in
    range however long it is timed. tests/test_bench.py checks that it updates the weights exactly as the Trainer
    does.
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


def _train_rows(config: BenchConfig, device: torch.device, matmul: dict, name: str, image_size: int,
                batch_sizes: tuple[int, ...], write: Write) -> tuple[list[dict], list[dict]]:
    """(rows, skipped) of one model: fp32, then bf16 (the whole sweep where fast, else the smallest batch size, or
    nothing when that step would take too long), each followed by its compiled row if asked for."""
    fast = bf16_is_fast(device)
    optim = OptimConfig()  # the recipe's defaults: lr 1e-3, big_vision wd, clip 1.0
    flops = train_flops_per_image(name, image_size, NUM_CLASSES)
    model = build_bench_model(name, image_size, device)
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
            sync_device(device)

        return time_calls(call, config.repeats, config.cell_budget_s)

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
        add_rates(row, flops, best["img_per_s"], matmul, device, config.threads, precision)
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
            add_rates(compiled, flops, best["batch_size"] / seconds, matmul, device, config.threads, precision)
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
    for name, image_size, batch_sizes in model_cells(config):
        kept, skip = supported_variants((name,), image_size, write)
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
          format_rate(r.get("img_per_s_per_core", r["img_per_s"])), format_si(r["achieved_flops_per_s"]),
          f"{r['utilisation']:.2f}", f"{r['time_over_fp32_same_batch']:.2f}x" if "time_over_fp32_same_batch" in r
          else "", " ".join(f"{c['batch_size']}({c['steps_timed']})" for c in r.get("sweep", []))
          or f"compile {r.get('compile_and_warmup_s', 0):.0f} s"]
         for r in rows])
    return {"num_classes": NUM_CLASSES, "threads": config.threads, "device": str(device), "rows": rows,
            "skipped": skipped, "table": table,
            "notes": "train FLOPs = 3x forward (workers.models.registry.train_flops_per_image); util = "
                     "achieved FLOP/s / measured matmul FLOP/s of the same dtype (section matmul); bf16 SLOW rows: "
                     "one batch size only, bf16/fp32 time = step time ratio at that batch size"}
