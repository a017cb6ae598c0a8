"""workers.data.permute (the paper's Fig. 4 input permutations): determinism, structure, the reader, and the property
the paper relies on: a Mixer with consistently permuted stem and token-mixing weights is exactly invariant to the
``patches`` permutation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workers.config import AugmentConfig, DataConfig
from workers.data.fractions import fraction_slices
from workers.data.manifest import load_manifest
from workers.data.permute import apply_permutation, patch_permutations, permutation, permute_spec
from workers.data.reader import ShardDataset
from workers.models.registry import build_model


@pytest.mark.parametrize("mode", ["none", "patches", "pixels"])
def test_deterministic_bijection(mode: str) -> None:
    perm = permutation(mode, 16, 4, 3)
    assert perm.dtype == np.int64 and perm.shape == (256,) and not perm.flags.writeable
    assert np.array_equal(np.sort(perm), np.arange(256)), "a bijection of the 256 pixel positions"
    permutation.cache_clear()
    assert np.array_equal(permutation(mode, 16, 4, 3), perm), "a function of its arguments, not of the cache"
    if mode == "none":
        assert np.array_equal(perm, np.arange(256))
    else:
        assert not np.array_equal(perm, np.arange(256))
        assert not np.array_equal(permutation(mode, 16, 4, 4), perm), "another seed, another permutation"


def test_patches_moves_whole_blocks_with_one_within_patch_permutation() -> None:
    n, p = 12, 3
    perm = permutation("patches", n, p, 0).reshape(n, n)  # perm[Y, X] = flat source of output pixel (Y, X)
    sigma, tau = patch_permutations(n, p, 0)
    src_y, src_x = np.divmod(perm, n)
    g = n // p
    for j in range(g * g):
        by, bx = divmod(j, g)
        block_y = src_y[by * p:(by + 1) * p, bx * p:(bx + 1) * p]
        block_x = src_x[by * p:(by + 1) * p, bx * p:(bx + 1) * p]
        # Every output block reads exactly one source block (so its pixel multiset is that block's) ...
        source = {(int(y) // p, int(x) // p) for y, x in zip(block_y.ravel(), block_x.ravel())}
        assert source == {divmod(int(sigma[j]), g)}
        # ... with the same arrangement inside every block: position q comes from position tau[q].
        within = (block_y % p) * p + block_x % p
        assert np.array_equal(within.ravel(), tau)
    assert not np.array_equal(sigma, np.arange(g * g)) and not np.array_equal(tau, np.arange(p * p))


def test_pixels_is_a_global_permutation() -> None:
    n = 16
    perm = permutation("pixels", n, 4, 0)
    # Not block-structured: the 4x4 blocks' sources spread over many source blocks.
    src_blocks = (perm // n // 4) * 4 + (perm % n) // 4
    first_block = src_blocks.reshape(n, n)[:4, :4]
    assert len(set(first_block.ravel().tolist())) > 4
    # Its patch size is not used (so a size it does not divide is fine), and it is not the patches permutation.
    assert np.array_equal(permutation("pixels", n, 5, 0), perm)
    assert not np.array_equal(permutation("patches", n, 4, 0), perm)


def test_apply_permutation_moves_every_channel_alike() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    perm = permutation("pixels", 8, 4, 1)
    out = apply_permutation(image, perm)
    assert out.dtype == np.uint8 and out.shape == image.shape
    for c in range(3):
        assert np.array_equal(out[..., c].ravel(), image[..., c].ravel()[perm])
    assert np.array_equal(apply_permutation(image[..., 0], perm), out[..., 0])
    inverse = np.argsort(perm)
    assert np.array_equal(apply_permutation(out, inverse), image)
    with pytest.raises(ValueError, match="cannot permute a 4 x 4 image"):
        apply_permutation(image[:4, :4], perm)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"data.permute_patch = 5 must be a positive divisor of the image size 16"):
        permutation("patches", 16, 5, 0)
    with pytest.raises(ValueError, match="data.permute must be one of"):
        permutation("rows", 16, 4, 0)
    with pytest.raises(ValidationError, match=r"data.permute_patch \(5\) must divide data.image_size \(32\)"):
        DataConfig(train="t", val="v", permute="patches", permute_patch=5, image_size=32)
    DataConfig(train="t", val="v", permute="pixels", permute_patch=5, image_size=32)  # P only matters for patches
    data = DataConfig(train="t", val="v", permute="patches", permute_patch=4, permute_seed=7)
    assert permute_spec(data) == ("patches", 4, 7)
    assert permute_spec(DataConfig(train="t", val="v")) is None


def _permute_batch(x: torch.Tensor, perm: np.ndarray) -> torch.Tensor:
    """(B, C, H, W) images with their pixels moved by the flat gather index, every channel alike."""
    b, c, h, w = x.shape
    return x.flatten(2)[:, :, torch.tensor(perm)].reshape(b, c, h, w)


def test_mixer_with_permuted_weights_is_invariant_to_patches() -> None:
    """The paper's Fig. 4 property (module docstring of workers.data.permute): stem kernel W'[:, :, q] = W[:, :, tau[q]]
    and token-mixing fc1 columns, fc2 rows and fc2 bias permuted by sigma give f'(patches(x)) = f(x) exactly.

    Extends tests/test_model.py::test_consistent_token_permutation_is_invariant (patch order only) with the
    within-patch permutation, on the production permutation of workers.data.permute."""
    torch.manual_seed(0)
    n, p, seed = 16, 4, 5
    model = build_model("Micro-4", n, 10).double().eval()
    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    perm = permutation("patches", n, p, seed)
    sigma, tau = (torch.from_numpy(a) for a in patch_permutations(n, p, seed))
    xp = _permute_batch(x, perm)
    # The batch helper is apply_permutation (what the reader does) on each H x W x C image.
    per_image = np.stack([apply_permutation(img.permute(1, 2, 0).numpy(), perm) for img in x])
    np.testing.assert_array_equal(xp.numpy(), per_image.transpose(0, 3, 1, 2))
    with torch.no_grad():
        for block in model.blocks:  # non-zero biases, so the test covers them too
            block.token_mixing.fc1.bias.normal_()
            block.token_mixing.fc2.bias.normal_()
        model.stem.bias.normal_()
        model.head.weight.normal_()  # a non-zero head, so the logits are compared, not only pre_logits
        tokens = model.stem(x).flatten(2).transpose(1, 2)
        expected = model(x)[0]
        assert not torch.allclose(model(xp)[0], expected, atol=1e-3), "the plain model does see the permutation"

        # Stem: a P x P stride-P convolution; its kernel's pixel axis is permuted like the pixels of a patch.
        c_out, c_in = model.stem.weight.shape[:2]
        model.stem.weight.copy_(model.stem.weight.reshape(c_out, c_in, p * p)[:, :, tau].reshape(c_out, c_in, p, p))
        # ... so the permuted image gives the original tokens in the patch order sigma: T'_j = T_sigma[j].
        torch.testing.assert_close(model.stem(xp).flatten(2).transpose(1, 2), tokens[:, sigma], rtol=0, atol=1e-12)
        for block in model.blocks:
            mlp = block.token_mixing
            mlp.fc1.weight.copy_(mlp.fc1.weight[:, sigma])  # input features are tokens
            mlp.fc2.weight.copy_(mlp.fc2.weight[sigma])  # output features are tokens
            mlp.fc2.bias.copy_(mlp.fc2.bias[sigma])
        actual = model(xp)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def _plain_and_permuted(slices, spec, **kwargs) -> tuple[list, list]:
    plain = list(ShardDataset(slices, return_keys=True, **kwargs))
    permuted = list(ShardDataset(slices, return_keys=True, permute=spec, **kwargs))
    return plain, permuted


@pytest.mark.parametrize("mode", ["patches", "pixels"])
def test_reader_yields_the_permuted_images(digits16: Path, mode: str) -> None:
    """Eval and train views (same seed, same augmentation draws) of the reader with ``permute`` are the plain
    reader's views with their pixels moved by the one permutation, every sample alike."""
    manifest = load_manifest(str(digits16 / "val"))
    slices = fraction_slices(manifest, 1.0)
    perm = permutation(mode, 16, 4, 2)
    for kwargs in ({"train": False}, {"train": True, "seed": 3, "augment": AugmentConfig(crop="pad", pad=2)}):
        plain, permuted = _plain_and_permuted(slices, (mode, 4, 2), **kwargs)
        assert len(plain) == len(permuted) == manifest.num_samples
        for (image, label, key), (image_p, label_p, key_p) in zip(plain, permuted, strict=True):
            assert (label, key) == (label_p, key_p)
            # to_tensor maps each pixel on its own, so permuting the tensor is permuting the uint8 view
            assert torch.equal(image_p, _permute_batch(image[None], perm)[0])
            assert not torch.equal(image_p, image)
    plain, none = _plain_and_permuted(slices, ("none", 4, 2), train=False)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, none, strict=True))
    with pytest.raises(ValueError, match="data.permute_patch = 5"):
        ShardDataset(slices, train=False, image_size=16, permute=("patches", 5, 0))


def test_checkpoint_keeps_the_permutation_and_the_fewshot_verb_applies_it(digits16: Path, tmp_path: Path) -> None:
    """A model trained on permuted images is evaluated on the same permutation: the checkpoint records it
    (model.json), and `mixer-study fewshot` applies it without being told."""
    from analysis.features import extract_features, fewshot_for_model
    from tests.conftest import cli_env, run_cli
    from workers.training.checkpoint import load_model, read_permute, write_checkpoint

    torch.manual_seed(0)
    model = build_model("Nano-4", image_size=16, num_classes=10)
    spec = permute_spec(DataConfig(train="x", val="x", permute="pixels", permute_seed=3))
    write_checkpoint(tmp_path / "permuted", model, {"model": model.state_dict()}, permute=spec)
    write_checkpoint(tmp_path / "plain", model, {"model": model.state_dict()})
    assert read_permute(tmp_path / "permuted") == spec and read_permute(tmp_path / "plain") is None
    assert load_model(tmp_path / "permuted").image_size == 16  # the extra key does not disturb rebuilding

    kwargs = {"shots": (5,), "seeds": 2, "crop_fraction": 1.0}
    expected = fewshot_for_model(model, str(digits16 / "train"), str(digits16 / "test"), permute=spec, **kwargs)
    permuted, _ = extract_features(model, str(digits16 / "test"), crop_fraction=1.0, permute=spec)
    original, _ = extract_features(model, str(digits16 / "test"), crop_fraction=1.0)
    assert not np.allclose(permuted, original)  # the permutation changes what the model sees
    result = run_cli(["fewshot", "--checkpoint", str(tmp_path / "permuted"), "--data", str(digits16), "--shots", "5",
                      "--seeds", "2", "--crop-fraction", "1.0"], cli_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "input permutation pixels (seed 3)" in result.stdout
    printed = {key.strip(): float(value) for key, value in
               (line.split(":") for line in result.stdout.splitlines() if line.strip().startswith("fewshot/"))}
    assert abs(printed["fewshot/5shot"] - expected["fewshot/5shot"]) < 1e-4  # printed with 4 decimals
