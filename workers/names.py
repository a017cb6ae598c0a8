"""Every metric and tag name a trial writes to MLflow (and reports to Ray Train), in one place.

Writers (``workers.training`` trainer, finetuner, ray_entry, mlflow_logger; ``pipeline`` tracking, trial,
finetune_sweep, trial_worker; ``analysis.features``' few-shot metrics) and readers (``analysis.results``, ``report``,
``pipeline.tune``) use these constants, so a name is spelled once. The names are a user-visible contract (the MLflow
UI, the results CSV, earlier studies' stores): change a value only with a migration, add new names here.

Metrics are grouped with ``/``: ``train/`` (every ``log_every`` steps), ``val/`` (every ``eval_every``), ``best/``,
``compute/`` and ``time/`` (the last report), ``perf/``, ``data/`` (``data.on_error: skip``), ``finetune/``,
``fewshot/``, ``study/`` (the parent run). Three report keys have no group: ``step`` (Ray only), ``images_seen`` and
``epochs``. Summaries go to MLflow at step 0 and ``time/`` marks as tags (:func:`is_summary`, :func:`is_timestamp`).
"""

from __future__ import annotations

import re

# -- report keys without a group ---------------------------------------------------------------------------------

STEP = "step"  # the step of a Ray Train report; MLflow has its own step axis, so it is not logged there
IMAGES_SEEN = "images_seen"
EPOCHS = "epochs"

# -- train/: pre-training, every log_every steps -----------------------------------------------------------------

TRAIN_LOSS = "train/loss"  # mean over the steps since the last log
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"  # pre-clip global norm of the last step

# -- val/: the upstream val split, every eval_every steps ---------------------------------------------------------

VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"  # what Ray Train ranks checkpoints by

# -- best/: the best checkpointed step ---------------------------------------------------------------------------

BEST_PREFIX = "best/"
BEST_VAL_ACC = "best/val_acc"
BEST_STEP = "best/step"

# -- compute/: accounting of the whole trial (all resumed segments) ---------------------------------------------

COMPUTE_TRAIN_FLOPS = "compute/train_flops"
COMPUTE_CORE_SECONDS = "compute/core_seconds"
COMPUTE_CPU_SECONDS = "compute/cpu_seconds"
COMPUTE_TRAIN_SECONDS = "compute/train_seconds"
COMPUTE_WALL_SECONDS = "compute/wall_seconds"
COMPUTE_IMAGES_SEEN = "compute/images_seen"
COMPUTE_EPOCHS = "compute/epochs"
COMPUTE_TRAIN_IMAGES = "compute/train_images"
COMPUTE_FINETUNE_FLOPS = "compute/finetune_flops"
COMPUTE_FINETUNE_IMAGES_SEEN = "compute/finetune_images_seen"
COMPUTE_FINETUNE_SECONDS = "compute/finetune_seconds"
COMPUTE_FINETUNE_WALL_SECONDS = "compute/finetune_wall_seconds"
COMPUTE_FINETUNE_CORE_SECONDS = "compute/finetune_core_seconds"
COMPUTE_FINETUNE_CPU_SECONDS = "compute/finetune_cpu_seconds"

# -- perf/: throughput and utilisation ---------------------------------------------------------------------------

PERF_TRAIN_IMG_PER_S = "perf/train_img_per_s"  # every log_every steps
PERF_TRAIN_IMG_PER_S_PER_CORE = "perf/train_img_per_s_per_core"  # the whole trial
PERF_FINETUNE_IMG_PER_S = "perf/finetune_img_per_s"
PERF_MFU = "perf/mfu"
PERF_IMG_PER_S_PER_CORE = "perf/img_per_s_per_core"  # inference (paper Fig. 3 right)
PERF_BEST_BATCH_SIZE = "perf/best_batch_size"  # the inference batch size that gave it
# The throughput table's (pipeline.throughput_table): (max - min) / median of the repetitions its figure is the
# median of; a trial that logs the table's figure logs this too. Min, max, repetitions and stability: table runs only.
PERF_IMG_PER_S_PER_CORE_SPREAD = "perf/img_per_s_per_core_spread"
PERF_IMG_PER_S_PER_CORE_MIN = "perf/img_per_s_per_core_min"
PERF_IMG_PER_S_PER_CORE_MAX = "perf/img_per_s_per_core_max"
PERF_THROUGHPUT_REPETITIONS = "perf/throughput_repetitions"
PERF_THROUGHPUT_STABLE = "perf/throughput_stable"  # 1: the last repetitions met the tolerance; 0: a cap stopped it

# -- time/: wall-clock marks of a trial (unix seconds), for analysis.timeline; MLflow tags, not metrics ---------

TIME_TRIAL_START_UNIX = "time/trial_start_unix"
TIME_WORKER_START_UNIX = "time/worker_start_unix"
TIME_FIRST_STEP_UNIX = "time/first_step_unix"
TIME_TRAIN_END_UNIX = "time/train_end_unix"
TIME_TRIAL_END_UNIX = "time/trial_end_unix"

# -- data/: data.on_error: skip -----------------------------------------------------------------------------------

DATA_SKIPPED_SAMPLES = "data/skipped_samples"
DATA_CORRUPT_SHARDS = "data/corrupt_shards"

# -- finetune/ -----------------------------------------------------------------------------------------------------

FINETUNE_PREFIX = "finetune/"
FINETUNE_TRAIN_LOSS = "finetune/train_loss"  # every log_every steps
FINETUNE_LR = "finetune/lr"
FINETUNE_GRAD_NORM = "finetune/grad_norm"
FINETUNE_LOSS = "finetune/loss"  # mean training loss since the last report
FINETUNE_TOP1 = "finetune/top1"  # the test split
FINETUNE_TEST_LOSS = "finetune/test_loss"
FINETUNE_VAL_TOP1 = "finetune/val_top1"  # the held-out split that picks a sweep's learning rate
FINETUNE_VAL_LOSS = "finetune/val_loss"
FINETUNE_IMAGE_SIZE = "finetune/image_size"
FINETUNE_BEST_LR = "finetune/best_lr"


def finetune_top1_at(image_size: int) -> str:
    """``finetune/top1_384px``: the test top-1 under a name that says the resolution.

    Args:
        image_size: the fine-tuning resolution in pixels.
    """
    return f"{FINETUNE_TOP1}_{image_size}px"


# -- fewshot/: linear few-shot accuracy of the best checkpoint ----------------------------------------------------

FEWSHOT_PREFIX = "fewshot/"


def fewshot_metric(shots: int) -> str:
    """``fewshot/5shot``: mean accuracy over the seeds at ``shots`` examples per class.

    Args:
        shots: examples per class.
    """
    return f"{FEWSHOT_PREFIX}{shots}shot"


def fewshot_std_metric(shots: int) -> str:
    """``fewshot/5shot_std``: its standard deviation over the seeds.

    Args:
        shots: examples per class.
    """
    return f"{fewshot_metric(shots)}_std"


FEWSHOT_5SHOT = fewshot_metric(5)  # the headline quality of a study

# -- study/: the study's parent run, at the end of `run` / `resume` (pipeline.tune) ------------------------------

STUDY_TRIALS_DONE = "study/trials_done"
STUDY_TRIALS_FAILED = "study/trials_failed"
# The parent run also holds the best finished trial's value of each headline metric, under the metric's own name,
# and that trial's run name in the tag best_trial_tag(metric).
HEADLINE_METRICS = (BEST_VAL_ACC, FEWSHOT_5SHOT, FINETUNE_TOP1)


def best_trial_tag(metric: str) -> str:
    """``mixer.best_trial.fewshot/5shot``: the parent run's tag naming the trial with the best ``metric``.

    Args:
        metric: a headline metric name.
    """
    return f"mixer.best_trial.{metric}"


# -- how MLflow shows a metric (workers.training.mlflow_logger.RunLogger) ------------------------------------------
# MLflow's chart view draws a metric as a line chart when its latest step is >= 1 in any run, else as a bar chart
# comparing the runs. A summary (one value per run: a result, its accounting) is therefore logged at step 0, once;
# a curve at its training step; a timestamp (time/*) as a tag of the same name, since plotting 1.8e9 helps nobody.
# compute/wall_seconds is reported at every evaluation (the wall time so far): a curve, whose last point counts.

COMPUTE_PREFIX = "compute/"
TIME_PREFIX = "time/"
SUMMARY_PREFIXES = (BEST_PREFIX, COMPUTE_PREFIX, FEWSHOT_PREFIX)
SUMMARY_METRICS = frozenset({
    PERF_TRAIN_IMG_PER_S_PER_CORE, PERF_MFU, PERF_IMG_PER_S_PER_CORE, PERF_BEST_BATCH_SIZE,
    PERF_IMG_PER_S_PER_CORE_SPREAD, PERF_IMG_PER_S_PER_CORE_MIN, PERF_IMG_PER_S_PER_CORE_MAX,
    PERF_THROUGHPUT_REPETITIONS, PERF_THROUGHPUT_STABLE,
    FINETUNE_TOP1, FINETUNE_TEST_LOSS, FINETUNE_VAL_TOP1, FINETUNE_VAL_LOSS, FINETUNE_IMAGE_SIZE, FINETUNE_BEST_LR,
})
# A fine-tuning sweep's runs log into the trial's run with a suffix ``_lr<lr>`` (pipeline.finetune_sweep), and
# finetune/top1 also appears as ``finetune/top1_<N>px``: both are the unsuffixed metric's kind.
_SWEEP_SUFFIX = re.compile(r"_lr[0-9.e+-]+$")


def is_summary(key: str) -> bool:
    """Whether metric ``key`` has one value per run (logged at step 0: a bar chart in MLflow), not a curve.

    Args:
        key: a metric name as logged, suffix included (``finetune/top1_lr0.01``).
    """
    base = _SWEEP_SUFFIX.sub("", key)
    if base == COMPUTE_WALL_SECONDS:
        return False
    return base.startswith(SUMMARY_PREFIXES) or base in SUMMARY_METRICS or base.startswith(f"{FINETUNE_TOP1}_")


def is_timestamp(key: str) -> bool:
    """Whether report key ``key`` is a wall-clock mark (``time/*_unix``), logged as a tag rather than a metric.

    Args:
        key: a report key.
    """
    return key.startswith(TIME_PREFIX)


# -- ledger/: the study's compute ledger, planned vs actual (analysis.ledger; on the study's parent run) -----------

LEDGER_PLANNED_FLOPS = "ledger/planned_flops"
LEDGER_ACTUAL_FLOPS = "ledger/actual_flops"
LEDGER_RATIO_FLOPS = "ledger/ratio_flops"  # actual / planned, over the trials where both are known
LEDGER_PLANNED_DEVICE_HOURS = "ledger/planned_device_hours"
LEDGER_ACTUAL_DEVICE_HOURS = "ledger/actual_device_hours"
LEDGER_RATIO_DEVICE_HOURS = "ledger/ratio_device_hours"
LEDGER_PLANNED_COST = "ledger/planned_cost"
LEDGER_ACTUAL_COST = "ledger/actual_cost"
LEDGER_RATIO_COST = "ledger/ratio_cost"
LEDGER_UNKNOWN_TRIALS = "ledger/unknown_trials"  # trials whose planned device-seconds had no calibration

# -- scaling/: fitted scaling laws (analysis.scaling_report; on the study's parent run) ----------------------------
# scaling/<family>/<frontier|all>/<param>[_lo|_hi], scaling/chinchilla/<param>[_lo|_hi],
# scaling/compare/Mixer-<family>/<scope>/<b|y_at_target>[_lo|_hi]: :func:`scaling_metric` spells them.

SCALING_PREFIX = "scaling/"
SCALING_INPUT_SHA256_TAG = "scaling.input_sha256"  # sha256 of the rows the fits read


def scaling_metric(*parts: str) -> str:
    """``scaling/<part>/<part>...``, e.g. ``scaling_metric("Mixer", "all", "b_lo")`` -> ``scaling/Mixer/all/b_lo``."""
    return SCALING_PREFIX + "/".join(parts)

# -- system/: MLflow's own system-metrics sampler ----------------------------------------------------------------

SYSTEM_PREFIX = "system/"

# -- MLflow tags -------------------------------------------------------------------------------------------------

STUDY_TAG = "mixer.study"
TRIAL_TAG = "mixer.trial"
ROLE_TAG = "mixer.role"  # one of the ROLE_* values below
ATTEMPTS_TAG = "mixer.attempts"  # how many times the trial started (1 + retries + resumes)
GRID_POINT_TAG = "mixer.grid_point"
# The trial's per-family recipe sweep setting (pipeline.spec ``sweep``), spelt like the grid point
# ("optim.lr=0.003,optim.weight_decay=0.0001"), or SWEEP_SETTING_BASE where its family sweeps nothing; analysis
# groups a setting's replicates (param train.seed) and keeps one setting per grid point on upstream validation.
SWEEP_SETTING_TAG = "mixer.sweep_setting"
SWEEP_SETTING_BASE = "base"
GIT_COMMIT_TAG = "mixer.git_commit"
BEST_CHECKPOINT_TAG = "checkpoint.best"
TRAIN_RUN_TAG = "ray.train_run"
FINETUNE_RUN_TAG = "ray.finetune_run"
FINETUNE_BEST_LR_TAG = "finetune.best_lr"
FINETUNE_CHECKPOINT_TAG = "finetune.checkpoint"
PRECISION_RESOLVED_TAG = "train.precision_resolved"
COMPILE_RESOLVED_TAG = "train.compile_resolved"
DEVICE_KIND_TAG = "mixer.device_kind"  # what rank 0 trained on: "cpu:<CPU model>" or "cuda:<GPU name>"
# Where a trial's perf/img_per_s_per_core came from: THROUGHPUT_FROM_TABLE (then PERF_THROUGHPUT_RUN_TAG names the
# table run) or THROUGHPUT_FROM_TRIAL (measured once inside the trial: the table had no entry).
PERF_THROUGHPUT_SOURCE_TAG = "perf.throughput_source"
PERF_THROUGHPUT_RUN_TAG = "perf.throughput_run"
THROUGHPUT_FROM_TABLE = "table"
THROUGHPUT_FROM_TRIAL = "trial"
# The throughput table: one run per (key, device kind) in this experiment of the tracking store, its key as tags
# (workers.training.throughput.ThroughputKey) beside DEVICE_KIND_TAG and ROLE_TAG = ROLE_THROUGHPUT.
THROUGHPUT_EXPERIMENT = "mixer-study-throughput"
THROUGHPUT_VARIANT_TAG = "throughput.variant"
THROUGHPUT_IMAGE_SIZE_TAG = "throughput.image_size"
THROUGHPUT_NUM_CLASSES_TAG = "throughput.num_classes"
THROUGHPUT_PRECISION_TAG = "throughput.precision"
THROUGHPUT_THREADS_TAG = "throughput.threads"  # CPU threads of one trial worker; 0: one GPU
# The plan's prediction for a trial (pipeline.plan), tagged at its first start; "unknown" where it had none.
PLAN_TRAIN_FLOPS_TAG = "plan.train_flops"
PLAN_DEVICE_SECONDS_TAG = "plan.device_seconds"
PLAN_COST_TAG = "plan.cost"
PLAN_PRICE_TAG = "plan.price_per_device_hour"
PLAN_DEVICE_KIND_TAG = "plan.device_kind"
PLAN_CALIBRATION_TAG = "plan.calibration"  # where its throughput came from (earlier runs, a bench file) or why none

ROLE_STUDY = "study"  # the study's parent run
ROLE_TRIAL = "trial"  # a grid point of a study (what analysis.results reads)
ROLE_TRAIN = "train"  # a one-off `mixer-study train` run
ROLE_THROUGHPUT = "throughput"  # a throughput table run (THROUGHPUT_EXPERIMENT)
