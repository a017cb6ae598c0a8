"""StudySpec -> the list of trials to run, with their names, steps, epochs and analytic compute. No Ray here.

``mixer-study plan`` prints this; ``mixer-study run`` hands the same list to Ray Tune, so what the dry run shows is
exactly what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline.spec import StudyError, StudySpec, trial_name
from workers.config import TrialConfig, flatten
from workers.data.fractions import class_counts, subset_size
from workers.data.manifest import Manifest, load_manifest
from workers.models.registry import check_fits, forward_flops, get_variant, train_flops_per_image


@dataclass(frozen=True)
class TrialPlan:
    name: str                    # deterministic, from the grid point: also the MLflow child run's name
    point: dict[str, Any]        # the grid coordinates (resolved values, e.g. B/16 -> B-16)
    config: TrialConfig
    image_size: int
    num_classes: int
    train_images: int            # size of the nested training subset
    epochs: float                # passes over that subset in `steps` steps
    forward_gflops: float        # per image
    train_flops: float           # 3 x forward x images seen

    @property
    def images_seen(self) -> int:
        return self.config.train.steps * self.config.train.batch_size


@lru_cache(maxsize=64)
def _manifest(url: str) -> Manifest:
    return load_manifest(url)


def _check_fewshot_classes(config: TrialConfig, manifest: Manifest, trial: str) -> None:
    """Every downstream class needs at least max(shots) examples in the (capped) downstream train split."""
    cap = config.fewshot.train_samples
    counts = class_counts(manifest, manifest.num_samples if cap is None else min(cap, manifest.num_samples))
    if counts is None:
        return  # an old manifest without per-class counts: the trial's few-shot step will say which class is short
    need = max(config.fewshot.shots)
    short = [(manifest.class_names[c], n) for c, n in enumerate(counts) if n < need]
    if short:
        shown = ", ".join(f"{name!r} has {n}" for name, n in short[:5]) + (" ..." if len(short) > 5 else "")
        raise StudyError(
            f"trial {trial}: fewshot.shots up to {need} need {need} examples of every class in fewshot.train "
            f"({manifest.url}, first {cap if cap is not None else 'all'} samples), but {len(short)} class(es) have "
            f"fewer: {shown}. Lower fewshot.shots, raise fewshot.train_samples, or use a larger split."
        )


def _check_finetune_resolution(config: TrialConfig, variant, image_size: int, trial: str) -> None:
    """finetune.image_size must be a whole multiple K of the pre-training size for Mixer (Supplementary C) and fit
    the model; a permuted pipeline has its permutation only at the pre-training size."""
    size = config.finetune.image_size
    if size is None or size == image_size:
        return
    if variant.family == "Mixer" and size % image_size:
        raise StudyError(
            f"finetune.image_size: {size} is not a whole multiple of the pre-training size {image_size} (trial "
            f"{trial}): Mixer keeps its patch size and grows S to K²S, so use e.g. {2 * image_size}")
    if config.data.permute != "none":
        raise StudyError(f"finetune.image_size: {size} differs from the pre-training size {image_size}, but "
                         f"data.permute {config.data.permute!r} has its fixed permutation only at {image_size} px")
    try:
        check_fits(variant, size)
    except ValueError as error:
        raise StudyError(f"finetune.image_size: {error} (trial {trial})") from None


def plan_study(spec: StudySpec) -> list[TrialPlan]:
    """Expand the grid and compute each trial's accounting. Reads the data manifests (small JSON files)."""
    plans = []
    for raw_point in spec.grid_points():
        config = spec.trial_config(raw_point)
        flat = flatten(config)
        point = {key: flat[key] for key in raw_point}
        try:
            manifest = _manifest(config.data.train)
            _manifest(config.data.val)
            if config.fewshot.enabled:
                _manifest(config.fewshot.train)
                _manifest(config.fewshot.test)
        except (OSError, ValueError) as error:
            raise StudyError(
                f"study {spec.name}, trial {trial_name(point)}: cannot read a data manifest: {error}") from None
        if config.fewshot.enabled:
            _check_fewshot_classes(config, _manifest(config.fewshot.train), trial_name(point))
        variant = get_variant(config.model.variant)
        image_size = config.data.image_size or manifest.image_size
        if not image_size:
            raise StudyError(f"data.image_size: required, because {manifest.url} holds images of varying size "
                             "(its manifest has no image_size)")
        if config.finetune.enabled:
            _manifest(config.finetune.train)
            _manifest(config.finetune.test)
            if config.finetune.val:
                _manifest(config.finetune.val)
            _check_finetune_resolution(config, variant, image_size, trial_name(point))
        if config.data.permute != "none" and image_size % config.data.permute_patch:
            raise StudyError(
                f"data.permute_patch: {config.data.permute_patch} does not divide the image size {image_size} of "
                f"trial {trial_name(point)}: the 'patches' permutation needs whole patches")
        try:
            check_fits(variant, image_size)  # each family's rule: whole patches (Mixer, ViT), total stride (BiT)
        except ValueError as error:
            where = "data.image_size" if config.data.image_size else f"data.train ({manifest.url})"
            raise StudyError(f"model.variant {variant.name} does not fit {where}: {error}") from None
        n_train = subset_size(manifest, config.data.fraction)
        slots = spec.resources.workers_per_trial * max(1, config.data.loader_workers)
        if n_train < slots:
            raise StudyError(
                f"trial {trial_name(point)}: data.fraction {config.data.fraction} selects {n_train} training "
                f"sample(s), fewer than the {slots} readers (workers_per_trial x data.loader_workers): every reader "
                "needs at least one sample; raise data.fraction or lower the workers"
            )
        images_seen = config.train.steps * config.train.batch_size
        plans.append(
            TrialPlan(
                name=trial_name(point),
                point=point,
                config=config,
                image_size=image_size,
                num_classes=manifest.num_classes,
                train_images=n_train,
                epochs=images_seen / n_train,
                forward_gflops=forward_flops(variant, image_size, manifest.num_classes) / 1e9,
                train_flops=float(train_flops_per_image(variant, image_size, manifest.num_classes)) * images_seen,
            )
        )
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise StudyError(f"study {spec.name}: grid points give duplicate trial names: {names}")
    return plans


def format_plan(spec: StudySpec, plans: list[TrialPlan]) -> str:
    """The dry-run table: one line per trial and the totals."""
    r = spec.resources
    lines = [
        f"study {spec.name}: {len(plans)} trial(s), {r.workers_per_trial} worker(s) x {r.cpus_per_worker} CPU"
        + (f" + {r.gpus_per_worker} GPU" if r.gpus_per_worker else "")
        + f" per trial; experiment '{spec.experiment}'",
        f"{'trial':<40} {'variant':>8} {'px':>4} {'fraction':>8} {'subset':>8} {'steps':>7} {'batch':>6} "
        f"{'epochs':>8} {'GFLOPs/img':>10} {'train FLOPs':>12}",
    ]
    for p in plans:
        c = p.config
        lines.append(
            f"{p.name:<40} {c.model.variant:>8} {p.image_size:>4} {c.data.fraction:>8.3g} {p.train_images:>8} "
            f"{c.train.steps:>7} {c.train.batch_size:>6} {p.epochs:>8.1f} {p.forward_gflops:>10.4g} "
            f"{p.train_flops:>12.3e}"
        )
    total = sum(p.train_flops for p in plans)
    lines.append(f"total: {sum(p.config.train.steps for p in plans)} steps, "
                 f"{sum(p.images_seen for p in plans):,} images, {total:.3e} training FLOPs")
    return "\n".join(lines)
