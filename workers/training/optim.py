"""The optimiser, schedule and loss of the paper's recipe, as big_vision builds them.

big_vision ``optax.py`` (``make``) chains, per step ``t`` with schedule multiplier ``s(t)``::

    clip_by_global_norm(grad_clip) -> scale_by_adam(b1, b2) -> scale(lr) -> add_decayed_weights(wd, kernels)
    -> scale_by_schedule(s) -> scale(-1)

so the update is ``theta -= s(t) * (lr * adam(g) + wd * theta)``, the decay term on kernels only (its default
mask ``.*/kernel$``: Dense and Conv kernels, the head's included; never biases or LayerNorm). The weight decay is
therefore NOT multiplied by the learning rate. torch's ``AdamW(weight_decay=w)`` shrinks by ``lr_t * w`` with
``lr_t = s(t) * lr``; giving it ``w = wd / lr`` makes that ``s(t) * wd``: big_vision's decay, in torch's fused
AdamW kernel. (Passing big_vision's ``wd`` straight to AdamW would decay 1/lr times too weakly: 1000x at 1e-3.)

``s(t)`` is big_vision ``utils.create_learning_rate_schedule`` with ``base=1`` and ``decay_type="linear"``:
``linear_end + (1 - linear_end) * (1 - progress)`` with ``progress = clip((t - warmup) / (total - warmup), 0, 1)``,
times ``min(1, t / warmup)``. ``t`` counts the updates already made (optax's count), so the first update of a run
with warm-up has multiplier 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import OptimConfig


def schedule_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """big_vision's linear schedule with warm-up, as a multiplier of ``optim.lr`` (see the module docstring)."""
    warmup = optim.warmup_steps
    progress = min(1.0, max(0.0, (step - warmup) / float(max(1, total_steps - warmup))))
    multiplier = optim.linear_end + (1.0 - optim.linear_end) * (1.0 - progress)
    if warmup:
        multiplier *= min(1.0, step / warmup)
    return multiplier


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether weight decay applies: kernels (``weight`` of Linear and Conv layers) only.

    big_vision masks by name (``.*/kernel$``); torch names kernels and LayerNorm scales alike (``weight``), so the
    mask looks at the owning module's type instead.
    """
    mask = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            mask[full] = param_name == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    return mask


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW whose per-step decay is big_vision's ``s(t) * wd`` on kernels and 0 elsewhere.

    The caller sets every group's ``lr`` to ``optim.lr * schedule_multiplier(t)`` before each step
    (:func:`set_lr`); the decay then follows the schedule exactly as in big_vision.
    """
    mask = decay_mask(model)
    named = dict(model.named_parameters())
    kernels = [p for name, p in named.items() if mask[name]]
    others = [p for name, p in named.items() if not mask[name]]
    groups = [
        {"params": kernels, "weight_decay": optim.weight_decay / optim.lr},
        {"params": others, "weight_decay": 0.0},
    ]
    # foreach (multi-tensor) kernels: one launch per group instead of one per parameter; `fused` is CPU-capable too
    # in torch 2.x but the measured gain on CPU is within noise, so foreach keeps one path for CPU and GPU.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=1e-8, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, optim: OptimConfig) -> float:
    """Set the learning rate of update number ``step`` (0-based) on every group; returns it."""
    lr = optim.lr * schedule_multiplier(step, total_steps, optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_by_global_norm(params, max_norm: float) -> Tensor:
    """Scale gradients by ``min(1, max_norm / ||g||)`` (optax ``clip_by_global_norm``: torch's ``clip_grad_norm_``
    adds 1e-6 to the norm); returns the pre-clip norm as a device tensor, without a host synchronisation."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    torch._foreach_mul_(grads, torch.clamp(max_norm / norm, max=1.0))
    return norm


def classification_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Mean loss over the batch for one-hot or soft (mixup) ``targets`` of shape (B, classes).

    ``sigmoid``: big_vision ``utils.sigmoid_xent``: per-class binary cross-entropy, summed over classes, mean over
    examples. ``softmax``: big_vision ``utils.softmax_xent``: ``-sum(targets * log_softmax(logits))``, batch mean.
    """
    logits = logits.float()
    if loss == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    if loss == "softmax":
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")

