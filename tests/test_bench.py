"""benchmarks: a tiny end-to-end run (seconds) whose JSON is checked for structure and for every figure being
positive and finite, never for its size; the bench's training step against the Trainer's; the orchestration study
against the study validator and planner (the study itself needs an embedded Ray for ~100 s, so the test run leaves
it out)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.orchestration import TRIALS, WORKERS, orchestration_study
from benchmarks.run import quick_config, run_benchmarks
from benchmarks.train_step import train_step_fn
from pipeline import cli
from pipeline.plan import plan_study
from pipeline.spec import parse_study
from workers.config import TrialConfig
from workers.training.optim import build_optimizer
from workers.training.trainer import Trainer

SECTIONS = ("matmul", "train_step", "inference", "loader", "orchestration", "fewshot")


def _figures(value, path="") -> list[tuple[str, float]]:
    """Every number in a JSON tree (booleans are flags, not figures), with its path."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, value)]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _figures(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in _figures(v, f"{path}[{i}]")]
    return []


def test_quick_bench_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "bench.json"
    lines: list[str] = []
    returned = run_benchmarks(quick_config(), out=str(out), write=lines.append)

    assert out.exists()
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    for section in ("machine", "config", *SECTIONS, "total_seconds"):
        assert section in results, section

    machine = results["machine"]
    assert machine["cpu_model"] and machine["torch_version"] and machine["logical_cpus"] >= 1
    assert isinstance(machine["cpu_has_fast_bf16"], bool) and isinstance(machine["bf16_fast_on_device"], bool)
    assert machine["device"] == "cpu" and machine["torch_threads_used"] == 1

    # Every measured figure, in every section, is positive and finite.
    figures = [f for section in SECTIONS for f in _figures(results[section], section)]
    assert len(figures) > 50
    bad = [(path, v) for path, v in figures if not (math.isfinite(v) and v > 0)]
    assert not bad, bad

    matmul = results["matmul"]
    assert [r["precision"] for r in matmul["rows"]] == ["fp32", "bf16"]
    assert matmul["rows"][0]["fast"] is True and matmul["rows"][1]["fast"] is machine["cpu_has_fast_bf16"]

    rows = results["train_step"]["rows"]
    assert {(r["variant"], r["precision"], r["mode"]) for r in rows} == {("Nano-4", "fp32", "eager"),
                                                                         ("Nano-4", "bf16", "eager")}
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    assert [c["batch_size"] for c in fp32["sweep"]] + fp32["batch_sizes_left_out"] == [4, 8]
    assert fp32["best_batch_size"] in (4, 8) and 1 <= fp32["sweep"][0]["steps_timed"] <= 2
    for row in rows:
        assert {"img_per_s", "img_per_s_per_core", "achieved_flops_per_s", "utilisation"} <= row.keys()
        assert row["slow"] is (row["precision"] == "bf16" and not machine["cpu_has_fast_bf16"])
    if not machine["cpu_has_fast_bf16"]:
        bf16 = next(r for r in rows if r["precision"] == "bf16")
        assert [c["batch_size"] for c in bf16["sweep"]] == [4] and bf16["time_over_fp32_same_batch"] > 0

    inference = results["inference"]["rows"]
    assert [r["precision"] for r in inference] == ["fp32", "bf16"] if machine["cpu_has_fast_bf16"] else ["fp32"]
    assert inference[0]["best_batch_size"] in (1, 8) and inference[0]["img_per_s_per_core"] > 0

    loader = results["loader"]
    assert loader["digits"]["image_size"] == 16 and loader["jpeg"]["image_size"] == 224
    assert loader["jpeg"]["augment_paper"]["crop"] == "inception" and loader["jpeg"]["augment_paper"]["flip"] is True
    assert loader["jpeg"]["augment_paper"]["randaug"] == [2, 15]
    assert loader["digits"]["fraction_0.1"]["samples"] < loader["digits"]["samples"]
    ratio = loader["in_memory_ratio"]
    assert isinstance(ratio["loader_processes_needed"], int)
    assert ratio["loader_processes_needed"] == max(1, math.ceil(ratio["step_consumption_img_per_s"]
                                                                / ratio["loader_samples_per_s_per_process"]))

    assert results["orchestration"] == {"ran": False, "reason": "orchestration off (--no-orchestration)"}
    assert results["failed_sections"] == []
    assert results["fewshot"]["features"]["samples"] > 0
    assert [r["shots"] for r in results["fewshot"]["solve"]["rows"]] == [1, 5]

    text = "\n".join(lines)
    for heading in ("Matmul ceiling", "Training step", "Inference", "Loader", "Few-shot", "img/s/core", "util"):
        assert heading in text, heading


def test_train_step_is_the_trainers(digits16: Path) -> None:
    """The bench times the step trials run: from the same weights and batches, the same updates, bit for bit."""
    trial = TrialConfig.model_validate({
        "data": {"train": str(digits16 / "train"), "val": str(digits16 / "val")},
        "model": {"variant": "Nano-4"},
        "optim": {"lr": 0.01, "warmup_steps": 2, "grad_clip": 0.05},  # a small clip norm: clipping is active
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3, "precision": "fp32"},
    })
    trainer = Trainer(trial)
    model = copy.deepcopy(trainer.module)
    step = train_step_fn(model, build_optimizer(model, trial.optim), trial.optim, trainer.num_classes, "fp32",
                         torch.device("cpu"), total_steps=trial.train.steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = torch.randn(8, 3, 16, 16, generator=generator)
        labels = torch.randint(0, trainer.num_classes, (8,), generator=generator)
        loss, grad_norm = trainer.train_step(images, labels)
        assert grad_norm > trial.optim.grad_clip
        assert torch.equal(step(images, labels), loss)
    torch.testing.assert_close(model.state_dict(), trainer.module.state_dict(), rtol=0, atol=0)


def test_orchestration_study_is_a_valid_plan(digits16: Path) -> None:
    spec = parse_study(orchestration_study("bench-orchestration", digits16, steps=30))
    plans = plan_study(spec)  # reads the manifests and checks the few-shot classes, as `mixer-study run` does
    assert len(plans) == TRIALS and spec.resources.workers_per_trial == WORKERS == 1  # trials run in process
    assert spec.base.model.variant == "Nano-4" and spec.base.fewshot.train
    assert not spec.base.finetune.enabled
    tuned = parse_study(orchestration_study("bench-orchestration", digits16, steps=30, finetune_steps=20))
    assert len(plan_study(tuned)) == TRIALS
    assert tuned.base.finetune.steps == 20 and tuned.base.finetune.lr == (0.003, 0.01, 0.03) and tuned.base.finetune.val


def test_a_negative_orchestration_finetune_steps_exits_2_naming_the_flag(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", "--orchestration-finetune-steps", "-3", "--out", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--orchestration-finetune-steps: -3 is negative" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()  # refused before any benchmark ran
