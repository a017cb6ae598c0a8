"""Which float format a worker trains in: bf16 autocast only where the hardware makes it fast.

Measured on this project's 2-core CI machine (AMD EPYC, AVX2, no AMX/AVX512-BF16): a bf16 1024x1024 matmul runs
at 0.7 GFLOP/s against 58 GFLOP/s in fp32, and a Micro-4 training step is ~5-10x slower under bf16 autocast.
CPUs with AMX-BF16 or AVX512-BF16 (and CUDA GPUs with bf16) run it faster than fp32. So ``auto`` asks the hardware.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True if the CPU advertises AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a GPU with bf16 support or a CPU with AMX/AVX512-BF16, else ``fp32``."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"
