"""Section 4, ``orchestration`` (optional): what Ray Tune, Ray Train and MLflow cost a trial beyond its training.

A tiny real study (6 trials (seeds) x 1 worker of Nano-4 on digits 16 px, few-shot on, as the demo is set up: two
trials at a time on 2 cores, so most trials run in a process an earlier trial used, as in any study of more trials
than fit at once) runs through ``mixer-study run`` in a subprocess (its own embedded Ray), and
``analysis.timeline.study_goodput`` reads it back from its MLflow store. Reading the table, one row per trial and
their median: ``queued s`` = trial start to its rank-0 worker starting (waiting for cores other trials hold, not
overhead; 0 for a 1-worker trial, which trains in its own Tune trial process), ``start-up s`` = worker start to the
first step, ``train s`` = time inside training steps, ``tail s`` = train end to trial end (evaluation,
checkpoint, few-shot, MLflow),
``overhead s`` = start-up + tail. The line under it gives the study's wall time and its goodput (in-loop training
core-seconds over the study wall x the CPUs Ray uses: the fraction of the machine's time spent training).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DIGITS_PAD, DIGITS_SIZE, BenchConfig, Write, format_table

REPO = Path(__file__).resolve().parents[1]


TRIALS = 6
WORKERS = 1  # as the demo: one single-core worker per trial


FINETUNE_LRS = [0.003, 0.01, 0.03]  # the shipped model-scale study's transfer sweep


def orchestration_study(name: str, data: Path, steps: int, finetune_steps: int = 0) -> dict:
    """The tiny study: 6 trials (seeds) x 1 worker of Nano-4 on digits 16 px, few-shot on, as the demo is set up;
    with ``finetune_steps`` > 0 each trial also fine-tunes at 3 lrs (digits train, val selects, test reports), as
    ``studies/model_scale.yaml`` does: the fine-tuning stage then sits in each trial's tail."""
    every = max(1, steps // 2)
    finetune = {"finetune": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test"),
                             "steps": finetune_steps, "batch_size": 64, "lr": FINETUNE_LRS,
                             "warmup_steps": max(1, finetune_steps // 10)}} if finetune_steps else {}
    return {
        "name": name,
        "description": "mixer-study bench: orchestration overhead",
        "base": {
            "data": {"train": str(data / "train"), "val": str(data / "val"),
                     "augment": {"crop": "pad", "pad": DIGITS_PAD, "eval_crop_fraction": 1.0}},
            "model": {"variant": "Nano-4"},
            "optim": {"lr": 0.003, "warmup_steps": max(1, steps // 10)},
            "train": {"steps": steps, "batch_size": 64, "eval_every": every, "checkpoint_every": every,
                      "log_every": max(1, steps // 3)},
            "fewshot": {"train": str(data / "train"), "test": str(data / "test"), "shots": [1, 5, 10, 25],
                        "seeds": 3},
            **finetune,
        },
        "grid": {"train.seed": list(range(TRIALS))},
        "resources": {"workers_per_trial": WORKERS, "cpus_per_worker": 1},
    }


def bench_orchestration(config: BenchConfig, write: Write) -> dict:
    """Run the tiny study with ``mixer-study run`` in a subprocess (its own embedded Ray, so this process never
    holds one), then read the per-trial overhead and goodput back from its MLflow store."""
    import yaml

    from analysis.timeline import study_goodput
    from workers.data.writer import shards_from_digits

    name = "bench-orchestration"
    with tempfile.TemporaryDirectory(prefix="mixer-bench-orch-") as tmp:
        root = Path(tmp)
        shards_from_digits(str(root / "digits"), image_size=DIGITS_SIZE)
        study = orchestration_study(name, root / "digits", config.orchestration_steps,
                                    config.orchestration_finetune_steps)
        (root / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)  # an embedded Ray, as `make demo` runs
        command = [sys.executable, "-m", "pipeline.cli", "run", str(root / "study.yaml"), "--tracking-uri", uri,
                   "--storage", str(root / "runs")]
        finetune = (f", fine-tuning {len(FINETUNE_LRS)} lrs x {config.orchestration_finetune_steps} steps"
                    if config.orchestration_finetune_steps else "")
        write(f"[bench] orchestration: {TRIALS} trials x {WORKERS} worker, Nano-4, "
              f"{config.orchestration_steps} steps, few-shot on{finetune} (mixer-study run in a subprocess) ...")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=config.orchestration_timeout_s)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"orchestration study failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        cluster_cpus = float(os.cpu_count() or 1)  # an embedded Ray uses every logical CPU
        timeline, summary = study_goodput(uri, name, cluster_cpus=cluster_cpus)
    trials = timeline.to_dict(orient="records")
    result = {"study": study["grid"] | {"variant": "Nano-4", "steps": config.orchestration_steps,
                                        "finetune_steps": config.orchestration_finetune_steps,
                                        "finetune_lrs": FINETUNE_LRS if config.orchestration_finetune_steps else [],
                                        "workers_per_trial": WORKERS, "cpus_per_worker": 1},
              "cluster_cpus": cluster_cpus, "subprocess_wall_s": wall,
              "outside_trials_s": wall - summary["study_wall_s"],  # Ray start/stop, Tune set-up, MLflow parent
              **summary, "trial_rows": trials}
    result["table"] = format_table(
        ["trial", "trial s", "queued s", "start-up s", "train s", "tail s", "overhead s"],
        [[t["trial"], f"{t['trial_s']:.1f}", f"{t['queued_s']:.1f}", f"{t['startup_s']:.1f}",
          f"{t['train_seconds']:.1f}", f"{t['tail_s']:.1f}", f"{t['overhead_s']:.1f}"] for t in trials]
        + [["median", "", f"{summary['median_queued_s']:.1f}", f"{summary['median_startup_s']:.1f}",
            f"{summary['median_train_s']:.1f}", f"{summary['median_tail_s']:.1f}",
            f"{summary['median_overhead_s']:.1f}"]],
    ) + (f"\nstudy wall {summary['study_wall_s']:.1f} s (first trial start to last trial end), goodput "
         f"{summary['goodput']:.3f} of {cluster_cpus:.0f} CPUs; mixer-study run took {wall:.1f} s in all")
    return result
