"""Study files: YAML -> a validated :class:`StudySpec`. Every error names the field, the bad value and what is allowed.

A study is a base recipe (a ``workers.config.TrialConfig``) plus a grid over any of its fields (dotted keys such as
``model.variant`` or ``data.fraction``), the resources each trial gets, and where results are tracked. Every grid
point is validated here, before Ray starts, so a bad value in the third grid entry fails now, not an hour in.

Two more axes cross the grid (:meth:`StudySpec.trial_points`): ``sweep``, a recipe sweep per model family (the
paper tunes each family; the report keeps, per grid point, the setting best on upstream validation), and
``replicates``, runs of every grid point and setting with ``train.seed`` = the base seed + 0, 1, ...
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.config import TrialConfig
from workers.models.registry import FAMILIES, get_variant

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Fields that hold data URLs: relative local paths in a study file are resolved against the working directory,
# so the trial processes (which run elsewhere) get absolute paths.
URL_FIELDS = ("data.train", "data.val", "fewshot.train", "fewshot.test", "finetune.train", "finetune.test",
              "finetune.val")
SEED_FIELD = "train.seed"  # what `replicates` varies
# How a swept field shows in a trial name's suffix (``-lr0.003-wd0.0001``); others by their last dotted part.
SHORT_SWEEP_KEYS = {"weight_decay": "wd"}


class StudyError(ValueError):
    """A study file is invalid; the message lists every problem, one per line, each naming its field."""


class ResourcesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers_per_trial: int = Field(2, ge=1, description="DDP workers (Ray Train worker actors) per trial")
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: int = Field(
        0, ge=0, le=1, description="0 trains on CPU (gloo), 1 on GPU (nccl): DDP drives one device per worker, so"
        " use more workers for more GPUs"
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as the cluster's CPUs (or GPUs) hold at once, plus one whose start-up"
        " overlaps the others' training"
    )
    max_failures: int = Field(
        1, ge=0, description="retries of a failed trial, each resuming from its last checkpoint (the only retry layer:"
        " a trial runs at most 1 + max_failures times)"
    )
    price_per_device_hour: float | None = Field(
        None, ge=0, description="what one device (a CPU core, or a GPU) costs per hour, in any currency: the compute"
        " ledger's cost (pipeline.plan); null = cost unknown"
    )
    device_kind: str | None = Field(
        None, description="the device the trials run on, as trials tag it (mixer.device_kind: 'cpu:<CPU model>' or"
        " 'cuda:<GPU name>'), for the ledger's planned device-seconds; default: this machine's"
    )
    calibration: str | None = Field(
        None, description="a `mixer-study bench` JSON whose train_step img/s calibrate the planned device-seconds"
        " (besides earlier finished runs on the same device kind)"
    )


class TrackingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment; default the study name")
    system_metrics: bool = Field(True, description="log MLflow system metrics (CPU, memory, GPU) for each trial")
    system_metrics_interval: float = Field(
        1.0, gt=0, description="seconds between two system-metrics samples: a few points even for a 10 s trial"
        " (each costs the store one write); $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it"
    )


@dataclass(frozen=True)
class TrialPoint:
    """Where one trial sits in a study: its grid coordinates, its family's sweep setting and its replicate's seed."""

    grid: dict[str, Any]      # the grid point (dotted keys, file order)
    setting: dict[str, Any]   # the sweep setting of the point's model family; {} = the base recipe
    seed: int | None          # train.seed of this replicate; None with one replicate (the recipe's own seed)

    @property
    def overrides(self) -> dict[str, Any]:
        """Every recipe field this trial sets over the base: grid values, then the setting, then the seed."""
        return {**self.grid, **self.setting, **({SEED_FIELD: self.seed} if self.seed is not None else {})}


def _check_values(where: str, values: list[Any]) -> None:
    """ValueError unless ``values`` (of a grid key or a swept field) is a non-empty list without repeats.

    Args:
        where: the field as the study file spells it (``grid.data.fraction``, ``sweep.ViT.optim.lr``).
        values: its values.
    """
    if not values:
        raise ValueError(f"{where} is an empty list: give at least one value")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"{where} repeats a value: {values}")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="study name: letters, digits, '_', '.', '-'")
    description: str = ""
    base: TrialConfig
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    sweep: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per model family (as the registry names it: Mixer, ViT, BiT), recipe "
        "fields and their values, crossed with the grid points of that family; a family without an entry runs the"
        " base recipe. The report keeps, per grid point, the setting with the best mean upstream val accuracy"
    )
    replicates: int = Field(
        1, ge=1, description="runs of every grid point and sweep setting, with train.seed = the base recipe's seed + "
        "0, 1, ...; the report shows means and 95 % intervals over them"
    )
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("grid")
    @classmethod
    def _grid_shape(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            _check_values(f"grid.{key}", values)
        return grid

    @field_validator("sweep")
    @classmethod
    def _sweep_shape(cls, sweep: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for family, fields in sweep.items():
            if not fields:
                raise ValueError(f"sweep.{family} sweeps no field: give e.g. {{optim.lr: [0.001, 0.003]}}")
            for key, values in fields.items():
                _check_values(f"sweep.{family}.{key}", values)
        return sweep

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def grid_points(self) -> list[dict[str, Any]]:
        """Cartesian product of the grid, in file order (first key slowest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def trial_config(self, point: dict[str, Any]) -> TrialConfig:
        """The recipe of the base with ``point``'s dotted fields set.

        Args:
            point: dotted recipe field -> value (a grid point, or a :attr:`TrialPoint.overrides`).
        """
        return TrialConfig.model_validate(_with_overrides(self.base.model_dump(), point))

    def sweep_settings(self, family: str) -> list[dict[str, Any]]:
        """The sweep settings of model family ``family`` (cartesian product, file order); [{}] where it has none.

        Args:
            family: a registered family's name ("Mixer", "ViT", "BiT").
        """
        fields = self.sweep.get(family, {})
        keys = list(fields)
        return [dict(zip(keys, values)) for values in itertools.product(*(fields[k] for k in keys))]

    def seeds(self) -> list[int | None]:
        """The replicates' train.seed values: the base seed + 0, 1, ...; [None] (the recipe's seed) for one."""
        if self.replicates == 1:
            return [None]
        return [self.base.train.seed + r for r in range(self.replicates)]

    def trial_points(self) -> list[TrialPoint]:
        """Every trial: grid point x its family's sweep settings x replicates (grid slowest, seed fastest).

        The family is the grid point's model.variant's, so validate the grid points first (:func:`parse_study`).
        """
        trials = []
        for point in self.grid_points():
            family = get_variant(self.trial_config(point).model.variant).family
            trials += [TrialPoint(point, setting, seed)
                       for setting in self.sweep_settings(family) for seed in self.seeds()]
        return trials


def _with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``config`` with dotted keys (``data.augment.crop``) set."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        *sections, field = dotted.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[field] = value
    return config


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc`` (a pydantic error location) inside ``model``, or None if not a model."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def did_you_mean(word: str, allowed: list[str]) -> str:
    """`` (did you mean 'steps'?)`` for the closest of ``allowed`` to a misspelt ``word``, else ''."""
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6) or [k for k in allowed if word in k][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_errors(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: the field's dotted path, what is wrong and allowed, and the value given."""
    lines = []
    for item in error.errors():
        where = prefix + ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            allowed = _keys_at(model, item["loc"][:-1]) if model else None
            if allowed is not None:
                hint = did_you_mean(str(item["loc"][-1]), allowed)
                lines.append(f"{where}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
                continue
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        lines.append(f"{where or '<top level>'}: {message}{shown}")
    return lines


def _resolve_local_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make relative local data paths absolute (URLs with a scheme such as s3:// are left alone)."""
    def fix(value: Any) -> Any:
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            return str((base_dir / value).resolve())
        return value

    for dotted in URL_FIELDS:
        section, _, field = dotted.partition(".")
        if isinstance(raw.get("base", {}).get(section), dict) and field in raw["base"][section]:
            raw["base"][section][field] = fix(raw["base"][section][field])
        if isinstance(raw.get("grid"), dict) and isinstance(raw["grid"].get(dotted), list):
            raw["grid"][dotted] = [fix(v) for v in raw["grid"][dotted]]


def parse_study(raw: Any, source: str = "<study>", base_dir: Path | None = None) -> StudySpec:
    """Validate a study given as a dict (e.g. parsed YAML). Raises :class:`StudyError` listing every problem."""
    if not isinstance(raw, dict):
        raise StudyError(
            f"{source}: a study file must be a YAML mapping (name, base, grid, ...), got {type(raw).__name__}")
    _resolve_local_paths(raw, base_dir or Path.cwd())
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as error:
        raise StudyError(f"{source} is invalid:\n  " + "\n  ".join(_format_errors(error, model=StudySpec))) from None

    problems = []
    known = set(recipe_fields())
    for key in spec.grid:
        if key not in known:
            problems.append(f"grid.{key}: not a recipe field{did_you_mean(key, sorted(known))}; allowed keys: "
                            f"{', '.join(sorted(known))}")
    if not problems:
        # Validate every value of every grid key in the context of the base recipe.
        for key, values in spec.grid.items():
            for index, value in enumerate(values):
                try:
                    spec.trial_config({key: value})
                except ValidationError as error:
                    problems += _format_errors(error, prefix=f"grid.{key}[{index}] -> ", model=TrialConfig)
        for point in spec.grid_points() if not problems else []:
            try:
                spec.trial_config(point)
            except ValidationError as error:
                problems += _format_errors(error, prefix=f"grid point {point} -> ")
    problems += _sweep_problems(spec, known)
    for trial in spec.trial_points() if not problems else []:
        try:
            spec.trial_config(trial.overrides)
        except ValidationError as error:
            problems += _format_errors(error, prefix=f"trial {trial.overrides} -> ")
    workers = spec.resources.workers_per_trial
    for trial in spec.trial_points() if not problems else []:
        batch = spec.trial_config(trial.overrides).train.batch_size
        if batch % workers:
            problems.append(
                f"train.batch_size: {batch} is not divisible by resources.workers_per_trial ({workers}) "
                + (f"at {trial.overrides}" if trial.overrides else "in the base recipe")
            )
            break
    if problems:
        raise StudyError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return spec


def _sweep_problems(spec: StudySpec, known: set[str]) -> list[str]:
    """What is wrong with ``sweep`` and ``replicates``, one line each: families the registry does not know, fields
    that are no recipe field, that the grid also sets or that say which model or seed runs, and bad values.

    Args:
        spec: the parsed study.
        known: every recipe field (:func:`recipe_fields`).
    """
    problems = []
    if spec.replicates > 1 and SEED_FIELD in spec.grid:
        problems.append(f"grid.{SEED_FIELD}: the grid sets the seed and replicates is {spec.replicates}: use one "
                        f"(replicates: N runs train.seed = {spec.base.train.seed} + 0..N-1)")
    for family, fields in spec.sweep.items():
        if family not in FAMILIES:
            problems.append(f"sweep.{family}: unknown model family{did_you_mean(family, list(FAMILIES))}; allowed: "
                            f"{', '.join(FAMILIES)}")
            continue
        for key, values in fields.items():
            where = f"sweep.{family}.{key}"
            if key not in known:
                problems.append(f"{where}: not a recipe field{did_you_mean(key, sorted(known))}")
            elif key in spec.grid:
                problems.append(f"{where}: also a grid key: a field is either gridded for every family or swept per"
                                " family, not both")
            elif key == SEED_FIELD:
                problems.append(f"{where}: the seed is not a recipe setting to select on: use replicates")
            elif key == "model.variant":
                problems.append(f"{where}: the sweep tunes a family's recipe; put model variants in the grid")
            else:
                for index, value in enumerate(values):
                    try:
                        spec.trial_config({key: value})
                    except ValidationError as error:
                        problems += _format_errors(error, prefix=f"{where}[{index}] -> ", model=TrialConfig)
    return problems


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file (``yaml.safe_load``; relative data paths resolve against the cwd)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyError(f"{path}: not valid YAML: {error}") from None
    return parse_study(raw, source=str(path))


def recipe_fields(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[str]:
    """Dotted names of every recipe field (the keys a grid or --set may use)."""
    leaves = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves += recipe_fields(annotation, f"{prefix}{name}.")
        else:
            leaves.append(prefix + name)
    return leaves


def trial_name(point: dict[str, Any], setting: dict[str, Any] | None = None, seed: int | None = None) -> str:
    """Deterministic, human-readable trial name: ``variant=B-16,fraction=0.1``, then the sweep setting and the seed
    as a suffix, ``variant=B-16,fraction=0.1-lr0.003-wd0.0001-s1``.

    Keys are shortened to their last part unless that would be ambiguous. The empty grid gives ``base``.

    Args:
        point: the grid point.
        setting: the trial's sweep setting ({} or None: the base recipe, no suffix).
        seed: its replicate's train.seed (None: one replicate, no suffix).
    """
    name = ",".join(f"{k}={_format_value(v)}" for k, v in zip(_short_keys(point), point.values())) or "base"
    setting = setting or {}
    shown = [SHORT_SWEEP_KEYS.get(key, key) for key in _short_keys(setting)]
    name += "".join(f"-{key}{_format_value(value)}" for key, value in zip(shown, setting.values()))
    name += f"-s{seed}" if seed is not None else ""
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _short_keys(point: dict[str, Any]) -> list[str]:
    """Each dotted key's last part, or the full keys where two would share one."""
    short = [key.rsplit(".", 1)[-1] for key in point]
    return short if len(set(short)) == len(short) else list(point)


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
