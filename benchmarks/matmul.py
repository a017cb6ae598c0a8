"""Section 1, ``matmul``: the measured matmul ceiling per dtype, the denominator of every utilisation in the bench.

It times a square matmul (``workers.training.throughput.measured_matmul_flops``, 1024³ on CPU, 8192³ on a GPU) in
fp32 and bf16 at the bench's thread count. Reading the table: ``matmul rate`` is the FLOP/s achieved;
``bf16 status`` says SLOW where bf16 has no fast path (a CPU without AMX/AVX512-BF16), and then bf16 rows of the
other sections are slow by design, not by a fault; ``of spec peak`` (a GPU with a known spec sheet,
``workers.training.throughput.GPU_PEAK_FLOPS``) is the measured rate over the vendor's dense peak.
"""

from __future__ import annotations

import torch

from benchmarks.common import BenchConfig, Write, bf16_is_fast, format_si, format_table, spec_peak


def bench_matmul(config: BenchConfig, device: torch.device, write: Write) -> dict:
    """FLOP/s of a square matmul in fp32 and bf16 on ``device`` at the bench's thread count."""
    from workers.training.throughput import measured_matmul_flops

    size, fast = config.matmul_size, bf16_is_fast(device)
    rows = []
    for precision in ("fp32", "bf16"):
        write(f"[bench] matmul {size}^3 {precision} on {device} ({config.threads} thread(s)) ...")
        flops = measured_matmul_flops(precision, config.threads, device, size=size, seconds=config.matmul_seconds)
        row = {"precision": precision, "flops_per_s": flops, "fast": precision == "fp32" or fast}
        peak = spec_peak(device, precision)
        if peak:
            row["spec_peak_flops_per_s"] = peak
            row["fraction_of_spec"] = flops / peak
        rows.append(row)
    by = {r["precision"]: r["flops_per_s"] for r in rows}
    table = format_table(
        ["dtype", "matmul rate", "bf16 status", "of spec peak"],
        [[r["precision"], format_si(r["flops_per_s"]), "" if r["precision"] == "fp32" else ("fast" if r["fast"] else
          "SLOW (no AMX/AVX512-BF16)"), f"{r['fraction_of_spec']:.2f}" if "fraction_of_spec" in r else ""]
         for r in rows])
    return {"size": size, "threads": config.threads, "device": str(device), "rows": rows,
            "flops_per_s": by, "bf16_over_fp32_rate": by["bf16"] / by["fp32"], "bf16_fast": fast, "table": table}
