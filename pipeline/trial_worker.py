"""The function every Ray Train worker of a trial runs: pre-training (``workers.training.ray_entry``) and then, on
rank 0 with the worker's reserved cores and before the worker group exits, the linear few-shot evaluation of the best
checkpoint (``analysis.features``).

It lives in ``pipeline`` because it joins ``workers`` and ``analysis`` (imports go pipeline -> analysis -> workers),
and in a module of its own so that a Ray worker imports only these, not MLflow's client or Ray Tune.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from analysis.features import fewshot_for_model
from workers.config import TrialConfig
from workers.data.permute import permute_spec
from workers.training.ray_entry import train_loop_per_worker


def fewshot_of_model(model: nn.Module, trial: TrialConfig) -> dict[str, float]:
    """``fewshot/<k>shot`` (+ ``_std``) of ``model`` on the trial's downstream splits ({} without few-shot)."""
    f = trial.fewshot
    if not f.enabled:
        return {}
    return fewshot_for_model(model, f.train, f.test, shots=f.shots, seeds=f.seeds, l2_reg=f.l2_reg,
                             train_samples=f.train_samples, crop_fraction=trial.data.augment.eval_crop_fraction,
                             permute=permute_spec(trial.data))


def trial_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a trial (``config`` as ``workers.training.ray_entry.train_loop_per_worker``)."""
    train_loop_per_worker(config, evaluate_best=fewshot_of_model)
