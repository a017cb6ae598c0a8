"""One trial: TrialConfig -> ``TorchTrainer(workers.training.ray_entry.train_loop_per_worker).fit()`` -> few-shot on
the best checkpoint -> MLflow. Used as the Ray Tune function trainable and by ``mixer-study train`` on its own.

A study's 1-worker trial pre-trains and fine-tunes inside its Tune trial process instead
(``pipeline.trial_in_process``: no process group is needed, so no worker group is started; Tune keeps its
pre-training checkpoints, ``pipeline.finetune_sweep`` its fine-tuning ones); DDP trials (2 or more workers) and
``mixer-study train`` run the ``TorchTrainer`` described here.

Ray Train V2 resumes by run name: a ``TorchTrainer`` whose ``RunConfig(name, storage_path)`` points at an
existing run restarts from that run's latest checkpoint. Trial names are deterministic, so a restarted trial
(Tune retry or ``mixer-study resume``) continues where its checkpoints left off.

Retries have ONE layer: Ray Tune's ``FailureConfig(max_failures=resources.max_failures)``. A failed attempt (a
worker, its node or the trial driver lost, or a deterministic error) is retried as a whole trial, which resumes
from the last checkpoint; Ray Train's own retry is off (``pipeline.ray_policy``). Each attempt increments the run's
``mixer.attempts`` tag.

:func:`run_trial` runs in named steps: :func:`_open_run` (create or continue the trial's MLflow run) ->
:func:`_fit` (pre-training) -> :func:`_best_and_logged` (the best checkpoint, checked against what the workers
logged) -> few-shot (logged by the workers' rank 0) and fine-tuning (``pipeline.finetune_sweep``) ->
:func:`_close_run`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow.tracking
import psutil
import ray
import ray.train
from mlflow.entities import RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from ray.train.torch import TorchTrainer

from pipeline.finetune_sweep import run_finetune
from pipeline.ray_policy import train_run_config, worker_scaling
from pipeline.spec import StudyError, StudySpec
from pipeline.tracking import (
    DataSplit,
    checkpoint_note,
    checkpoint_uri,
    experiment_id,
    log_dataset_inputs,
    log_model_card,
    run_label,
    trial_run,
)
from pipeline.trial_in_process import InProcessResult, fit_in_process
from pipeline.trial_worker import trial_loop_per_worker
from workers.config import TrialConfig, flat_defaults, flatten
from workers.data.fractions import subset_size
from workers.data.manifest import Manifest, join_url, load_manifest
from workers.names import (
    ATTEMPTS_TAG,
    BEST_CHECKPOINT_TAG,
    BEST_PREFIX,
    BEST_STEP,
    FEWSHOT_PREFIX,
    FINETUNE_PREFIX,
    GRID_POINT_TAG,
    ROLE_TAG,
    ROLE_TRAIN,
    ROLE_TRIAL,
    STEP,
    STUDY_TAG,
    TIME_TRIAL_END_UNIX,
    TIME_TRIAL_START_UNIX,
    TRAIN_RUN_TAG,
    TRIAL_TAG,
    VAL_ACC,
)
from workers.training.mlflow_logger import RunLogger, fail_fast_http, replay_spool, tag_filter

log = logging.getLogger(__name__)

STUDY_TRIAL, ONE_OFF = ROLE_TRIAL, ROLE_TRAIN  # MLflow roles: a study's grid point, or a `mixer-study train` run
SPOOL = "mlflow-spool"  # folder name of the MLflow records that wait for the store (workers.training.mlflow_logger)

# When the previous trial run in this process ended (0: none). Tune reuses a trial driver's process for the next
# trial (pipeline.tune, reuse_actors), so the process start is the first trial's start only.
_previous_trial_end = 0.0


@dataclass
class TrialJob:
    """Everything one trial needs, as plain data (it travels through Ray Tune's param space)."""

    name: str
    study: str
    role: str                             # STUDY_TRIAL or ONE_OFF: only study trials enter a study's results
    trial: dict[str, Any]                 # TrialConfig as a dict
    tracking_uri: str
    experiment: str
    storage: str                          # Ray Train storage path for this study's trial runs
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    system_metrics: bool = True
    system_metrics_interval: float = 1.0  # seconds between samples (tracking.system_metrics_interval)
    parent_run_id: str | None = None
    point: dict[str, Any] = field(default_factory=dict)
    planned: dict[str, str] = field(default_factory=dict)  # the ledger's prediction as tags (pipeline.plan.plan_tags)


def make_job(spec: StudySpec, name: str, config: TrialConfig, point: dict[str, Any], *, tracking_uri: str,
             storage: str, role: str = STUDY_TRIAL, parent_run_id: str | None = None,
             planned: dict[str, str] | None = None) -> dict[str, Any]:
    """The one constructor of a trial's job (``run`` for every grid point, ``train`` for its single run); ``planned``
    is the compute ledger's prediction, tagged on the trial's run at its first start."""
    r = spec.resources
    return dataclasses.asdict(TrialJob(
        name=name, study=spec.name, role=role, trial=config.model_dump(mode="json"), tracking_uri=tracking_uri,
        experiment=spec.experiment, storage="/".join([storage.rstrip("/"), spec.name, "train"]),
        workers=r.workers_per_trial, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
        system_metrics=spec.tracking.system_metrics, system_metrics_interval=spec.tracking.system_metrics_interval,
        parent_run_id=parent_run_id, point=point, planned=planned or {},
    ))


def in_process(job_dict: dict[str, Any], in_tune: bool = True) -> bool:
    """Whether the trial of ``job_dict`` (:func:`make_job`) trains in its Tune trial process: 1 worker, in a study; it
    then holds its worker's resources itself (``pipeline.tune``) and fine-tunes in the same process too
    (``pipeline.finetune_sweep``): a fine-tuning ``TorchTrainer`` would ask for the CPUs/GPUs the trial process
    holds, so trials holding every CPU would wait for each other's forever.

    Args:
        job_dict: the trial's job.
        in_tune: running as Ray Tune's function trainable (``mixer-study train`` runs a ``TorchTrainer``).
    """
    return in_tune and job_dict["workers"] == 1


def best_checkpoint(result: ray.train.Result | InProcessResult) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """Early stopping as the paper does it: the checkpoint with the best upstream val/acc; of equal ones the latest,
    which is the one Ray Train's retention keeps (and the rule workers.training.trainer applies)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if VAL_ACC in m]
    if not candidates:
        raise RuntimeError(f"trial run {result.path} reported no checkpoint with val/acc")
    return max(candidates, key=lambda cm: (cm[1][VAL_ACC], cm[1][STEP]))


def trial_params(trial: TrialConfig, job: TrialJob, manifest: Manifest) -> dict[str, Any]:
    """The MLflow params of a trial's run: its flattened recipe, the data facts it resolves to, its resources.

    Args:
        trial: the trial's recipe.
        job: the trial's job (its resources).
        manifest: the training split's manifest.
    """
    return {**flatten(trial), "data.image_size": trial.data.image_size or manifest.image_size,
            "data.num_classes": manifest.num_classes, "data.train_images": subset_size(manifest, trial.data.fraction),
            "resources.workers": job.workers, "resources.cpus_per_worker": job.cpus_per_worker,
            "resources.gpus_per_worker": job.gpus_per_worker}


def _dataset_inputs(trial: TrialConfig, train: Manifest) -> list[DataSplit]:
    """One MLflow dataset input per split the trial reads: what the runs table's Dataset column shows."""
    def split(context: str, manifest: Manifest, num_samples: int | None, grid_fraction: float | None = None
              ) -> DataSplit:
        count = manifest.num_samples if num_samples is None else min(num_samples, manifest.num_samples)
        return DataSplit(context, manifest.url, [s.sha256 for s in manifest.shards], count / manifest.num_samples,
                         count, manifest.num_classes, grid_fraction=grid_fraction)

    # The training subset is named by the fraction asked for (train@0.3), not the one its classes round to.
    splits = [split("train", train, subset_size(train, trial.data.fraction), trial.data.fraction),
              split("val", load_manifest(trial.data.val), None)]
    if trial.fewshot.enabled:
        splits += [split("fewshot-train", load_manifest(trial.fewshot.train), trial.fewshot.train_samples),
                   split("fewshot-test", load_manifest(trial.fewshot.test), None)]
    if trial.finetune.enabled:
        splits += [split("finetune-train", load_manifest(trial.finetune.train), None),
                   split("finetune-test", load_manifest(trial.finetune.test), None)]
        if trial.finetune.val:
            splits.append(split("finetune-val", load_manifest(trial.finetune.val), None))
    return splits


def refuse_changed_rerun(job_dict: dict[str, Any]) -> None:
    """Raise StudyError if ``job`` would continue an existing MLflow run (same study, name and role) whose recipe
    differs: rerunning a name continues its checkpoints, so an edited recipe must get a new name. Call before Ray."""
    job = TrialJob(**job_dict)
    trial = TrialConfig.model_validate(job.trial)
    client = mlflow.tracking.MlflowClient(job.tracking_uri)
    experiment = client.get_experiment_by_name(job.experiment)
    if experiment is None:
        return
    runs = client.search_runs([experiment.experiment_id], tag_filter(
        {STUDY_TAG: job.study, TRIAL_TAG: job.name, ROLE_TAG: job.role}), max_results=1)
    if not runs:
        return
    new = {k: str(v)[:6000] for k, v in trial_params(trial, job, load_manifest(trial.data.train)).items()}
    old = runs[0].data.params
    # A field added to the recipe after the run was made is absent from its params: at its default it changes
    # nothing the run did, so only a non-default value counts as an edit.
    defaults = {k: str(v)[:6000] for k, v in flat_defaults().items()}
    changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k)
                     and not (k not in old and k in defaults and new.get(k) == defaults[k]))
    if changed:
        diff = "; ".join(f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in changed[:8])
        raise StudyError(f"run '{job.name}' of study '{job.study}' already exists with a different recipe ({diff}): "
                         "rerunning a name continues its checkpoints, so give the changed recipe another --name")


def run_trial(job_dict: dict[str, Any], in_tune: bool = False) -> dict[str, float]:
    """Train one trial and evaluate it; returns the trial's final metrics (also logged to its MLflow run).

    Args:
        job_dict: the trial's :class:`TrialJob` as a dict (:func:`make_job`).
        in_tune: running as Ray Tune's function trainable: report each result to Tune too.
    """
    job = TrialJob(**job_dict)
    trial = TrialConfig.model_validate(job.trial)
    client = mlflow.tracking.MlflowClient(job.tracking_uri)
    spool = spool_url(job.storage, job.name)
    run_id, manifest = _open_run(client, job, trial, spool)
    worker_mlflow = {"tracking_uri": job.tracking_uri, "run_id": run_id, "system_metrics": job.system_metrics,
                     "sampling_interval": job.system_metrics_interval, "spool": spool}
    run_log: RunLogger | None = None
    ok = False
    try:
        log_dataset_inputs(client, run_id, _dataset_inputs(trial, manifest))
        result = _fit(job, trial, worker_mlflow, in_tune)
        # From here on the store may be down (training did not need it): what it does not take is spooled.
        run_log = RunLogger(job.tracking_uri, run_id, spool=spool)
        checkpoint, logged = _best_and_logged(client, job, trial, result, run_id, run_log, spool)
        final: dict[str, float] = {}
        if trial.finetune.enabled:  # the paper's fine-tuning of the best checkpoint, on the trial's resources
            final.update(run_finetune(job_dict, checkpoint, worker_mlflow, run_log.set_tag,
                                      in_process=in_process(job_dict, in_tune)))
        final.update(_trial_span())
        run_log.log(final, trial.train.steps)  # skips what an earlier attempt already logged
        ok = True
        headline = {k: v for k, v in logged.items() if k.startswith((BEST_PREFIX, FEWSHOT_PREFIX))}
        return {**headline, **{k: v for k, v in final.items() if k.startswith(FINETUNE_PREFIX)}}
    finally:
        _close_run(run_log or RunLogger(job.tracking_uri, run_id, spool=spool), ok)


def _open_run(client: mlflow.tracking.MlflowClient, job: TrialJob, trial: TrialConfig,
              spool: str) -> tuple[str, Manifest]:
    """Create the trial's MLflow run or continue it (same study, name and role), count this attempt, and send the
    records an earlier attempt spooled; returns (run id, the training split's manifest).

    Args:
        client: the tracking store's client.
        job: the trial's job.
        trial: its recipe.
        spool: where its MLflow records wait while the store is down (:func:`spool_url`).
    """
    exp_id = experiment_id(client, job.experiment)
    manifest = load_manifest(trial.data.train)
    run_id = trial_run(client, exp_id, job.study, job.parent_run_id, job.name, trial_params(trial, job, manifest),
                       role=job.role, run_name=run_label(job.name, job.point))
    tags = client.get_run(run_id).data.tags
    attempts = int(tags.get(ATTEMPTS_TAG, "0")) + 1
    client.set_tag(run_id, ATTEMPTS_TAG, str(attempts))
    # The plan's prediction, as first made: a retry or resume keeps it (report compares it with the actual).
    first_plan = [RunTag(k, v) for k, v in job.planned.items() if k not in tags]
    if first_plan:
        client.log_batch(run_id, tags=first_plan)
    client.set_tag(run_id, GRID_POINT_TAG, ",".join(f"{k}={v}" for k, v in job.point.items()) or "base")
    with fail_fast_http():
        replay_spool(client, spool)  # an earlier attempt's records first, so this attempt's follow them in order
    return run_id, manifest


def _fit(job: TrialJob, trial: TrialConfig, worker_mlflow: dict[str, Any],
         in_tune: bool) -> ray.train.Result | InProcessResult:
    """Pre-train: in this Tune trial process for 1 worker (resumed from Tune's latest checkpoint), else the trial's
    Ray Train run (resumed by name from its latest checkpoint).

    Args:
        job: the trial's job.
        trial: its recipe.
        worker_mlflow: the workers' logging config (tracking_uri, run_id, system_metrics, spool).
        in_tune: also report every result to Ray Tune.
    """
    if in_process(dataclasses.asdict(job), in_tune):
        return fit_in_process(job.trial, worker_mlflow, job.cpus_per_worker, job.gpus_per_worker,
                              worker_group_run=join_url(job.storage, job.name))
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        trial_loop_per_worker,
        train_loop_config={"trial": job.trial, "mlflow": worker_mlflow, "cpus_per_worker": job.cpus_per_worker},
        scaling_config=worker_scaling(job.workers, job.cpus_per_worker, job.gpus_per_worker),
        run_config=train_run_config(job.name, job.storage, trial.train.keep_checkpoints, score_metric=VAL_ACC,
                                    callbacks=callbacks),
    )
    return trainer.fit()


def _best_and_logged(client: mlflow.tracking.MlflowClient, job: TrialJob, trial: TrialConfig,
                     result: ray.train.Result | InProcessResult, run_id: str, run_log: RunLogger,
                     spool: str) -> tuple[ray.train.Checkpoint, dict[str, float]]:
    """The best checkpoint (tagged on the run) and the run's metrics, checked against it: the workers logged
    best/* (at the last step) and, on rank 0, the few-shot of the best model; every metric is logged once, by whoever
    computed it. With the store down: the last report's metrics (the few-shot waits in the spool).

    Args:
        client: the tracking store's client.
        job: the trial's job.
        trial: its recipe.
        result: the pre-training run's result.
        run_id: the trial's MLflow run.
        run_log: the driver's logger of that run.
        spool: where the run's records wait while the store is down.
    """
    checkpoint, best_metrics = best_checkpoint(result)
    location = checkpoint_uri(checkpoint)
    run_log.set_tag(BEST_CHECKPOINT_TAG, location)
    run_log.set_tag(TRAIN_RUN_TAG, result.path)
    run_log.set_tag(MLFLOW_RUN_NOTE, checkpoint_note(location, int(best_metrics[STEP]), best_metrics[VAL_ACC],
                                                     job.point))
    logged = None if run_log.spooling else _run_metrics(client, run_id)
    if logged is not None:
        log_model_card(client, run_id, checkpoint)
    if logged is None:
        log.warning("trial %s: MLflow does not answer; its records wait in %s for `mixer-study sync`", job.name, spool)
        return checkpoint, dict(result.metrics or {})
    if logged.get(BEST_STEP) != best_metrics[STEP]:
        raise RuntimeError(f"trial {job.name}: the workers' best step {logged.get(BEST_STEP)} is not Ray's "
                           f"best checkpoint (step {best_metrics[STEP]})")
    if trial.fewshot.enabled and not any(k.startswith(FEWSHOT_PREFIX) for k in logged):
        raise RuntimeError(f"trial {job.name}: the workers logged no few-shot metrics to run {run_id}")
    return checkpoint, logged


def _trial_span() -> dict[str, float]:
    """This attempt's start and end (unix seconds): the span whose parts outside the step loop are the per-trial
    overhead (analysis.timeline). It started when its process did (Tune or the `train` verb launched it), or, in a
    process that Tune reuses for one trial after another, when the previous trial in it ended."""
    return {TIME_TRIAL_START_UNIX: max(psutil.Process().create_time(), _previous_trial_end),
            TIME_TRIAL_END_UNIX: time.time()}


def _close_run(run_log: RunLogger, ok: bool) -> None:
    """End the trial's MLflow run as FINISHED or FAILED, and note when this process's trial ended.

    Args:
        run_log: the driver's logger of the run.
        ok: whether the trial finished.
    """
    global _previous_trial_end
    run_log.close(RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
    _previous_trial_end = time.time()


def spool_url(trial_storage: str, name: str) -> str:
    """Where trial ``name``'s MLflow records wait while the store is down: inside its Ray Train run folder."""
    return join_url(trial_storage, name, SPOOL)


def _run_metrics(client: mlflow.tracking.MlflowClient, run_id: str) -> dict[str, float] | None:
    """The run's latest metrics, or None if the store does not answer."""
    try:
        with fail_fast_http():
            return client.get_run(run_id).data.metrics
    except Exception:  # noqa: BLE001 - any failure means "not now": the caller spools
        return None

