"""StudySpec -> the list of trials to run, with their names, steps, epochs and analytic compute, and the compute
ledger's prediction (device-seconds and cost, analysis.ledger). No Ray here.

``mixer-study plan`` prints this; ``mixer-study run`` hands the same list to Ray Tune, so what the dry run shows is
exactly what runs; it tags each trial's MLflow run with its planned numbers, which ``report`` sets beside the actual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import fsspec
import pandas as pd
import torch

from analysis.ledger import (
    CALIBRATION_COLUMNS,
    UNKNOWN,
    PlannedCost,
    bench_device_kind,
    bench_throughput,
    canonical_variant,
    load_calibration_runs,
    planned_cost,
    runs_throughput,
)
from pipeline.spec import StudyError, StudySpec, TrialPoint, trial_name
from pipeline.tracking import check_tracking, local_store_path, redact_url, resolve_tracking_uri
from workers.config import TrialConfig, flatten
from workers.data.fractions import class_counts, subset_size
from workers.data.manifest import Manifest, load_manifest
from workers.models.registry import check_fits, forward_flops, get_variant, train_flops_per_image
from workers.names import (
    PLAN_CALIBRATION_TAG,
    PLAN_COST_TAG,
    PLAN_DEVICE_KIND_TAG,
    PLAN_DEVICE_SECONDS_TAG,
    PLAN_PRICE_TAG,
    PLAN_TRAIN_FLOPS_TAG,
    SWEEP_SETTING_BASE,
    SWEEP_SETTING_TAG,
)
from workers.training.throughput import device_kind


@dataclass(frozen=True)
class TrialPlan:
    name: str                    # deterministic, from the grid point, setting, seed: also the MLflow child run's name
    point: dict[str, Any]        # the trial's coordinates (resolved values, e.g. B/16 -> B-16): the grid point, then
    #                              its sweep setting and seed where the study has them (the run's label and tag)
    config: TrialConfig
    image_size: int
    num_classes: int
    train_images: int            # size of the nested training subset
    epochs: float                # passes over that subset in `steps` steps
    forward_gflops: float        # per image
    train_flops: float           # 3 x forward x images seen
    setting: dict[str, Any] = field(default_factory=dict)  # the family's sweep setting; {} = the base recipe
    seed: int | None = None      # the replicate's train.seed; None with one replicate

    @property
    def images_seen(self) -> int:
        return self.config.train.steps * self.config.train.batch_size

    @property
    def tags(self) -> dict[str, str]:
        """The MLflow tags that place the trial in its study beyond the grid point: its sweep setting (analysis
        groups the replicates of a setting and selects a setting per grid point on them)."""
        text = ",".join(f"{key}={value}" for key, value in self.setting.items())  # as mixer.grid_point spells it
        return {SWEEP_SETTING_TAG: text or SWEEP_SETTING_BASE}


@lru_cache(maxsize=64)
def _manifest(url: str) -> Manifest:
    return load_manifest(url)


def _field_manifest(field: str, url: str, study: str, trial: str) -> Manifest:
    """The manifest the recipe field ``field`` (e.g. "data.train") points at; StudyError naming the field, the study
    and the ``trial`` if it cannot be read (missing, unreadable, not a manifest)."""
    try:
        return _manifest(url)
    except (OSError, ValueError) as error:
        message = str(error)
        if isinstance(error, FileNotFoundError):  # "no data-set manifest at URL ...": say it as the field's fault
            message = message.replace("no data-set manifest at", "no manifest at", 1)
        raise StudyError(f"{field}: {message} (study {study}, trial {trial})") from None


def _trial_name(trial: TrialPoint, flat: dict[str, Any]) -> str:
    """The trial's name from its resolved values (B/16 -> B-16).

    Args:
        trial: where the trial sits in the study.
        flat: its flattened recipe (workers.config.flatten).
    """
    return trial_name({key: flat[key] for key in trial.grid}, {key: flat[key] for key in trial.setting}, trial.seed)


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
    for trial in spec.trial_points():
        config = spec.trial_config(trial.overrides)
        flat = flatten(config)
        point = {key: flat[key] for key in trial.overrides}
        name = _trial_name(trial, flat)
        manifest = _field_manifest("data.train", config.data.train, spec.name, name)
        _field_manifest("data.val", config.data.val, spec.name, name)
        if config.fewshot.enabled:
            fewshot_train = _field_manifest("fewshot.train", config.fewshot.train, spec.name, name)
            _field_manifest("fewshot.test", config.fewshot.test, spec.name, name)
            _check_fewshot_classes(config, fewshot_train, name)
        variant = get_variant(config.model.variant)
        image_size = config.data.image_size or manifest.image_size
        if not image_size:
            raise StudyError(f"data.image_size: required, because {manifest.url} holds images of varying size "
                             "(its manifest has no image_size)")
        if config.finetune.enabled:
            _field_manifest("finetune.train", config.finetune.train, spec.name, name)
            _field_manifest("finetune.test", config.finetune.test, spec.name, name)
            if config.finetune.val:
                _field_manifest("finetune.val", config.finetune.val, spec.name, name)
            _check_finetune_resolution(config, variant, image_size, name)
        if config.data.permute != "none" and image_size % config.data.permute_patch:
            raise StudyError(
                f"data.permute_patch: {config.data.permute_patch} does not divide the image size {image_size} of "
                f"trial {name}: the 'patches' permutation needs whole patches")
        try:
            check_fits(variant, image_size)  # each family's rule: whole patches (Mixer, ViT), total stride (BiT)
        except ValueError as error:
            where = "data.image_size" if config.data.image_size else f"data.train ({manifest.url})"
            raise StudyError(f"model.variant {variant.name} does not fit {where}: {error}") from None
        n_train = subset_size(manifest, config.data.fraction)
        slots = spec.resources.workers_per_trial * max(1, config.data.loader_workers)
        if n_train < slots:
            raise StudyError(
                f"trial {name}: data.fraction {config.data.fraction} selects {n_train} training "
                f"sample(s), fewer than the {slots} readers (workers_per_trial x data.loader_workers): every reader "
                "needs at least one sample; raise data.fraction or lower the workers"
            )
        images_seen = config.train.steps * config.train.batch_size
        plans.append(
            TrialPlan(
                name=name,
                point=point,
                config=config,
                image_size=image_size,
                num_classes=manifest.num_classes,
                train_images=n_train,
                epochs=images_seen / n_train,
                forward_gflops=forward_flops(variant, image_size, manifest.num_classes) / 1e9,
                train_flops=float(train_flops_per_image(variant, image_size, manifest.num_classes)) * images_seen,
                setting={key: flat[key] for key in trial.setting},
                seed=trial.seed,
            )
        )
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise StudyError(f"study {spec.name}: grid points give duplicate trial names: {names}")
    return plans


@dataclass(frozen=True)
class Calibration:
    """What a plan's device-seconds and cost come from (:func:`calibrate`): the device kind the trials will run on,
    the price per device-hour, earlier finished runs on that kind, a bench JSON of that kind, and notes on what was
    looked at and left out."""

    device_kind: str | None
    price: float | None
    runs: pd.DataFrame
    bench: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def local_device_kind(gpus: bool) -> str | None:
    """This machine's device kind for a study on GPUs (``gpus``) or CPU cores; None for GPUs where it has none.

    Args:
        gpus: whether the study's workers hold GPUs.
    """
    if gpus:
        return device_kind(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    return device_kind(torch.device("cpu"))


def calibrate(spec: StudySpec, *, tracking_uri: str | None = None, bench: str | None = None,
              price: float | None = None, kind: str | None = None) -> Calibration:
    """Gather the ledger's inputs. Arguments win over the study's ``resources`` fields.

    Args:
        spec: the study.
        tracking_uri: the store whose earlier finished runs calibrate (default: the study's, $MLFLOW_TRACKING_URI,
            ./mlflow.db; a sqlite file that does not exist is not created, and a store that does not answer is
            left out with a note, since a dry run must not need one).
        bench: a ``mixer-study bench`` JSON (default ``resources.calibration``); used only if measured on ``kind``.
        price: per device-hour (default ``resources.price_per_device_hour``).
        kind: the device kind (default ``resources.device_kind``, else this machine's).
    """
    r = spec.resources
    price = price if price is not None else r.price_per_device_hour
    if price is not None and price < 0:
        raise StudyError(f"price per device-hour: {price} is negative; give 0 or more")
    kind = kind or r.device_kind or local_device_kind(r.gpus_per_worker > 0)
    runs = pd.DataFrame(columns=CALIBRATION_COLUMNS)
    notes: list[str] = []
    if kind is None:
        notes.append("device kind unknown: the study's workers hold GPUs and this machine has none to name; set "
                     "resources.device_kind or --device-kind (e.g. 'cuda:NVIDIA H100 80GB HBM3')")
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    store = local_store_path(uri)
    if kind and store is not None and not store.exists():
        notes.append(f"earlier runs: none ({uri} does not exist)")
    elif kind:
        try:
            check_tracking(uri, timeout_s=5.0)
            runs = load_calibration_runs(uri, kind)
            notes.append(f"earlier runs: {len(runs)} finished on this device kind in {redact_url(uri)}")
        except StudyError as error:
            notes.append(f"earlier runs: not read ({error})")
    bench_doc = None
    bench = bench or r.calibration
    if bench:
        try:
            with fsspec.open(bench, "r") as f:
                doc = json.load(f)
        except (OSError, ValueError) as error:
            raise StudyError(f"calibration bench file {bench}: cannot read it as a `mixer-study bench` JSON: "
                             f"{error}") from None
        measured = bench_device_kind(doc)
        if measured == kind:
            bench_doc = doc
            notes.append(f"bench: {bench}")
        else:
            notes.append(f"bench: {bench} left out: it measured {measured}, the study runs on {kind or UNKNOWN}")
    return Calibration(kind, price, runs, bench_doc, notes)


def plan_costs(spec: StudySpec, plans: list[TrialPlan], calibration: Calibration) -> list[PlannedCost]:
    """Each trial's planned FLOPs, device-seconds and cost: earlier runs first (real trials, loader included), then
    the bench; "unknown" where neither timed that model on the study's device kind.

    Args:
        spec: the study (its workers per trial).
        plans: :func:`plan_study`.
        calibration: :func:`calibrate`.
    """
    kind, costs = calibration.device_kind, []
    for p in plans:
        train = p.config.train
        variant = canonical_variant(p.config.model.variant)
        batch_per_worker = train.batch_size // spec.resources.workers_per_trial
        throughput = None
        if kind is not None:
            throughput = runs_throughput(calibration.runs, variant, p.image_size, train.precision, str(train.compile),
                                         batch_per_worker)
            if throughput is None and calibration.bench is not None:
                compiled = train.compile is True or (train.compile == "auto" and kind.startswith("cuda"))
                throughput = bench_throughput(calibration.bench, variant, p.image_size, train.precision, compiled,
                                              batch_per_worker)
        why = (f"none: no earlier run or bench row of {variant} at {p.image_size} px ({train.precision}) on this "
               "device kind" if kind else "none: device kind unknown")
        costs.append(planned_cost(p.train_flops, p.images_seen, throughput, calibration.price, why))
    return costs


def plan_tags(cost: PlannedCost, calibration: Calibration) -> dict[str, str]:
    """A trial's prediction as the MLflow tags its run gets at its first start (``report`` reads them back).

    Args:
        cost: the trial's :class:`PlannedCost`.
        calibration: where it came from (device kind, price).
    """
    def text(value: float | None) -> str:
        return UNKNOWN if value is None else repr(float(value))

    return {PLAN_TRAIN_FLOPS_TAG: text(cost.train_flops), PLAN_DEVICE_SECONDS_TAG: text(cost.device_seconds),
            PLAN_COST_TAG: text(cost.cost), PLAN_PRICE_TAG: text(calibration.price),
            PLAN_DEVICE_KIND_TAG: calibration.device_kind or UNKNOWN, PLAN_CALIBRATION_TAG: cost.calibration}


def format_ledger(plans: list[TrialPlan], costs: list[PlannedCost], calibration: Calibration) -> str:
    """The plan's ledger: per trial FLOPs, device-seconds, cost and its calibration, then the totals.

    Args:
        plans: :func:`plan_study`.
        costs: :func:`plan_costs`, in the same order.
        calibration: :func:`calibrate`.
    """
    def cell(value: float | None, fmt: str) -> str:
        return UNKNOWN if value is None else format(value, fmt)

    lines = [f"compute ledger on {calibration.device_kind or UNKNOWN}, price per device-hour "
             f"{cell(calibration.price, 'g')} (a device = a CPU core or a GPU)",
             f"{'trial':<40} {'train FLOPs':>12} {'device-s':>10} {'cost':>10}  calibration"]
    for p, c in zip(plans, costs):
        lines.append(f"{p.name:<40} {c.train_flops:>12.3e} {cell(c.device_seconds, '.4g'):>10} "
                     f"{cell(c.cost, '.4g'):>10}  {c.calibration}")
    known = [c for c in costs if c.device_seconds is not None]
    unknown = len(costs) - len(known)
    seconds = sum(c.device_seconds for c in known)
    cost = None if calibration.price is None else sum(c.cost for c in known)
    partial = f" for the {len(known)} calibrated trial(s)" if unknown else ""
    lines.append(f"total: {sum(c.train_flops for c in costs):.3e} training FLOPs, "
                 + (f"{seconds:.4g} device-seconds ({seconds / 3600:.4g} device-hours){partial}, cost "
                    f"{cell(cost, '.4g')}{partial if cost is not None else ''}" if known else
                    "device-seconds and cost unknown")
                 + (f"; {unknown} of {len(costs)} trial(s) unknown (no calibration)" if unknown else "")
                 + ("" if calibration.price is not None else
                    "; no price: set resources.price_per_device_hour or --price-per-hour"))
    lines += [f"  {note}" for note in calibration.notes]
    return "\n".join(lines)


def _trial_count(spec: StudySpec, plans: list[TrialPlan]) -> str:
    """``24 trial(s) = 4 grid point(s) x sweep settings (Mixer 2, ViT 4; other families 1) x 3 replicate(s)``;
    without a sweep or replicates just ``4 trial(s)``.

    Args:
        spec: the study.
        plans: its trials (:func:`plan_study`).
    """
    if not spec.sweep and spec.replicates == 1:
        return f"{len(plans)} trial(s)"
    settings = (" x sweep settings (" + ", ".join(f"{family} {len(spec.sweep_settings(family))}"
                                                    for family in spec.sweep) + "; other families 1)"
                if spec.sweep else "")
    return (f"{len(plans)} trial(s) = {len(spec.grid_points())} grid point(s){settings} x {spec.replicates} "
            "replicate(s)")


def format_plan(spec: StudySpec, plans: list[TrialPlan]) -> str:
    """The dry-run table: one line per trial and the totals.

    Args:
        spec: the study.
        plans: :func:`plan_study`.
    """
    r = spec.resources
    width = max([40, *(len(p.name) for p in plans)])
    lines = [
        f"study {spec.name}: {_trial_count(spec, plans)}, {r.workers_per_trial} worker(s) x {r.cpus_per_worker} CPU"
        + (f" + {r.gpus_per_worker} GPU" if r.gpus_per_worker else "")
        + f" per trial; experiment '{spec.experiment}'",
        f"{'trial':<{width}} {'variant':>8} {'px':>4} {'fraction':>8} {'subset':>8} {'steps':>7} {'batch':>6} "
        f"{'epochs':>8} {'GFLOPs/img':>10} {'train FLOPs':>12}",
    ]
    for p in plans:
        c = p.config
        lines.append(
            f"{p.name:<{width}} {c.model.variant:>8} {p.image_size:>4} {c.data.fraction:>8.3g} {p.train_images:>8} "
            f"{c.train.steps:>7} {c.train.batch_size:>6} {p.epochs:>8.1f} {p.forward_gflops:>10.4g} "
            f"{p.train_flops:>12.3e}"
        )
    total = sum(p.train_flops for p in plans)
    lines.append(f"total: {sum(p.config.train.steps for p in plans)} steps, "
                 f"{sum(p.images_seen for p in plans):,} images, {total:.3e} training FLOPs")
    return "\n".join(lines)
