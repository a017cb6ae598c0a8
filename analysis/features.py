"""Frozen ``pre_logits`` features of a trained model over a shard split, and few-shot evaluation of a checkpoint.

This is the glue between ``workers`` (model, shard reader) and the pure maths in ``analysis.fewshot``.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.fewshot import fewshot_metrics, linear_fewshot
from workers.data import ShardDataset, fraction_slices, load_manifest, make_loader
from workers.model import MlpMixer


@torch.inference_mode()
def extract_features(
    model: MlpMixer, manifest_url: str, batch_size: int = 256, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C) float64, labels (N,) int64) for every sample of a split, in eval mode, no augmentation."""
    manifest = load_manifest(manifest_url)
    if manifest.image_size != model.image_size:
        raise ValueError(
            f"{manifest.url}: images are {manifest.image_size}px but the model was trained at {model.image_size}px"
        )
    dataset = ShardDataset(fraction_slices(manifest, 1.0), train=False)
    model.eval()
    features, labels = [], []
    for images, batch_labels in make_loader(dataset, batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pre_logits = model.forward_features(images)
        features.append(pre_logits.float().numpy().astype(np.float64))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(features), np.concatenate(labels)


def fewshot_for_model(
    model: MlpMixer,
    train_url: str,
    test_url: str,
    shots: tuple[int, ...] = (1, 5, 10, 25),
    seeds: int = 3,
    l2_reg: float = 2.0**10,
) -> dict[str, float]:
    """Linear few-shot accuracies of a model as flat MLflow metrics (``fewshot/5shot``, ``fewshot/5shot_std``, ...)."""
    train_x, train_y = extract_features(model, train_url)
    test_x, test_y = extract_features(model, test_url)
    num_classes = load_manifest(train_url).num_classes
    results = linear_fewshot(
        train_x, train_y, test_x, test_y, shots=shots, seeds=tuple(range(seeds)), l2_reg=l2_reg,
        num_classes=num_classes,
    )
    return fewshot_metrics(results)
