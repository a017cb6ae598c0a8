"""Tests for workers/model.py: sizes, costs, init, token mixing and stochastic depth."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workers.model import (
    VARIANTS,
    MixerVariant,
    MlpMixer,
    build_model,
    drop_path,
    forward_flops,
    get_variant,
    kernel_and_other_params,
    num_tokens,
    param_count,
    train_flops_per_image,
)

# Paper-notes table: (no head, 1000-class head) at 224 px.
PAPER_PARAMS = {
    "S-32": (18_591_624, 19_104_624),
    "S-16": (18_015_264, 18_528_264),
    "B-32": (59_524_428, 60_293_428),
    "B-16": (59_111_472, 59_880_472),
    "L-32": (205_914_264, 206_939_264),
    "L-16": (207_171_168, 208_196_168),
    "H-14": (431_069_952, 432_350_952),
}


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _permute_patches(x: torch.Tensor, p: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the P×P patches of images x (B, C, H, W): new patch j is old patch perm[j] (row-major)."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    patches = patches[:, perm]
    return patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_and_paper_shapes():
    assert list(VARIANTS)[:4] == ["Nano-4", "Micro-4", "Micro-2", "Mini-4"]
    for name, v in VARIANTS.items():
        assert v.name == name and "/" not in name
        assert v.description
    assert get_variant("B-16") == MixerVariant("B-16", 12, 16, 768, 384, 3072, VARIANTS["B-16"].description)
    assert get_variant("H/14") is VARIANTS["H-14"]
    assert (VARIANTS["Nano-4"].num_blocks, VARIANTS["Nano-4"].hidden_dim) == (2, 32)


def test_get_variant_slash_alias_and_unknown():
    assert get_variant("B/16") is get_variant("B-16")
    with pytest.raises(ValueError, match="X-99") as err:
        get_variant("X-99")
    for name in VARIANTS:
        assert name in str(err.value)


def test_num_tokens():
    assert num_tokens(get_variant("S-32"), 224) == 49
    assert num_tokens(get_variant("B-16"), 224) == 196
    assert num_tokens(get_variant("H-14"), 224) == 256
    assert num_tokens(get_variant("Micro-2"), 8) == 16
    with pytest.raises(ValueError, match=r"30.*P=4") as err:
        num_tokens(get_variant("Micro-4"), 30)
    assert "Micro-4" in str(err.value)
    with pytest.raises(ValueError, match="P=16"):
        MlpMixer("B-16", 100, 10)


# --- sizes and costs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_param_count_matches_paper_and_module(name):
    no_head, with_head = PAPER_PARAMS[name]
    assert param_count(get_variant(name), 224, 1000) == with_head
    assert param_count(get_variant(name), 224, 0) == no_head
    # Meta tensors: the real module's shapes, without allocating H-14's 1.7 GB.
    with torch.device("meta"):
        full = MlpMixer(name, 224, 1000)
        headless = MlpMixer(name, 224, 0)
    assert _numel(full) == with_head
    assert _numel(headless) == no_head


@pytest.mark.parametrize("name,image_size,num_classes", [("Nano-4", 16, 10), ("Micro-2", 8, 0), ("Mini-4", 32, 100)])
def test_param_count_small_variants(name, image_size, num_classes):
    model = build_model(name, image_size, num_classes)
    assert _numel(model) == param_count(get_variant(name), image_size, num_classes)


def test_forward_flops_hand_count_s32():
    # S-32 at 224 px: S=49, C=512, D_S=256, D_C=2048, 8 blocks, 1000 classes; 2 FLOPs per multiply-add.
    stem = 2 * 49 * (32 * 32 * 3) * 512  # 154,140,672
    token = 2 * 512 * (49 * 256 + 256 * 49)  # 25,690,112 per block
    channel = 2 * 49 * (512 * 2048 + 2048 * 512)  # 205,520,896 per block
    head = 2 * 512 * 1000  # 1,024,000
    assert stem + 8 * (token + channel) + head == 2_004_852_736
    assert forward_flops(get_variant("S-32"), 224, 1000) == 2_004_852_736
    assert train_flops_per_image(get_variant("S-32"), 224, 1000) == 3 * 2_004_852_736


@pytest.mark.parametrize("name,image_size,num_classes", [("S-32", 224, 1000), ("B-16", 224, 1000), ("Micro-2", 16, 10)])
def test_forward_flops_matches_torch_flop_counter(name, image_size, num_classes):
    # torch's counter also counts only matmuls/convs (2 per multiply-add); meta tensors keep it free.
    with torch.device("meta"):
        model = MlpMixer(name, image_size, num_classes)
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == forward_flops(get_variant(name), image_size, num_classes)


def test_mixing_cost_linear_in_tokens():
    # B-32 -> B-16 quadruples S. The stem costs the same at any P (each pixel is projected once),
    # while the token and channel MLPs are both linear in S (no quadratic term as in attention).
    stem = 2 * (224 * 224 * 3) * 768
    b32 = forward_flops(get_variant("B-32"), 224, 0)
    b16 = forward_flops(get_variant("B-16"), 224, 0)
    assert b16 - stem == 4 * (b32 - stem)


# --- module ---------------------------------------------------------------------------------------


def test_forward_shapes_and_zero_head():
    model = build_model("Micro-4", 16, 7, head_bias_init=-6.9).eval()
    assert model.variant is VARIANTS["Micro-4"]
    assert (model.image_size, model.num_classes, model.num_tokens) == (16, 7, 16)
    logits, out = model(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 7)
    assert out["pre_logits"].shape == (3, 64)
    torch.testing.assert_close(logits, torch.full((3, 7), -6.9))


def test_headless_model_returns_pre_logits():
    model = build_model("Nano-4", 8, 0).eval()
    logits, out = model(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 32)
    torch.testing.assert_close(logits, out["pre_logits"])


def test_wrong_input_size_raises():
    model = build_model("Nano-4", 16, 10)
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 3, 32, 32))


def test_lecun_normal_init():
    torch.manual_seed(0)
    model = build_model("Mini-4", 32, 10, head_bias_init=0.5)
    w = model.blocks[0].channel_mixing.fc1.weight  # (256, 128): fan_in 128
    target = math.sqrt(1 / 128)
    assert abs(w.std().item() / target - 1) < 0.03
    assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-6
    stem_std = model.stem.weight.std().item()  # fan_in 3*4*4 = 48
    assert abs(stem_std / math.sqrt(1 / 48) - 1) < 0.1
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module is not model.head:
            assert torch.count_nonzero(module.bias) == 0
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.all(model.head.bias == 0.5)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert model.norm.eps == 1e-6


def test_token_mixing_weights_shape():
    model = build_model("Micro-4", 32, 10)
    w = model.token_mixing_weights(2)
    assert w.shape == (32, 64)  # (D_S, S)
    assert not w.requires_grad
    assert w.data_ptr() == model.blocks[2].token_mixing.fc1.weight.data_ptr()


def test_permuting_patches_changes_output():
    torch.manual_seed(0)
    model = build_model("Micro-4", 16, 10).eval()
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(model.num_tokens)
    with torch.no_grad():
        a = model.forward_features(x)
        b = model.forward_features(_permute_patches(x, 4, perm))
    assert not torch.allclose(a, b, atol=1e-3)


def test_consistent_token_permutation_is_invariant():
    # Permuting the patches and, consistently, the token axis of every token-mixing MLP relabels the
    # tokens only; global average pooling then forgets the labels.
    torch.manual_seed(0)
    model = build_model("Micro-4", 16, 10).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    perm = torch.randperm(model.num_tokens)
    xp = _permute_patches(x, 4, perm)
    with torch.no_grad():
        for block in model.blocks:  # non-zero biases, so the test covers them too
            block.token_mixing.fc1.bias.normal_()
            block.token_mixing.fc2.bias.normal_()
        # The stem sees the same patches in the new order: token j of xp is token perm[j] of x.
        tokens = model.stem(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.stem(xp).flatten(2).transpose(1, 2), tokens[:, perm])
        expected = model.forward_features(x)
        for block in model.blocks:
            mlp = block.token_mixing
            mlp.fc1.weight.copy_(mlp.fc1.weight[:, perm])  # input features are tokens
            mlp.fc2.weight.copy_(mlp.fc2.weight[perm])  # output features are tokens
            mlp.fc2.bias.copy_(mlp.fc2.bias[perm])
        actual = model.forward_features(xp)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# --- stochastic depth -----------------------------------------------------------------------------


def test_stochastic_depth_rates_ramp():
    model = build_model("Mini-4", 32, 10, stoch_depth=0.25)
    rates = [block.stoch_depth for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    assert [b.stoch_depth for b in build_model("Nano-4", 8, 10).blocks] == [0.0, 0.0]


def test_stochastic_depth_train_vs_eval():
    torch.manual_seed(0)
    model = build_model("Micro-4", 16, 10, stoch_depth=0.5)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.forward_features(x), model.forward_features(x), rtol=0, atol=0)
        model.train()
        a, b = model.forward_features(x), model.forward_features(x)
    assert not torch.allclose(a, b)


def test_drop_path_per_example_and_rescaled():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    y = drop_path(x, 0.5, training=True)
    per_example = y[:, :1, :1]
    assert torch.all(y == per_example)  # one decision per example, broadcast over the rest
    assert set(per_example.unique().tolist()) == {0.0, 2.0}  # kept branches scaled by 1/(1-p)
    assert abs(y.mean().item() - 1.0) < 0.05
    assert drop_path(x, 0.5, training=False) is x


def test_invalid_regularisation_rates():
    with pytest.raises(ValueError, match="stoch_depth"):
        build_model("Nano-4", 8, 10, stoch_depth=1.0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("Nano-4", 8, 10, dropout=-0.1)


# --- optimiser groups -----------------------------------------------------------------------------


def test_kernel_and_other_params():
    model = build_model("Nano-4", 8, 10)
    kernels, others = kernel_and_other_params(model)
    assert all(p.ndim >= 2 for p in kernels)
    assert all(p.ndim < 2 for p in others)
    assert len(kernels) + len(others) == len(list(model.parameters()))
    # stem + 4 Linear per block + head.
    assert len(kernels) == 1 + 4 * 2 + 1
    mlps = [m for b in model.blocks for m in (b.token_mixing, b.channel_mixing)]
    expected = [model.stem.weight, model.head.weight] + [fc.weight for m in mlps for fc in (m.fc1, m.fc2)]
    assert {id(p) for p in kernels} == {id(p) for p in expected}
    # stem bias + per block (2 LayerNorms x 2 + 4 biases) + final LayerNorm x 2 + head bias.
    assert len(others) == 1 + 2 * 8 + 2 + 1
