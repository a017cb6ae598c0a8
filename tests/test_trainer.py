"""The Trainer driven in-process, without Ray: seeds, the step loop's reporting cadence, checkpoints, resume and
compute accounting, on real digits shards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workers import names
from workers.config import TrialConfig
from workers.training.checkpoint import load_model, read_state, write_checkpoint
from workers.training.trainer import Trainer


def _config(data: Path, **train) -> TrialConfig:
    return TrialConfig.model_validate({
        "data": {"train": str(data / "train"), "val": str(data / "val"),
                 "augment": {"crop": "pad", "pad": 1, "eval_crop_fraction": 1.0}},
        "model": {"variant": "Nano-4"},
        "optim": {"lr": 0.003, "warmup_steps": 5},
        "train": {"steps": 40, "batch_size": 32, "eval_every": 10, "checkpoint_every": 20, "log_every": 5, **train},
    })


def declared_names() -> set[str]:
    """Every metric and tag name ``workers.names`` declares as a constant."""
    return {value for key, value in vars(names).items() if key.isupper() and isinstance(value, str)}


def test_seed_fixes_init_and_data_order(digits16: Path) -> None:
    a, b, c = (Trainer(_config(digits16, seed=s)) for s in (0, 0, 1))
    torch.testing.assert_close(a.module.state_dict(), b.module.state_dict(), rtol=0, atol=0)
    assert not torch.equal(a.module.stem.weight, c.module.stem.weight)
    (xa, ya), (xb, yb), (xc, yc) = (next(t.train_batches()) for t in (a, b, c))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)


def test_fit_reports_checkpoints_and_resumes(digits16: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(digits16))
    reports, logged = [], []
    trainer.log = lambda metrics, step: logged.append((step, metrics))

    def report(metrics: dict, with_checkpoint: bool) -> None:
        reports.append((metrics, with_checkpoint))
        if with_checkpoint:
            write_checkpoint(tmp_path / f"step_{metrics['step']}", trainer.module, trainer.state_dict())

    trainer.fit(report)
    assert [(m["step"], ckpt) for m, ckpt in reports] == [(10, False), (20, True), (30, False), (40, True)]
    final = reports[-1][0]
    assert final["val/loss"] < reports[0][0]["val/loss"]
    assert final["compute/images_seen"] == 40 * 32 and final["compute/train_flops"] > 0
    assert 0 < final["compute/train_seconds"] < final["compute/wall_seconds"]  # eval/checkpoint time excluded
    assert final["compute/cpu_seconds"] > 0
    assert final["best/step"] in (20, 40) and final["best/val_acc"] == max(m["val/acc"] for m, c in reports if c)
    train_steps = [step for step, m in logged if "train/loss" in m]
    assert train_steps == list(range(5, 41, 5))
    assert all(math.isfinite(m["train/loss"]) for _, m in logged if "train/loss" in m)
    # Every name the Trainer reports or logs is declared in workers.names: a new literal name fails here.
    written = {key for m, _ in reports for key in m} | {key for _, m in logged for key in m}
    assert names.TIME_FIRST_STEP_UNIX in written and written <= declared_names(), written - declared_names()

    # The checkpoint rebuilds the model without Ray, and a new Trainer resumes from it at step 20.
    model = load_model(tmp_path / "step_40")
    torch.testing.assert_close(model.state_dict(), trainer.module.state_dict(), rtol=0, atol=0)
    resumed = Trainer(_config(digits16))
    state = read_state(tmp_path / "step_20")
    resumed.load_state_dict(state)
    assert resumed.progress.step == 20 and resumed.progress.cpu_seconds == state["progress"]["cpu_seconds"] > 0
    again = []
    resumed.fit(lambda metrics, ckpt: again.append(metrics))
    assert [m["step"] for m in again] == [30, 40]
    assert again[-1]["compute/images_seen"] == 40 * 32
    assert again[-1]["compute/cpu_seconds"] > state["progress"]["cpu_seconds"]  # earlier segments carried over


def test_paper_augmentation_and_mixup_step(digits16: Path) -> None:
    config = TrialConfig.model_validate({
        "data": {"train": str(digits16 / "train"), "val": str(digits16 / "val"), "image_size": 16,
                 "augment": {"crop": "inception", "flip": True, "randaug": [2, 15], "mixup": 0.5}},
        "model": {"variant": "Nano-4", "stoch_depth": 0.1},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3, "loss": "sigmoid"},
    })
    trainer = Trainer(config)
    assert float(trainer.module.head.bias.detach()[0]) == torch.tensor(-math.log(10)).float().item()
    images, labels = next(trainer.train_batches())
    assert images.shape == (8, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    loss, grad_norm = trainer.train_step(images, labels)
    assert math.isfinite(float(loss)) and float(grad_norm) > 0


def test_cpu_accounting_includes_child_processes() -> None:
    """compute/cpu_seconds counts DataLoader processes: a child burning CPU shows up, the parent's own time not."""
    import subprocess
    import sys
    import time

    from workers.training.loop import process_tree_cpu_seconds

    before, own_before = process_tree_cpu_seconds(), time.process_time()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.6\n"
                              "while time.process_time() < end: pass\ntime.sleep(5)"])
    try:
        deadline = time.monotonic() + 20
        while process_tree_cpu_seconds() - before < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_tree_cpu_seconds() - before >= 0.5  # the live child's CPU time
    finally:
        child.kill()
        child.wait()
    assert time.process_time() - own_before < 0.5
    assert process_tree_cpu_seconds() - before >= 0.5  # still counted once the child is reaped (RUSAGE_CHILDREN)


def test_fewshot_features_are_float32_and_capped(digits16: Path) -> None:
    """Point 8: float32 features (not a float64 copy of the downstream split), first N samples as train[:N]."""
    from analysis.features import extract_features
    from workers.models.mixer import MlpMixer

    model = MlpMixer("Nano-4", image_size=16, num_classes=10)
    x, y = extract_features(model, str(digits16 / "train"), num_samples=100, crop_fraction=1.0)
    assert x.dtype == "float32" and x.shape == (100, 32) and len(y) == 100
    full, _ = extract_features(model, str(digits16 / "train"), crop_fraction=1.0)
    assert len(full) == 1258 and (full[:100] == x).all()  # the cap is a prefix of the split


def test_checkpoints_and_figures_need_no_ray(tmp_path: Path) -> None:
    """Point 13: report and fewshot rebuild models from checkpoints with workers.training.checkpoint alone, without
    Ray."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys\nimport analysis.report, analysis.features, workers.training.checkpoint\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_best_checkpoint_is_the_latest_of_equals_as_ray_keeps_it(digits16: Path) -> None:
    """Ray Train's retention evicts the earlier of equally scored checkpoints, so the worker's best step (whose model
    the few-shot reads) and the driver's best checkpoint must both be the latest of equals, or they disagree."""
    from types import SimpleNamespace

    from pipeline.trial import best_checkpoint

    trainer = Trainer(_config(digits16, steps=40, eval_every=10, checkpoint_every=10))
    accuracies = iter([0.5, 0.9, 0.9, 0.8])
    trainer.evaluate = lambda loader: (1.0, next(accuracies))  # scripted val/acc: steps 20 and 30 tie
    reported = []
    trainer.fit(lambda metrics, ckpt: reported.append((f"ckpt{metrics['step']}", dict(metrics))))
    assert (trainer.progress.best_step, trainer.progress.best_val_acc) == (30, 0.9)
    kept = SimpleNamespace(best_checkpoints=reported[1:3], path="run")  # what keep_checkpoints=2 leaves
    checkpoint, metrics = best_checkpoint(kept)
    assert checkpoint == "ckpt30" and metrics["step"] == trainer.progress.best_step


def test_compiled_trainer_steps_as_the_eager_one(digits16: Path) -> None:
    """``train.compile: true`` runs the Trainer's steps through ``torch.compile``; the losses of the first updates
    match the eager Trainer's (same seed, data and recipe), and ``auto`` stays eager on CPU."""
    eager, compiled = Trainer(_config(digits16)), Trainer(_config(digits16, compile=True))
    assert not eager.compiled and compiled.compiled and compiled.model is not compiled.module
    batches = next(eager.train_batches())
    losses = [[float(t.train_step(*batches)[0]) for _ in range(3)] for t in (eager, compiled)]
    assert losses[0][0] > losses[0][2]  # it trains
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
