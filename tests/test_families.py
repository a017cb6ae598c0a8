"""Tests for the model families beside Mixer (workers/models/vit.py, workers/models/bit.py) and their registry
(workers/models/registry.py).

Big models are built on the meta device (shapes only, no memory); FLOPs are counted there too, where
``F.scaled_dot_product_attention`` decomposes into batched matmuls that ``FlopCounterMode`` counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import to_rgb
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from analysis import figures
from pipeline.plan import plan_study
from pipeline.spec import StudyError, parse_study
from tests.conftest import study_dict
from workers.config import ModelConfig
from workers.models import registry
from workers.models.bit import BiTVariant, ResNetV2, StdConv2d
from workers.models.layers import Classifier
from workers.models.mixer import MlpMixer
from workers.models.registry import (
    FAMILIES,
    NAMED_VARIANTS,
    build_model,
    check_fits,
    forward_flops,
    get_variant,
    param_count,
    train_flops_per_image,
)
from workers.models.vit import VisionTransformer, ViTVariant
from workers.training.checkpoint import load_model, write_checkpoint
from workers.training.optim import decay_mask

# timm's parameter counts of the same architectures, 1000-class head, 224 px (paper-notes "Baselines").
TIMM_PARAMS = {
    "ViT-B/32": 88_224_232,
    "ViT-B/16": 86_567_656,
    "ViT-L/32": 306_535_400,
    "ViT-L/16": 304_326_632,
    "ViT-H/14": 632_045_800,
    "BiT-R50x1": 25_549_352,
    "BiT-R50x3": 217_319_080,
}
CPU_VARIANTS = ["Nano-4", "Micro-4", "Mini-4", "ViT-Nano/4", "ViT-Micro/4", "ViT-Mini/4", "BiT-Micro", "BiT-Mini"]


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _counted_flops(name: str, image_size: int, num_classes: int, device: str = "meta") -> int:
    with torch.device(device):
        model = build_model(name, image_size, num_classes)
        x = torch.zeros(2, 3, image_size, image_size)
    # The math backend on CPU: torch 2.13's counter has no formula for the fused CPU attention kernel.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2  # per image


# --- names and the registry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,canonical,family,kind,size,patch",
    [
        ("ViT-B/16", "ViT-B/16", "ViT", "attention", "B", 16),
        ("ViT-B-16", "ViT-B/16", "ViT", "attention", "B", 16),
        ("vit-micro/4", "ViT-Micro/4", "ViT", "attention", "Micro", 4),
        ("ViT-S/8", "ViT-S/8", "ViT", "attention", "S", 8),
        ("BiT-R50x1", "BiT-R50x1", "BiT", "convolution", "R50x1", None),
        ("bit-r101x3", "BiT-R101x3", "BiT", "convolution", "R101x3", None),
        ("BiT-R26x2", "BiT-R26x2", "BiT", "convolution", "R26x2", None),
        ("BiT-micro", "BiT-Micro", "BiT", "convolution", "Micro", None),
        ("B/16", "B-16", "Mixer", "Mixer", "B", 16),
        ("Mixer-B/16", "B-16", "Mixer", "Mixer", "B", 16),
        ("Micro-4", "Micro-4", "Mixer", "Mixer", "Micro", 4),
    ],
)
def test_one_parser_for_every_family(name, canonical, family, kind, size, patch):
    v = get_variant(name)
    assert (v.name, v.family, v.kind, v.size, v.patch_size) == (canonical, family, kind, size, patch)
    assert get_variant(v.name) == v and get_variant(v) is v
    assert ModelConfig(variant=name).variant == canonical  # the config canonicalises every family's names
    assert v.description


@pytest.mark.parametrize("name", ["X-99", "ViT-X/16", "ViT-B/0", "ViT-B", "BiT-R51x1", "BiT-R50x0", "BiT-Huge", "ViT"])
def test_unknown_names_list_the_families(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))) as err:
        get_variant(name)
    message = str(err.value)
    for example in ("B-16", "ViT-B/16", "BiT-R50x1", "Micro-4", "Mixer", "attention", "convolution"):
        assert example in message


def test_named_variants_have_the_uniform_attributes():
    assert list(FAMILIES) == ["Mixer", "ViT", "BiT"]
    for family in FAMILIES.values():
        assert set(family.variants) <= set(NAMED_VARIANTS)
        ranks = [v.size_rank for v in family.variants.values()]
        assert ranks == sorted(ranks)  # each family listed small to large
    for name, v in NAMED_VARIANTS.items():
        assert get_variant(name) is v and v.name == name
        assert v.family in FAMILIES and v.kind == FAMILIES[v.family].kind and v.size and v.description
        assert isinstance(v.size_rank, int | float)
        assert (v.patch_size is None) == (v.family == "BiT")
    # One size order across families: the CPU sizes share the Mixer ranks; R50x1 sits between S and B.
    assert [get_variant(n).size_rank for n in ("Micro-4", "ViT-Micro/4", "BiT-Micro")] == [1, 1, 1]
    assert get_variant("S-16").size_rank < get_variant("BiT-R50x1").size_rank < get_variant("B-16").size_rank
    assert get_variant("ViT-Mini/4").size_rank < get_variant("ViT-Ti/16").size_rank < get_variant("ViT-S/16").size_rank


def test_check_fits_per_family():
    check_fits("ViT-B/16", 224)
    check_fits("BiT-R50x1", 32)
    check_fits("BiT-Micro", 4)
    with pytest.raises(ValueError, match="P=16"):
        check_fits("ViT-B/16", 100)
    with pytest.raises(ValueError, match="P=4 of Mixer Micro-4"):
        check_fits("Micro-4", 30)
    with pytest.raises(ValueError, match="total stride 32 of BiT-R50x1"):
        check_fits("BiT-R50x1", 16)
    with pytest.raises(ValueError, match="P=16"):
        VisionTransformer("ViT-B/16", 100, 10)
    with pytest.raises(ValueError, match="total stride"):
        ResNetV2("BiT-R50x1", 16, 10)


# --- sizes and costs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_counts_match_timm(name):
    assert param_count(name, 224, 1000) == TIMM_PARAMS[name]
    with torch.device("meta"):
        full, headless = build_model(name, 224, 1000), build_model(name, 224, 0)
    assert _numel(full) == TIMM_PARAMS[name]
    assert _numel(headless) == param_count(name, 224, 0) == TIMM_PARAMS[name] - (full.head.in_features + 1) * 1000


@pytest.mark.parametrize(
    "name,image_size,num_classes",
    [("ViT-Nano/4", 16, 10), ("ViT-Micro/4", 32, 10), ("ViT-Mini/4", 32, 7), ("ViT-B/16", 224, 1000),
     ("ViT-S/32", 224, 1000), ("ViT-H/14", 224, 1000), ("ViT-Ti/8", 48, 0),
     ("BiT-Micro", 16, 10), ("BiT-Mini", 32, 10), ("BiT-R50x1", 224, 1000), ("BiT-R50x1", 100, 10),
     ("BiT-R26x1", 33, 0), ("Micro-4", 32, 10)],
)
def test_forward_flops_match_torch_flop_counter(name, image_size, num_classes):
    assert _counted_flops(name, image_size, num_classes) == forward_flops(name, image_size, num_classes)


@pytest.mark.parametrize("name", ["ViT-Micro/4", "BiT-Micro"])
def test_forward_flops_match_the_counter_on_real_cpu_tensors(name):
    assert _counted_flops(name, 16, 10, device="cpu") == forward_flops(name, 16, 10)


def test_vit_flops_hand_count_and_quadratic_attention():
    # ViT-B/16 at 224: S = 196 patches, T = 197 tokens, C = 768, D = 3072, 12 blocks, 1000 classes.
    s, t, c, d = 196, 197, 768, 3072
    stem = s * 16 * 16 * 3 * c
    block = t * c * 3 * c + t * c * c + 2 * t * c * d + 2 * t * t * c
    assert forward_flops("ViT-B/16", 224, 1000) == 2 * (stem + 12 * block + c * 1000) == 35_127_656_448
    assert train_flops_per_image("ViT-B/16", 224, 1000) == 3 * 35_127_656_448
    # Without the parameter-free T² term (what "6 x parameters x tokens" misses) the blocks are linear in T.
    per_token = []
    for n, tokens in ((224, 197), (448, 785)):
        blocks = forward_flops("ViT-B/16", n, 0) - 2 * (n * n * 3 * c) - 2 * 12 * 2 * tokens * tokens * c
        per_token.append(blocks / tokens)
    assert per_token[0] == per_token[1] == 2 * 12 * (4 * c * c + 2 * c * d)
    r50 = forward_flops("BiT-R50x1", 224, 1000)
    assert 8.1e9 < r50 < 8.3e9  # 4.1 GMACs, the usual ResNet-50 figure


# --- modules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_cpu_variants_uniform_api(name, image_size):
    torch.manual_seed(0)
    model = build_model(name, image_size, 10, head_bias_init=-2.3)
    v = get_variant(name)
    assert model.variant == v and (model.image_size, model.num_classes) == (image_size, 10)
    assert _numel(model) == param_count(v, image_size, 10)
    model.eval()
    x = torch.randn(2, 3, image_size, image_size)
    logits, out = model(x)
    width = model.head.in_features
    assert logits.shape == (2, 10) and out["pre_logits"].shape == (2, width)
    torch.testing.assert_close(model.forward_features(x), out["pre_logits"])
    torch.testing.assert_close(logits, torch.full((2, 10), -2.3))  # zero head kernel, constant bias
    assert torch.count_nonzero(model.head.weight) == 0
    with pytest.raises(ValueError, match=f"{image_size}x{image_size}"):
        model(torch.randn(1, 3, image_size + 4, image_size + 4))
    with torch.device("meta"):  # shapes only
        headless = build_model(name, image_size, 0).eval()
        features, out = headless(torch.empty(2, 3, image_size, image_size))
    assert features.shape == (2, width) and features is out["pre_logits"]


def test_cpu_variant_sizes_near_the_mixer():
    # BiT's CPU widths were chosen for parameters near Mixer Micro-4 / Mini-4 (10 classes, 16 and 32 px).
    assert param_count("BiT-Micro", 32, 10) == 79_826
    assert param_count("BiT-Mini", 32, 10) == 404_954
    for mixer, bit in (("Micro-4", "BiT-Micro"), ("Mini-4", "BiT-Mini")):
        for size in (16, 32):
            assert 0.85 < param_count(bit, size, 10) / param_count(mixer, size, 10) < 1.1
    # The ViT CPU sizes use the Mixer's layers, C and D_C.
    for size in ("Nano", "Micro", "Mini"):
        m, t = get_variant(f"{size}-4"), get_variant(f"ViT-{size}/4")
        assert (t.num_blocks, t.hidden_dim, t.patch_size) == (m.num_blocks, m.hidden_dim, 4)
        assert t.hidden_dim % t.num_heads == 0
    assert get_variant("ViT-Micro/4").mlp_dim == get_variant("Micro-4").channels_mlp_dim


@pytest.mark.parametrize("name", ["ViT-Micro/4", "BiT-Micro"])
def test_training_step_grads_and_checkpointing(name):
    torch.manual_seed(0)
    model = build_model(name, 16, 10, stoch_depth=0.0)
    with torch.no_grad():
        model.head.weight.normal_(std=0.1)  # a zero head passes no gradient to the trunk
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x)[0], y).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    if name.startswith("ViT"):
        assert plain["pos_embed"].abs().sum() > 0 and plain["cls_token"].abs().sum() > 0
    model.set_grad_checkpointing()
    for k, g in grads().items():
        torch.testing.assert_close(g, plain[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ViT-Micro/4", "BiT-Micro"])
def test_stochastic_depth_ramp_and_eval(name):
    model = build_model(name, 8, 10, stoch_depth=0.3)
    rates = [b.stoch_depth for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert np.allclose(np.diff(rates), rates[1] - rates[0])  # linear ramp over blocks (units for BiT)
    x = torch.randn(8, 3, 8, 8)
    model.eval()
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x))
    model.train()
    torch.manual_seed(1)
    a = model.forward_features(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model.forward_features(x))


def test_decay_mask_leaves_out_pos_embed_and_class_token():
    # big_vision decays `.*/kernel$` only: ViT's posemb and cls are not kernels; BiT's standardised convs are.
    vit_mask = decay_mask(VisionTransformer("ViT-Nano/4", 8, 10))
    assert set(vit_mask) == {n for n, _ in VisionTransformer("ViT-Nano/4", 8, 10).named_parameters()}
    assert not vit_mask["pos_embed"] and not vit_mask["cls_token"]
    assert vit_mask["patch_embed.weight"] and vit_mask["head.weight"]
    for kernel in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        assert vit_mask[f"blocks.1.{kernel}"]
    assert not any(vit_mask[n] for n in vit_mask if n.endswith("bias") or "norm" in n)
    bit_mask = decay_mask(ResNetV2("BiT-Micro", 8, 10))
    assert isinstance(ResNetV2("BiT-Micro", 8, 10).blocks[0].conv2, torch.nn.Conv2d)
    assert bit_mask["stem.0.weight"] and bit_mask["blocks.0.conv2.weight"] and bit_mask["blocks.0.downsample.weight"]
    assert not bit_mask["blocks.0.norm1.weight"] and not bit_mask["norm.bias"] and not bit_mask["head.bias"]


def test_weight_standardisation():
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    w = conv.weight
    w_hat = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, padding=1), rtol=1e-5, atol=1e-5)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # per-kernel affine changes of the weight do not change the output
    torch.testing.assert_close(conv(x), y, rtol=1e-4, atol=1e-4)


def test_vit_position_embedding_and_class_token_layout():
    # What resolution changes rely on: pos_embed (1, S+1, C) covers the class token (row 0) and the S patches; the
    # class token has its own (1, 1, C) Parameter; pos_embed is the only parameter that depends on image_size.
    small, big = VisionTransformer("ViT-Micro/4", 16, 10), VisionTransformer("ViT-Micro/4", 32, 10)
    assert small.pos_embed.shape == (1, 16 + 1, 64) and big.pos_embed.shape == (1, 64 + 1, 64)
    assert small.cls_token.shape == (1, 1, 64) and torch.count_nonzero(small.cls_token) == 0
    assert small.num_tokens == 16 and small.num_prefix_tokens == 1
    differ = {k for k, v in small.state_dict().items() if v.shape != big.state_dict()[k].shape}
    assert differ == {"pos_embed"}
    bit_small, bit_big = ResNetV2("BiT-Micro", 16, 10), ResNetV2("BiT-Micro", 32, 10)
    bit_big.load_state_dict(bit_small.state_dict())  # BiT's weights fit any resolution


@pytest.mark.parametrize("name", ["ViT-Micro/4", "BiT-Micro"])
def test_checkpoint_round_trip(name, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(name, 16, 10, head_bias_init=-1.0)
    with torch.no_grad():
        model.head.weight.normal_()
    write_checkpoint(tmp_path, model, {"model": model.state_dict()})
    assert json.loads((tmp_path / "model.json").read_text()) == {"variant": name, "image_size": 16, "num_classes": 10}
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.variant == model.variant and not loaded.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])


def test_old_mixer_checkpoint_still_loads(tmp_path: Path):
    model = MlpMixer("Nano-4", 8, 10)
    (tmp_path / "model.json").write_text(json.dumps({"variant": "Nano-4", "image_size": 8, "num_classes": 10}))
    torch.save({"model": model.state_dict(), "trainer": {}}, tmp_path / "state.pt")
    assert isinstance(load_model(tmp_path), MlpMixer)


# --- studies and figures --------------------------------------------------------------------------


def test_mixed_family_grid_validates_and_plans(digits16: Path):
    raw = study_dict("families", digits16, grid={"model.variant": ["Micro-4", "ViT-Micro-4", "bit-micro"]})
    spec = parse_study(raw)
    plans = plan_study(spec)
    assert [p.point["model.variant"] for p in plans] == ["Micro-4", "ViT-Micro/4", "BiT-Micro"]
    assert [p.name for p in plans] == ["variant=Micro-4", "variant=ViT-Micro_4", "variant=BiT-Micro"]
    for p in plans:
        assert p.train_flops == train_flops_per_image(p.config.model.variant, 16, p.num_classes) * p.images_seen
    odd = study_dict("odd", digits16, grid={"model.variant": ["ViT-Micro/4"]})
    odd["base"]["data"]["image_size"] = 18
    with pytest.raises(StudyError, match="ViT-Micro/4 does not fit data.image_size"):
        plan_study(parse_study(odd))
    with pytest.raises(StudyError, match=r"grid.model.variant\[1\] -> model.variant.*unknown ViT variant"):
        parse_study(study_dict("bad", digits16, grid={"model.variant": ["Micro-4", "ViT-Q/4"]}))


def _family_df() -> pd.DataFrame:
    rows = []
    for i, variant in enumerate(["BiT-Micro", "ViT-Micro/4", "Mini-4", "Micro-4", "ViT-Nano/4", "BiT-Mini"]):
        for j, images in enumerate((100, 300, 1000)):
            rows.append({"variant": variant, "family": figures.family_of(variant), "train_images": images,
                         "train_flops": 1e12 * (i + 1) * (j + 1), "img_per_s_per_core": 1000.0 / (i + 1),
                         "fewshot_5shot": 0.1 * i + 0.05 * j})
    return pd.DataFrame(rows)


def test_figures_style_families_as_the_paper():
    assert [figures.kind_of(n) for n in ("B-16", "ViT-B/16", "BiT-R50x1")] == ["Mixer", "attention", "convolution"]
    assert [figures.family_of(n) for n in ("B-16", "ViT-B/16", "BiT-R50x1")] == ["Mixer", "ViT", "BiT"]
    assert figures.size_of("BiT-R50x3") == "R50x3" and figures.size_of("ViT-L/16") == "L"
    (ax,) = figures._build_fig2_right(_family_df(), "fewshot_5shot").axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Micro-4", "Mini-4", "ViT-Nano/4", "ViT-Micro/4", "BiT-Micro", "BiT-Mini"]
    lines = {line.get_label(): line for line in ax.lines}  # one curve per model
    assert [lines[n].get_linestyle() for n in ("Micro-4", "ViT-Micro/4", "BiT-Micro")] == ["-", "--", ":"]
    colours = {n: lines[n].get_color() for n in lines}
    assert len(set(colours.values())) == len(colours)
    hue = {n: np.argmax(to_rgb(c)) for n, c in colours.items()}  # the red, blue, green channel dominates
    assert (hue["Micro-4"], hue["ViT-Micro/4"], hue["BiT-Micro"]) == (0, 2, 1)
    assert sum(to_rgb(colours["Mini-4"])) < sum(to_rgb(colours["Micro-4"]))  # larger is darker
    assert lines["BiT-Micro"].get_marker() != lines["Micro-4"].get_marker()
    left = figures._build_fig3(_family_df(), "fewshot_5shot").axes[0]
    assert [line.get_label() for line in left.lines] == ["Mixer", "ViT", "BiT"]  # one line per family
    assert [line.get_linestyle() for line in left.lines] == ["-", "--", ":"]


def test_registry_builds_what_the_family_module_builds():
    for name, cls in (("Micro-4", MlpMixer), ("ViT-Micro/4", VisionTransformer), ("BiT-Micro", ResNetV2)):
        assert type(build_model(name, 16, 10)) is cls
    assert isinstance(get_variant("ViT-B/16"), ViTVariant) and isinstance(get_variant("BiT-R50x1"), BiTVariant)
    assert registry.shape_summary("ViT-B/16") == "12 blocks, P 16, C 768, MLP 3072, 12 heads"
    assert registry.shape_summary("BiT-R50x1").startswith("50 layers, units 3/4/6/3")


def test_state_dict_keys_are_those_checkpoints_hold():
    # Every family's model is a layers.Classifier; the base holds only the head, so the keys (hence checkpoints
    # written before the base existed) are each family's own: ends and counts of the 16 px CPU models' state_dicts.
    expected = {
        "Nano-4": (30, ["stem.weight", "stem.bias", "blocks.0.norm1.weight"]),
        "ViT-Nano/4": (32, ["cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias"]),
        "BiT-Micro": (89, ["stem.0.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias"]),
    }
    for name, (count, first) in expected.items():
        model = build_model(name, 16, 10)
        keys = list(model.state_dict())
        assert isinstance(model, Classifier)
        assert len(keys) == count and keys[:len(first)] == first
        assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
