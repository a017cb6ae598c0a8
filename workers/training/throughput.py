"""Inference throughput as the paper measures it (images/s per core, sweeping the batch size, best one reported),
repeated until it is stable (the figure the throughput table holds: ``pipeline.throughput_table``), that table read
back by a trial, and the device peak that ``perf/mfu`` divides by."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.models.registry import Model, build_model, get_variant
from workers.names import (
    DEVICE_KIND_TAG,
    PERF_BEST_BATCH_SIZE,
    PERF_IMG_PER_S_PER_CORE,
    PERF_IMG_PER_S_PER_CORE_MAX,
    PERF_IMG_PER_S_PER_CORE_MIN,
    PERF_IMG_PER_S_PER_CORE_SPREAD,
    PERF_THROUGHPUT_REPETITIONS,
    PERF_THROUGHPUT_RUN_TAG,
    PERF_THROUGHPUT_SOURCE_TAG,
    PERF_THROUGHPUT_STABLE,
    ROLE_TAG,
    ROLE_THROUGHPUT,
    THROUGHPUT_EXPERIMENT,
    THROUGHPUT_FROM_TABLE,
    THROUGHPUT_FROM_TRIAL,
    THROUGHPUT_IMAGE_SIZE_TAG,
    THROUGHPUT_NUM_CLASSES_TAG,
    THROUGHPUT_PRECISION_TAG,
    THROUGHPUT_THREADS_TAG,
    THROUGHPUT_VARIANT_TAG,
)
from workers.training.precision import resolve_precision

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


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


@dataclasses.dataclass(frozen=True)
class ThroughputKey:
    """What an inference throughput is a property of besides the device kind (:func:`device_kind`): one row of the
    throughput table (``pipeline.throughput_table``). The table's measurement and a trial's worker spell it alike."""

    variant: str      # canonical name, as the built model's variant gives it ("Nano-4", "ViT-Micro/4")
    image_size: int
    num_classes: int  # the head's width
    precision: str    # resolved: "bf16" or "fp32" (workers.training.precision)
    threads: int      # the CPU threads of one trial worker (its cores); 0 on a GPU, which counts as one device

    @classmethod
    def of_model(cls, model: Model, precision: str, device: torch.device, cores: int) -> ThroughputKey:
        """The key of ``model`` run in ``precision`` on ``device`` by a worker with ``cores`` cores.

        Args:
            model: a built model (its variant, image size and head).
            precision: the resolved precision.
            device: where it runs.
            cores: the worker's CPU cores (threads).
        """
        return cls(model.variant.name, model.image_size, model.num_classes, precision,
                   cores if device.type == "cpu" else 0)

    def tags(self, kind: str) -> dict[str, str]:
        """The MLflow tags of this key's table run measured on device kind ``kind`` (what :func:`find_tabled` matches).

        Args:
            kind: :func:`device_kind` of the device it was measured on.
        """
        return {ROLE_TAG: ROLE_THROUGHPUT, DEVICE_KIND_TAG: kind, THROUGHPUT_VARIANT_TAG: self.variant,
                THROUGHPUT_IMAGE_SIZE_TAG: str(self.image_size), THROUGHPUT_NUM_CLASSES_TAG: str(self.num_classes),
                THROUGHPUT_PRECISION_TAG: self.precision, THROUGHPUT_THREADS_TAG: str(self.threads)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ThroughputKey:
        """The key a table run's tags (:meth:`tags`) name.

        Args:
            tags: the run's tags.
        """
        return cls(tags[THROUGHPUT_VARIANT_TAG], int(tags[THROUGHPUT_IMAGE_SIZE_TAG]),
                   int(tags[THROUGHPUT_NUM_CLASSES_TAG]), tags[THROUGHPUT_PRECISION_TAG],
                   int(tags[THROUGHPUT_THREADS_TAG]))

    def label(self) -> str:
        """Short and readable: the table run's name and the driver's progress line."""
        where = f"{self.threads} thread{'s' * (self.threads != 1)}" if self.threads else "1 GPU"
        return f"{self.variant} {self.image_size}px {self.num_classes}cls {self.precision} {where}"


@dataclasses.dataclass(frozen=True)
class StableThroughput:
    """Inference img/s per core (per GPU on a GPU) repeated until stable: the median of the last repetitions (the
    window the stopping rule judged) and their range, the batch size that gave the median, how many repetitions
    were run in all (earlier ones are the warm-up of clocks and caches), and whether the window met the tolerance."""

    img_per_s_per_core: float
    low: float
    high: float
    best_batch_size: int
    repetitions: int
    stable: bool

    @property
    def spread(self) -> float:
        """(high - low) / median over the window: 0.03 means the repetitions the figure rests on lie within 3 %."""
        return (self.high - self.low) / self.img_per_s_per_core

    def metrics(self) -> dict[str, float]:
        """The table run's metrics (``perf/img_per_s_per_core`` and its spread, range, repetitions, stability)."""
        return {PERF_IMG_PER_S_PER_CORE: self.img_per_s_per_core, PERF_BEST_BATCH_SIZE: self.best_batch_size,
                PERF_IMG_PER_S_PER_CORE_SPREAD: self.spread, PERF_IMG_PER_S_PER_CORE_MIN: self.low,
                PERF_IMG_PER_S_PER_CORE_MAX: self.high, PERF_THROUGHPUT_REPETITIONS: self.repetitions,
                PERF_THROUGHPUT_STABLE: float(self.stable)}


def measure_until_stable(model: Model, cores: int, precision: str, device: torch.device, *, window: int = 3,
                         tolerance: float = 0.05, max_repetitions: int = 8, max_seconds: float = 60.0,
                         batch_sizes: tuple[int, ...] = (1, 8, 32, 128),
                         seconds_per_batch_size: float = 0.25) -> StableThroughput:
    """Repeat :func:`inference_throughput` until the last ``window`` repetitions lie within ``tolerance`` of their
    median (relative range), or ``max_repetitions`` ran, or ``max_seconds`` passed; the median of that window.

    Args:
        model: the model to time (eval mode while timed).
        cores: CPU threads to run with (the figure is per core); on a GPU the figure is per device.
        precision: "bf16" (autocast) or "fp32".
        device: where ``model`` is.
        window: how many of the latest repetitions must agree.
        tolerance: the largest relative range (max - min) / median the window may have.
        max_repetitions: stop after this many repetitions even if not stable (at least ``window``).
        max_seconds: stop after this long even if not stable.
        batch_sizes: the batch-size sweep of each repetition.
        seconds_per_batch_size: timed seconds per batch size and repetition.
    """
    per_device = cores if device.type == "cpu" else 1
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cores)
    rates: list[tuple[float, int]] = []
    start = time.perf_counter()
    try:
        while True:
            best, batch = inference_throughput(model, batch_sizes, seconds_per_batch_size, precision, device)
            rates.append((best / per_device, batch))
            values = [rate for rate, _ in rates[-window:]]
            median = statistics.median(values)
            stable = len(values) == window and max(values) - min(values) <= tolerance * median
            if stable or len(rates) >= max(max_repetitions, window) or time.perf_counter() - start >= max_seconds:
                break
    finally:
        torch.set_num_threads(previous)
    # The batch size of the repetition nearest the median (the sweep's winner can differ between repetitions).
    batch = min(rates[-window:], key=lambda rb: abs(rb[0] - median))[1]
    return StableThroughput(median, min(values), max(values), batch, len(rates), stable)


def measure_table_rows(requests: list[tuple[str, int, int, str]], known: set[tuple[str, ThroughputKey]], cores: int,
                       gpu: bool, **settings: Any) -> tuple[str, list[tuple[ThroughputKey, StableThroughput]]]:
    """What the throughput table's Ray task runs on its reserved cores (or GPU): the stable throughput of each
    requested model whose key this device kind has not measured yet. Returns (device kind, [(key, throughput)]).

    Args:
        requests: (variant, image size, classes, precision as the recipe asks: "auto" resolves here) per model.
        known: (device kind, key) pairs the table already holds: skipped.
        cores: the CPU threads of one trial worker.
        gpu: measure on this task's GPU instead of the CPU.
        **settings: :func:`measure_until_stable`'s keywords (window, tolerance, max_repetitions, ...).
    """
    device = torch.device("cuda") if gpu else torch.device("cpu")
    kind = device_kind(device)
    rows: list[tuple[ThroughputKey, StableThroughput]] = []
    for variant, image_size, num_classes, precision in requests:
        resolved = resolve_precision(precision, device)
        key = ThroughputKey(get_variant(variant).name, image_size, num_classes, resolved, cores if not gpu else 0)
        if (kind, key) in known or any(key == done for done, _ in rows):
            continue
        torch.manual_seed(0)  # the weights do not change the time, but the same model every time costs nothing
        model = build_model(variant, image_size, num_classes).to(device)
        rows.append((key, measure_until_stable(model, cores, resolved, device, **settings)))
    return kind, rows


@dataclasses.dataclass(frozen=True)
class TabledThroughput:
    """A throughput table entry as a trial logs it: the stable figure, its spread and the table run it came from."""

    img_per_s_per_core: float
    spread: float
    best_batch_size: int
    run_id: str

    def metrics(self) -> dict[str, float]:
        """The trial's metrics: the names an in-trial measurement logs, plus the spread."""
        return {PERF_IMG_PER_S_PER_CORE: self.img_per_s_per_core, PERF_BEST_BATCH_SIZE: self.best_batch_size,
                PERF_IMG_PER_S_PER_CORE_SPREAD: self.spread}


def find_tabled(client: MlflowClient, key: ThroughputKey, kind: str) -> TabledThroughput | None:
    """The latest finished table run of ``key`` measured on device kind ``kind``, or None.

    Args:
        client: a client of the tracking store the table lives in (experiment ``THROUGHPUT_EXPERIMENT``).
        key: what was measured.
        kind: :func:`device_kind` of the device it must have been measured on.
    """
    from workers.training.mlflow_logger import tag_filter  # MLflow only where the table is read

    experiment = client.get_experiment_by_name(THROUGHPUT_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], tag_filter(key.tags(kind)) + " and attributes.status = "
                              "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or PERF_IMG_PER_S_PER_CORE not in runs[0].data.metrics:
        return None
    metrics = runs[0].data.metrics
    return TabledThroughput(metrics[PERF_IMG_PER_S_PER_CORE], metrics.get(PERF_IMG_PER_S_PER_CORE_SPREAD, 0.0),
                            int(metrics.get(PERF_BEST_BATCH_SIZE, 0)), runs[0].info.run_id)



def trial_throughput(model: Model, precision: str, device: torch.device, cores: int,
                     tracking_uri: str) -> tuple[dict[str, float], dict[str, str]]:
    """The inference throughput a trial logs, as (metrics, tags): the throughput table's entry for the trial's key
    and device kind (``pipeline.throughput_table``), else one :func:`inference_throughput` here and now (a one-off
    run, a key the table lacks, a store that does not answer), its cores shared with whatever else runs.

    Args:
        model: the trial's trained model (its variant, image size, head).
        precision: the resolved precision it trained in.
        device: where it is.
        cores: the worker's CPU cores.
        tracking_uri: the tracking store that holds the table.
    """
    from mlflow.tracking import MlflowClient  # only rank 0 talks to MLflow (and pays its import)

    kind = device_kind(device)
    try:
        tabled = find_tabled(MlflowClient(tracking_uri), ThroughputKey.of_model(model, precision, device, cores), kind)
    except Exception:  # noqa: BLE001 - the store is down: the figure measured here is better than none
        tabled = None
    if tabled is not None:
        return tabled.metrics(), {PERF_THROUGHPUT_SOURCE_TAG: THROUGHPUT_FROM_TABLE,
                                  PERF_THROUGHPUT_RUN_TAG: tabled.run_id}
    best, batch = inference_throughput(model, precision=precision, device=device)
    return ({PERF_IMG_PER_S_PER_CORE: best / (cores if device.type == "cpu" else 1), PERF_BEST_BATCH_SIZE: batch},
            {PERF_THROUGHPUT_SOURCE_TAG: THROUGHPUT_FROM_TRIAL})


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
