"""`build_report` on a real MLflow store: which accuracy Fig. 2 left / Fig. 3 use, and which trials enter them."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.report import build_report
from analysis.results import load_study
from workers.names import ROLE_TAG, STUDY_TAG, TRIAL_TAG


def _store(tmp_path: Path, finetuned: bool) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=str(tmp_path / "mlruns"))  # not ./mlruns of the cwd
    client.create_run(exp, tags={STUDY_TAG: "s", ROLE_TAG: "study"})
    for variant, permute, acc in (("Micro-4", "none", 0.8), ("BiT-Micro", "none", 0.7), ("Micro-4", "pixels", 0.3)):
        trial = f"variant={variant},permute={permute}"
        run = client.create_run(exp, tags={STUDY_TAG: "s", ROLE_TAG: "trial", TRIAL_TAG: trial}).info.run_id
        for key, value in (("model.variant", variant), ("data.permute", permute), ("data.fraction", "1.0")):
            client.log_param(run, key, value)
        for key, value in (("fewshot/5shot", acc), ("compute/train_flops", 1e12), ("best/val_acc", acc),
                           ("perf/img_per_s_per_core", 100.0)):
            client.log_metric(run, key, value)
        if finetuned:
            client.log_metric(run, "finetune/top1", acc + 0.1)
        client.set_terminated(run)
    # A one-off `mixer-study train` run of the same study never enters its results.
    client.create_run(exp, tags={STUDY_TAG: "s", ROLE_TAG: "train", TRIAL_TAG: "train-base"})
    return uri


def test_fig3_uses_finetuned_top1_when_the_study_has_it(tmp_path: Path) -> None:
    uri = _store(tmp_path, finetuned=True)
    names = {p.name for p in build_report(uri, "s", tmp_path / "out")}
    assert {"fig3_finetune_top1.png", "fig2_left_finetune_top1_vs_train_flops.png"} <= names
    assert "fig4_permutation_fewshot_5shot.png" in names  # data.permute has several values: Fig. 4
    assert len(load_study(uri, "s")) == 3  # the role=train run is not a trial of the study
    table = (tmp_path / "out" / "table3.md").read_text()
    assert "fine-tuned top-1 (%)" in table and "90.0" in table and "40.0" not in table  # permuted rows: Fig. 4 only


def test_fig3_falls_back_to_linear_5shot(tmp_path: Path) -> None:
    names = {p.name for p in build_report(_store(tmp_path, finetuned=False), "s", tmp_path / "out")}
    assert "fig3_fewshot_5shot.png" in names and "fig3_finetune_top1.png" not in names
