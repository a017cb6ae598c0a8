"""MLflow bookkeeping of a study: one parent run per study, one child run per grid point, found again on resume.

Runs are looked up by tags (``mixer.study``, ``mixer.trial``) rather than remembered in local state, so a resumed
study, a retried trial or a driver on another machine all land in the same runs: never a duplicate per grid point.
A run's displayed name (``Micro-4 f=0.03``, :func:`run_label`) is for people only and identifies nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from pipeline.spec import StudyError
from workers.names import (
    GIT_COMMIT_TAG,
    HEADLINE_METRICS,
    ROLE_STUDY,
    ROLE_TAG,
    ROLE_TRIAL,
    STUDY_TAG,
    STUDY_TRIALS_DONE,
    STUDY_TRIALS_FAILED,
    TRIAL_TAG,
    best_trial_tag,
)
from workers.training.mlflow_logger import fail_fast_http, tag_filter

log = logging.getLogger(__name__)

# The experiment's kind, as the UI's own experiment-kind selector writes it. MLflow 3.17's UI no longer opens on the
# runs table because of it: it follows its workflowType switch (GenAI by default), so the link that `mixer-study ui`
# prints carries workflowType=machine_learning (pipeline/ui.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """--tracking-uri, then the study file, then $MLFLOW_TRACKING_URI, then ./mlflow.db (sqlite, absolute path)."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


# MLflow's own variables for HTTP basic auth: credentials found in a tracking URI move here (see connect_tracking).
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def connect_tracking(uri: str, *, embedded_ray: bool = True, timeout_s: float = 10.0) -> str:
    """The URI to use everywhere after this point: ``uri`` without credentials, once the store has answered.

    Credentials (``http://user:password@host``) would otherwise be written in clear to the stored study spec, Tune's
    state, MLflow params and logs. They move into ``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD`` of
    this process, which MLflow reads for basic auth and which an embedded Ray's processes inherit. A cluster's
    processes do not inherit this driver's environment, so there the user passes those two variables in the job's
    runtime environment instead, and a URI with credentials is refused.

    Raises StudyError (naming the URI without its credentials) if the store does not answer within ``timeout_s``.
    """
    clean = redact_url(uri)
    if clean != uri:
        if not embedded_ray:
            raise StudyError(
                f"tracking URI {clean} holds credentials (user:password@), which a Ray cluster's processes cannot "
                "receive without writing them in clear: give the URI without them and set "
                f"{' and '.join(CREDENTIAL_ENV)} in the job's runtime environment (ray job submit "
                "--runtime-env-json '{\"env_vars\": {...}}')")
        user, _, password = urlsplit(uri).netloc.rsplit("@", 1)[0].partition(":")
        os.environ.update(dict(zip(CREDENTIAL_ENV, (unquote(user), unquote(password)))))
    check_tracking(clean, timeout_s)
    return clean


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Raise StudyError unless the MLflow store at ``uri`` answers a query within about ``timeout_s``."""
    with fail_fast_http(timeout_s):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track": say so, with the cause
            cause = " ".join(str(exc).split())[:400]
            raise StudyError(f"MLflow tracking store {redact_url(uri)} does not answer ({type(exc).__name__}: "
                             f"{cause}): start it, or give another --tracking-uri / $MLFLOW_TRACKING_URI; nothing was "
                             "launched") from None


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///path``, ``file:///path`` or a path); None for a
    server or a database server (``http://``, ``postgresql://``, ...)."""
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):]))
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return Path(unquote(urlsplit(uri).path))
    return Path(uri) if scheme == "" else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlruns/<experiment>`` beside the database of a local sqlite store.

    MLflow's default there is ``./mlruns/<id>`` of whatever the working directory is, so a study run from another
    folder than its store's scattered artifacts (report figures) into that folder. None for other stores: a
    tracking server or a file store decides itself.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return str(local_store_path(tracking_uri).resolve().parent / "mlruns" / experiment)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing, and always tagged as a model-training experiment.

    An existing experiment without the kind tag gets it (stores made before the tag existed are fixed on the next
    run); one whose kind someone chose in the UI keeps that choice.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            # Two drivers starting at once (e.g. `mixer-study train` beside a study): the loser uses the winner's.
            experiment = client.get_experiment_by_name(name)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _find_run(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> Run | None:
    runs = client.search_runs([exp_id], filter_string=tag_filter(tags), order_by=["attributes.start_time ASC"],
                              max_results=2)
    return runs[0] if runs else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The Source column of MLflow's runs table: what made the run (it shows "-" without these tags).
SOURCE_NAME, SOURCE_TYPE = "mixer-study", "LOCAL"
_SHORT_KEYS = {"data.fraction": "f"}  # the grid key of every data-scale study, shortest in the runs table
# workers.training.checkpoint.MODEL_FILE (not imported: that module loads torch, which this one's users need not):
# what rebuilds a checkpoint's model, a few hundred bytes.
MODEL_CARD = "model.json"


def find_study_run(client: MlflowClient, exp_id: str, study: str) -> Run | None:
    """The parent run of ``study`` in experiment ``exp_id``, as it is (None if the study never started)."""
    return _find_run(client, exp_id, {STUDY_TAG: study, ROLE_TAG: ROLE_STUDY})


def study_run(client: MlflowClient, exp_id: str, study: str, params: dict[str, Any], description: str = "") -> str:
    """The study's parent run id: found by tag, else created with ``params`` (spec summary) logged.

    Args:
        client: the tracking store's client.
        exp_id: the study's experiment.
        study: the study's name (also the parent run's name).
        params: the spec summary logged to a new parent run (params never change afterwards).
        description: the study's description: the run's MLflow description (``mlflow.note.content``, markdown).
    """
    run = find_study_run(client, exp_id, study)
    if run:
        client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
    else:
        commit = git_commit()
        run_id = client.create_run(exp_id, run_name=study, tags={
            STUDY_TAG: study, ROLE_TAG: ROLE_STUDY, GIT_COMMIT_TAG: commit, MLFLOW_GIT_COMMIT: commit,
            MLFLOW_SOURCE_NAME: SOURCE_NAME, MLFLOW_SOURCE_TYPE: SOURCE_TYPE}).info.run_id
        log_params(client, run_id, params)
    if description:
        client.set_tag(run_id, MLFLOW_RUN_NOTE, description)
    return run_id


def run_label(name: str, point: dict[str, Any]) -> str:
    """The name MLflow shows for a trial's run: its grid values, short (``Micro-4 f=0.03``), else ``name``.

    The model variant shows bare, ``data.fraction`` as ``f``, any other key by its last part (its full dotted key
    where two share a last part) and ``=``. Values keep their full precision (``repr`` of a float), so distinct grid
    points of a study always get distinct labels; the point itself is in the run's params and its
    ``mixer.grid_point`` tag, and ``name`` (``mixer.trial``) is what finds the run again.

    Args:
        name: the trial's name (pipeline.spec.trial_name, or ``--name`` of a one-off run).
        point: the trial's grid coordinates ({} for a study without a grid or a one-off run).
    """
    if not point:
        return name
    short = [key.rsplit(".", 1)[-1] for key in point]
    keys = short if len(set(short)) == len(short) else list(point)
    parts = []
    for full_key, key, value in zip(point, keys, point.values()):
        shown = repr(value) if isinstance(value, float) else str(value)
        parts.append(shown if full_key == "model.variant" else f"{_SHORT_KEYS.get(full_key, key)}={shown}")
    return " ".join(parts)


def trial_run(client: MlflowClient, exp_id: str, study: str, parent_run_id: str | None, trial: str,
              params: dict[str, Any], role: str = ROLE_TRIAL, run_name: str | None = None) -> str:
    """The trial's run id: the existing run of this (study, name, role) (status set back to RUNNING, its shown name
    set to ``run_name``), else a new one. ``role`` is "trial" for a study's grid point (what analysis.results reads)
    or "train" for a one-off run; ``run_name`` defaults to ``trial``."""
    tags = {STUDY_TAG: study, TRIAL_TAG: trial, ROLE_TAG: role}
    run_name = run_name or trial
    run = _find_run(client, exp_id, tags)
    if run:
        client.update_run(run.info.run_id, status="RUNNING", name=run_name)
        return run.info.run_id
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    tags.update({MLFLOW_RUN_NAME: run_name, MLFLOW_SOURCE_NAME: SOURCE_NAME, MLFLOW_SOURCE_TYPE: SOURCE_TYPE})
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_study_summary(client: MlflowClient, parent_run_id: str) -> dict[str, tuple[str, float]]:
    """Log the study's outcome to its parent run; returns {headline metric: (its best trial's run name, value)}.

    ``study/trials_done`` and ``study/trials_failed`` (its trial runs FINISHED and FAILED); for each headline
    metric (``best/val_acc``, ``fewshot/5shot``, ``finetune/top1``) that a finished trial logged, the best value
    under the metric's own name (the parent's row in the runs table then shows the study's best in the trials'
    columns) and the best trial's run name in the tag ``mixer.best_trial.<metric>``. All at step 0 (bar charts),
    each only when it changed, so running or resuming a finished study again adds no point.

    Args:
        client: the tracking store's client.
        parent_run_id: the study's parent run.
    """
    parent = client.get_run(parent_run_id)
    trials = client.search_runs([parent.info.experiment_id], tag_filter(
        {STUDY_TAG: parent.data.tags[STUDY_TAG], ROLE_TAG: ROLE_TRIAL}), max_results=10_000)
    finished = [r for r in trials if r.info.status == RunStatus.to_string(RunStatus.FINISHED)]
    failed = sum(r.info.status == RunStatus.to_string(RunStatus.FAILED) for r in trials)
    values: dict[str, float] = {STUDY_TRIALS_DONE: len(finished), STUDY_TRIALS_FAILED: failed}
    tags: dict[str, str] = {}
    best: dict[str, tuple[str, float]] = {}
    for metric in HEADLINE_METRICS:
        having = [r for r in finished if metric in r.data.metrics]
        if having:
            run = max(having, key=lambda r: r.data.metrics[metric])
            best[metric] = (run.info.run_name, run.data.metrics[metric])
            values[metric] = run.data.metrics[metric]
            tags[best_trial_tag(metric)] = run.info.run_name
    held = parent.data
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if held.metrics.get(k) != float(v)]
    changed = [RunTag(k, v) for k, v in tags.items() if held.tags.get(k) != v]
    if metrics or changed:
        client.log_batch(parent_run_id, metrics=metrics, tags=changed)
    return best


def checkpoint_note(checkpoint: str, step: int, val_acc: float, point: dict[str, Any]) -> str:
    """A trial run's MLflow description (markdown): its grid point and where its best checkpoint is.

    Values are rounded as the project shows them; the exact ones are the run's metrics.

    Args:
        checkpoint: the best checkpoint's URL (:func:`checkpoint_uri`).
        step: its step.
        val_acc: its upstream val/acc.
        point: the trial's grid coordinates.
    """
    grid = ", ".join(f"`{key}` = {value}" for key, value in point.items()) or "the study's base recipe"
    return (f"Grid point: {grid}.\n\nBest checkpoint: step {step}, val/acc {val_acc:.4f}, at `{checkpoint}` "
            "(its `model.json` is this run's artifact `checkpoint/model.json`; `mixer-study fewshot --checkpoint` "
            "and `analysis.report` load the folder).")


def log_model_card(client: MlflowClient, run_id: str, checkpoint) -> bool:
    """Copy the small ``model.json`` of a ``ray.train.Checkpoint`` (variant, image size, classes) into run
    ``run_id``'s artifacts as ``checkpoint/model.json``, so the run page shows what the checkpoint holds; the
    weights stay in the storage. Returns False (with a warning) where the file or the artifact store is not
    reachable: a trial never fails for it."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{MODEL_CARD}") as stream:
            text = stream.read().decode()
        client.log_text(run_id, text, f"checkpoint/{MODEL_CARD}")
    except (OSError, MlflowException) as error:
        log.warning("run %s: %s of checkpoint %s not logged: %s", run_id, MODEL_CARD, checkpoint.path, error)
        return False
    return True



def checkpoint_uri(checkpoint) -> str:
    """Where a ``ray.train.Checkpoint`` lives, as a URL for an MLflow tag (a local path, or ``s3://...``)."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


@dataclass(frozen=True)
class DataSplit:
    """One data split a trial uses, as plain values (no dependency on ``workers.data.manifest``).

    ``context`` is the split's role in the trial ("train", "val", "fewshot-train", "fewshot-test"); ``url`` the
    manifest's URL; ``shard_sha256`` the manifest's shard checksums in shard order; ``fraction`` the share of the
    split the trial actually uses (``num_samples`` / the split's size), ``grid_fraction`` the one the study asked for
    (``data.fraction``), which names the dataset when given (``train@0.3``, where ``fraction`` may be 0.299682).
    ``name`` overrides the dataset name shown in MLflow.
    """

    context: str
    url: str
    shard_sha256: Sequence[str]
    fraction: float
    num_samples: int
    num_classes: int
    name: str | None = None
    grid_fraction: float | None = None


def redact_url(url: str) -> str:
    """``url`` without a ``user:password@`` part: dataset sources are stored in the tracking database in clear."""
    if "://" not in url:
        return url  # a local path: an '@' in it is part of a folder name, not credentials
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def dataset_digest(shard_sha256: Sequence[str], fraction: float) -> str:
    """Short digest of a subset: the shard checksums (in order: the subset is a prefix in shard order) + fraction.

    Independent of the URL, so the same subset copied elsewhere, or used by another trial, has the same digest.
    8 hex digits like MLflow's own dataset digests (its limit is 36).
    """
    doc = json.dumps({"shards": list(shard_sha256), "fraction": float(fraction)}, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:8]


def _dataset_name(split: DataSplit) -> str:
    """``<parent folder>/<split folder>`` of the manifest, ``@fraction`` for a subset: ``imagenet21k/train@0.1``.

    Readable in the runs table's Dataset column without opening the run; the digest still tells subsets apart.
    """
    if split.name:
        return split.name
    url = urlsplit(split.url) if "://" in split.url else None
    path = f"{url.netloc.rsplit('@', 1)[-1]}/{url.path}" if url else split.url  # s3://bucket/...: bucket counts
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1].endswith(".json"):
        parts = parts[:-1]
    base = "/".join(parts[-2:]) or split.context
    fraction = float(split.fraction if split.grid_fraction is None else split.grid_fraction)
    return base if fraction >= 1.0 else f"{base}@{fraction:g}"


def _source_type(url: str) -> str:
    """MLflow's dataset source type for ``url``: "local" for paths and file://, else the URL scheme (s3, gs, ...)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    return "local" if scheme in ("", "file") else scheme


def log_dataset_inputs(client: MlflowClient, run_id: str, splits: Sequence[DataSplit]) -> None:
    """Log each split as an MLflow dataset input of ``run_id`` (one per split, tagged with its context).

    Idempotent: a split already logged to the run with the same name, digest and context is skipped, so a resumed or
    retried trial logs nothing twice, whatever the store (the SQL store dedups by itself, other stores need not).

    MLflow keeps one input per (dataset, run), with one context: two splits of identical data in one run (e.g.
    few-shot on the upstream training set at fraction 1) would collapse into one input, so the later one gets its
    context appended to its name.
    """
    existing = client.get_run(run_id).inputs.dataset_inputs or []
    logged: dict[tuple[str, str], str | None] = {}  # (name, digest) -> context
    for dataset_input in existing:
        context = next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        logged[(dataset_input.dataset.name, dataset_input.dataset.digest)] = context
    new: list[DatasetInput] = []
    for split in splits:
        digest = dataset_digest(split.shard_sha256, split.fraction)
        name = _dataset_name(split)
        if (name, digest) in logged and logged[(name, digest)] != split.context:
            name = f"{name} ({split.context})"
        if (name, digest) in logged:
            if logged[(name, digest)] != split.context:
                log.warning("run %s already has dataset %s (%s) with context %s, not %s", run_id, name, digest,
                            logged[(name, digest)], split.context)
            continue
        logged[(name, digest)] = split.context
        url = redact_url(split.url)
        profile = {"num_samples": int(split.num_samples), "fraction": float(split.fraction),
                   "num_classes": int(split.num_classes)}
        if split.grid_fraction is not None:
            profile["grid_fraction"] = float(split.grid_fraction)
        dataset = Dataset(name=name, digest=digest, source_type=_source_type(url), source=json.dumps({"uri": url}),
                          profile=json.dumps(profile))
        new.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split.context)]))
    if new:
        _log_inputs_racing(client, run_id, new)


def _log_inputs_racing(client: MlflowClient, run_id: str, inputs: list[DatasetInput], attempts: int = 5) -> None:
    """``client.log_inputs``, retried when another trial created one of the same datasets meanwhile.

    MLflow's store keeps one dataset row per (experiment, name, digest) and creates it on first use, check then
    insert: two trials of a study starting at once (the val and few-shot splits are shared) can both insert, and
    the loser's whole transaction fails on the unique constraint (reproduced with 4 processes on sqlite). The
    transaction rolled back, so logging again is safe, and then the dataset exists and is reused.
    """
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            text = str(error).lower()
            if attempt == attempts - 1 or not any(s in text for s in ("unique constraint", "duplicate", "integrity")):
                raise
            time.sleep(0.2 * (attempt + 1) * (1 + random.random()))
