"""Inference throughput as the paper measures it: images/s per core, sweeping the batch size, best one reported."""

from __future__ import annotations

import time

import torch

from workers.model import MlpMixer


@torch.inference_mode()
def inference_throughput(
    model: MlpMixer,
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
