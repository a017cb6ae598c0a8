"""Linear few-shot evaluation on frozen features, as big_vision's fewshot_lsr.py.

For every seed and every k in `shots`, take k examples per class from the
downstream train split, fit a closed-form ridge regression from standardised
features to ±1 one-hot targets, and report top-1 accuracy of its argmax on the
whole test split. The solve is numpy float64 (features may be float32).
"""

from collections.abc import Sequence

import numpy as np

from workers.names import fewshot_metric, fewshot_std_metric

# Constant appended to every feature vector. The ridge penalty acts on its
# weight like on any other, but a large feature needs only a small weight for a
# given bias, so the bias is almost unregularised (big_vision's BIAS_CONSTANT).
BIAS_CONSTANT = 100.0
# Added to the standard deviation so that constant features do not divide by 0.
STD_EPS = 1e-5
DEFAULT_L2_REG = 2.0**10
TEST_CHUNK = 8192  # test rows predicted at once


def kshot_indices(
    labels: np.ndarray, shots: int, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of the first `shots` examples of each class after a per-class shuffle.

    The permutations depend only on `seed`, not on `shots`, so for one seed the
    k-shot sets are nested (the 1-shot set is inside the 5-shot set, ...).
    Classes are 0..num_classes-1 (default: the labels present).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
    if shots < 1:
        raise ValueError(f"shots: expected a positive integer, got {shots}")
    classes = np.unique(labels) if num_classes is None else np.arange(num_classes)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < shots:
            raise ValueError(
                f"class {c} has {len(members)} training examples, fewer than the "
                f"{shots} needed for {shots}-shot"
            )
        chosen.append(members[:shots])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardised features with the constant bias feature appended."""
    x = (x - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def ridge_weights(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
    """W = argmin ||XW - Y||² + λ||W||², i.e. (XᵀX + λI)⁻¹XᵀY, shape (d, c).

    By the push-through identity (XᵀX + λI)⁻¹Xᵀ = Xᵀ(XXᵀ + λI)⁻¹, the same W is
    Xᵀ(XXᵀ + λI)⁻¹Y. The first needs a d×d system, the second an n×n one; the
    solve is cubic in that size, so we take whichever Gram matrix is smaller.
    Few-shot sets are often smaller than the feature dimension (n = k·classes,
    e.g. 5·10 = 50 points in 768 dims), but not always (5·1000 in 768 dims).
    Both systems are symmetric positive definite for λ > 0.
    """
    n, d = x.shape
    if n >= d:
        return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)


def ridge_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    l2_reg: float = DEFAULT_L2_REG,
) -> np.ndarray:
    """Predicted test labels of a ridge regression onto ±1 one-hot targets."""
    train_x = np.asarray(train_x, dtype=np.float64)
    # Standardise with the statistics of the (tiny) k-shot set only.
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + STD_EPS
    x = _design(train_x, mean, std)
    y = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
    w = ridge_weights(x, y, l2_reg)
    # The test split may be large (float32 features): predict in float64 chunks to bound memory.
    return np.concatenate([
        np.argmax(_design(np.asarray(test_x[i:i + TEST_CHUNK], dtype=np.float64), mean, std) @ w, axis=1)
        for i in range(0, len(test_x), TEST_CHUNK)
    ])


def _check_inputs(train_x, train_y, test_x, test_y, num_classes):
    """Arrays as float features (kept in their dtype: float32 features are not copied) / int labels, and the
    number of classes."""
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name}: expected float features, got dtype {x.dtype}")
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (examples, features) array, got shape {x.shape}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"test_x: expected {train_x.shape[1]} features like train_x, got {test_x.shape[1]}"
        )
    for name, y, x in (("train_y", train_y, train_x), ("test_y", test_y, test_x)):
        if y.shape != (len(x),):
            raise ValueError(f"{name}: expected shape ({len(x)},) to match the features, got {y.shape}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if len(test_y) == 0:
        raise ValueError("test_x/test_y: expected at least one test example, got 0")
    if num_classes is None:
        num_classes = int(max(train_y.max(initial=-1), test_y.max())) + 1
    for name, y in (("train_y", train_y), ("test_y", test_y)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name}: expected labels in [0, {num_classes}), got [{y.min()}, {y.max()}]"
            )
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), num_classes


def linear_fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2_reg: float = DEFAULT_L2_REG,
    num_classes: int | None = None,
) -> dict[int, dict]:
    """Top-1 test accuracy per k: {k: {"per_seed": [...], "mean": m, "std": s}}.

    `std` is the population standard deviation over seeds (0 for one seed).
    `num_classes` defaults to 1 + the largest label in either split; every
    class must have at least k training examples.
    """
    train_x, train_y, test_x, test_y, num_classes = _check_inputs(
        train_x, train_y, test_x, test_y, num_classes
    )
    if not shots or not seeds:
        raise ValueError(f"shots and seeds: expected non-empty, got {shots!r} and {seeds!r}")
    results = {}
    for k in shots:
        accs = []
        for seed in seeds:
            idx = kshot_indices(train_y, k, seed, num_classes)
            pred = ridge_classify(train_x[idx], train_y[idx], test_x, num_classes, l2_reg)
            accs.append(float(np.mean(pred == test_y)))
        results[int(k)] = {"per_seed": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs))}
    return results


def fewshot_metrics(results: dict[int, dict]) -> dict[str, float]:
    """Flat MLflow metric names: {"fewshot/5shot": mean, "fewshot/5shot_std": std, ...}."""
    metrics = {}
    for k, r in results.items():
        metrics[fewshot_metric(k)] = float(r["mean"])
        metrics[fewshot_std_metric(k)] = float(r["std"])
    return metrics
