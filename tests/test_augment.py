"""workers.data.augment: big_vision's inception crop / eval view / RandAugment / mixup, each checked against an
independent numpy computation of what the TF op does (not against the implementation's own helpers)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from workers.config import AugmentConfig
from workers.data import augment as A


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# inception crop


def test_crop_boxes_respect_area_and_aspect():
    rng, (W, H) = random.Random(0), (300, 200)
    areas, aspects = [], []
    for _ in range(5000):
        x, y, w, h = A.sample_crop_box(W, H, rng)
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H
        assert (x + w < W or w == W) and (y + h < H or h == H), "TF's Uniform(n) is [0, n): never the last offset"
        areas.append(w * h / (W * H))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.05 and areas.max() <= 1.0
    # aspect uniform in [0.75, 1.33], then width = round(height * aspect): at most half a pixel off
    assert aspects.min() >= 0.75 - 0.5 / 40 and aspects.max() <= 1.33 + 0.5 / 40
    assert aspects.min() < 0.77 and aspects.max() > 1.31, "the whole aspect range is used"
    # TF draws the HEIGHT uniformly, so the area (~ height^2) leans small: density ~ 1 / sqrt(area). A uniform area
    # on [0.05, 0.887] would put 18 % of the crops below 0.2 and average 0.47.
    assert (areas < 0.2).mean() > 0.3 and areas.mean() < 0.4 and (areas > 0.6).mean() > 0.05
    # at aspect <= 1.33 a crop never covers a 3:2 image: max area 266 x 200
    assert areas.max() <= 266 * 200 / (W * H) + 1e-9


def test_crop_box_falls_back_to_whole_image_and_is_deterministic():
    # a 1000 x 10 strip has no crop of >= 90 % area with aspect <= 1.33: 100 failed attempts -> whole image
    assert A.sample_crop_box(1000, 10, random.Random(0), area_min=0.9) == (0, 0, 1000, 10)
    a = [A.sample_crop_box(300, 200, random.Random(5)) for _ in range(2)]
    assert a[0] == a[1]


def _tf_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.image.resize(bilinear, antialias=False): half-pixel centres, edge clamp, float result truncated to uint8."""
    def taps(out: int, inp: int):
        c = (np.arange(out) + 0.5) * (inp / out) - 0.5
        lower = np.floor(c)
        return np.clip(lower, 0, inp - 1).astype(int), np.clip(np.ceil(c), 0, inp - 1).astype(int), c - lower

    y0, y1, fy = taps(out_h, image.shape[0])
    x0, x1, fx = taps(out_w, image.shape[1])
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [16, 32, 57])
def test_inception_crop_is_the_box_resized_bilinearly(size):
    image = _random_image(60, 90, seed=size)
    smooth = np.asarray(Image.fromarray(image).resize((90, 60), Image.Resampling.BOX))  # any content works
    for seed in range(5):
        out = np.asarray(A.inception_crop(Image.fromarray(smooth), size, random.Random(seed)))
        x, y, w, h = A.sample_crop_box(90, 60, random.Random(seed))
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        expected = _tf_bilinear(smooth[y : y + h, x : x + w], size, size)
        assert np.abs(out.astype(int) - expected).max() <= 1  # PIL double vs float64 here: truncation ties


# ---------------------------------------------------------------------------------------------------------------
# eval view, pad crop, flip


def test_resize_small_and_central_crop_sizes():
    img = Image.new("RGB", (300, 200))
    assert A.resize_small(img, 96).size == (144, 96)
    assert A.resize_small(Image.new("RGB", (25, 10)), 5).size == (12, 5), "12.5 rounds half to even, as tf.round"
    assert A.central_crop(Image.new("RGB", (7, 5)), 3).size == (3, 3)
    with pytest.raises(ValueError, match="smaller than the crop"):
        A.central_crop(Image.new("RGB", (7, 2)), 3)


def test_eval_view_is_the_central_crop_of_the_resized_image():
    small = _random_image(32, 48, seed=1)
    big = np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))  # 64 x 96, constant 2x2 blocks: BOX /2 is exact
    out = np.asarray(A.eval_view(Image.fromarray(big), 16, 0.5))  # shorter side -> 32, i.e. `small`
    # central crop of a 32 x 48 image: top (32 - 16) // 2 = 8, left (48 - 16) // 2 = 16
    np.testing.assert_array_equal(out, small[8:24, 16:32])
    square = _random_image(20, 20, seed=2)
    np.testing.assert_array_equal(A.eval_array(Image.fromarray(square), 20, AugmentConfig(eval_crop_fraction=1.0)),
                                  square)
    # big_vision's resize_small(256) | central_crop(224)
    view = A.eval_view(Image.new("RGB", (512, 384)), 224, 0.875)
    assert view.size == (224, 224)
    assert A.resize_small(Image.new("RGB", (512, 384)), round(224 / 0.875)).size == (341, 256)


def test_pad_crop_is_a_window_of_the_reflect_padded_image():
    image = _random_image(6, 7, seed=3)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    offsets = set()
    for seed in range(300):
        out = A.pad_crop(image, 2, random.Random(seed))
        matches = [(t, left) for t in range(5) for left in range(5)
                   if np.array_equal(out, padded[t : t + 6, left : left + 7])]
        assert matches, "every output is a window of the padded image"
        offsets.update(matches)
    assert len(offsets) == 25, "all (2 * pad + 1)^2 offsets occur"
    tiny = _random_image(2, 2, seed=4)  # pad >= size: reflect impossible, edge padding
    out = A.pad_crop(tiny, 3, random.Random(0))
    assert out.shape == (2, 2, 3) and set(map(tuple, out.reshape(-1, 3).tolist())) <= set(
        map(tuple, tiny.reshape(-1, 3).tolist()))


def test_flip_lr():
    image = _random_image(4, 5)
    outs = [A.flip_lr(image, random.Random(s)) for s in range(200)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs, strict=True))
    assert 60 < sum(flipped) < 140


# ---------------------------------------------------------------------------------------------------------------
# RandAugment, op by op


def test_posterize_keeps_top_bits():
    image = _random_image(8, 8)
    for bits in range(1, 9):
        mask = (0xFF << (8 - bits)) & 0xFF
        np.testing.assert_array_equal(A.posterize(image, bits), image & mask)
    # TF: shift 8 - bits as uint8, clamped to 7 by the shift kernels -> 0 bits and > 8 bits keep the top bit
    np.testing.assert_array_equal(A.posterize(image, 0), image & 0x80)
    np.testing.assert_array_equal(A.posterize(image, 12), image & 0x80)


def test_solarize_threshold_wraps_like_uint8():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    v = image.astype(int)
    np.testing.assert_array_equal(A.solarize(image, 100), np.where(v < 100, v, 255 - v))
    np.testing.assert_array_equal(A.solarize(image, 384), np.where(v < 128, v, 255 - v))  # magnitude 15
    np.testing.assert_array_equal(A.solarize(image, 256), 255 - v)  # magnitude 10: everything inverted
    np.testing.assert_array_equal(A.solarize_add(image, 50), np.where(v < 128, np.minimum(v + 50, 255), v))
    np.testing.assert_array_equal(A.solarize_add(image, 165), np.where(v < 128, np.minimum(v + 165, 255), v))
    np.testing.assert_array_equal(A.invert(image), 255 - v)


def test_translate_by_exact_pixels():
    image = _random_image(5, 8)
    out = A.translate_x(image, 3)
    np.testing.assert_array_equal(out[:, :5], image[:, 3:])
    assert (out[:, 5:] == 128).all()
    out = A.translate_x(image, -2)
    np.testing.assert_array_equal(out[:, 2:], image[:, :-2])
    assert (out[:, :2] == 128).all()
    out = A.translate_y(image, 2)
    np.testing.assert_array_equal(out[:3], image[2:])
    assert (out[3:] == 128).all()
    assert (A.translate_x(image, 150) == 128).all(), "magnitude 15 moves a small image out of view"


def test_rotate_matches_rot90_up_to_fill():
    square = _random_image(7, 7, seed=5)
    np.testing.assert_array_equal(A.rotate(square, 0), square)
    np.testing.assert_array_equal(A.rotate(square, 90), np.rot90(square))
    np.testing.assert_array_equal(A.rotate(square, -90), np.rot90(square, -1))
    np.testing.assert_array_equal(A.rotate(square, 180), np.rot90(square, 2))
    # 4 x 6: centre (2.5, 1.5) fixed; output (x, y) reads input column 4 - y, row x - 1 where that exists
    image = _random_image(4, 6, seed=6)
    out = A.rotate(image, 90)
    for y in range(4):
        for x in range(6):
            sx, sy = 4 - y, x - 1
            inside = 0 <= sx < 6 and 0 <= sy < 4
            np.testing.assert_array_equal(out[y, x], image[sy, sx] if inside else [128, 128, 128])
    grey = np.full((21, 21, 3), 7, dtype=np.uint8)
    out = A.rotate(grey, 45)
    assert (out[10, 10] == 7).all() and (out[0, 0] == 128).all() and (out[20, 20] == 128).all()


def test_shear_reads_sheared_coordinates():
    image = _random_image(6, 9, seed=7)
    for level in (1.0, 0.5, -0.5):
        out = A.shear_x(image, level)
        for y in range(6):
            for x in range(9):
                v = x + level * y
                sx = int(np.floor(v + 0.5)) if v >= 0 else -int(np.floor(-v + 0.5))  # round half away from 0
                expected = image[y, sx] if 0 <= sx < 9 else [128, 128, 128]
                np.testing.assert_array_equal(out[y, x], expected)
    out = A.shear_y(image, 1.0)
    for y in range(6):
        for x in range(9):
            expected = image[y + x, x] if y + x < 6 else [128, 128, 128]
            np.testing.assert_array_equal(out[y, x], expected)


def test_cutout_fills_a_clipped_square():
    image = _random_image(8, 8, seed=8)
    out = A.cutout(image, 2, (2, 3))
    expected = image.copy()
    expected[0:4, 1:5] = 128
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(A.cutout(image, 0, (4, 4)), image)
    out = A.cutout(image, 3, (7, 0))  # clipped at the bottom-left corner
    assert (out[4:8, 0:3] == 128).all() and np.array_equal(out[:4], image[:4])


def test_equalize_on_constructed_histograms():
    # channel 0: 512 x 10, 256 x 20, 256 x 30 (32 x 32 px); step = (1024 - 256) // 255 = 3
    # lut[v] = (cumsum[v - 1] + 1) // 3: lut[10] = 0, lut[20] = 513 // 3 = 171, lut[30] = 769 // 3 = 256 -> 255
    ch = np.array([10] * 512 + [20] * 256 + [30] * 256, dtype=np.uint8).reshape(32, 32)
    image = np.stack([ch, np.full_like(ch, 77), ch], axis=2)
    out = A.equalize(image)
    np.testing.assert_array_equal(out[:, :, 0], np.select([ch == 10, ch == 20], [0, 171], 255))
    np.testing.assert_array_equal(out[:, :, 1], 77), "one value: step 0, channel unchanged"
    np.testing.assert_array_equal(out[:, :, 2], out[:, :, 0])


def test_autocontrast_on_constructed_ranges():
    ch = np.array([[51, 102], [76, 51]], dtype=np.uint8)
    image = np.stack([ch, np.full_like(ch, 9), np.array([[0, 255], [3, 4]], dtype=np.uint8)], axis=2)
    out = A.autocontrast(image)
    # scale = 255 / (102 - 51) = 5, offset = -255: 51 -> 0, 102 -> 255, 76 -> 125
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [125, 0]])
    np.testing.assert_array_equal(out[:, :, 1], 9)  # constant: unchanged
    np.testing.assert_array_equal(out[:, :, 2], image[:, :, 2])  # already spans 0..255


def test_brightness_and_contrast_blend_formulas():
    image = _random_image(32, 64, seed=9)
    v = image.astype(np.float64)
    np.testing.assert_array_equal(A.brightness(image, 0.5), np.floor(0.5 * v))
    np.testing.assert_array_equal(A.brightness(image, 1.5), np.clip(np.floor(1.5 * v), 0, 255))
    np.testing.assert_array_equal(A.brightness(image, 1.0), image)
    # TF's contrast "mean" is the pixel count / 256: 32 * 64 / 256 = 8, whatever the pixels
    np.testing.assert_array_equal(A.contrast(image, 0.0), np.full_like(image, 8))
    np.testing.assert_array_equal(A.contrast(image, 0.5), np.floor(8 + 0.5 * (v - 8)))
    np.testing.assert_array_equal(A.contrast(image, 2.0), np.clip(np.floor(8 + 2.0 * (v - 8)), 0, 255))
    assert (A.contrast(_random_image(16, 16), 0.0) == 1).all()


def test_color_blends_with_tf_grayscale():
    pixels = np.array([[[100, 150, 200], [255, 0, 0], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    # tf.image.rgb_to_grayscale on uint8: trunc(255.5 * (0.2989 r + 0.587 g + 0.114 b) / 255)
    grey = np.floor(255.5 * (pixels.astype(np.float64) @ [0.2989, 0.587, 0.114]) / 255)
    np.testing.assert_array_equal(grey, [[141, 76, 255, 0]])
    np.testing.assert_array_equal(A.color(pixels, 0.0), np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(A.color(pixels, 1.0), pixels)
    expected = np.clip(np.floor(grey[:, :, None] + 2.0 * (pixels - grey[:, :, None])), 0, 255)
    np.testing.assert_array_equal(A.color(pixels, 2.0), expected)


def test_sharpness_blends_with_the_smooth_filter():
    image = _random_image(9, 11, seed=10)
    np.testing.assert_array_equal(A.sharpness(image, 1.0), image)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    smooth = np.zeros((7, 9, 3))
    for dy in range(3):
        for dx in range(3):
            smooth += kernel[dy, dx] * image[dy : dy + 7, dx : dx + 9]
    out = A.sharpness(image, 0.0)  # the degenerate image: smoothed interior, original border
    np.testing.assert_array_equal(out[0], image[0])
    np.testing.assert_array_equal(out[:, -1], image[:, -1])
    diff = out[1:-1, 1:-1].astype(int) - np.floor(smooth)
    near_integer = np.abs(smooth - np.round(smooth)) < 1e-4  # float32 vs float64 may truncate differently there
    assert (diff[~near_integer] == 0).all() and (np.abs(diff) <= 1).all()


def test_level_to_arg_matches_tf_at_magnitudes_10_and_15():
    rng = random.Random(0)
    args = {name: A.level_to_arg(name, 15, rng) for name in A.RANDAUG_OPS}
    assert args["Posterize"] == (6,) and args["Solarize"] == (384,) and args["SolarizeAdd"] == (165,)
    assert args["Cutout"] == (60,) and args["AutoContrast"] == args["Equalize"] == args["Invert"] == ()
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert args[name] == pytest.approx((2.8,))
    for name, value in (("Rotate", 45.0), ("ShearX", 0.45), ("ShearY", 0.45), ("TranslateX", 150.0)):
        assert abs(args[name][0]) == pytest.approx(value)
    signs = Counter(A.level_to_arg("Rotate", 10, rng)[0] for _ in range(400))
    assert set(signs) == {30.0, -30.0} and 150 < signs[30.0] < 250
    assert A.level_to_arg("Posterize", 10, rng) == (4,) and A.level_to_arg("Solarize", 10, rng) == (256,)
    with pytest.raises(ValueError, match="unknown"):
        A.level_to_arg("Blur", 10, rng)


def test_randaugment_picks_ops_uniformly_and_is_deterministic(monkeypatch):
    image = _random_image(24, 24, seed=11)
    aug = A.RandAugment(2, 15)
    a, b = aug(image, random.Random(3)), aug(image, random.Random(3))
    np.testing.assert_array_equal(a, b)
    assert sum(not np.array_equal(aug(image, random.Random(s)), a) for s in range(10)) >= 8

    picked: list[str] = []
    monkeypatch.setattr(A.RandAugment, "apply_op", lambda self, name, img, rng: picked.append(name) or img)
    rng = random.Random(0)
    for _ in range(800):
        aug(image, rng)
    counts = Counter(picked)
    assert len(picked) == 1600 and set(counts) == set(A.RANDAUG_OPS)
    assert all(60 < c < 140 for c in counts.values()), counts


@pytest.mark.parametrize("magnitude", [0, 15, 30])
def test_every_op_runs_at_extreme_magnitudes(magnitude):
    image, rng = _random_image(16, 20, seed=12), random.Random(0)
    aug = A.RandAugment(1, magnitude)
    for name in A.RANDAUG_OPS:
        out = aug.apply_op(name, image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8, name


# ---------------------------------------------------------------------------------------------------------------
# views


@pytest.mark.parametrize("crop", ["inception", "pad", "none"])
def test_train_view_shapes_and_determinism(crop):
    image = Image.fromarray(_random_image(40, 60, seed=13))
    cfg = AugmentConfig(crop=crop, pad=2 if crop == "pad" else 0, flip=True, randaug=(2, 15))
    a = A.train_view(image, 24, cfg, random.Random(1))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, A.train_view(image, 24, cfg, random.Random(1)))
    grey = A.train_view(image.convert("L"), 24, cfg, random.Random(1))
    assert grey.shape == (24, 24, 3)


def test_train_view_composes_the_steps_in_big_vision_order():
    image = _random_image(16, 16, seed=14)
    cfg = AugmentConfig(crop="pad", pad=2, flip=True)
    rng = random.Random(7)
    expected = A.flip_lr(A.pad_crop(image, 2, rng), rng)  # the old _random_crop_flip draws, in order
    np.testing.assert_array_equal(A.train_view(Image.fromarray(image), 16, cfg, random.Random(7)), expected)
    plain = AugmentConfig()  # crop none: the evaluation view
    photo = Image.fromarray(_random_image(40, 60, seed=15))
    np.testing.assert_array_equal(A.train_view(photo, 24, plain, random.Random(0)), A.eval_array(photo, 24, plain))
    cfg = AugmentConfig(crop="inception", randaug=(1, 5))
    rng = random.Random(2)
    cropped = np.asarray(A.inception_crop(photo, 24, rng))
    np.testing.assert_array_equal(A.train_view(photo, 24, cfg, random.Random(2)), A.RandAugment(1, 5)(cropped, rng))


def test_needed_shorter_side():
    assert A.needed_shorter_side(224, AugmentConfig(), train=False) == 256
    assert A.needed_shorter_side(224, AugmentConfig(crop="pad", pad=4), train=True) == 224
    assert A.needed_shorter_side(224, AugmentConfig(crop="inception"), train=True) == 1002  # 224 / sqrt(0.05)
    assert A.needed_shorter_side(224, AugmentConfig(crop="inception"), train=False) == 256


# ---------------------------------------------------------------------------------------------------------------
# mixup


def test_mixup_mixes_rows_with_their_predecessor():
    images = torch.randn(8, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    targets = torch.nn.functional.one_hot(labels, 10).float()
    for seed in range(20):
        mixed, soft = A.mixup(images, targets, 0.5, torch.Generator().manual_seed(seed))
        a = float(soft[0, 0])  # row 0 mixes label 0 (weight a) with row 7's label 7 (weight 1 - a)
        assert 0.5 <= a <= 1.0
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        torch.testing.assert_close(soft, a * targets + (1 - a) * targets.roll(1, 0))
        torch.testing.assert_close(mixed, a * images + (1 - a) * images.roll(1, 0))
        for i in range(8):
            assert float(soft[i, i]) == pytest.approx(a, abs=1e-6)
            assert float(soft[i, (i - 1) % 8]) == pytest.approx(1 - a, abs=1e-6)


def test_mixup_is_deterministic_per_generator_and_skips_p0():
    images, targets = torch.randn(4, 3, 2, 2), torch.eye(4)
    run = [A.mixup(images, targets, 0.5, torch.Generator().manual_seed(11)) for _ in range(2)]  # e.g. two ranks
    assert torch.equal(run[0][0], run[1][0]) and torch.equal(run[0][1], run[1][1])
    other = A.mixup(images, targets, 0.5, torch.Generator().manual_seed(12))
    assert not torch.equal(other[1], run[0][1])
    state = torch.get_rng_state()
    A.mixup(images, targets, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state()), "the global RNG is untouched"
    assert A.mixup(images, targets, 0.0, torch.Generator()) == (images, targets)
    with pytest.raises(ValueError, match="float"):
        A.mixup(images, torch.arange(4), 0.5, torch.Generator())
    draws = [float(A.mixup(images, targets, 0.5, torch.Generator().manual_seed(s))[1].max()) for s in range(300)]
    assert min(draws) >= 0.5 and np.mean(draws) == pytest.approx(0.5 + 1 / np.pi, abs=0.03)  # E[max(a, 1-a)]


# ---------------------------------------------------------------------------------------------------------------
# the loader's batches, pinned: the optimised views (PIL C ops, look-up tables, cached coordinate maps) must yield
# bit for bit the batches of the first, plain numpy port for the same seed: same data order, same augmentation
# draws, same pixels. The digests were taken with that port (commit fb6b9bb); the images are PNG (lossless), so no
# JPEG decoder version enters them. The paper view is pinned at 40 px, where every crop of these 232 px images is
# shrunk (the exact path); enlarged crops round instead of truncating (test_enlarged_crops_round_...).


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field with a few hard-edged rectangles: every RandAugment op changes it."""
    low = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = np.array(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC))
    for _ in range(4):
        y, x = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        image[y : y + int(rng.integers(4, height // 2)), x : x + int(rng.integers(4, width // 2))] = rng.integers(
            0, 256, 3, dtype=np.uint8)
    return image


def _batch_digests(slices, train: bool, augment: AugmentConfig, image_size: int | None, batch_size: int) -> list[str]:
    import hashlib

    from workers.data.reader import ShardDataset, make_loader

    dataset = ShardDataset(slices, train=train, seed=3, augment=augment, image_size=image_size)
    return [hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
            for images, labels in make_loader(dataset, batch_size)]


PINNED_PHOTO_BATCHES = {
    "paper": ["ef0c6be8dba5c5dc", "fce142665f9423d6", "bb03ad2a08eacd5b", "30cb392fb3341351", "97651e6b01cc3cea"],
    "eval": ["475b66b7c03666ac", "e5bbfa3c7f11f64e", "831d033939dff743", "88f97685ac7c72ca", "650a09f8627d7235"],
}
PINNED_DIGITS_BATCHES = [
    "e4155ed504cdf2c8", "b6d3adb0e2e057ca", "ae6ffa48aece1a06", "7e79685bcd2ddf99", "229ef7d9f0eba678",
    "93d8944bc341aefd", "b4304bd99729e234", "623f7a87b6671fbf", "abcdb4908a0f6ca8", "b34cf35c9c5dd07e",
    "9b9d14d6a35eb7bb", "b11b99c64874b5d8",
]


@pytest.fixture(scope="module")
def photo_slices(tmp_path_factory):
    from workers.data.fractions import fraction_slices
    from workers.data.writer import write_split

    rng = np.random.default_rng(20)
    shapes = ((232, 232), (232, 300), (300, 232), (232, 348))  # the 224 px views: RandAugment's pixel constants
    samples = [(_photo(rng, *shapes[i % 4]), i % 3) for i in range(40)]
    manifest = write_split(samples, str(tmp_path_factory.mktemp("photos")), "train", ["a", "b", "c"], image_size=232,
                           samples_per_shard=16)
    return fraction_slices(manifest, 1.0)


@pytest.mark.parametrize("view", ["paper", "eval"])
def test_photo_batches_are_those_of_the_plain_port(photo_slices, view):
    augment = AugmentConfig(crop="inception", flip=True, randaug=(2, 15)) if view == "paper" else AugmentConfig()
    size = 40 if view == "paper" else 224
    assert _batch_digests(photo_slices, view == "paper", augment, size, 8) == PINNED_PHOTO_BATCHES[view]


def test_digits_batches_are_those_of_the_plain_port(digits16):
    from workers.data.fractions import fraction_slices
    from workers.data.manifest import load_manifest

    slices = fraction_slices(load_manifest(str(digits16 / "train")), 0.3)
    augment = AugmentConfig(crop="pad", pad=1, randaug=(2, 15))
    assert _batch_digests(slices, True, augment, None, 32) == PINNED_DIGITS_BATCHES


def test_enlarged_crops_round_where_the_exact_path_truncates():
    """The one approximation of the optimised views: a crop enlarged along both sides is resized by PIL's resize
    (a fifth of the time) instead of transform(EXTENT); it rounds where TF truncates, so never lower, at most one
    level higher, half a level on average; the crop boxes (the rng draws) are the same."""
    photo = Image.fromarray(_photo(np.random.default_rng(5), 232, 300))
    diffs = []
    for seed in range(40):
        out = np.asarray(A.inception_crop(photo, 224, random.Random(seed))).astype(int)
        x, y, w, h = A.sample_crop_box(300, 232, random.Random(seed))
        exact = photo.crop((x, y, x + w, y + h)).transform((224, 224), Image.Transform.EXTENT, (0, 0, w, h),
                                                            resample=Image.Resampling.BILINEAR)
        if w <= 224 and h <= 224:
            diffs.append(out - np.asarray(exact))
        else:
            np.testing.assert_array_equal(out, np.asarray(exact))
    diff = np.stack(diffs)
    assert len(diffs) >= 20 and diff.min() == 0 and diff.max() == 1
    assert 0.35 < diff.mean() < 0.65, diff.mean()


# ---------------------------------------------------------------------------------------------------------------
# pixel_ops: fast (workers.data.randaugment_pil, augment's fast train view): the same draws as the exact path and
# pixels within the errors measured for docs/benchmarks.md ("Loader at the paper's shape"), bounded here so that
# they cannot silently grow. A bound is (mean |difference| in levels, share of differing pixel values, largest
# difference); ops not listed must be bit-identical.

FAST_OP_BOUNDS = {
    "Rotate": (0.02, 0.002, 255), "ShearX": (0.05, 0.01, 255), "ShearY": (0.05, 0.01, 255),  # ties, at fill edges
    "Color": (0.4, 0.22, 2), "Sharpness": (0.7, 0.55, 3),  # Pillow's grey / box-blur rounding, times |1 - factor|
}


@pytest.mark.parametrize("magnitude", [5, 15])
def test_fast_ops_draw_the_same_and_stay_within_their_bounds(magnitude):
    from workers.data.randaugment_pil import RandAugmentPIL

    photos = [_photo(np.random.default_rng(seed), 224, 224) for seed in range(3)]
    exact, fast = A.RandAugment(1, magnitude), RandAugmentPIL(1, magnitude)
    for name in A.RANDAUG_OPS:
        for seed, photo in enumerate(photos):
            exact_rng, fast_rng = random.Random(seed), random.Random(seed)
            want = exact.apply_op(name, photo, exact_rng)
            got = np.asarray(fast.apply_op(name, Image.fromarray(photo), fast_rng))
            assert exact_rng.random() == fast_rng.random(), f"{name} consumed other draws"
            diff = np.abs(want.astype(int) - got)
            mean_bound, share_bound, max_bound = FAST_OP_BOUNDS.get(name, (0, 0, 0))
            assert diff.mean() <= mean_bound and (diff > 0).mean() <= share_bound and diff.max() <= max_bound, (
                name, diff.mean(), (diff > 0).mean(), diff.max())


def test_fast_train_view_draws_the_same_and_stays_within_its_bounds():
    """Per stage: the inception crop resized by torch's uint8 kernel (TF's taps, rounded where TF truncates: shrunk
    crops a level higher at most, enlarged ones as the exact path), then the whole paper view (RandAugment
    amplifies a level's difference where an op thresholds, e.g. Solarize: hence no bound on its maximum)."""
    rng = np.random.default_rng(21)
    photos = [Image.fromarray(_photo(rng, *shape)) for shape in ((256, 256), (256, 341), (341, 256), (256, 384))]
    stages = {"crop": (AugmentConfig(crop="inception"), 0.18, 0.18, 1),  # measured 0.12 levels, 12 % of values
              "view": (AugmentConfig(crop="inception", flip=True, randaug=(2, 15)), 0.25, 0.16, 255)}  # 0.15, 10 %
    for stage, (exact_cfg, mean_bound, share_bound, max_bound) in stages.items():
        fast_cfg = exact_cfg.model_copy(update={"pixel_ops": "fast"})
        diffs = []
        for seed in range(24):
            photo = photos[seed % len(photos)]
            exact_rng, fast_rng = random.Random(seed), random.Random(seed)
            want = A.train_view(photo, 224, exact_cfg, exact_rng)
            got = A.train_view(photo, 224, fast_cfg, fast_rng)
            assert got.shape == want.shape and got.dtype == np.uint8
            assert exact_rng.random() == fast_rng.random(), "the same crop box, flip and op draws"
            diffs.append(np.abs(want.astype(int) - got))
        diff = np.stack(diffs)
        assert 0 < diff.mean() <= mean_bound and (diff > 0).mean() <= share_bound and diff.max() <= max_bound, (
            stage, diff.mean(), (diff > 0).mean(), diff.max())


@pytest.mark.parametrize("crop", ["pad", "none"])
def test_fast_train_view_without_inception_crop_differs_only_in_randaugment(crop):
    image = _random_image(24, 24, seed=16)
    exact_cfg = AugmentConfig(crop=crop, pad=2 if crop == "pad" else 0, flip=True, randaug=(2, 15))
    fast_cfg = exact_cfg.model_copy(update={"pixel_ops": "fast"})
    for source in (image, Image.fromarray(image)):  # the memory cache's arrays and decoded images alike
        for seed in range(20):
            exact_rng, fast_rng = random.Random(seed), random.Random(seed)
            want, got = A.train_view(source, 24, exact_cfg, exact_rng), A.train_view(source, 24, fast_cfg, fast_rng)
            assert exact_rng.random() == fast_rng.random()
            assert got.shape == (24, 24, 3) and np.abs(want.astype(int) - got).mean() <= 3.0
    no_randaug = exact_cfg.model_copy(update={"randaug": None})
    np.testing.assert_array_equal(A.train_view(image, 24, no_randaug, random.Random(4)),
                                  A.train_view(image, 24, no_randaug.model_copy(update={"pixel_ops": "fast"}),
                                               random.Random(4)))


def test_read_only_views_become_tensors_without_a_copy_or_a_warning():
    import warnings

    from workers.data.reader import to_tensor

    view = np.asarray(Image.fromarray(_random_image(64, 64, seed=17)))  # a PIL image's array is read-only
    assert not view.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = A.uint8_tensor(view)
        floats = to_tensor(view)
    assert tensor.data_ptr() == view.ctypes.data, "read in place"
    assert torch.equal(floats, to_tensor(view.copy())) and floats.dtype == torch.float32


@pytest.mark.parametrize("side", [16, 224])  # to_tensor's look-up (small) and torch (large) branches
def test_loader_batches_are_the_per_image_tensors_normalised_once(side):
    from workers.data.reader import normalised_batch, to_tensor

    views = [_random_image(side, side, seed=18 + i) for i in range(3)]
    images, labels, keys = normalised_batch([(A.uint8_tensor(v), i, f"k{i}") for i, v in enumerate(views)])
    floats_already, _labels = normalised_batch([(to_tensor(v), 0) for v in views])  # small views come as float
    expected = torch.stack([to_tensor(v) for v in views])
    assert images.dtype == torch.float32 and images.is_contiguous() and images.shape == (3, 3, side, side)
    assert torch.equal(images, expected) and torch.equal(floats_already, expected), "to_tensor's bits"
    assert labels.tolist() == [0, 1, 2] and list(keys) == ["k0", "k1", "k2"]
