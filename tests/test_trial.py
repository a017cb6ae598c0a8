"""One 2-worker DDP trial on real digits shards, end to end: Ray Train on an embedded local Ray (2 CPUs),
checkpoints on disk, MLflow run in a sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.results import load_study
from tests.conftest import cli_env, run_cli, study_dict, write_study
from workers.models.mixer import MlpMixer, forward_flops
from workers.models.resolution import mixer_to_resolution
from workers.training.checkpoint import load_model

STEPS = 150


def test_two_worker_trial_learns_and_logs(tmp_path: Path, digits16: Path) -> None:
    study = write_study(tmp_path / "one.yaml", study_dict(
        "one", digits16, model={"variant": "Micro-4"},
        train={"steps": STEPS, "batch_size": 32, "eval_every": 50, "checkpoint_every": 50, "log_every": 10},
        # The paper's fine-tuning stage: a 2-lr sweep at twice the resolution (Mixer: block-diagonal token mixing).
        finetune={"train": str(digits16 / "train"), "test": str(digits16 / "test"), "val": str(digits16 / "val"),
                  "steps": 8, "batch_size": 16, "lr": [0.01, 0.1], "warmup_steps": 2, "image_size": 32},
    ))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["train", "--config", str(study), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")],
                     cli_env(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = json.loads(result.stdout[result.stdout.index("{"):])

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("one")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-base"
    params = run.data.params
    assert params["model.variant"] == "Micro-4" and params["train.steps"] == str(STEPS)
    assert params["resources.workers"] == "2" and params["data.image_size"] == "16"
    metrics = run.data.metrics
    # Clearly above chance (10 classes -> 0.1) after 150 steps.
    assert metrics["best/val_acc"] > 0.6, metrics
    assert final["best/val_acc"] == metrics["best/val_acc"]
    assert metrics["fewshot/5shot"] > 0.3
    assert metrics["compute/images_seen"] == STEPS * 32
    assert metrics["compute/train_flops"] > 0 and metrics["compute/core_seconds"] > 0
    assert metrics["perf/img_per_s_per_core"] > 0
    # A per-step training curve, not just the last value.
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(10, STEPS + 1, 10))
    assert history[-1].value < history[0].value
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == STEPS // 50

    # The best checkpoint is on disk and loads (weights_only) into a model that matches the run.
    checkpoint = Path(run.data.tags["checkpoint.best"])
    assert checkpoint.is_dir() and checkpoint.name == f"step_{int(metrics['best/step']):08d}"
    model = load_model(checkpoint)
    assert model.variant.name == "Micro-4" and model.image_size == 16

    # The standalone few-shot verb on that checkpoint reproduces the logged accuracy (same features, same seeds).
    fewshot = run_cli(["fewshot", "--checkpoint", str(checkpoint), "--data", str(digits16), "--shots", "1", "5",
                       "--seeds", "2", "--crop-fraction", "1.0"], cli_env(tmp_path), timeout=300)
    assert fewshot.returncode == 0, fewshot.stderr[-3000:]
    printed = {key.strip(): float(value) for key, value in
               (line.split(":") for line in fewshot.stdout.strip().splitlines())}
    assert abs(printed["fewshot/5shot"] - metrics["fewshot/5shot"]) < 1e-4  # printed with 4 decimals

    # A one-off run is not a study trial: the study's results table (and so its figures) leaves it out.
    assert run.data.tags["mixer.role"] == "train" and run.data.tags["mixer.attempts"] == "1"
    assert load_study(uri, "one").empty
    contexts = [t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"]
    assert sorted(contexts) == ["fewshot-test", "fewshot-train", "finetune-test", "finetune-train", "finetune-val",
                                "train", "val"]  # one input per split
    for key in ("val/acc", "val/loss", "train/loss", "best/val_acc", "finetune/top1_lr0.01"):  # every point once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert 0 < metrics["perf/mfu"] <= 1.5 and metrics["compute/train_seconds"] < metrics["compute/wall_seconds"]
    # Summaries at step 0 (MLflow draws bar charts), curves at their steps, wall-clock marks as tags, the model card
    # beside the checkpoint path, system metrics sampled every second (tests/test_mlflow_view.py).
    for key in ("best/val_acc", "perf/mfu", "finetune/top1", "finetune/top1_lr0.01", "compute/finetune_flops_lr0.1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    assert min(m.step for m in client.get_metric_history(run.info.run_id, "finetune/train_loss_lr0.01")) >= 1
    assert not any(key.startswith("time/") for key in metrics)
    marks = [float(run.data.tags[f"time/{mark}_unix"]) for mark in ("trial_start", "first_step", "trial_end")]
    assert marks == sorted(marks)
    card = json.loads(Path(client.download_artifacts(run.info.run_id, "checkpoint/model.json", str(tmp_path)))
                      .read_text())
    assert card["variant"] == "Micro-4" and card["image_size"] == 16
    assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 5

    # Fine-tuning: one Ray Train run per lr, the best on the held-out finetune.val kept (never chosen by test
    # top-1); the kept run's test top-1 is finetune/top1. Its compute is accounted separately.
    vals = {lr: metrics[f"finetune/val_top1_lr{lr}"] for lr in ("0.01", "0.1")}
    best = max(vals, key=lambda lr: (vals[lr], lr == "0.01"))  # a tie goes to the first lr of the sweep
    tops = {lr: metrics[f"finetune/top1_lr{lr}"] for lr in ("0.01", "0.1")}
    assert metrics["finetune/top1"] == tops[best] == metrics["finetune/top1_32px"] and 0.1 < tops[best] <= 1
    assert metrics["finetune/val_top1"] == vals[best]
    assert metrics["finetune/best_lr"] == float(best) and metrics["finetune/image_size"] == 32
    flops = forward_flops(mixer_to_resolution(MlpMixer("Micro-4", 16, 10), 32).variant, 32, 10)
    assert metrics["compute/finetune_flops"] == 2 * 3 * flops * 8 * 16  # two runs of 8 steps x 16 images
    assert run.data.tags["finetune.best_lr"] == best and "step_00000008" in run.data.tags["finetune.checkpoint"]
    assert run.data.tags["ray.finetune_run"].endswith(f"train-base-finetune-lr{best}")
    assert "finetune/train_loss_lr0.01" in metrics and "compute/finetune_flops_lr0.01" in metrics

    # Rerunning the name with an edited recipe is refused before Ray starts (it would resume the old checkpoints).
    edited = run_cli(["train", "--config", str(study), "--set", "optim.lr=0.01", "--name", "train-base",
                      "--tracking-uri", uri, "--storage", str(tmp_path / "runs")], cli_env(tmp_path), timeout=120)
    assert edited.returncode == 2, edited.stderr[-3000:]
    assert "already exists with a different recipe (optim.lr: 0.003 -> 0.01)" in edited.stderr
    assert "Traceback" not in edited.stderr and "Ray logs" not in edited.stdout

    # Running the same trial again continues it: same MLflow run, nothing retrained past the last step.
    again = run_cli(["train", "--config", str(study), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")],
                    cli_env(tmp_path), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(history)
