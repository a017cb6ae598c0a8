"""Run a study with Ray Tune: one function-trainable trial per grid point, each fitting a ``TorchTrainer``.

Layout on storage (local path or any pyarrow/fsspec URL such as s3://bucket/prefix)::

    <storage>/<study>/study.yaml        the resolved spec (what `mixer-study resume` reads)
    <storage>/<study>/tune/...          Ray Tune experiment state (Tuner.restore)
    <storage>/<study>/train/<trial>/    Ray Train run of each trial: checkpoints (resume + best checkpoint)

Resources: a trial of 2 or more workers only orchestrates in its Tune trial (it holds 0 CPU and a token of memory,
since Ray rejects an empty resource request); its ``TorchTrainer`` workers hold the CPUs/GPUs. A 1-worker trial
pre-trains and fine-tunes in its Tune trial process (``pipeline.trial_in_process``, ``pipeline.finetune_sweep``),
which then holds the worker's CPUs/GPUs itself.
So a 2-CPU machine runs one 2-worker trial or two 1-worker trials at a time, and a cluster as many as its CPUs (or
GPUs) hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import mlflow.tracking
import ray
import yaml
from mlflow.entities import RunStatus
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory, resource_dict_to_pg_factory

from analysis.ledger import PlannedCost
from pipeline.lock import StudyLock
from pipeline.plan import Calibration, TrialPlan, calibrate, plan_costs, plan_study, plan_tags
from pipeline.progress import StudyProgress
from pipeline.ray_policy import tune_checkpoints
from pipeline.spec import StudyError, StudySpec, parse_study
from pipeline.throughput_table import prepare_throughput_table
from pipeline.tracking import (
    connect_tracking,
    experiment_id,
    find_study_run,
    log_study_summary,
    redact_url,
    resolve_tracking_uri,
    study_run,
)
from pipeline.trial import SPOOL, in_process, make_job, run_trial
from workers.data.manifest import join_url
from workers.names import BEST_VAL_ACC, FEWSHOT_5SHOT
from workers.training.mlflow_logger import fail_fast_http, replay_spool, spool_files, write_spool

DEFAULT_STORAGE = "runs"
# The trial driver needs no CPU: Ray rejects an all-zero request ("empty head"), so ask for a token of memory.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


def resolve_storage(storage: str | None) -> str:
    """--storage, then $MIXER_STUDY_STORAGE, then ./runs; local paths made absolute (Ray requires it)."""
    storage = storage or os.environ.get("MIXER_STUDY_STORAGE") or DEFAULT_STORAGE
    return storage if "://" in storage else str(Path(storage).resolve())


def tune_trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: one grid point. Final metrics go to Tune for the progress lines."""
    tune.report(run_trial(config["job"], in_tune=True))


def is_embedded(address: str | None) -> bool:
    """Whether :func:`init_ray` starts a Ray of its own here (no ``address``, no $RAY_ADDRESS, e.g. from a job)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def check_storage(url: str) -> None:
    """Raise StudyError unless ``url`` (the study's folder) can be written: before Ray, not at the first checkpoint."""
    probe = join_url(url, ".write-probe")
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"ok")
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - permissions, credentials, network: one clear error naming the URL
        raise StudyError(f"storage {redact_url(url)} is not writable ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}): give a writable --storage / $MIXER_STUDY_STORAGE "
                         "(a local path or a URL such as s3://bucket/prefix with credentials in the environment)"
                         ) from None


def init_ray(address: str | None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS if given, else start an embedded local Ray. Worker logs stay on disk."""
    if ray.is_initialized():
        return
    # Tune's own console tables would drown the concise StudyProgress lines; verbose=0 + legacy output = silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A 1-worker trial checkpoints through Tune, and Tune saves its experiment state whenever a trial has checkpointed
    # num_to_keep times since the last save (so a restore never points at a deleted checkpoint); that is wanted, and
    # its "may become a bottleneck" warning (once per checkpoint here) would only drown the progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    embedded = is_embedded(address)
    if embedded:
        # The Ray Train controller polls its workers every 2 s by default, so each trial's start and end wait up to
        # that long; an embedded Ray's processes inherit this environment. (On a cluster, set it in the job's env.)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # Ray Train starts a preemption-watcher actor (one more Python process) per trial; a single machine is never
        # drained by an autoscaler, so an embedded Ray does without it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address=address or None, log_to_driver=False, include_dashboard=False if embedded else None,
             logging_level="WARNING")


def ray_logs_dir() -> str:
    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:  # connected as a client: logs live on the cluster
        return "the Ray cluster's session logs (dashboard > Logs)"


def trials_that_fit(spec: StudySpec) -> int:
    """How many trials the cluster's CPUs (and GPUs) train at once; a clear error if not even one fits."""
    r = spec.resources
    total = ray.cluster_resources()
    fit = int(total.get("CPU", 1) // (r.workers_per_trial * r.cpus_per_worker))
    if r.gpus_per_worker:
        fit = min(fit, int(total.get("GPU", 0) // (r.workers_per_trial * r.gpus_per_worker)))
    if fit < 1:
        raise StudyError(
            f"the Ray cluster has {total.get('CPU', 0):g} CPU / {total.get('GPU', 0):g} GPU, less than one trial needs "
            f"({r.workers_per_trial} workers x {r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU): lower "
            "resources.workers_per_trial or add nodes"
        )
    return fit


def default_concurrency(spec: StudySpec, fit: int) -> int:
    """``resources.max_concurrent_trials``, else the trials that fit plus one.

    The extra trial starts its driver, MLflow run and Ray Train controller while the others train, and its workers
    wait for resources (Ray Train retries a worker group's start without limit: it is a controller error, not a
    training failure), so the per-trial start-up overlaps training instead of following it.
    """
    return spec.resources.max_concurrent_trials or fit + 1


def _jobs(spec: StudySpec, plans: list[TrialPlan], tracking_uri: str, storage: str, parent_run_id: str,
          costs: list[PlannedCost], calibration: Calibration) -> list[dict]:
    return [make_job(spec, p.name, p.config, p.point, tracking_uri=tracking_uri, storage=storage,
                     parent_run_id=parent_run_id, planned={**plan_tags(cost, calibration), **p.tags})
            for p, cost in zip(plans, costs)]


def _write_text(url: str, text: str) -> None:
    with fsspec.open(url, "w") as f:
        f.write(text)


def _read_text(url: str) -> str:
    with fsspec.open(url, "r") as f:
        return f.read()


def trial_resources(config: dict[str, Any]) -> PlacementGroupFactory:
    """What a Tune trial (``config``: its param space entry) holds: its worker's CPUs/GPUs when it trains in its own
    process (``pipeline.trial.in_process``), else only the token that lets Ray schedule it (module docstring)."""
    job = config["job"]
    if not in_process(job):
        return resource_dict_to_pg_factory(TRIAL_DRIVER_RESOURCES)
    gpus = job["gpus_per_worker"]
    return resource_dict_to_pg_factory({"cpu": job["cpus_per_worker"], **({"gpu": gpus} if gpus else {})})


def _trainable():
    return tune.with_resources(tune_trainable, trial_resources)


def run_study(spec: StudySpec, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | None = None, write: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Validate, plan, then run every grid point as a Tune trial. Returns one summary row per trial."""
    plans = plan_study(spec)  # reads manifests: bad data URLs fail here, before Ray starts
    storage = resolve_storage(storage)
    study_dir = join_url(storage, spec.name)
    check_storage(study_dir)
    tracking_uri = connect_tracking(resolve_tracking_uri(tracking_uri, spec.tracking.uri),
                                    embedded_ray=is_embedded(address))
    with StudyLock(study_dir):  # one driver per study (pipeline.lock)
        return _start_or_continue(spec, plans, address=address, tracking_uri=tracking_uri, storage=storage,
                                  write=write)


def _start_or_continue(spec: StudySpec, plans: list[TrialPlan], *, address: str | None, tracking_uri: str,
                       storage: str, write: Callable[[str], None]) -> list[dict[str, Any]]:
    study_dir = join_url(storage, spec.name)
    resolved = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": tracking_uri})})
    spec_yaml = yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False)
    if tune.Tuner.can_restore(join_url(study_dir, "tune")):
        # Running the same study again continues it (finished trials are not rerun); a changed spec under the
        # same name would mix two designs in one experiment, so that is refused.
        if load_stored_spec(spec.name, storage) != parse_study(yaml.safe_load(spec_yaml)):
            raise StudyError(f"study '{spec.name}' already exists at {study_dir} with a different spec: give the "
                             "study a new name, or another --storage")
        write(f"study {spec.name} exists at {study_dir}: continuing it (finished trials are kept)")
        return resume_study(spec.name, address=address, storage=storage, write=write)

    # The compute ledger's prediction, made before this study's own runs exist (they would calibrate it).
    calibration = calibrate(spec, tracking_uri=tracking_uri)
    costs = plan_costs(spec, plans, calibration)
    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp_id = experiment_id(client, spec.experiment)
    parent = study_run(client, exp_id, spec.name, {"grid_size": len(plans), "grid_keys": ",".join(spec.grid),
                                                   "storage": redact_url(study_dir), "description": spec.description},
                       description=spec.description)
    client.log_text(parent, spec_yaml, "study.yaml")

    init_ray(address)
    fit = trials_that_fit(spec)
    concurrency = default_concurrency(spec, fit)
    _write_text(join_url(study_dir, "study.yaml"), spec_yaml)
    write(f"study {spec.name}: {len(plans)} trials, up to {concurrency} at once ({fit} fit the resources); "
          f"MLflow {tracking_uri} (experiment '{spec.experiment}'); storage {redact_url(study_dir)}")
    write(f"Ray logs: {ray_logs_dir()}")
    # Before any trial trains, so the inference throughput has its cores to itself (pipeline.throughput_table).
    prepare_throughput_table(spec, plans, tracking_uri, write)
    tuner = tune.Tuner(
        _trainable(),
        param_space={"job": tune.grid_search(_jobs(spec, plans, tracking_uri, storage, parent, costs, calibration))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            # A finished trial's driver process runs the next trial: it does not pay the imports again (about 7 CPU
            # seconds, on the cores the running trial trains on). docs/benchmarks.md "Orchestration".
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["job"]["name"],
            trial_dirname_creator=lambda t: t.config["job"]["name"],
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=study_dir,
            verbose=0,
            callbacks=[StudyProgress(len(plans), {p.name: p.config.train.steps for p in plans}, fit)],
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            # Kept only for the trials that train in their own process: the others report no checkpoint to Tune.
            checkpoint_config=tune_checkpoints(max(p.config.train.keep_checkpoints for p in plans)),
        ),
    )
    return _finish(tuner.fit(), client, parent, study_dir, write)


def load_stored_spec(name: str, storage: str | None = None) -> StudySpec:
    url = join_url(resolve_storage(storage), name, "study.yaml")
    try:
        raw = yaml.safe_load(_read_text(url))
    except FileNotFoundError:
        raise StudyError(f"no study '{name}' at {url}: check the name and --storage") from None
    return parse_study(raw, source=url)


def resume_study(name: str, *, address: str | None = None, storage: str | None = None,
                 write: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Finish an interrupted study: Tune restores its state and reruns only unfinished/errored trials; each of
    those continues from its last Ray Train checkpoint and its existing MLflow run."""
    storage = resolve_storage(storage)
    tune_dir = join_url(storage, name, "tune")
    lock = StudyLock(join_url(storage, name))  # one driver per study (pipeline.lock); re-entrant from run_study
    # The lock first: a study whose driver is still starting holds the lock before it writes study.yaml (and long
    # before any Tune state: planning, the throughput table), and "another driver is running it" is the true answer
    # then, not "no study". Only checked here: taking it would leave a lock folder behind for a mistyped name.
    lock.raise_if_held()
    spec = load_stored_spec(name, storage)
    with lock:
        if not tune.Tuner.can_restore(tune_dir):
            raise StudyError(f"study '{name}' has no Tune state at {tune_dir}: start it with `mixer-study run`")
        tracking_uri = connect_tracking(spec.tracking.uri, embedded_ray=is_embedded(address))
        return _resume_locked(spec, tune_dir, tracking_uri, address=address, write=write)


def _resume_locked(spec: StudySpec, tune_dir: str, tracking_uri: str, *, address: str | None,
                   write: Callable[[str], None]) -> list[dict[str, Any]]:
    name, study_dir = spec.name, tune_dir.rsplit("/", 1)[0]
    client = mlflow.tracking.MlflowClient(tracking_uri)
    parent = study_run(client, experiment_id(client, spec.experiment), spec.name, {}, description=spec.description)
    init_ray(address)
    write(f"resuming study {name} from {tune_dir}; Ray logs: {ray_logs_dir()}")
    tuner = tune.Tuner.restore(tune_dir, trainable=_trainable(), resume_unfinished=True,
                               resume_errored=True)
    return _finish(tuner.fit(), client, parent, study_dir, write)


def _finish(results: tune.ResultGrid, client, parent_run_id: str, study_dir: str,
            write: Callable[[str], None]) -> list[dict]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append({
            "trial": result.config["job"]["name"] if result.config else "?",
            "status": "ERROR" if result.error else "DONE",
            BEST_VAL_ACC: metrics.get(BEST_VAL_ACC),
            FEWSHOT_5SHOT: metrics.get(FEWSHOT_5SHOT),
        })
    failed = [r["trial"] for r in rows if r["status"] != "DONE"]
    status = RunStatus.to_string(RunStatus.FINISHED if not failed else RunStatus.FAILED)
    # Records that trials spooled while MLflow was down go in now, then the study's own end.
    write_spool(join_url(study_dir, SPOOL), parent_run_id, [], {}, status)
    try:
        sent = sync_spools(client, study_dir)
        best = log_study_summary(client, parent_run_id)
    except Exception as exc:  # noqa: BLE001 - the store is down: everything waits in the spools
        write(f"MLflow does not answer ({type(exc).__name__}): the study's results wait in {redact_url(study_dir)} "
              f"(mlflow-spool folders); once it is back, run `mixer-study sync {Path(study_dir).name} --storage "
              f"{redact_url(study_dir.rsplit('/', 1)[0])}`")
    else:
        if sent:
            write(f"sent {sent} metric points that waited in the spools while MLflow was down")
        _write_best(best, write)
    failures = f"; failed: {', '.join(failed)}" if failed else ""
    write(f"{len(rows) - len(failed)}/{len(rows)} trials finished{failures}")
    return rows


def _write_best(best: dict[str, tuple[str, float]], write: Callable[[str], None]) -> None:
    """One line naming the best trial of each headline metric, rounded as the progress lines round."""
    if best:
        write("best: " + "; ".join(f"{metric} {value:.3f} ({trial})" for metric, (trial, value) in best.items()))


def spool_folders(study_dir: str) -> list[str]:
    """The study's spool folders: its own (the parent run's end) and each trial's (pipeline.trial.spool_url)."""
    fs, root = fsspec.core.url_to_fs(study_dir)
    protocol = study_dir.split("://", 1)[0] + "://" if "://" in study_dir else ""
    found = fs.glob(f"{root}/train/*/{SPOOL}") + fs.glob(f"{root}/{SPOOL}")
    return [protocol + path for path in found]


def sync_spools(client, study_dir: str) -> int:
    """Replay every spool of the study into MLflow (trials first, the study's end last); the points sent."""
    with fail_fast_http():
        client.search_experiments(max_results=1)  # fails at once if the store is down
        return sum(replay_spool(client, folder) for folder in spool_folders(study_dir))


def sync_study(name: str, *, storage: str | None = None, write: Callable[[str], None] = print) -> int:
    """`mixer-study sync`: send what a study spooled while MLflow was down. Refused while a driver runs the study
    (its trials replay their own spools); returns the metric points sent."""
    spec = load_stored_spec(name, storage)
    study_dir = join_url(resolve_storage(storage), name)
    tracking_uri = connect_tracking(spec.tracking.uri)
    client = mlflow.tracking.MlflowClient(tracking_uri)
    with StudyLock(study_dir):
        records = sum(len(spool_files(folder)) for folder in spool_folders(study_dir))
        sent = sync_spools(client, study_dir)
        # A study that ended while the store was down spooled its end too: its summary is written now.
        parent = find_study_run(client, experiment_id(client, spec.experiment), spec.name)
        ended = parent is not None and parent.info.status != RunStatus.to_string(RunStatus.RUNNING)
        best = log_study_summary(client, parent.info.run_id) if ended else {}
    write(f"study {name}: {sent} metric points sent to {tracking_uri} from {records} spooled record(s)"
          if records else f"study {name}: nothing spooled, MLflow {tracking_uri} has everything")
    _write_best(best, write)
    return sent
