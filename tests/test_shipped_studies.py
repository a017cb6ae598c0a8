"""Study files users run, end to end, then `mixer-study report`: `studies/model_scale.yaml` (Mixer, ViT and BiT CPU
variants, linear few-shot and the fine-tuning stage with its learning-rate sweep) and `studies/permutation.yaml`
(Mixer and BiT x the three input pipelines of Fig. 4).

Each file is taken as shipped (grid, per-family sweep, recipe, fine-tuning, resources) with three changes so it
runs in minutes: the data point at a small generated corpus written here (the classes of `data/synthetic-16`, 8,000
instead of 32,000 pre-training images) instead of `data/synthetic-16`, the step counts are cut, and one replicate
runs instead of the shipped 3 (the recipe's other fields, the grid, the sweep and the fine-tuning lr sweep are
kept). Every shipped study file also validates and plans here without changes to its recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.results import load_study
from pipeline.spec import parse_study
from tests.conftest import REPO, cli_env, run_cli, write_study
from workers.data.synthetic import shards_from_synthetic

pytestmark = pytest.mark.slow  # `make test-slow`: 8 trials with fine-tuning, then 6 trials; minutes on 2 cores

STUDY = REPO / "studies" / "model_scale.yaml"
PERMUTATION = REPO / "studies" / "permutation.yaml"
SHIPPED_DATA = "data/synthetic-16"  # the corpus the shipped CPU studies read


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped studies' generated corpus (64 pre-training and 16 transfer classes, 16 px, seed 0) at 8,000
    pre-training images: the smallest size whose transfer classes have the 25 examples each that the studies'
    default 25-shot needs (plan_study checks), a few seconds to write."""
    out = tmp_path_factory.mktemp("synthetic") / "synthetic-16"
    shards_from_synthetic(str(out), seed=0, size=8000)
    return out


def _shortened(shipped: dict, shards: Path) -> dict:
    """``shipped`` with every `data/synthetic-16/...` URL replaced by the same split of ``shards``, the step counts
    cut and one replicate (everything else as shipped)."""
    assert shipped["replicates"] == 3 and SHIPPED_DATA in yaml.safe_dump(shipped)  # what this test replaces
    study = yaml.safe_load(yaml.safe_dump(shipped, sort_keys=False).replace(SHIPPED_DATA, str(shards)))
    study["replicates"] = 1  # grid x sweep settings as shipped, once: the seeds add run time, not coverage
    base = study["base"]
    base["train"].update(steps=20, eval_every=10, checkpoint_every=20)
    base["optim"]["warmup_steps"] = 5
    if "finetune" in base:
        base["finetune"].update(steps=10, warmup_steps=2)
    return study


def _run(study: dict, tmp_path: Path) -> tuple[str, dict]:
    """Run ``study`` with `mixer-study run` on a sqlite store; returns (tracking URI, CLI environment)."""
    path = write_study(tmp_path / f"{study['name']}.yaml", study)
    uri, env = f"sqlite:///{tmp_path / 'mlflow.db'}", cli_env(tmp_path)
    ran = run_cli(["run", str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")], env, timeout=1800)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    trials = len(parse_study(study).trial_points())  # grid points x sweep settings x replicates
    assert f"{trials}/{trials} trials finished" in ran.stdout
    return uri, env


def test_model_scale_study_runs_and_reports(tmp_path: Path, corpus: Path) -> None:
    shipped = yaml.safe_load(STUDY.read_text())
    study = _shortened(shipped, corpus)
    assert study["grid"] == shipped["grid"] and study["sweep"] == shipped["sweep"]
    assert study["base"]["finetune"]["lr"] == shipped["base"]["finetune"]["lr"]
    uri, env = _run(study, tmp_path)
    variants = shipped["grid"]["model.variant"]

    out = tmp_path / "report"
    report = run_cli(["report", shipped["name"], "--tracking-uri", uri, "--out", str(out)], env, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    df = load_study(uri, shipped["name"])
    assert sorted(df["variant"]) == sorted(variants)
    assert df["finetune_top1"].between(0, 1).all() and df["fewshot_5shot"].between(0, 1).all()
    assert set(df["family"]) == {"Mixer", "ViT", "BiT"}
    # Fig. 3 and Table 3 compare families by fine-tuned top-1 when the study has it, and say so.
    assert "fine-tuned top-1" in (out / "table3.md").read_text()
    for stem in ("fig3_finetune_top1", "fig2_left_finetune_top1_vs_train_flops"):
        assert (out / f"{stem}.png").stat().st_size > 1000, sorted(p.name for p in out.iterdir())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(shipped["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`mixer.role` = 'trial'")
    assert len(runs) == len(variants) and {r.info.status for r in runs} == {"FINISHED"}


def test_permutation_study_runs_and_reports(tmp_path: Path, corpus: Path) -> None:
    shipped = yaml.safe_load(PERMUTATION.read_text())
    study = _shortened(shipped, corpus)
    assert study["grid"] == shipped["grid"] and study["sweep"] == shipped["sweep"]
    assert study["base"]["data"]["permute_patch"] == 4
    uri, env = _run(study, tmp_path)

    out = tmp_path / "report"
    report = run_cli(["report", shipped["name"], "--tracking-uri", uri, "--out", str(out)], env, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "fig4_permutation_fewshot_5shot.png").stat().st_size > 1000, sorted(p.name for p in out.iterdir())
    df = load_study(uri, shipped["name"])
    assert sorted(zip(df["variant"], df["permute"])) == sorted(
        (v, p) for v in shipped["grid"]["model.variant"] for p in shipped["grid"]["data.permute"])

    # A trained checkpoint records its input permutation, and the standalone few-shot verb, told nothing but the
    # checkpoint, feeds the same permutation: it reproduces the few-shot accuracy the trial logged.
    row = df[(df["variant"] == "Micro-4") & (df["permute"] == "patches")].iloc[0]
    checkpoint = Path(row["checkpoint"])
    assert json.loads((checkpoint / "model.json").read_text())["input_permute"] == {"mode": "patches", "patch": 4,
                                                                                     "seed": 0}
    fewshot = run_cli(["fewshot", "--checkpoint", str(checkpoint), "--data", str(corpus / "transfer"),
                       "--crop-fraction", "1.0"], env, timeout=300)
    assert fewshot.returncode == 0, fewshot.stderr[-3000:]
    assert "input permutation patches (patch 4, seed 0)" in fewshot.stdout
    printed = {key.strip(): float(value) for key, value in
               (line.split(":") for line in fewshot.stdout.splitlines() if line.strip().startswith("fewshot/"))}
    assert abs(printed["fewshot/5shot"] - row["fewshot_5shot"]) < 1e-4  # printed with 4 decimals
