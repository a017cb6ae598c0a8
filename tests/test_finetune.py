"""The fine-tuning stage: Mixer at a higher resolution (paper Supplementary C), ViT position-embedding resampling,
the cosine schedule against big_vision's formula, and the Ray-free FineTuner on real digits shards."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.finetune_sweep import COMPLETE, RunFolderCheckpoints, run_finetune, select_lr
from tests.test_trainer import declared_names
from workers.config import TrialConfig
from workers.models.mixer import MlpMixer, forward_flops
from workers.models.registry import build_model
from workers.models.registry import forward_flops as registry_forward_flops
from workers.models.resolution import (
    GroupedPatchStem,
    grouped_token_order,
    mixer_to_resolution,
    resample_pos_embed,
    to_resolution,
)
from workers.names import COMPUTE_FINETUNE_IMAGES_SEEN
from workers.training.checkpoint import read_state, write_checkpoint
from workers.training.finetuner import FineTuner, cosine_multiplier
from workers.training.ray_entry import finetune_in_process
from workers.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


# -- Mixer at K x the resolution (Supplementary C) ------------------------------------------------------------------


def _random_mixer(variant: str, image_size: int) -> MlpMixer:
    """A float64 Mixer with every parameter random (biases, LayerNorms and head too), so no term hides."""
    torch.manual_seed(0)
    model = MlpMixer(variant, image_size=image_size, num_classes=10).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _tile(images: torch.Tensor, k: int) -> torch.Tensor:
    """K² images (K², 3, s, s) -> one (1, 3, K·s, K·s) image: image q = a·K + b in block row a, block column b."""
    _, c, s, _ = images.shape
    return images.reshape(k, k, c, s, s).permute(2, 0, 3, 1, 4).reshape(1, c, k * s, k * s)


def test_grouped_token_order_is_contiguous_k_by_k_blocks() -> None:
    # A 4x4 patch grid (K=2, g=2), row-major positions 0..15: the four 2x2 quadrants, row-major inside each.
    assert grouped_token_order(2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert grouped_token_order(3, 1).tolist() == list(range(9))  # K=1: the row-major order itself
    order = grouped_token_order(4, 3)
    assert sorted(order.tolist()) == list(range(144))  # a permutation


@pytest.mark.parametrize("k", [2, 3])
def test_token_groups_are_mixed_as_the_pretrained_model_mixes_one_image(k: int) -> None:
    small = _random_mixer("Micro-4", 16)
    big = mixer_to_resolution(small, 16 * k)
    s, d_s = small.num_tokens, small.variant.tokens_mlp_dim
    assert big.image_size == 16 * k and big.num_tokens == k * k * s
    assert big.variant.tokens_mlp_dim == k * k * d_s and isinstance(big.stem, GroupedPatchStem)

    # The weights: block-diagonal copies, biases tiled, everything else copied.
    w1, w1_big = small.blocks[0].token_mixing.fc1.weight, big.blocks[0].token_mixing.fc1.weight
    assert w1_big.shape == (k * k * d_s, k * k * s)
    for p in range(k * k):
        for q in range(k * k):
            block = w1_big[p * d_s:(p + 1) * d_s, q * s:(q + 1) * s]
            assert torch.equal(block, w1) if p == q else not block.any()
    torch.testing.assert_close(big.blocks[2].token_mixing.fc2.bias, small.blocks[2].token_mixing.fc2.bias.repeat(k * k))
    torch.testing.assert_close(big.blocks[1].channel_mixing.fc1.weight, small.blocks[1].channel_mixing.fc1.weight)
    torch.testing.assert_close(big.head.weight, small.head.weight)

    # The function: K² different images tiled into one K x as large image, arranged as grouped_token_order says.
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(k * k, 3, 16, 16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        x_small = small.stem(images).flatten(2).transpose(1, 2)  # (K², S, C): each image on its own
        x_big = big.stem(_tile(images, k)).flatten(2).transpose(1, 2).reshape(k * k, s, -1)  # group q -> row q
        torch.testing.assert_close(x_big, x_small, rtol=0, atol=1e-12)
        for block_small, block_big in zip(small.blocks, big.blocks, strict=True):
            # Token-mixing output of every group == the pre-trained token MLP on that group's image.
            t_small = block_small.token_mixing(block_small.norm1(x_small).transpose(1, 2)).transpose(1, 2)
            big_in = x_big.reshape(1, k * k * s, -1)
            t_big = block_big.token_mixing(block_big.norm1(big_in).transpose(1, 2)).transpose(1, 2)
            torch.testing.assert_close(t_big.reshape(k * k, s, -1), t_small, rtol=0, atol=1e-10)
            x_small, x_big = block_small(x_small), block_big(big_in).reshape(k * k, s, -1)
            torch.testing.assert_close(x_big, x_small, rtol=0, atol=1e-10)
        # Global average pooling: the big model's pre_logits are the mean of the K² images' pre_logits.
        torch.testing.assert_close(big.forward_features(_tile(images, k))[0],
                                   small.forward_features(images).mean(0), rtol=0, atol=1e-10)


def test_non_integer_factor_is_a_clear_error() -> None:
    small = MlpMixer("Nano-4", image_size=16, num_classes=10)
    for size in (24, 20, 8):
        with pytest.raises(ValueError, match="not an integer multiple K of the pre-training resolution 16"):
            mixer_to_resolution(small, size)
    assert mixer_to_resolution(small, 16) is small  # K = 1: unchanged
    with pytest.raises(ValueError, match="already moved"):
        mixer_to_resolution(mixer_to_resolution(small, 32), 64)


def test_to_resolution_dispatches_by_family() -> None:
    mixer = MlpMixer("Nano-4", image_size=16, num_classes=10)
    assert isinstance(to_resolution(mixer, 32).stem, GroupedPatchStem)

    # ViT: the registry's model; only pos_embed's grid rows change (class-token row kept), and it runs at 32 px.
    vit = build_model("ViT-Micro/4", 16, 10)
    big = to_resolution(vit, 32)
    assert big.image_size == 32 and big.pos_embed.shape == (1, 1 + 64, 64)
    torch.testing.assert_close(big.pos_embed.detach(), resample_pos_embed(vit.pos_embed.detach(), 4, 8, 1))
    for name, value in vit.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(big.state_dict()[name], value), name
    assert big(torch.zeros(2, 3, 32, 32))[0].shape == (2, 10)

    class TinyViT(nn.Module):  # duck-typed, outside the registry: pos_embed (1, 1 + g², C), image_size, patch
        def __init__(self) -> None:
            super().__init__()
            self.image_size, self.patch_size, self.num_classes = 8, 4, 3
            self.pos_embed = nn.Parameter(torch.arange(5 * 2, dtype=torch.float32).reshape(1, 5, 2))

    tiny = to_resolution(TinyViT(), 16)
    assert tiny.image_size == 16 and tiny.pos_embed.shape == (1, 1 + 16, 2)
    torch.testing.assert_close(tiny.pos_embed.detach(), resample_pos_embed(TinyViT().pos_embed.detach(), 2, 4, 1))

    # BiT: the same weights, rebuilt for the new image_size it records and checks.
    resnet = build_model("BiT-Micro", 16, 10)
    wide = to_resolution(resnet, 48)
    assert wide.image_size == 48 and to_resolution(resnet, 16) is resnet
    torch.testing.assert_close(wide.state_dict(), resnet.state_dict(), rtol=0, atol=0)
    assert wide(torch.zeros(2, 3, 48, 48))[0].shape == (2, 10)


# -- ViT position embeddings --------------------------------------------------------------------------------------


def _ramp(h: int, w: int, prefix: int) -> tuple[torch.Tensor, np.ndarray]:
    """pos[i, j, c] = c + (c + 1)·i - 0.5·j (bilinear interpolation reproduces a ramp exactly) and the prefix."""
    c = np.arange(3.0)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = c + (c + 1) * i[..., None] - 0.5 * j[..., None]
    prefix_rows = np.full((prefix, 3), 7.0)
    return torch.from_numpy(np.concatenate([prefix_rows, grid.reshape(h * w, 3)])[None]), c


def test_resample_pos_embed_identity_ramp_and_prefix() -> None:
    pos, _ = _ramp(4, 4, 1)
    assert resample_pos_embed(pos, 4, 4, 1) is pos  # unchanged grid: the tensor itself

    out = resample_pos_embed(pos, 4, 7, 1)
    assert out.shape == (1, 1 + 49, 3) and out.dtype == torch.float64
    assert torch.equal(out[:, :1], pos[:, :1])  # the class token's entry is kept as it is
    # align_corners: new index o sits at old coordinate o * (4 - 1) / (7 - 1)
    c = np.arange(3.0)
    i, j = np.meshgrid(np.arange(7) * 3 / 6, np.arange(7) * 3 / 6, indexing="ij")
    expected = (c + (c + 1) * i[..., None] - 0.5 * j[..., None]).reshape(49, 3)
    np.testing.assert_allclose(out[0, 1:].numpy(), expected, rtol=0, atol=1e-12)

    # Non-square grids and no prefix (big_vision's ViT adds the posemb before the class token).
    pos, _ = _ramp(2, 3, 0)
    out = resample_pos_embed(pos, (2, 3), (4, 5), 0)
    i, j = np.meshgrid(np.arange(4) * 1 / 3, np.arange(5) * 2 / 4, indexing="ij")
    np.testing.assert_allclose(out[0].numpy(), (c + (c + 1) * i[..., None] - 0.5 * j[..., None]).reshape(20, 3),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not 1 prefix"):
        resample_pos_embed(pos, 3, 4, 1)


def test_resample_pos_embed_matches_the_official_scipy_zoom() -> None:
    """vision_transformer load_pretrained / big_vision resample_posemb: scipy.ndimage.zoom(grid, zoom, order=1)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    generator = torch.Generator().manual_seed(0)
    for old, new in ((3, 7), (7, 12), (14, 24), (6, 4)):
        pos = torch.randn(1, 1 + old * old, 5, dtype=torch.float64, generator=generator)
        grid = pos[0, 1:].reshape(old, old, 5).numpy()
        expected = ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(new * new, 5)
        np.testing.assert_allclose(resample_pos_embed(pos, old, new, 1)[0, 1:].numpy(), expected, atol=1e-12)


# -- schedule -----------------------------------------------------------------------------------------------------


def _big_vision_cosine(step: int, total: int, warmup: int) -> float:
    """big_vision utils.create_learning_rate_schedule(total, base=1.0, decay_type="cosine", warmup_steps=warmup)."""
    progress = np.clip((step - warmup) / float(total - warmup), 0.0, 1.0)
    lr = 1.0 * 0.5 * (1.0 + np.cos(np.pi * progress))
    if warmup:
        lr = lr * np.minimum(1.0, step / warmup)
    return float(lr)


@pytest.mark.parametrize("total,warmup", [(100, 0), (100, 10), (500, 50), (7, 3)])
def test_cosine_schedule_is_big_vision(total: int, warmup: int) -> None:
    for step in range(total + 1):
        assert cosine_multiplier(step, total, warmup) == pytest.approx(_big_vision_cosine(step, total, warmup),
                                                                       abs=1e-12)
    if warmup:
        assert cosine_multiplier(0, total, warmup) == 0.0  # warm-up from 0: the first update is a no-op
    assert cosine_multiplier(total, total, warmup) == pytest.approx(0.0, abs=1e-12)


# -- FineTuner on digits ------------------------------------------------------------------------------------------


def _trial(data: Path, **finetune) -> TrialConfig:
    return TrialConfig.model_validate({
        "data": {"train": str(data / "train"), "val": str(data / "val"),
                 "augment": {"crop": "pad", "pad": 1, "eval_crop_fraction": 1.0}},
        "model": {"variant": "Nano-4"},
        "optim": {"lr": 0.003, "warmup_steps": 5},
        "train": {"steps": 60, "batch_size": 32, "eval_every": 60, "checkpoint_every": 60, "log_every": 10,
                  "precision": "fp32"},
        "finetune": {"train": str(data / "train"), "test": str(data / "test"), "steps": 32, "batch_size": 32,
                     "lr": [0.1], "warmup_steps": 3, "image_size": 32, **finetune},
    })


@pytest.fixture(scope="module")
def pretrained(digits16: Path, tmp_path_factory) -> Path:
    """A Nano-4 pre-trained for 60 steps at 16 px with the sigmoid loss (head bias -log 10): a real checkpoint."""
    trainer = Trainer(_trial(digits16))
    folder = tmp_path_factory.mktemp("pretrained")
    trainer.fit(lambda metrics, ckpt: write_checkpoint(folder, trainer.module, trainer.state_dict()) if ckpt else None)
    return folder


def test_finetuner_fits_checkpoints_and_resumes(digits16: Path, pretrained: Path, tmp_path: Path) -> None:
    trial = _trial(digits16, val=str(digits16 / "val"))
    tuner = FineTuner(pretrained, trial, 0.1)
    head = tuner.module.head
    assert tuner.image_size == 32 and tuner.module.num_tokens == 64 and tuner.num_classes == 10
    assert not head.weight.any() and not head.bias.any()  # fresh zero head (the pre-trained bias was -log 10)
    pre_w1 = read_state(pretrained)["model"]["blocks.0.token_mixing.fc1.weight"]
    w1 = tuner.module.blocks[0].token_mixing.fc1.weight.detach()
    torch.testing.assert_close(w1, torch.block_diag(*[pre_w1] * 4))  # K = 2: four copies
    assert all(group["weight_decay"] == 0.0 and group["momentum"] == 0.9 for group in tuner.optimizer.param_groups)

    reports, logged = [], []
    tuner.log = lambda metrics, step: logged.append((step, metrics))

    def report(metrics: dict, with_checkpoint: bool) -> None:
        reports.append((metrics, with_checkpoint))
        if with_checkpoint:
            write_checkpoint(tmp_path / f"step_{metrics['step']}", tuner.module, tuner.state_dict())

    tuner.fit(report)
    assert [(m["step"], ckpt) for m, ckpt in reports] == [(8, True), (16, True), (24, True), (32, True)]
    final = reports[-1][0]
    assert final["finetune/top1"] > 0.3  # chance is 0.1 on 10 classes
    assert final["finetune/val_top1"] > 0.3 and "finetune/val_top1" not in reports[-2][0]  # finetune.val, at the end
    assert math.isfinite(final["finetune/loss"]) and final["finetune/loss"] < reports[0][0]["finetune/loss"]
    flops = forward_flops(tuner.module.variant, 32, 10)  # the K²·D_S token-mixing width at 32 px
    assert final["compute/finetune_flops"] == 3 * flops * 32 * 32 and final["finetune/image_size"] == 32
    assert 0 < final["compute/finetune_seconds"] < final["compute/finetune_wall_seconds"]
    assert [step for step, m in logged if "finetune/train_loss" in m] == [10, 20, 30, 32]
    assert tuner.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_multiplier(31, 32, 3))
    written = {key for m, _ in reports for key in m} | {key for _, m in logged for key in m}
    assert written <= declared_names(), written - declared_names()  # workers.names declares every name

    # Resume at step 16: a new FineTuner continues from there, with the momentum buffers of the checkpoint.
    resumed = FineTuner(pretrained, trial, 0.1)
    resumed.load_state_dict(read_state(tmp_path / "step_16"))
    assert resumed.progress.step == 16 and resumed.optimizer.state_dict()["state"]  # momentum restored
    again = []
    resumed.fit(lambda metrics, ckpt: again.append((metrics["step"], ckpt)))
    assert again == [(24, True), (32, True)]

    # Resumed from the final checkpoint: only the evaluation is reported again, and it is the same model.
    done = FineTuner(pretrained, trial, 0.1)
    done.load_state_dict(read_state(tmp_path / "step_32"))
    last = []
    done.fit(lambda metrics, ckpt: last.append((metrics, ckpt)))
    assert [(m["step"], ckpt) for m, ckpt in last] == [(32, False)]
    assert last[0][0]["finetune/top1"] == final["finetune/top1"]

    with pytest.raises(ValueError, match="lr 0.1"):
        FineTuner(pretrained, trial, 0.01).load_state_dict(read_state(tmp_path / "step_16"))


def test_finetuner_first_step_has_lr_zero_and_same_resolution_keeps_the_model(digits16: Path,
                                                                               pretrained: Path) -> None:
    tuner = FineTuner(pretrained, _trial(digits16, image_size=None), 0.01)
    assert tuner.image_size == 16 and not isinstance(tuner.module.stem, GroupedPatchStem)
    before = {k: v.clone() for k, v in tuner.module.state_dict().items()}
    images, labels = next(tuner.train_batches())
    tuner.train_step(images, labels)
    assert tuner.optimizer.param_groups[0]["lr"] == 0.0  # warm-up from 0 (big_vision): step 0 changes nothing
    torch.testing.assert_close(tuner.module.state_dict(), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not an integer multiple"):
        FineTuner(pretrained, _trial(digits16, image_size=24), 0.01)


@pytest.mark.parametrize("variant", ["ViT-Nano/4", "BiT-Micro"])
def test_finetuner_takes_the_other_families(digits16: Path, tmp_path: Path, variant: str) -> None:
    model = build_model(variant, 16, 7, head_bias_init=-1.0)  # 7 upstream classes: the head must be replaced
    write_checkpoint(tmp_path, model, {"model": model.state_dict()})
    tuner = FineTuner(tmp_path, _trial(digits16), 0.1)
    assert tuner.module.image_size == 32 and tuner.module.variant.name == model.variant.name
    assert tuner.module.head.out_features == 10 and not tuner.module.head.bias.any()
    assert tuner.forward_flops_per_image == registry_forward_flops(model.variant, 32, 10)
    images, labels = next(tuner.train_batches())
    loss, _ = tuner.train_step(images, labels)
    assert images.shape[-1] == 32 and loss.item() == pytest.approx(math.log(10), rel=1e-5)  # zero head: uniform


# The stage on Ray (one TorchTrainer per learning rate, inside a real trial) is tested end to end through
# `mixer-study train` in tests/test_trial.py; in a 1-worker trial's Tune trial process through the shipped model-scale
# study (tests/test_shipped_studies.py); the two engines against each other below.


TIMING = {"compute/finetune_core_seconds", "compute/finetune_seconds"}


def _job(trial: TrialConfig, storage: Path) -> dict:
    return {"name": "train-base", "trial": trial.model_dump(mode="json"), "storage": str(storage), "workers": 1,
            "cpus_per_worker": 1, "gpus_per_worker": 0}


def _step_folders(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("step_*"))


def test_an_in_process_sweep_keeps_each_runs_latest_complete_checkpoint_and_resumes(
        digits16: Path, pretrained: Path, tmp_path: Path) -> None:
    trial = _trial(digits16, val=str(digits16 / "val"), lr=[0.01, 0.1], steps=8)
    job, tags = _job(trial, tmp_path / "runs"), {}
    metrics = run_finetune(job, str(pretrained), None, tags.__setitem__, in_process=True)
    runs = {lr: tmp_path / "runs" / f"train-base-finetune-lr{lr}" for lr in ("0.01", "0.1")}
    for run in runs.values():  # reports every 2 steps with a checkpoint; only the latest, marked complete, is kept
        assert _step_folders(run) == ["step_00000008"]
        assert sorted(p.name for p in (run / "step_00000008").iterdir()) == [COMPLETE, "model.json", "state.pt"]
    best = tags["finetune.best_lr"]
    assert metrics["finetune/best_lr"] == float(best) and 0 < metrics["finetune/top1"] <= 1
    assert tags["ray.finetune_run"] == str(runs[best])
    assert tags["finetune.checkpoint"] == str(runs[best] / "step_00000008")
    marked = [json.loads((run / "step_00000008" / COMPLETE).read_text()) for run in runs.values()]
    assert [m["compute/finetune_images_seen"] for m in marked] == [8 * 32, 8 * 32]
    assert metrics["compute/finetune_flops"] == sum(m["compute/finetune_flops"] for m in marked) > 0  # both runs

    # Run again (a retried trial): each finished run only re-evaluates its final checkpoint (the wall time of that
    # segment still counts: wall and core seconds grow, the rest is the same).
    again = run_finetune(job, str(pretrained), None, tags.__setitem__, in_process=True)
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in metrics.items() if k not in TIMING}

    # Cut one run short after its step-4 checkpoint, leaving a step-6 folder whose copy never completed: the next
    # attempt resumes from step 4 and ends where an uncut run ends, with one complete checkpoint.
    cut = tmp_path / "cut"
    checkpoints = RunFolderCheckpoints(str(cut))
    engine = checkpoints.engine()

    def report_until_4(metrics: dict, folder: str | None, step: int) -> None:
        if step > 4:
            raise KeyboardInterrupt
        checkpoints.report(metrics, folder, step)

    config = {"trial": job["trial"], "pretrained": str(pretrained), "lr": 0.1, "mlflow": None, "cpus_per_worker": 1}
    with pytest.raises(KeyboardInterrupt):
        finetune_in_process(config, dataclasses.replace(engine, report=report_until_4))
    assert _step_folders(cut) == ["step_00000004"]
    (cut / "step_00000006").mkdir()
    (cut / "step_00000006" / "model.json").write_text("{}")
    resumed = RunFolderCheckpoints(str(cut))
    assert resumed.latest().path == str(cut / "step_00000004")
    finetune_in_process(config, resumed.engine())
    assert _step_folders(cut) == ["step_00000008"]  # step 6 written again, complete, then superseded
    assert resumed.metrics[COMPUTE_FINETUNE_IMAGES_SEEN] == 8 * 32  # the resumed run's compute counts both segments
    assert 0 < resumed.metrics["finetune/top1"] <= 1


@pytest.mark.slow
def test_in_process_fine_tuning_computes_what_a_ray_train_worker_group_of_one_computes(
        digits16: Path, pretrained: Path, tmp_path: Path) -> None:
    import ray

    trial = _trial(digits16, val=str(digits16 / "val"), lr=[0.01, 0.1], steps=8)
    ours = run_finetune(_job(trial, tmp_path / "a"), str(pretrained), None, lambda k, v: None, in_process=True)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        theirs = run_finetune(_job(trial, tmp_path / "b"), str(pretrained), None, lambda k, v: None)
    finally:
        ray.shutdown()
    assert {k: v for k, v in ours.items() if k not in TIMING} == {k: v for k, v in theirs.items() if k not in TIMING}
    assert ours.keys() == theirs.keys()


def test_a_sweep_keeps_the_best_lr_on_the_held_out_split_not_on_test() -> None:
    """The test split reports, it never selects (big_vision's transfer configs select on minival = train[99%:])."""
    runs = {0.003: {"finetune/top1": 0.95, "finetune/val_top1": 0.50},   # the best test top-1: not kept
            0.01: {"finetune/top1": 0.70, "finetune/val_top1": 0.80},
            0.03: {"finetune/top1": 0.90, "finetune/val_top1": 0.80}}
    assert select_lr(runs, (0.003, 0.01, 0.03)) == 0.01  # best val; of equal ones the first in finetune.lr
    assert select_lr(runs, (0.03, 0.01, 0.003)) == 0.03
    assert select_lr({0.1: {"finetune/top1": 0.5}}, (0.1,)) == 0.1  # one lr: nothing to select
    with pytest.raises(RuntimeError, match="lr 0.01 reported no finetune/val_top1"):
        select_lr({0.003: runs[0.003], 0.01: {"finetune/top1": 0.7}}, (0.003, 0.01))
