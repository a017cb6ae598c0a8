"""The fast paths of a training step give the numbers of the plain fp32 eager one: bf16 autocast within bf16's
rounding, ``torch.compile`` (inductor) within fp32 reassociation, and the choices ``auto`` makes per device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.models.registry import build_model
from workers.training.optim import classification_loss
from workers.training.precision import compile_model, resolve_compile, resolve_precision


def _model(variant: str = "Nano-4") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(variant, 16, 10, head_bias_init=-2.3)
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # the zero-initialised head would make every logit equal
    return model


def _images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["Nano-4", "ViT-Nano/4", "BiT-Micro"])
def test_bf16_autocast_logits_agree_with_fp32(variant):
    model = _model(variant).eval()
    images = _images()
    with torch.no_grad():
        fp32, _ = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = model(images)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    scale = fp32.abs().max().item()
    assert scale > 0.5  # a real comparison: the logits are not all ~0
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op): a few blocks of matmuls stay within 5 % of the
    # logit scale; a wrong cast (a layer left in bf16 where it must not be, a dropped bias) is off by far more.
    assert (bf16.float() - fp32).abs().max().item() < 0.05 * scale
    assert (bf16.float().argmax(-1) == fp32.argmax(-1)).float().mean().item() >= 0.75


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_logits_and_gradients_agree_with_eager(device):
    eager, compiled_module = _model().to(device), _model().to(device)
    compiled = compile_model(compiled_module)
    images, labels = _images().to(device), torch.arange(8, device=device) % 10
    targets = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        # (CUDA: no TF32 here, torch's default for matmuls; inductor may still pick other kernels than eager.)
        assert torch.allclose(compiled(images)[0], eager(images)[0], atol=1e-5, rtol=1e-4)
    # The training graph (forward and backward, compiled together by AOTAutograd): the recipe's loss, then every
    # parameter's gradient. (Not the Adam update: Adam turns a gradient's sign into a +-lr step, so rounding noise
    # on a near-zero gradient would flip whole steps.)
    for forward in (eager, compiled):
        classification_loss(forward(images)[0], targets, "sigmoid").backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_module.parameters()):
        scale = a.grad.abs().max().item()
        assert scale > 0, name  # every parameter gets a gradient: a real comparison
        assert (a.grad - b.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_auto_choices_per_device():
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu) is False and resolve_compile(True, cpu) is True
    cuda = torch.device("cuda")
    assert resolve_compile("auto", cuda) is True and resolve_compile(False, cuda) is False
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_trainer_on_cuda_takes_the_fast_path(digits16: Path):
    """On a GPU, ``auto`` means bf16 autocast and a compiled step; its losses follow the eager bf16 step's."""
    from workers.config import TrialConfig
    from workers.training.trainer import Trainer

    def config(compile_mode):
        return TrialConfig.model_validate({
            "data": {"train": str(digits16 / "train"), "val": str(digits16 / "val"),
                     "augment": {"crop": "pad", "pad": 1, "eval_crop_fraction": 1.0}},
            "model": {"variant": "Micro-4"}, "optim": {"lr": 0.003, "warmup_steps": 2},
            "train": {"steps": 20, "batch_size": 64, "eval_every": 10, "checkpoint_every": 10,
                      "compile": compile_mode}})

    cuda = torch.device("cuda")
    fast, eager = Trainer(config("auto"), device=cuda), Trainer(config(False), device=cuda)
    assert fast.precision == "bf16" and fast.compiled and not eager.compiled
    images, labels = next(fast.train_batches())
    losses = [[float(t.train_step(images, labels)[0]) for _ in range(5)] for t in (eager, fast)]
    assert losses[0][0] > losses[0][4]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 rounding, differently fused
