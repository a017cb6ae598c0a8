"""Frozen ``pre_logits`` features of a trained model over a shard split, and few-shot evaluation of a model.

This is the glue between ``workers`` (model, shard reader) and the pure maths in ``analysis.fewshot``. Features
are float32 (an (N, C) float64 copy of ImageNet-1k train with H/14 would be ~13 GB); the few-shot maths casts only
the small k-shot sets to float64.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.fewshot import fewshot_metrics, linear_fewshot
from workers.config import AugmentConfig
from workers.data.fractions import prefix_slices
from workers.data.manifest import load_manifest
from workers.data.permute import PermuteSpec
from workers.data.reader import ShardDataset, make_loader
from workers.models.registry import Model


@torch.inference_mode()
def extract_features(
    model: Model, manifest_url: str, batch_size: int = 256, precision: str = "fp32",
    num_samples: int | None = None, crop_fraction: float = 0.875, permute: PermuteSpec | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C) float32, labels (N,) int64) of the first ``num_samples`` samples (all for None) of a split,
    in eval mode, through the evaluation view (resize the shorter side to size/crop_fraction, central crop), with
    the pixels moved by ``permute`` (``workers.data.permute.permute_spec(trial.data)``: the one the model trained
    on)."""
    manifest = load_manifest(manifest_url)
    dataset = ShardDataset(prefix_slices(manifest, num_samples), train=False, image_size=model.image_size,
                           augment=AugmentConfig(eval_crop_fraction=crop_fraction), permute=permute)
    device = next(model.parameters()).device
    model.eval()
    features, labels = [], []
    for images, batch_labels in make_loader(dataset, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pre_logits = model.forward_features(images.to(device))
        features.append(pre_logits.float().cpu().numpy())
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(features), np.concatenate(labels)


def fewshot_for_model(
    model: Model,
    train_url: str,
    test_url: str,
    shots: tuple[int, ...] = (1, 5, 10, 25),
    seeds: int = 3,
    l2_reg: float = 2.0**10,
    train_samples: int | None = None,
    crop_fraction: float = 0.875,
    permute: PermuteSpec | None = None,
) -> dict[str, float]:
    """Linear few-shot accuracies of a model as flat MLflow metrics (``fewshot/5shot``, ``fewshot/5shot_std``, ...).

    ``train_samples`` caps the downstream train split to its first N samples (big_vision's ``train[:N]``).
    ``permute``: the fixed pixel permutation the model was trained with (``data.permute``, the Fig. 4 study), applied
    to both downstream splits; None for the original images.
    """
    train_x, train_y = extract_features(model, train_url, num_samples=train_samples, crop_fraction=crop_fraction,
                                        permute=permute)
    test_x, test_y = extract_features(model, test_url, crop_fraction=crop_fraction, permute=permute)
    num_classes = load_manifest(train_url).num_classes
    results = linear_fewshot(
        train_x, train_y, test_x, test_y, shots=shots, seeds=tuple(range(seeds)), l2_reg=l2_reg,
        num_classes=num_classes,
    )
    return fewshot_metrics(results)
