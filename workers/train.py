"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every DDP worker.

One call of :func:`train_loop_per_worker` is one worker of one trial. It trains for a fixed number of steps
(the data-fraction study matches steps, not epochs, across subsets), validates every ``eval_every`` steps, and
reports a checkpoint every ``checkpoint_every`` steps. Ray keeps the best checkpoints by ``val/acc`` (early
stopping, as the paper does it) plus the latest one, from which a restarted worker group resumes.

Kept thin on purpose: the model comes from ``workers.model``, the data from ``workers.data``, MLflow from
``workers.track``; this module only wires them together and does the distributed bookkeeping.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from workers.config import OptimConfig, TrialConfig
from workers.data import ShardDataset, fraction_slices, load_manifest, make_loader, subset_size
from workers.model import MlpMixer, kernel_and_other_params, train_flops_per_image
from workers.precision import resolve_precision
from workers.throughput import inference_throughput

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.json"


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    return optim.lr * max(0.0, (total_steps - step) / decay_steps)


def load_model_from_checkpoint(checkpoint_dir: str | Path) -> MlpMixer:
    """Rebuild the trained model from a checkpoint folder written by this loop (no optimizer state)."""
    checkpoint_dir = Path(checkpoint_dir)
    spec = json.loads((checkpoint_dir / MODEL_FILE).read_text())
    model = MlpMixer(spec["variant"], image_size=spec["image_size"], num_classes=spec["num_classes"])
    state = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


def _infinite(loader) -> Iterator:
    while True:
        yield from loader


def _evaluate(model: MlpMixer, loader, device: torch.device, autocast: torch.autocast) -> tuple[float, float]:
    """Mean loss and top-1 over the whole split, summed across ranks (each rank holds a disjoint part)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with autocast:
                logits, _ = model(images)
            logits = logits.float()
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (logits.argmax(-1) == labels).sum()
            totals[2] += labels.numel()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"trial": TrialConfig dict, "mlflow": {"tracking_uri", "run_id"} | None,
    "cpus_per_worker": int, "measure_throughput": bool}."""
    trial = TrialConfig.model_validate(config["trial"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cores = max(1, int(config.get("cpus_per_worker", 1)))
    if device.type == "cpu":
        torch.set_num_threads(cores)
    tr = trial.train
    if tr.batch_size % world_size:
        raise ValueError(f"train.batch_size {tr.batch_size} is not divisible by the {world_size} workers")

    train_manifest, val_manifest = load_manifest(trial.data.train), load_manifest(trial.data.val)
    model = MlpMixer(
        trial.model.variant,
        image_size=train_manifest.image_size,
        num_classes=train_manifest.num_classes,
        stoch_depth=trial.model.stoch_depth,
        dropout=trial.model.dropout,
        head_bias_init=trial.model.head_bias_init,
    )

    # Resume: Ray hands every worker the latest reported checkpoint of this run (or None on a fresh start).
    step, progress, rng_state = 0, {"wall_seconds": 0.0, "cpu_seconds": 0.0, "best_val_acc": -1.0}, None
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        step, progress, rng_state = state["step"], state["progress"], state["rng"]
        log.info("rank %d resumes from step %d", rank, step)
    torch.manual_seed(tr.seed * 1000 + rank + step)
    if rng_state is not None and rank == 0:
        torch.set_rng_state(rng_state)

    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) and device placement
    module: MlpMixer = model.module if hasattr(model, "module") else model
    kernels, others = kernel_and_other_params(module)
    optimizer = torch.optim.AdamW(
        [{"params": kernels, "weight_decay": trial.optim.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=trial.optim.lr,
        betas=(trial.optim.b1, trial.optim.b2),
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    del state

    # Data: a fresh seed per (seed, step) so a resumed run does not replay the first epochs' order.
    train_slices = fraction_slices(train_manifest, trial.data.fraction)
    train_images = subset_size(train_manifest, trial.data.fraction)
    train_data = ShardDataset(
        train_slices, train=True, rank=rank, world_size=world_size, seed=tr.seed * 1_000_003 + step, repeat=True,
        shuffle_buffer=trial.data.shuffle_buffer, crop_pad=trial.data.crop_pad, flip=trial.data.flip,
    )
    val_data = ShardDataset(fraction_slices(val_manifest, 1.0), train=False, rank=rank, world_size=world_size)
    per_rank_batch = tr.batch_size // world_size
    train_batches = _infinite(make_loader(train_data, per_rank_batch, trial.data.loader_workers))
    val_loader = make_loader(val_data, per_rank_batch, trial.data.loader_workers)

    tracker = None
    if rank == 0 and config.get("mlflow"):
        from workers.track import RunLogger  # only rank 0 talks to MLflow (and pays its import)

        tracker = RunLogger(**config["mlflow"])
    precision = resolve_precision(tr.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if tracker:
        tracker.set_tag("train.precision_resolved", precision)
    flops_per_image = train_flops_per_image(module.variant, module.image_size, module.num_classes)
    params = list(module.parameters())

    segment_wall, segment_cpu = time.perf_counter(), time.process_time()
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    model.train()
    while step < tr.steps:
        images, labels = next(train_batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = lr_at(step, tr.steps, trial.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            logits, _ = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, trial.optim.grad_clip)
        optimizer.step()
        step += 1
        window_loss += loss.item()
        window_steps += 1

        if tracker and (step % tr.log_every == 0 or step == tr.steps):
            elapsed = time.perf_counter() - window_start
            tracker.log(
                {
                    "train/loss": window_loss / window_steps,
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "perf/train_img_per_s": window_steps * tr.batch_size / elapsed,
                },
                step,
            )
        if step % tr.log_every == 0:
            train_loss = window_loss / window_steps
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

        if step % tr.eval_every and step != tr.steps:
            continue
        val_loss, val_acc = _evaluate(module, val_loader, device, autocast)
        wall = progress["wall_seconds"] + time.perf_counter() - segment_wall
        images_seen = step * tr.batch_size
        metrics: dict[str, float] = {
            "step": step,
            "train/loss": window_loss / window_steps if window_steps else train_loss,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "images_seen": images_seen,
            "epochs": images_seen / train_images,
            "compute/wall_seconds": wall,
        }
        if val_acc > progress["best_val_acc"]:
            progress.update(best_val_acc=val_acc, best_step=step)
        if step == tr.steps:
            metrics.update(_compute_metrics(progress, segment_cpu, wall, world_size, cores, device, tr.steps,
                                            tr.batch_size, train_images, flops_per_image))
        if tracker:
            # train/loss is already on the per-step curve above; "step" is MLflow's x axis.
            tracker.log({k: v for k, v in metrics.items() if k not in ("step", "train/loss")}, step)
            tracker.flush()
        progress_now = {**progress, "wall_seconds": wall,
                        "cpu_seconds": progress["cpu_seconds"] + time.process_time() - segment_cpu}
        if step % tr.checkpoint_every == 0 or step == tr.steps:
            _report_with_checkpoint(metrics, module, optimizer, step, progress_now, rank)
        else:
            ray.train.report(metrics)

    if tracker and config.get("measure_throughput", True):
        # Inference throughput (paper Fig. 3 right): rank 0 only, after training, with this worker's cores.
        best, batch = inference_throughput(module, precision=precision, device=device)
        per_core = best / (cores if device.type == "cpu" else 1)
        tracker.log({"perf/img_per_s_per_core": per_core, "perf/best_batch_size": batch}, tr.steps)
        tracker.flush()


def _compute_metrics(progress, segment_cpu, wall, world_size, cores, device, steps, batch_size, train_images,
                     flops_per_image) -> dict[str, float]:
    """Compute accounting of the whole trial (all resumed segments together)."""
    cpu = torch.tensor([time.process_time() - segment_cpu], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(cpu)  # measured CPU seconds summed over the workers of this segment
    images_seen = steps * batch_size
    allocated = world_size * (cores if device.type == "cpu" else 1)
    return {
        "compute/train_flops": float(flops_per_image) * images_seen,
        "compute/core_seconds": wall * allocated,  # allocated cores (or GPUs) x wall, like the paper's core-days
        "compute/cpu_seconds": progress["cpu_seconds"] + float(cpu.item()),  # measured process CPU time
        "compute/images_seen": images_seen,
        "compute/epochs": images_seen / train_images,
        "compute/train_images": train_images,
        "perf/train_img_per_s_per_core": images_seen / wall / allocated,
    }


def _report_with_checkpoint(metrics, module: MlpMixer, optimizer, step: int, progress: dict, rank: int) -> None:
    """Report metrics with a checkpoint written by rank 0 (DDP replicas are identical, one copy is enough)."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "rng": torch.get_rng_state(),
                "progress": progress,
            },
            Path(tmp) / STATE_FILE,
        )
        spec = {"variant": module.variant.name, "image_size": module.image_size, "num_classes": module.num_classes}
        (Path(tmp) / MODEL_FILE).write_text(json.dumps(spec))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{step:08d}",
        )

