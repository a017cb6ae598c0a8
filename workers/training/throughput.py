"""Inference throughput as the paper measures it (images/s per core, sweeping the batch size, best one reported),
and the device peak that ``perf/mfu`` divides by."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from workers.models.registry import Model


@torch.inference_mode()
def inference_throughput(
    model: Model,
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128),
    seconds_per_batch_size: float = 0.5,
    precision: str = "bf16",
    device: torch.device | None = None,
) -> tuple[float, int]:
    """Best forward images/s over ``batch_sizes`` and the batch size that reached it.

    Each batch size gets one warm-up call, then as many timed calls as fit in ``seconds_per_batch_size``.
    Divide by the number of cores (``torch.get_num_threads()`` on CPU) for the paper's img/s/core.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    best = (0.0, batch_sizes[0])
    for batch_size in batch_sizes:
        images = torch.randn(batch_size, 3, model.image_size, model.image_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(images)  # warm-up: allocator, kernels, autocast caches
            calls, start = 0, time.perf_counter()
            while True:
                model(images)
                calls += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds_per_batch_size:
                    break
        best = max(best, (calls * batch_size / elapsed, batch_size))
    model.train(was_training)
    return best


# Dense peak FLOP/s from the vendors' spec sheets (no sparsity), by a substring of torch.cuda.get_device_name().
# bf16 uses the tensor cores; fp32 is the non-tensor-core rate (torch keeps fp32 matmuls in fp32 by default).
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},  # SXM; the PCIe card is lower (756e12 / 51e12)
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
}
MATMUL_SIZE = 1024


def measured_matmul_flops(precision: str, threads: int, device: torch.device | None = None,
                          size: int = MATMUL_SIZE, seconds: float = 0.3) -> float:
    """FLOP/s of a square ``size`` matmul on ``device`` (CPU: with ``threads`` threads) in the training dtype: the
    ceiling a Mixer step (nothing but matmuls, plus O(S·C) element-wise work) can approach there."""
    device = device or torch.device("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        a @ b  # warm-up
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
            a @ b
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return 2.0 * size**3 * calls / elapsed
    finally:
        torch.set_num_threads(previous)


def peak_flops(device: torch.device, precision: str, threads: int) -> float:
    """The per-device peak for MFU: the spec sheet for known GPUs, else a measured matmul rate (CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks["bf16" if precision == "bf16" else "fp32"]
    return measured_matmul_flops(precision, threads, device)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (``platform.processor()`` elsewhere), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_kind(device: torch.device) -> str:
    """What a throughput measured on ``device`` is a property of: ``cpu:<CPU model>`` or ``cuda:<GPU name>``.

    Trials tag it (``mixer.device_kind``) and ``mixer-study bench`` records the same parts, so the compute ledger
    (analysis.ledger) calibrates a plan only from measurements on the same kind of device.

    Args:
        device: a CPU or CUDA device.
    """
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()}"
