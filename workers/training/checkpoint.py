"""Checkpoint folders: what a trial saves, and rebuilding a model from one. Imports no Ray.

A checkpoint is a folder with two files::

    model.json   {"variant", "image_size", "num_classes"}: enough to rebuild the module; and "input_permute"
                 {"mode", "patch", "seed"} when the model was trained on permuted images (data.permute, Fig. 4), so
                 that whoever evaluates the checkpoint later feeds it the same permutation (read_permute)
    state.pt     {"model": state_dict, "trainer": Trainer.state_dict() minus the model}  (torch.save)

``report`` and ``fewshot`` rebuild figures and features from checkpoints with this module alone, so they work
without Ray (or on a laptop, from checkpoints copied off a cluster). Files are written under a temporary name and
renamed, so a folder never holds a half-written ``state.pt`` under its real name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from workers.data.permute import PermuteSpec
from workers.models.registry import Model, build_model

STATE_FILE = "state.pt"
MODEL_FILE = "model.json"


def model_spec(model: Model) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (config saved with the weights, as timm does). The variant's
    canonical name names its family too ("B-16" Mixer, "ViT-B/16", "BiT-R50x1"), so the format needs no family key."""
    return {"variant": model.variant.name, "image_size": model.image_size, "num_classes": model.num_classes}


def write_checkpoint(folder: str | Path, model: Model, state: dict[str, Any], permute: PermuteSpec | None = None
                     ) -> None:
    """Write ``model.json`` and ``state.pt`` (``state`` must hold ``"model"``: the state_dict) into ``folder``.
    ``permute``: the fixed input permutation the model was trained on (``workers.data.permute.permute_spec``), or
    None."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**model_spec(model), **({"input_permute": permute._asdict()} if permute else {})}
    for name, write in ((MODEL_FILE, lambda f: f.write(json.dumps(spec).encode())),
                        (STATE_FILE, lambda f: torch.save(state, f))):
        partial = folder / f".{name}.partial"
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, folder / name)


def read_state(folder: str | Path) -> dict[str, Any]:
    """The saved state (tensors on CPU), loaded with ``weights_only=True``: no code runs from a checkpoint."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint folder {folder}")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_permute(folder: str | Path) -> PermuteSpec | None:
    """The input permutation a checkpoint's model was trained on (``write_checkpoint``), None for the original
    images (and for checkpoints written before the permutation was recorded)."""
    permute = json.loads((Path(folder) / MODEL_FILE).read_text()).get("input_permute")
    return PermuteSpec(**permute) if permute else None


def load_model(folder: str | Path) -> Model:
    """Rebuild the trained model, of any family, from a checkpoint folder (eval mode, CPU)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / MODEL_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MODEL_FILE} in checkpoint folder {folder}: not a mixer-study checkpoint") from None
    model = build_model(spec["variant"], image_size=spec["image_size"], num_classes=spec["num_classes"])
    model.load_state_dict(read_state(folder)["model"])
    return model.eval()
