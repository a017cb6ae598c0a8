"""The recipe's optimiser, schedule and loss against numpy ports of big_vision (optax.py, utils.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.config import OptimConfig, TrialConfig
from workers.models.mixer import MlpMixer
from workers.training.optim import (
    build_optimizer,
    classification_loss,
    clip_by_global_norm,
    decay_mask,
    schedule_multiplier,
    set_lr,
)


def _big_vision_schedule(step: int, total: int, warmup: int, linear_end: float) -> float:
    """big_vision utils.create_learning_rate_schedule(base=1.0, decay_type="linear", warmup_steps, linear_end)."""
    progress = np.clip((step - warmup) / float(total - warmup), 0.0, 1.0)
    lr = linear_end + (1.0 - linear_end) * (1.0 - progress)
    if warmup:
        lr = lr * min(1.0, step / warmup)
    return float(lr)


@pytest.mark.parametrize("warmup,linear_end", [(0, 0.0), (10, 1e-5), (30, 0.1)])
def test_schedule_is_big_vision(warmup: int, linear_end: float) -> None:
    optim = OptimConfig(warmup_steps=warmup, linear_end=linear_end)
    for step in range(101):
        expected = _big_vision_schedule(step, 100, warmup, linear_end)
        assert schedule_multiplier(step, 100, optim) == pytest.approx(expected, abs=1e-12)
    if warmup:
        assert schedule_multiplier(0, 100, optim) == 0.0  # warm-up starts from 0: the first update is a no-op
    assert schedule_multiplier(100, 100, optim) == pytest.approx(linear_end)


def test_decay_mask_is_kernels_only() -> None:
    model = MlpMixer("Nano-4", image_size=8, num_classes=10)
    mask = decay_mask(model)
    assert mask["stem.weight"] and mask["head.weight"] and mask["blocks.0.token_mixing.fc1.weight"]
    assert mask["blocks.1.channel_mixing.fc2.weight"]
    assert not mask["head.bias"] and not mask["stem.bias"] and not mask["blocks.0.token_mixing.fc1.bias"]
    assert not mask["norm.weight"] and not mask["blocks.0.norm1.weight"] and not mask["blocks.0.norm2.bias"]
    assert set(mask) == {name for name, _ in model.named_parameters()}


def test_one_zero_gradient_step_shrinks_kernels_by_wd() -> None:
    """big_vision's wd is not multiplied by lr: at s(t)=1 a kernel shrinks by exactly (1 - wd) per step."""
    torch.manual_seed(0)
    model = MlpMixer("Nano-4", image_size=8, num_classes=10).double()
    with torch.no_grad():
        model.head.weight.normal_()  # the head kernel starts at zero; give it something to decay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = OptimConfig(lr=1e-3, weight_decay=1e-4)
    optimizer = build_optimizer(model, optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    set_lr(optimizer, 0, 100, optim)
    optimizer.step()
    mask = decay_mask(model)
    for name, value in model.state_dict().items():
        expected = before[name] * (1 - 1e-4) if mask[name] else before[name]
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    shrink = float((before["stem.weight"] - model.stem.weight.detach()).abs().max() / before["stem.weight"].abs().max())
    assert shrink == pytest.approx(1e-4, rel=1e-6)  # torch AdamW(weight_decay=1e-4) would give 1e-7 here


def _optax_port(params: dict, grads_per_step: list[dict], optim: OptimConfig, total: int, mask: dict) -> dict:
    """numpy port of big_vision optax.make: clip -> scale_by_adam -> scale(lr) -> add_decayed_weights(wd, mask)
    -> scale_by_schedule -> scale(-1)."""
    params = {k: v.copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for count, grads in enumerate(grads_per_step):
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        grads = {k: g if norm < optim.grad_clip else g / norm * optim.grad_clip for k, g in grads.items()}
        s = _big_vision_schedule(count, total, optim.warmup_steps, optim.linear_end)
        for k, g in grads.items():
            mu[k] = optim.b1 * mu[k] + (1 - optim.b1) * g
            nu[k] = optim.b2 * nu[k] + (1 - optim.b2) * g**2
            m_hat = mu[k] / (1 - optim.b1 ** (count + 1))
            v_hat = nu[k] / (1 - optim.b2 ** (count + 1))
            update = optim.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
            if mask[k]:
                update = update + optim.weight_decay * params[k]
            params[k] = params[k] - s * update
    return params


def test_optimizer_matches_big_vision_optax_chain() -> None:
    torch.manual_seed(1)
    model = MlpMixer("Nano-4", image_size=8, num_classes=10).double()
    with torch.no_grad():
        model.head.weight.normal_()
    optim = OptimConfig(lr=3e-3, warmup_steps=2, linear_end=1e-2, weight_decay=0.05, grad_clip=1.0)
    total, steps = 8, 6
    start = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    rng = np.random.default_rng(0)
    # Alternate large (clipped) and small (unclipped) gradients.
    grads = [{k: rng.normal(scale=0.3 if i % 2 else 0.001, size=v.shape) for k, v in start.items()}
             for i in range(steps)]
    optimizer = build_optimizer(model, optim)
    for step, g in enumerate(grads):
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(g[name].copy())
        set_lr(optimizer, step, total, optim)
        clip_by_global_norm(model.parameters(), optim.grad_clip)
        optimizer.step()
    expected = _optax_port(start, grads, optim, total, decay_mask(model))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_clip_returns_preclip_norm_and_clips_exactly() -> None:
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    norm = clip_by_global_norm([p], 1.0)
    assert float(norm) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    p.grad = torch.tensor([0.3, 0.4, 0.0, 0.0], dtype=torch.float64)
    clip_by_global_norm([p], 1.0)
    assert p.grad.tolist() == [0.3, 0.4, 0.0, 0.0]  # below the threshold: untouched


def test_sigmoid_loss_is_big_vision_sigmoid_xent() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4, size=(6, 5))
    labels = rng.dirichlet(np.ones(5), size=6)  # soft (mixup) targets too
    log_p = -np.logaddexp(0, -logits)  # log_sigmoid
    log_not_p = -np.logaddexp(0, logits)
    expected = np.mean(-np.sum(labels * log_p + (1 - labels) * log_not_p, axis=-1))
    got = classification_loss(torch.from_numpy(logits), torch.from_numpy(labels), "sigmoid")
    assert float(got) == pytest.approx(expected, rel=1e-6)
    softmax = np.mean(-np.sum(labels * (logits - np.log(np.exp(logits).sum(-1, keepdims=True))), axis=-1))
    assert float(classification_loss(torch.from_numpy(logits), torch.from_numpy(labels), "softmax")) == pytest.approx(
        softmax, rel=1e-6)


def _trial(**sections) -> dict:
    base = {"data": {"train": "x", "val": "y"}, "model": {"variant": "Nano-4"},
            "train": {"steps": 10, "batch_size": 4, "eval_every": 5, "checkpoint_every": 5}}
    for key, value in sections.items():
        base[key] = {**base[key], **value}
    return base


def test_head_bias_with_softmax_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_bias_init: -6.9 has no effect with train.loss: softmax"):
        TrialConfig.model_validate(_trial(model={"head_bias_init": -6.9}, train={"loss": "softmax"}))
    TrialConfig.model_validate(_trial(model={"head_bias_init": -6.9}, train={"loss": "sigmoid"}))
    TrialConfig.model_validate(_trial(model={"head_bias_init": 0.0}, train={"loss": "softmax"}))


def test_head_bias_default_is_minus_log_classes() -> None:
    from workers.config import head_bias

    config = TrialConfig.model_validate(_trial())
    assert head_bias(config.model, "sigmoid", 1000) == pytest.approx(-6.9078, abs=1e-4)  # big_vision's -6.9
    assert head_bias(config.model, "softmax", 1000) == 0.0
