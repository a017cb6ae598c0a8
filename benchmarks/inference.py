"""Section 2b, ``inference``: forward img/s per (variant, resolution, dtype), best over a batch-size sweep.

It runs ``workers.training.throughput.inference_throughput`` (no gradients, autocast for bf16) on the models of
section 2a: fp32, and bf16 only where it is fast. Reading the table: ``img/s/core`` (``img/s`` on a GPU) at the
``best batch``; ``FLOP/s`` = forward FLOPs x img/s; ``util`` = that over the matmul ceiling of the same dtype
(section 1). ``batches`` lists the batch sizes run: those whose forward would take longer than ``max_call_s``
(estimated from the FLOPs and the measured matmul rate) are left out, and the JSON says which.
"""

from __future__ import annotations

import torch

from benchmarks import common
from workers.models.registry import forward_flops


def _inference_batches(config: common.BenchConfig, fwd_flops: float, rate: float) -> tuple[tuple[int, ...], list[int]]:
    """Inference batch sizes whose estimated forward time (FLOPs / matmul rate) fits ``max_call_s``; the smallest
    always runs."""
    ordered = sorted(config.inference_batch_sizes)
    kept = tuple(b for b in ordered if b == ordered[0] or b * fwd_flops / rate <= config.max_call_s)
    return kept, [b for b in ordered if b not in kept]


def bench_inference(config: common.BenchConfig, device: torch.device, matmul: dict, write: common.Write) -> dict:
    """Best forward img/s (img/s/core on CPU) over the batch sweep per variant: fp32, and bf16 where it is fast."""
    from workers.training.throughput import inference_throughput

    precisions = ("fp32", "bf16") if common.bf16_is_fast(device) else ("fp32",)
    rows, skipped = [], []
    for name_in, image_size, _ in common.model_cells(config):
        kept, skip = common.supported_variants((name_in,), image_size, write)
        skipped += skip
        if not kept:
            continue
        name = kept[0]
        model = common.build_bench_model(name, image_size, device)
        fwd = forward_flops(name, image_size, common.NUM_CLASSES)
        for precision in precisions:
            batches, left_out = _inference_batches(config, fwd, matmul["flops_per_s"][precision])
            write(f"[bench] inference {name} {image_size} px {precision}, batches {batches} ...")
            img_s, best_batch = inference_throughput(model, batch_sizes=batches, precision=precision, device=device,
                                                     seconds_per_batch_size=config.inference_seconds)
            row = {"variant": name, "image_size": image_size, "precision": precision, "best_batch_size": best_batch,
                   "batch_sizes": list(batches), "batch_sizes_left_out": left_out, "forward_flops_per_image": fwd}
            common.add_rates(row, fwd, img_s, matmul, device, config.threads, precision)
            rows.append(row)
        del model
    per = "img/s/core" if device.type == "cpu" else "img/s"
    table = common.format_table(
        ["variant", "px", "dtype", per, "best batch", "FLOP/s", "util", "batches"],
        [[r["variant"], str(r["image_size"]), r["precision"],
          common.format_rate(r.get("img_per_s_per_core", r["img_per_s"])), str(r["best_batch_size"]),
          common.format_si(r["achieved_flops_per_s"]), f"{r['utilisation']:.2f}",
          ",".join(map(str, r["batch_sizes"]))] for r in rows])
    return {"seconds_per_batch_size": config.inference_seconds, "threads": config.threads, "device": str(device),
            "rows": rows, "skipped": skipped, "table": table}
