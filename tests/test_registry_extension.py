"""The registry is open: a family defined here, in a few lines on ``workers.models.layers``, registers itself and goes
through `mixer-study models`, `plan` and the Ray-free Trainer as the built-in families do, with its own summary row,
FLOPs and parameter count. The fixture unregisters it, so no other test sees it."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cli import main
from pipeline.plan import plan_study
from pipeline.spec import load_study
from tests.conftest import study_dict, write_study
from workers.config import TrialConfig
from workers.models import registry
from workers.models.layers import Classifier, MlpBlock, drop_path, lecun_normal_
from workers.training.trainer import Trainer

# --- the Toy family: patch embedding, then per-patch MLP blocks (a Mixer without token mixing) ------------------


@dataclass(frozen=True)
class ToyVariant:
    family: ClassVar[str] = "Toy"
    kind: ClassVar[str] = "patch-MLP"

    name: str
    width: int  # C
    depth: int  # blocks
    patch_size: int = 4
    description: str = "toy patch-MLP for the registry test"
    size: str = "Toy"

    @property
    def size_rank(self) -> float:
        return 0.5


TOY_VARIANTS = {v.name: v for v in (ToyVariant("Toy-8", 8, 2), ToyVariant("Toy-16", 16, 2))}


def parse_toy(name: str) -> ToyVariant:
    m = re.fullmatch(r"Toy-([0-9]+)", name, re.IGNORECASE)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown Toy variant {name!r}: expected Toy-WIDTH; named variants: {', '.join(TOY_VARIANTS)}")
    return TOY_VARIANTS.get(f"Toy-{int(m.group(1))}") or ToyVariant(f"Toy-{int(m.group(1))}", int(m.group(1)), 2)


def toy_check_fits(v: ToyVariant, image_size: int) -> None:
    if image_size <= 0 or image_size % v.patch_size:
        raise ValueError(f"image_size {image_size} is not a positive multiple of P={v.patch_size} of {v.name}")


def toy_param_count(v: ToyVariant, image_size: int, num_classes: int, in_chans: int) -> int:
    c = v.width
    block = 2 * c + (c * 2 * c + 2 * c) + (2 * c * c + c)  # LayerNorm, MLP C -> 2C -> C
    return v.patch_size**2 * in_chans * c + c + v.depth * block + 2 * c + c * num_classes + num_classes


def toy_forward_flops(v: ToyVariant, image_size: int, num_classes: int, in_chans: int) -> int:
    toy_check_fits(v, image_size)
    s, c = (image_size // v.patch_size) ** 2, v.width
    return 2 * (s * v.patch_size**2 * in_chans * c + v.depth * s * 2 * c * 2 * c + c * num_classes)


def toy_summary(v: ToyVariant) -> str:
    return f"{v.depth} toy blocks, P {v.patch_size}, C {v.width}"


class ToyBlock(nn.Module):
    def __init__(self, dim: int, stoch_depth: float) -> None:
        super().__init__()
        self.stoch_depth = stoch_depth
        self.norm = nn.LayerNorm(dim)
        self.mlp = MlpBlock(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.mlp(self.norm(x)), self.stoch_depth, self.training)


class ToyNet(Classifier):
    parse_variant = staticmethod(parse_toy)

    def _build(self, variant: ToyVariant, stoch_depth: float) -> int:
        c = variant.width
        self.stem = nn.Conv2d(self.in_chans, c, variant.patch_size, stride=variant.patch_size)
        self.blocks = nn.ModuleList(ToyBlock(c, stoch_depth) for _ in range(variant.depth))
        self.norm = nn.LayerNorm(c)
        return c

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _embed(self, x: Tensor) -> Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)

    def _pool(self, x: Tensor) -> Tensor:
        return self.norm(x).mean(dim=1)


TOY = registry.Family(
    name="Toy", kind="patch-MLP", prefix="Toy-", syntax="Toy-WIDTH (Toy-8, Toy-16)", parse=parse_toy, model=ToyNet,
    variants=TOY_VARIANTS, param_count=toy_param_count, forward_flops=toy_forward_flops, check_fits=toy_check_fits,
    shape_summary=toy_summary,
)


@pytest.fixture
def toy_family() -> Iterator[registry.Family]:
    registry.register_family(TOY)
    try:
        yield TOY
    finally:
        registry.unregister_family("Toy")


# --- the tests ----------------------------------------------------------------------------------------------------


def test_registered_family_is_found_and_then_gone(toy_family: registry.Family) -> None:
    assert list(registry.FAMILIES) == ["Mixer", "ViT", "BiT", "Toy"]  # after the built-ins, in registration order
    assert registry.get_variant("toy-8") is TOY_VARIANTS["Toy-8"] and registry.NAMED_VARIANTS["Toy-16"].width == 16
    model = registry.build_model("Toy-8", 16, 10, head_bias_init=-1.0)
    assert type(model) is ToyNet and model.variant.name == "Toy-8"
    assert sum(p.numel() for p in model.parameters()) == registry.param_count("Toy-8", 16, 10)
    with FlopCounterMode(display=False) as counter:
        logits, out = model(torch.randn(2, 3, 16, 16))
    assert counter.get_total_flops() == 2 * registry.forward_flops("Toy-8", 16, 10)  # two images
    torch.testing.assert_close(logits, torch.full((2, 10), -1.0))  # Classifier's zero head
    assert out["pre_logits"].shape == (2, 8)
    with pytest.raises(ValueError, match=re.escape("Toy-8 was built for 16x16 inputs, got (8, 8)")):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown Toy variant 'Toy-x'.*Toy \\(patch-MLP\\): Toy-WIDTH"):
        registry.get_variant("Toy-x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(TOY)
    registry.unregister_family("Toy")
    with pytest.raises(ValueError, match="unknown Mixer variant 'Toy-8'"):  # unprefixed again: the Mixer parser's
        registry.get_variant("Toy-8")
    assert "Toy-8" not in registry.NAMED_VARIANTS
    registry.register_family(TOY)  # for the fixture to remove


def test_models_verb_lists_the_family_with_its_own_summary(toy_family: registry.Family, capsys) -> None:
    main(["models", "--image-size", "16", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert "\nToy (patch-MLP); any Toy-WIDTH (Toy-8, Toy-16)\n" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("Toy-8 "))
    toy = TOY_VARIANTS["Toy-8"]
    assert f"{toy_param_count(toy, 16, 10, 3):,}" in row and f"{toy_forward_flops(toy, 16, 10, 3) / 1e9:.4g}" in row
    assert "2 toy blocks, P 4, C 8" in row and "toy patch-MLP for the registry test" in row
    assert out.index("Nano-4") < out.index("ViT-Nano/4") < out.index("BiT-Micro") < out.index("Toy-8")


def test_plan_takes_the_family_flops(toy_family: registry.Family, digits16: Path, tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path / "toy.yaml", study_dict("toy", digits16, grid={"model.variant": ["toy-8", "Nano-4"]}))
    plans = plan_study(load_study(study))
    assert [p.point["model.variant"] for p in plans] == ["Toy-8", "Nano-4"]
    toy, nano = plans
    forward = toy_forward_flops(TOY_VARIANTS["Toy-8"], 16, toy.num_classes, 3)
    assert toy.forward_gflops == pytest.approx(forward / 1e9, rel=1e-12)
    assert toy.train_flops == 3 * forward * toy.images_seen
    assert nano.forward_gflops == pytest.approx(registry.forward_flops("Nano-4", 16, nano.num_classes) / 1e9)
    main(["plan", str(study)])
    assert "Toy-8" in capsys.readouterr().out


def test_trainer_takes_one_step(toy_family: registry.Family, digits16: Path) -> None:
    trial = TrialConfig.model_validate({
        "data": {"train": str(digits16 / "train"), "val": str(digits16 / "val")},
        "model": {"variant": "Toy-8"},
        "optim": {"lr": 0.01},
        "train": {"steps": 1, "batch_size": 16, "eval_every": 1, "checkpoint_every": 1, "log_every": 1},
    })
    trainer = Trainer(trial)
    assert type(trainer.module) is ToyNet
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    logged: list[dict[str, float]] = []
    trainer.log = lambda metrics, step: logged.append(metrics)
    reports: list[dict[str, float]] = []
    trainer.fit(lambda metrics, with_checkpoint: reports.append(metrics))
    losses = [m["train/loss"] for m in logged if "train/loss" in m]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert [m["step"] for m in reports] == [1] and math.isfinite(reports[0]["val/loss"])
    after = trainer.module.state_dict()
    # The zero head passes no gradient to the body at the first step; the head itself moves.
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["head.bias"], before["head.bias"])
    assert reports[0]["compute/train_flops"] == 3 * toy_forward_flops(TOY_VARIANTS["Toy-8"], 16, 10, 3) * 16
