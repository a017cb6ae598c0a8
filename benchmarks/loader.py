"""Section 3, ``loader``: samples/s of ONE loader process, and whether the loader keeps a training step fed.

The loader is the trials' own (``ShardDataset`` + ``make_loader``, ``num_workers=0``), on digits at 16 px with the
CPU studies' pad crop, and on synthetic JPEGs viewed at 224 px with the paper's augmentation (inception crop, flip,
RandAugment(2, 15)). The JPEGs (``_synthetic_photo``): a smooth random colour field (bicubic from 6 x 8 random
colours), a linear brightness gradient, six hard-edged rectangles and two lines of random colours (the edges and
flat regions a photo has), and mild per-pixel noise (+-12 levels); stored at shorter side 256 (four photo aspect
ratios), quality 90, about the size in bytes of a real photo's JPEG at that resolution. Beside the loader, the
views alone (JPEG bytes -> HxWx3 uint8, what one loader core does per image before ``to_tensor``) are timed
against a plain timm-style PIL pipeline on the same JPEGs (``benchmarks.timm_style``). Cases alternate pass by
pass (``interleaved_medians``); the JPEG cases are timed in CPU seconds of this single-threaded process, so their
rates are per core even on a host busy with other work (the digits and step cases in wall time).

Reading the first table: ``samples/s`` per process; the digits row's note is its rate over a bare PNG-decode loop,
"later epochs" is the rate with the trials' memory cache warm, "read fraction 0.1" the time of a nested 10 % subset
over the full pass; the JPEG rows break the paper's augmentation down (``pixel_ops: fast``, no RandAugment, the eval
view, decode only), then give the views without the loader beside the timm-style pipeline's (docs/benchmarks.md
"Loader at the paper's shape").
Reading the second: ``ratio`` = the time of N steps fed by the loader over N steps on one in-memory batch (<= 1.05:
the loader is not the bottleneck), ``predicted`` = 1 + step rate / loader rate (loader and step serial in one
process), ``procs needed`` = ceil(step img/s / one loader process's samples/s), also for every 224 px training row
of section 2a (``--paper``) at the JPEG rate, exact and fast.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    DIGITS_PAD,
    DIGITS_SIZE,
    NUM_CLASSES,
    BenchConfig,
    Write,
    build_bench_model,
    format_rate,
    format_table,
    interleaved_medians,
    sync_device,
)
from benchmarks.train_step import train_step_fn
from workers.config import AugmentConfig, DataConfig, OptimConfig
from workers.models.registry import get_variant
from workers.training.optim import build_optimizer

CACHE_MB = DataConfig.model_fields["cache_mb"].default  # the trials' default memory cache (workers.data.reader)
PAPER_AUGMENT = AugmentConfig(crop="inception", flip=True, randaug=(2, 15))  # big_vision mlp_mixer_i1k.py
PAPER_AUGMENT_FAST = PAPER_AUGMENT.model_copy(update={"pixel_ops": "fast"})  # as studies/paper_*.yaml run it
JPEG_SIZE = 224
JPEG_SHORTER_SIDE = 256
JPEG_SHAPES = ((256, 256), (256, 341), (341, 256), (256, 384))  # (height, width): shorter side 256, photo aspects


def _drain(loader) -> int:
    return sum(len(labels) for _images, labels in loader)


def _synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 image (module docstring): smooth colour field + gradient + hard edges + mild noise, so
    its JPEG has a photo's size and decode cost (pure noise would decode slower, a flat image faster)."""
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
        w, h = int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3))
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(2):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=3)
    gradient = np.linspace(-40, 40, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(-12, 13, size=(height, width, 3))
    return np.clip(np.asarray(image, dtype=np.float32) + gradient + noise, 0, 255).astype(np.uint8)


def _write_jpegs(out_dir: str, count: int):
    from workers.data.writer import write_split

    rng = np.random.default_rng(0)
    samples = ((_synthetic_photo(rng, *JPEG_SHAPES[i % len(JPEG_SHAPES)]), i % NUM_CLASSES) for i in range(count))
    return write_split(samples, out_dir, "train", [str(c) for c in range(NUM_CLASSES)], image_size=JPEG_SHORTER_SIDE,
                       samples_per_shard=16, image_format="jpeg", jpeg_quality=90)


def _digits_section(config: BenchConfig, manifest, write: Write) -> dict:
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, decode_image, iter_samples, make_loader

    augment = AugmentConfig(crop="pad", pad=DIGITS_PAD)
    full, tenth = fraction_slices(manifest, 1.0), fraction_slices(manifest, 0.1)

    def reader(slices) -> Callable[[], int]:  # a new dataset per pass: a trial's first epoch (nothing cached)
        return lambda: _drain(make_loader(ShardDataset(slices, train=True, seed=0, augment=augment,
                                                       image_size=DIGITS_SIZE), config.loader_batch_size))

    # One dataset for every pass, with the trials' default memory cache, warmed by one pass first: the epochs after
    # a trial's first, which are most of them (the demo's subsets run 15 to 505 epochs).
    cached = make_loader(ShardDataset(full, train=True, seed=0, augment=augment, image_size=DIGITS_SIZE,
                                      cache_mb=CACHE_MB), config.loader_batch_size)
    _drain(cached)
    pngs = [image for _key, image, _label in iter_samples([manifest.shard_url(s) for s in manifest.shards])]
    n, n_tenth = manifest.num_samples, sum(s.num_samples for s in tenth)
    write(f"[bench] loader: digits {DIGITS_SIZE} px, {n} samples, {config.loader_passes} interleaved passes ...")
    seconds = interleaved_medians({"reader": reader(full), "decode_only": lambda: [decode_image(p) for p in pngs],
                                    "tenth": reader(tenth), "cached": lambda: _drain(cached)}, config.loader_passes)
    return {
        "image_size": DIGITS_SIZE, "samples": n, "shards": len(manifest.shards), "crop_pad": DIGITS_PAD,
        "batch_size": config.loader_batch_size, "samples_per_s_per_process": n / seconds["reader"],
        "cached_samples_per_s_per_process": n / seconds["cached"], "cache_mb": CACHE_MB,
        "decode_only_samples_per_s": n / seconds["decode_only"],
        "reader_over_decode_only": seconds["decode_only"] / seconds["reader"],
        "fraction_0.1": {"samples": n_tenth, "shards_touched": len(tenth), "seconds": seconds["tenth"],
                         "time_ratio_over_full": seconds["tenth"] / seconds["reader"],
                         "sample_ratio_over_full": n_tenth / n},
        "seconds_full_pass": seconds["reader"],
    }


def _jpeg_section(config: BenchConfig, tmp: str, write: Write) -> dict:
    from benchmarks.timm_style import timm_style_eval_view, timm_style_train_view
    from workers.data.augment import eval_array, needed_shorter_side, train_view
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, decode_pil, iter_samples, make_loader

    write(f"[bench] loader: writing {config.jpeg_images} synthetic JPEGs ({JPEG_SHORTER_SIDE} px shorter side) ...")
    manifest = _write_jpegs(tmp, config.jpeg_images)
    slices = fraction_slices(manifest, 1.0)
    raw = [image for _key, image, _label in iter_samples([manifest.shard_url(s) for s in manifest.shards])]
    views = {"paper": (True, PAPER_AUGMENT), "paper_fast": (True, PAPER_AUGMENT_FAST),
             "inception_flip": (True, AugmentConfig(crop="inception", flip=True)), "eval": (False, AugmentConfig())}

    def reader(train: bool, augment: AugmentConfig) -> Callable[[], int]:
        return lambda: _drain(make_loader(ShardDataset(slices, train=train, seed=0, augment=augment,
                                                       image_size=JPEG_SIZE), config.jpeg_batch_size))

    fns: dict[str, Callable[[], Any]] = {k: reader(*v) for k, v in views.items()}
    fns["decode_only"] = lambda: [decode_pil(b) for b in raw]
    # The views alone, JPEG bytes -> uint8 array, as the loader computes them (decode at the side the view needs).
    train_side, eval_side = (needed_shorter_side(JPEG_SIZE, c, t) for t, c in (views["paper"], views["eval"]))
    fns["paper_view"] = lambda: [train_view(decode_pil(b, train_side), JPEG_SIZE, PAPER_AUGMENT, random.Random(i))
                                 for i, b in enumerate(raw)]
    fns["paper_fast_view"] = lambda: [train_view(decode_pil(b, train_side), JPEG_SIZE, PAPER_AUGMENT_FAST,
                                                 random.Random(i)) for i, b in enumerate(raw)]
    fns["eval_view_only"] = lambda: [eval_array(decode_pil(b, eval_side), JPEG_SIZE, views["eval"][1]) for b in raw]
    fns["timm_train"] = lambda: [timm_style_train_view(b, JPEG_SIZE, random.Random(i)) for i, b in enumerate(raw)]
    fns["timm_eval"] = lambda: [timm_style_eval_view(b, JPEG_SIZE) for b in raw]
    write(f"[bench] loader: {JPEG_SIZE} px JPEG views, {config.jpeg_passes} interleaved passes (CPU time) ...")
    # CPU seconds of this (single-threaded) process: a rate per core that other jobs on the host do not dilute.
    seconds = interleaved_medians(fns, config.jpeg_passes, clock=time.process_time)
    n = manifest.num_samples
    rates = {k: n / s for k, s in seconds.items()}
    return {"image_size": JPEG_SIZE, "stored_shorter_side": JPEG_SHORTER_SIDE, "samples": n,
            "mean_jpeg_bytes": sum(map(len, raw)) / len(raw), "batch_size": config.jpeg_batch_size,
            "augment_paper": PAPER_AUGMENT.model_dump(mode="json", exclude_defaults=True),
            "samples_per_s_per_process": rates["paper"], "fast_samples_per_s_per_process": rates["paper_fast"],
            "inception_flip_samples_per_s": rates["inception_flip"],
            "eval_view_samples_per_s": rates["eval"], "decode_only_samples_per_s": rates["decode_only"],
            "paper_over_inception_flip_time": seconds["paper"] / seconds["inception_flip"],
            "views_img_per_s_per_core": {"paper": rates["paper_view"], "paper_fast": rates["paper_fast_view"],
                                         "eval": rates["eval_view_only"],
                                         "timm_style_train": rates["timm_train"],
                                         "timm_style_eval": rates["timm_eval"]},
            "paper_view_over_timm_style": rates["paper_view"] / rates["timm_train"],
            "paper_fast_view_over_timm_style": rates["paper_fast_view"] / rates["timm_train"]}


def _ratio_section(config: BenchConfig, manifest, device: torch.device, loader_rate: float, write: Write) -> dict:
    """N steps fed by the real loader (in the training process, as ``data.loader_workers: 0``) vs N steps on one
    pre-built batch; the same model, optimiser and step, interleaved pass by pass."""
    from workers.data.fractions import fraction_slices
    from workers.data.reader import ShardDataset, make_loader

    name = get_variant(config.ratio_variant).name
    model = build_bench_model(name, DIGITS_SIZE, device)
    optim = OptimConfig()
    step = train_step_fn(model, build_optimizer(model, optim), optim, NUM_CLASSES, "fp32", device)
    dataset = ShardDataset(fraction_slices(manifest, 1.0), train=True, seed=0, repeat=True,
                           augment=AugmentConfig(crop="pad", pad=DIGITS_PAD), image_size=DIGITS_SIZE,
                           cache_mb=CACHE_MB)
    batches: Iterator = iter(make_loader(dataset, config.loader_batch_size))
    fixed = next(batches)
    for _ in range(math.ceil(manifest.num_samples / config.loader_batch_size)):  # one epoch: the cache is warm
        next(batches)
    steps = config.ratio_steps

    def fed() -> None:
        for _ in range(steps):
            step(*next(batches))
        sync_device(device)

    def in_memory() -> None:
        for _ in range(steps):
            step(*fixed)
        sync_device(device)

    write(f"[bench] loader-fed vs in-memory: {name} {DIGITS_SIZE} px, {steps} steps x {config.ratio_passes} ...")
    seconds = interleaved_medians({"loader": fed, "memory": in_memory}, config.ratio_passes)
    consumption = config.loader_batch_size * steps / seconds["memory"]
    return {"variant": name, "image_size": DIGITS_SIZE, "batch_size": config.loader_batch_size, "steps": steps,
            "cache_mb": CACHE_MB, "loader_fed_s": seconds["loader"], "in_memory_s": seconds["memory"],
            "ratio": seconds["loader"] / seconds["memory"],
            "predicted_ratio_serial": 1 + consumption / loader_rate,
            "step_consumption_img_per_s": consumption, "loader_samples_per_s_per_process": loader_rate,
            "loader_processes_needed": max(1, math.ceil(consumption / loader_rate))}


def bench_loader(config: BenchConfig, device: torch.device, train_rows: list[dict], write: Write) -> dict:
    """Per-process loader rates (digits 16 px, 224 px JPEG), the loader-vs-in-memory ratio, processes needed."""
    from workers.data.writer import shards_from_digits

    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as tmp:
        write(f"[bench] loader: writing digits shards ({DIGITS_SIZE} px) ...")
        manifest = shards_from_digits(str(Path(tmp) / "digits"), image_size=DIGITS_SIZE)["train"]
        digits = _digits_section(config, manifest, write)
        jpeg = _jpeg_section(config, str(Path(tmp) / "jpeg"), write)
        ratio = _ratio_section(config, manifest, device, digits["cached_samples_per_s_per_process"], write)
    jpeg_rate, fast_rate = jpeg["samples_per_s_per_process"], jpeg["fast_samples_per_s_per_process"]
    # Every timed 224 px training row (--paper): loader processes to keep its step fed with the paper's augment.
    needs = [{"variant": r["variant"], "precision": r["precision"], "mode": r["mode"], "step_img_per_s": r["img_per_s"],
              "loader_processes_needed": max(1, math.ceil(r["img_per_s"] / jpeg_rate)),
              "loader_processes_needed_fast": max(1, math.ceil(r["img_per_s"] / fast_rate))}
             for r in train_rows if r["image_size"] == JPEG_SIZE and not r["slow"]]
    rows = [
        [f"digits {DIGITS_SIZE} px, pad crop {DIGITS_PAD} (ShardDataset+loader)", f"{digits['samples']}",
         f"{digits['samples_per_s_per_process']:,.0f}", f"{digits['reader_over_decode_only']:.2f} of decode-only"],
        ["  PNG decode only (loop)", "", f"{digits['decode_only_samples_per_s']:,.0f}", ""],
        ["  later epochs (memory cache warm)", f"{digits['samples']}",
         f"{digits['cached_samples_per_s_per_process']:,.0f}",
         f"{digits['cached_samples_per_s_per_process'] / digits['samples_per_s_per_process']:.2f}x the first"],
        ["  read fraction 0.1", f"{digits['fraction_0.1']['samples']}",
         f"{digits['fraction_0.1']['samples'] / digits['fraction_0.1']['seconds']:,.0f}",
         f"time {digits['fraction_0.1']['time_ratio_over_full']:.3f} of full"],
        [f"JPEG {JPEG_SIZE} px, inception+flip+RandAugment(2,15)", f"{jpeg['samples']}",
         f"{jpeg_rate:,.0f}", f"{jpeg['paper_over_inception_flip_time']:.2f}x the time of no RandAugment"],
        ["  the same, pixel_ops: fast", "", f"{jpeg['fast_samples_per_s_per_process']:,.0f}",
         f"{jpeg['fast_samples_per_s_per_process'] / jpeg_rate:.2f}x the exact path"],
        ["  inception crop + flip only", "", f"{jpeg['inception_flip_samples_per_s']:,.0f}", ""],
        ["  eval view (resize 256, centre crop 224)", "", f"{jpeg['eval_view_samples_per_s']:,.0f}", ""],
        ["  JPEG decode only (full size)", "", f"{jpeg['decode_only_samples_per_s']:,.0f}", ""],
        ["JPEG -> 224 px uint8 view, no loader: paper train view", "",
         f"{jpeg['views_img_per_s_per_core']['paper']:,.0f}",
         f"{jpeg['paper_view_over_timm_style']:.2f}x the timm-style pipeline"],
        ["  the same, pixel_ops: fast", "", f"{jpeg['views_img_per_s_per_core']['paper_fast']:,.0f}",
         f"{jpeg['paper_fast_view_over_timm_style']:.2f}x the timm-style pipeline"],
        ["  timm-style PIL: RRC + flip + rand-m15-n2 (benchmarks.timm_style)", "",
         f"{jpeg['views_img_per_s_per_core']['timm_style_train']:,.0f}", ""],
        ["  eval view (resize 256, centre crop 224)", "", f"{jpeg['views_img_per_s_per_core']['eval']:,.0f}", ""],
        ["  timm-style eval (bicubic resize 256, centre crop 224)", "",
         f"{jpeg['views_img_per_s_per_core']['timm_style_eval']:,.0f}", ""],
    ]
    ratio_rows = [[f"{ratio['variant']} {DIGITS_SIZE} px batch {ratio['batch_size']}, {ratio['steps']} steps (cached)",
                   f"{ratio['ratio']:.2f}", f"{ratio['predicted_ratio_serial']:.2f}",
                   f"{ratio['step_consumption_img_per_s']:,.0f}", f"{ratio['loader_samples_per_s_per_process']:,.0f}",
                   str(ratio["loader_processes_needed"])]]
    ratio_rows += [[f"{n['variant']} {JPEG_SIZE} px {n['precision']} {n['mode']} (paper augment{label})", "", "",
                    format_rate(n["step_img_per_s"]), f"{rate:,.0f}", str(n[key])]
                   for n in needs
                   for label, rate, key in (("", jpeg_rate, "loader_processes_needed"),
                                            (", fast", fast_rate, "loader_processes_needed_fast"))]
    table = (format_table(["loader (one process, num_workers=0)", "samples", "samples/s", "note"], rows) + "\n\n"
             + format_table(["step fed by the loader vs one in-memory batch", "ratio", "predicted", "step img/s",
                             "loader/s/proc", "procs needed"], ratio_rows))
    return {"digits": digits, "jpeg": jpeg, "in_memory_ratio": ratio, "paper_loader_needs": needs, "table": table,
            "notes": "ratio = loader-fed time / in-memory time for the same steps (<= 1.05: the loader is not the "
                     "bottleneck); predicted = 1 + step rate / loader rate (loader and step serial in one process); "
                     "procs needed = ceil(step img/s / one loader process's samples/s)"}
