"""How a worker runs its step fast: bf16 autocast only where the hardware makes it fast, ``torch.compile`` only
where it pays for its compile time.

bf16: measured on this project's 2-core CI machine (AMD EPYC, AVX2, no AMX/AVX512-BF16), a bf16 1024x1024 matmul
runs at 0.7 GFLOP/s against 58 GFLOP/s in fp32, and a Micro-4 training step is ~5-10x slower under bf16 autocast.
CPUs with AMX-BF16 or AVX512-BF16 (and CUDA GPUs with bf16) run it faster than fp32. So ``auto`` asks the hardware.

compile: inductor fuses the LayerNorms, GELUs, bias and residual additions around the matmuls. On an H100 that made
bf16 training steps 1.5-1.75x faster for a 20-40 s compile; on the 2-core AVX2 CPU the compiled S-32 and B-16 steps
were 1-3 % slower than eager, after a 60-70 s compile (docs/benchmarks.md "Against timm"). So ``auto`` compiles on
CUDA only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn


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


def resolve_compile(requested: str | bool, device: torch.device) -> bool:
    """``auto`` -> compile on a CUDA device, not on CPU (see the module docstring); ``True``/``False`` as given."""
    return device.type == "cuda" if requested == "auto" else bool(requested)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` (inductor) that falls back to eager where it cannot compile (no C++ compiler, an
    unsupported op): dynamo's ``suppress_errors`` runs the failing frame eagerly and logs why, instead of failing the
    trial. The compiled module shares ``model``'s parameters; compilation happens at the first call."""
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)
