"""Bad study files and bad environments, as `mixer-study run` meets them: each exits with code 2 and a message
that names the field (or file, or URL), the value and what is allowed, before any Ray process starts.

Table-driven: each case changes a valid study (or the command line, or the environment) in one way. The run
happens in this process with ``init_ray`` replaced by a tripwire, so a case that got past validation fails
loudly instead of starting a study.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline.tune
from pipeline import cli
from tests.conftest import study_dict

CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    # (case id, change to the study (keys as study_dict takes them), substrings the error must contain)
    ("unknown variant", {"model": {"variant": "Q-16"}}, ["model.variant", "Q-16", "Nano-4"]),
    ("unknown variant in grid", {"grid": {"model.variant": ["Nano-4", "Q-16"]}}, ["grid.model.variant[1]", "Q-16"]),
    ("fraction zero", {"data": {"fraction": 0}}, ["base.data.fraction", "greater than 0", "got 0"]),
    ("fraction above one", {"grid": {"data.fraction": [0.5, 1.5]}}, ["data.fraction", "less than or equal to 1",
                                                                      "1.5"]),
    ("zero steps", {"train": {"steps": 0}}, ["base.train.steps", "greater than 0", "got 0"]),
    ("negative steps", {"train": {"steps": -5}}, ["base.train.steps", "got -5"]),
    ("image size not a multiple of the patch", {"data": {"image_size": 18}}, ["Nano-4", "18"]),
    ("zero workers", {"resources": {"workers_per_trial": 0}}, ["resources.workers_per_trial", "got 0"]),
    ("misspelt section", {"trian": {"steps": 10}}, ["base.trian", "did you mean 'train'"]),
    ("misspelt field", {"train": {"stepz": 10}}, ["base.train.stepz", "did you mean 'steps'", "allowed keys"]),
    ("misspelt top-level key", {"gird": {"data.fraction": [0.5]}}, ["gird", "did you mean 'grid'"]),
    ("misspelt resources key", {"resources": {"workers": 2}},
     ["resources.workers", "did you mean 'workers_per_trial'"]),
    ("wrong type: text for int", {"train": {"steps": "many"}}, ["base.train.steps", "valid integer", "'many'"]),
    ("wrong type: list for float", {"optim": {"lr": [0.1, 0.2]}}, ["base.optim.lr", "valid number"]),
    ("wrong type: grid not a list", {"grid": {"data.fraction": 0.5}}, ["grid.data.fraction", "valid list"]),
    ("empty grid list", {"grid": {"data.fraction": []}}, ["grid.data.fraction", "empty list"]),
    ("grid repeats a value", {"grid": {"data.fraction": [0.5, 0.5]}}, ["grid.data.fraction", "repeats"]),
    ("grid key not a recipe field", {"grid": {"model.depth": [2]}}, ["grid.model.depth", "not a recipe field"]),
    ("grid key misspelt", {"grid": {"data.fracton": [0.5]}}, ["grid.data.fracton", "did you mean 'data.fraction'"]),
    ("negative learning rate", {"optim": {"lr": -1}}, ["base.optim.lr", "got -1"]),
    ("unknown loss", {"train": {"loss": "hinge"}}, ["base.train.loss", "'sigmoid' or 'softmax'", "hinge"]),
    ("unknown permutation", {"data": {"permute": "rows"}}, ["base.data.permute", "rows"]),
    ("two GPUs per worker", {"resources": {"gpus_per_worker": 2}}, ["resources.gpus_per_worker", "got 2"]),
    ("batch not divisible by workers", {"train": {"batch_size": 33}}, ["train.batch_size", "33", "divisible"]),
    ("study name with spaces", {"name": "my study"}, ["name", "my study", "pattern"]),
    ("head bias with softmax", {"model": {"head_bias_init": -2.3}, "train": {"loss": "softmax"}},
     ["model.head_bias_init", "-2.3", "softmax"]),
    ("few-shot shots above a class's count", {"fewshot": {"shots": [1, 500]}}, ["fewshot", "500"]),
    ("missing manifest", {"data": {"train": "/nonexistent/digits/train"}},
     ["data.train: no manifest at /nonexistent/digits/train/manifest.json"]),
    ("missing val manifest", {"data": {"val": "/nonexistent/digits/val"}},
     ["data.val: no manifest at /nonexistent/digits/val/manifest.json"]),
    ("missing few-shot test manifest", {"fewshot": {"test": "/nonexistent/digits/test"}},
     ["fewshot.test: no manifest at /nonexistent/digits/test/manifest.json"]),
]


@pytest.fixture
def no_ray(monkeypatch):
    def tripwire(address):
        raise AssertionError("Ray was started for an invalid study")

    monkeypatch.setattr(pipeline.tune, "init_ray", tripwire)


def _run(tmp_path: Path, study: Any, capsys, extra: list[str] = ()) -> tuple[int, str, float]:
    path = tmp_path / "bad.yaml"
    path.write_text(study if isinstance(study, str) else yaml.safe_dump(study, sort_keys=False))
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "--storage", str(tmp_path / "runs"), *extra])
    elapsed = time.monotonic() - started
    return exit_info.value.code, capsys.readouterr().err, elapsed


def _assert_clear(code: int, err: str, elapsed: float, expected: list[str]) -> None:
    assert code == 2, err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert err.startswith("mixer-study run: error: ") and "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph
    assert elapsed < 30


@pytest.mark.parametrize("case, change, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_study_exits_2_naming_the_field(tmp_path: Path, digits16: Path, capsys, no_ray, case: str,
                                            change: dict, expected: list[str]) -> None:
    study = study_dict("bad", digits16, **{k: v for k, v in change.items() if k not in ("trian", "gird")})
    if "trian" in change:  # a misspelt section of the base recipe
        study["base"]["trian"] = change["trian"]
    if "gird" in change:
        study["gird"] = change["gird"]
    if "resources" in change:
        study["resources"] = {**study_dict("x", digits16)["resources"], **change["resources"]}
    _assert_clear(*_run(tmp_path, study, capsys), expected)


def test_files_and_environment(tmp_path: Path, digits16: Path, capsys, no_ray, monkeypatch) -> None:
    """Study files that are not studies, manifests that are not manifests, storage that cannot be written and a
    cloud URL without credentials."""
    good = study_dict("bad", digits16)
    cases = []
    cases.append(("not a mapping", "- a\n- list\n", [], ["YAML mapping", "list"]))
    cases.append(("invalid YAML", "name: [unclosed\n", [], ["not valid YAML"]))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "manifest.json").write_text("{not json")
    cases.append(("manifest not JSON", study_dict("bad", digits16, data={"train": str(garbage)}), [],
                  [str(garbage / "manifest.json"), "not JSON"]))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases.append(("unwritable storage", good, ["--storage", str(blocker / "runs")],
                  ["storage", str(blocker / "runs" / "bad"), "not writable"]))
    for case, study, extra, expected in cases:
        code, err, elapsed = _run(tmp_path, study, capsys, extra)
        assert code == 2, case
        _assert_clear(code, err, elapsed, expected)

    # On a cluster, credentials in the tracking URI cannot reach the trials without being written in clear: refused.
    code, err, elapsed = _run(tmp_path, good, capsys, ["--address", "127.0.0.1:1",
                                                       "--tracking-uri", "http://alice:s3cret@127.0.0.1:1"])
    _assert_clear(code, err, elapsed, ["tracking URI http://127.0.0.1:1 holds credentials",
                                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", "runtime-env-json"])
    assert "s3cret" not in err and "alice" not in err

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(tmp_path / "no-such-study.yaml")])
    _assert_clear(exit_info.value.code, capsys.readouterr().err, 0, ["no-such-study.yaml", "does not exist"])

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on this machine
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    cloud = study_dict("bad", digits16, data={"train": "s3://mixer-study-no-credentials/train"})
    _assert_clear(*_run(tmp_path, cloud, capsys),
                  ["s3://mixer-study-no-credentials/train/manifest.json", "NoCredentialsError", "AWS_ACCESS_KEY_ID"])


@pytest.mark.parametrize("verb", ["report", "resume", "sync"])
def test_study_verbs_take_the_yaml_or_the_name(tmp_path: Path, digits16: Path, capsys, verb: str) -> None:
    """`report`, `resume` and `sync` read the study's name from its YAML file: the error about a study that never
    ran names the YAML's study, not the file; a YAML path that does not exist is named as a study file."""
    path = tmp_path / "a-file-name.yaml"
    path.write_text(yaml.safe_dump(study_dict("named-in-yaml", digits16), sort_keys=False))
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] if verb == "report" else []
    for study, expected in ((str(path), "named-in-yaml"), ("named-in-yaml", "named-in-yaml"),
                            (str(tmp_path / "missing.yml"), "missing.yml")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([verb, study, "--storage" if verb != "report" else "--out", str(tmp_path / "out"), *store])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert expected in err and "a-file-name" not in err and "Traceback" not in err, err
