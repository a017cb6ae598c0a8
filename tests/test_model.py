"""Tests for workers/models/mixer.py (sizes, costs, init, token mixing) and the shared parts it is built from
(workers/models/layers.py: stochastic depth, gradient checkpointing, the Classifier base)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from workers.models.layers import Classifier, drop_path
from workers.models.mixer import (
    SIZES,
    VARIANTS,
    MixerBlock,
    MixerVariant,
    MlpMixer,
    forward_flops,
    get_variant,
    num_tokens,
    param_count,
    parse_variant,
)
from workers.models.registry import build_model, train_flops_per_image

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
        assert get_variant(name) is v  # every named variant parses to itself
        assert name == f"{v.size}-{v.patch_size}" and v.family == "Mixer"
    b16 = MixerVariant("B-16", 12, 16, 768, 384, 3072, VARIANTS["B-16"].description, size="B")
    assert get_variant("B-16") == b16
    assert get_variant("H/14") is VARIANTS["H-14"]
    assert (VARIANTS["Nano-4"].num_blocks, VARIANTS["Nano-4"].hidden_dim) == (2, 32)


def test_size_table():
    assert list(SIZES) == ["Nano", "Micro", "Mini", "S", "B", "L", "H"]
    shapes = {k: (s.num_blocks, s.hidden_dim, s.tokens_mlp_dim, s.channels_mlp_dim) for k, s in SIZES.items()}
    assert shapes == {  # Table 1 of the paper (S..H) and big_vision's Model() table
        "Nano": (2, 32, 16, 64),
        "Micro": (4, 64, 32, 128),
        "Mini": (6, 128, 64, 256),
        "S": (8, 512, 256, 2048),
        "B": (12, 768, 384, 3072),
        "L": (24, 1024, 512, 4096),
        "H": (32, 1280, 640, 5120),
    }
    ranks = [get_variant(n).size_rank for n in ("Nano-4", "Micro-4", "Mini-4", "S-32", "B-16", "L-16", "H-14")]
    assert ranks == list(range(7))
    assert MixerVariant("custom", 1, 1, 1, 1, 1).size_rank == len(SIZES)


@pytest.mark.parametrize(
    "name,canonical,size,patch",
    [("S/16", "S-16", "S", 16), ("S-16", "S-16", "S", 16), ("L/32", "L-32", "L", 32), ("H/14", "H-14", "H", 14),
     ("Micro-4", "Micro-4", "Micro", 4), ("Nano-4", "Nano-4", "Nano", 4), ("b/16", "B-16", "B", 16),
     ("S/8", "S-8", "S", 8), ("Mini/1", "Mini-1", "Mini", 1)],
)
def test_parse_variant_round_trips(name, canonical, size, patch):
    v = parse_variant(name)
    assert (v.name, v.size, v.patch_size, v.family) == (canonical, size, patch, "Mixer")
    assert parse_variant(v.name) == v  # the canonical name parses back to the same variant
    table = SIZES[size]
    assert (v.num_blocks, v.hidden_dim, v.tokens_mlp_dim, v.channels_mlp_dim) == (
        table.num_blocks, table.hidden_dim, table.tokens_mlp_dim, table.channels_mlp_dim)
    assert get_variant is parse_variant


def test_custom_variant_from_the_size_table():
    s8 = get_variant("S/8")
    assert "S-8" not in VARIANTS and s8.description
    assert num_tokens(s8, 224) == 784
    model = build_model("S-8", 32, 10)
    assert model.variant == s8 and model.num_tokens == 16
    assert _numel(model) == param_count(s8, 32, 10)


def test_get_variant_slash_alias_and_unknown():
    assert get_variant("B/16") is get_variant("B-16")
    with pytest.raises(ValueError, match="X-99") as err:
        get_variant("X-99")
    for name in VARIANTS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["X/16", "B16", "B/0", "B/x", " B/16", "B/16 ", "B_16", "B/16/2", "", "B/-1", "B/1.5"])
def test_bad_variant_names_list_the_sizes(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))) as err:
        parse_variant(name)
    assert "Nano, Micro, Mini, S, B, L, H" in str(err.value)
    assert "B/16" in str(err.value)  # an example of the format


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
    assert isinstance(model, Classifier)  # the check is the shared base's, the note in parentheses Mixer's
    message = "Mixer Nano-4 was built for 16x16 inputs (S=16 tokens), got (32, 32)"
    with pytest.raises(ValueError, match=re.escape(message)):
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
        expected = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=0)
        model.train()
        a, b = model.forward_features(x), model.forward_features(x)
        assert not torch.allclose(a, b)
        # Without rescaling, training with no drops is the eval forward pass exactly.
        model.blocks.apply(lambda m: setattr(m, "stoch_depth", 0.0) if isinstance(m, MixerBlock) else None)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=0)


def test_drop_path_per_example_not_rescaled():
    torch.manual_seed(0)
    n, rate = 20_000, 0.3
    x = torch.randn(n, 3, 5)
    y = drop_path(x, rate, training=True)
    kept = (y == x).flatten(1).all(dim=1)  # kept branches are exactly unchanged (big_vision: no 1/(1-p))
    dropped = (y == 0).flatten(1).all(dim=1)  # dropped ones exactly zero, for the whole example
    assert torch.all(kept ^ dropped)
    # The empirical drop rate is within 5 standard deviations of a Binomial(n, rate) / n.
    assert abs(dropped.double().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    assert drop_path(x, rate, training=False) is x  # eval: a multiplication by 1.0
    assert drop_path(x, 0.0, training=True) is x
    assert torch.all(drop_path(x, 1.0, training=True) == 0)
    with pytest.raises(ValueError, match="rate"):
        drop_path(x, 1.5, training=True)


def test_block_draws_separate_masks_per_branch(monkeypatch):
    calls = []

    def recording_drop_path(x, rate, training):
        calls.append((tuple(x.shape), rate, training))
        return drop_path(x, rate, training)

    monkeypatch.setattr("workers.models.mixer.drop_path", recording_drop_path)
    model = build_model("Nano-4", 8, 10, stoch_depth=0.2).train()
    model(torch.randn(3, 3, 8, 8))
    # Two draws per block (token branch, then channel branch); rates ramp as i / max(N - 1, 1) * stoch_depth.
    assert calls == [((3, 4, 32), 0.0, True)] * 2 + [((3, 4, 32), 0.2, True)] * 2


def test_invalid_regularisation_rates():
    with pytest.raises(ValueError, match="stoch_depth"):
        build_model("Nano-4", 8, 10, stoch_depth=1.0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("Nano-4", 8, 10, dropout=-0.1)


# --- gradient checkpointing ----------------------------------------------------------------------


@pytest.mark.parametrize("stoch_depth", [0.0, 0.5])
def test_grad_checkpointing_matches(stoch_depth, monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr("workers.models.layers.checkpoint", counting_checkpoint)  # Classifier's block loop
    torch.manual_seed(0)
    model = build_model("Nano-4", 16, 10, stoch_depth=stoch_depth, head_bias_init=0.1).double().train()
    with torch.no_grad():
        model.head.weight.normal_()  # a zero head would give the blocks zero gradients
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth masks in both runs
        logits, out = model(x)
        (logits.square().mean() + out["pre_logits"].sum()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    assert not model.grad_checkpointing
    logits, expected = grads()
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    logits_ckpt, actual = grads()
    torch.testing.assert_close(logits_ckpt, logits, rtol=1e-12, atol=1e-12)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert any(torch.count_nonzero(g) for g in actual[1:-2])  # the blocks do get gradients
    assert calls == [{"use_reentrant": False}] * len(model.blocks)  # one checkpoint per block
    with torch.no_grad():
        model.eval()(x)
        model.train()(x)
    assert len(calls) == len(model.blocks)  # not in eval mode, nor without autograd
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


