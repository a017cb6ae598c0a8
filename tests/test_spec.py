"""Study files: validation errors name the field before any Ray process starts; plans are exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.plan import format_plan, plan_study
from pipeline.spec import StudyError, load_study, parse_study, trial_name
from tests.conftest import REPO, cli_env, run_cli, study_dict, write_study
from workers import names
from workers.data.fractions import fraction_slices
from workers.data.manifest import load_manifest
from workers.data.synthetic import shards_from_synthetic

STUDIES = sorted((REPO / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_validate(path: Path) -> None:
    spec = load_study(path)
    assert spec.name == path.stem
    assert len(spec.grid_points()) >= 1


def test_paper_epochs_study_gives_the_papers_epochs() -> None:
    # The paper's data-fraction subsets are seen 233 / 70 / 23 / 7 times in the same steps; on the 32,000 pre-training
    # images of `mixer-study shards --from synthetic` (its default --size) this study's fractions must give the same.
    spec = load_study(REPO / "studies" / "data_fraction_paper_epochs.yaml")
    seen = spec.base.train.steps * spec.base.train.batch_size
    epochs = [seen / round(fraction * 32_000) for fraction in spec.grid["data.fraction"]]
    assert [round(e) for e in epochs] == [229, 70, 23, 7]
    assert all(abs(e / paper - 1) < 0.02 for e, paper in zip(epochs, (233, 70, 23, 7)))
    assert spec.replicates == 5 and set(spec.sweep) == {"Mixer", "ViT"}


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"optim": {"weight_decey": 0.1}}, "base.optim.weight_decey: unknown key (did you mean 'weight_decay'?)"),
        ({"optim": {"lr": -1}}, "base.optim.lr: Input should be greater than 0 (got -1)"),
        ({"train": {"checkpoint_every": 30}}, "must be a multiple of eval_every"),
        ({"train": {"batch_size": 33}}, "train.batch_size: 33 is not divisible by resources.workers_per_trial (2)"),
        ({"grid": {"model.variant": ["Nano-4", "X-99"]}}, "grid.model.variant[1] -> model.variant"),
        ({"grid": {"model.variant": ["Nano-4", "X-99"]}}, "Micro-4"),  # the error lists the known variants
        ({"grid": {"data.fraction": [0.1, 1.5]}}, "grid.data.fraction[1] -> data.fraction: Input should be less than"),
        ({"grid": {"model.colour": ["red"]}}, "grid.model.colour: not a recipe field"),
        ({"grid": {"data.fraction": []}}, "empty list"),
        ({"name": "my study!"}, "name: String should match pattern"),
        ({"resources": {"workers_per_trial": 0}},
         "resources.workers_per_trial: Input should be greater than or equal to 1"),
        ({"fewshot": {"train": None}}, "give both fewshot.train and fewshot.test"),
        ({"model": {"head_bias_init": -6.9}, "train": {"loss": "softmax"}},
         "model.head_bias_init: -6.9 has no effect with train.loss: softmax"),
        ({"train": {"loss": "hinge"}}, "base.train.loss: Input should be 'sigmoid' or 'softmax'"),
        ({"resources": {"gpus_per_worker": 2}}, "resources.gpus_per_worker: Input should be less than or equal to 1"),
        ({"grid": {"data.augment.crop": ["pad", "random"]}}, "grid.data.augment.crop[1] -> data.augment.crop"),
        ({"grid": {"data.augment.crop": ["inception"]}}, "pad: 1 only applies to crop: pad"),
        ({"grid": {"data.augment.randaug": [[2, 99]]}}, "randaug must be [num_layers >= 1, magnitude in 0..30]"),
        ({"optim": {"warmup_steps": 60}}, "optim.warmup_steps (60) must be below train.steps (60)"),
        ({"finetune": {"train": "x/train", "test": "x/test", "lr": [0.01, 0.03], "warmup_steps": 1}},
         "finetune.lr sweeps 2 values [0.01, 0.03]: give finetune.val"),  # the test split must not select
        ({"finetune": {"val": "x/val"}}, "finetune.val is given without finetune.train"),
        ({"finetune": {"train": "x/train", "test": "x/test", "val": "x/test/", "warmup_steps": 1}},
         "finetune.val is the test split"),
        ({"sweep": {"Mixr": {"optim.lr": [0.001]}}},
         "sweep.Mixr: unknown model family (did you mean 'Mixer'?); allowed: Mixer, ViT, BiT"),
        ({"sweep": {"Mixer": {"optim.lrr": [0.001]}}}, "sweep.Mixer.optim.lrr: not a recipe field (did you mean"),
        ({"sweep": {"ViT": {"optim.lr": []}}}, "sweep.ViT.optim.lr is an empty list"),
        ({"sweep": {"ViT": {}}}, "sweep.ViT sweeps no field"),
        ({"sweep": {"BiT": {"optim.lr": [0.01, -1]}}}, "sweep.BiT.optim.lr[1] -> optim.lr: Input should be greater"),
        ({"grid": {"optim.lr": [0.01]}, "sweep": {"Mixer": {"optim.lr": [0.001]}}},
         "sweep.Mixer.optim.lr: also a grid"),
        ({"sweep": {"Mixer": {"train.seed": [1, 2]}}}, "sweep.Mixer.train.seed: the seed is not a recipe setting"),
        ({"sweep": {"Mixer": {"model.variant": ["Micro-4"]}}}, "put model variants in the grid"),
        ({"replicates": 0}, "replicates: Input should be greater than or equal to 1 (got 0)"),
        ({"grid": {"train.seed": [0, 1]}, "replicates": 2}, "grid.train.seed: the grid sets the seed and replicates"),
    ],
)
def test_bad_fields_name_the_field(tmp_path: Path, change: dict, expected: str) -> None:
    raw = study_dict("bad", tmp_path, **change)
    with pytest.raises(StudyError) as error:
        parse_study(raw, source="bad.yaml")
    assert expected in str(error.value)


def test_cli_rejects_bad_study_before_ray(tmp_path: Path) -> None:
    path = write_study(tmp_path / "bad.yaml", study_dict("bad", tmp_path, optim={"lr": "fast"}))
    start = time.monotonic()
    result = run_cli(["run", str(path), "--storage", str(tmp_path / "runs")], cli_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "base.optim.lr" in result.stderr and "'fast'" in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # no cluster was started
    assert time.monotonic() - start < 60
    assert not (tmp_path / "runs").exists()


def test_cli_names_a_missing_manifest(tmp_path: Path) -> None:
    path = write_study(tmp_path / "nodata.yaml", study_dict("nodata", tmp_path / "nowhere"))
    result = run_cli(["plan", str(path)], cli_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert str(tmp_path / "nowhere" / "train") in result.stderr


def test_plan_fractions_nested_with_equal_steps(digits16: Path) -> None:
    raw = study_dict("fractions", digits16, grid={"model.variant": ["Nano-4", "Micro/4"],
                                                  "data.fraction": [0.03, 0.1, 0.3, 1.0]})
    spec = parse_study(raw)
    plans = plan_study(spec)
    assert [p.name for p in plans][:2] == ["variant=Nano-4,fraction=0.03", "variant=Nano-4,fraction=0.1"]
    assert plans[4].point == {"model.variant": "Micro-4", "data.fraction": 0.03}  # B/16-style alias resolved
    assert {p.config.train.steps for p in plans} == {60}
    manifest = load_manifest(str(digits16 / "train"))
    sizes = [p.train_images for p in plans[:4]]
    assert sizes == sorted(sizes) and sizes[-1] == manifest.num_samples
    for p in plans[:4]:
        assert p.epochs == pytest.approx(60 * 32 / p.train_images)
    # Nested: each subset's samples are a prefix of the next one's.
    subsets = [fraction_slices(manifest, f) for f in (0.03, 0.1, 0.3, 1.0)]
    for small, large in zip(subsets, subsets[1:]):
        for i, piece in enumerate(small):
            assert piece.url == large[i].url and piece.num_samples <= large[i].num_samples
    assert plans[4].train_flops > plans[0].train_flops  # Micro-4 costs more than Nano-4 per image
    table = format_plan(spec, plans)
    assert "variant=Micro-4,fraction=1.0" in table and "total: 480 steps" in table


def test_trial_names_are_deterministic() -> None:
    assert trial_name({"model.variant": "B-16", "data.fraction": 0.1}) == "variant=B-16,fraction=0.1"
    assert trial_name({"data.fraction": 0.1, "fewshot.fraction": 1}) == "data.fraction=0.1,fewshot.fraction=1"
    assert trial_name({}) == "base"
    point = {"model.variant": "B-16", "data.fraction": 0.1}
    assert (trial_name(point, {"optim.lr": 0.003, "optim.weight_decay": 0.0001}, 1)
            == "variant=B-16,fraction=0.1-lr0.003-wd0.0001-s1")
    assert trial_name({}, {"optim.lr": 1e-3}, None) == "base-lr0.001"


def test_sweep_per_family_crossed_with_grid_and_replicates(digits16: Path) -> None:
    grid = {"model.variant": ["Nano-4", "ViT-Nano/4", "BiT-Micro"], "data.fraction": [0.3, 1.0]}
    sweep = {"Mixer": {"optim.lr": [0.001, 0.003]}, "ViT": {"optim.lr": [0.001, 0.003],
                                                            "optim.weight_decay": [0.0001, 0.03]}}
    spec = parse_study(study_dict("sweep", digits16, grid=grid, sweep=sweep, replicates=3, train={"seed": 7}))
    plans = plan_study(spec)
    # Mixer 2 settings, ViT 4, BiT (no entry) the base recipe; each point x setting 3 times.
    assert len(plans) == 2 * (2 + 4 + 1) * 3 and len({p.name for p in plans}) == len(plans)
    by_name = {p.name: p for p in plans}
    vit = by_name["variant=ViT-Nano_4,fraction=0.3-lr0.003-wd0.03-s8"]
    assert (vit.config.optim.lr, vit.config.optim.weight_decay, vit.config.train.seed) == (0.003, 0.03, 8)
    assert vit.setting == {"optim.lr": 0.003, "optim.weight_decay": 0.03} and vit.seed == 8
    assert vit.tags == {names.SWEEP_SETTING_TAG: "optim.lr=0.003,optim.weight_decay=0.03"}
    assert vit.point == {"model.variant": "ViT-Nano/4", "data.fraction": 0.3, "optim.lr": 0.003,
                         "optim.weight_decay": 0.03, "train.seed": 8}
    bit = [p for p in plans if p.config.model.variant == "BiT-Micro" and p.config.data.fraction == 0.3]
    assert [p.name for p in bit] == [f"variant=BiT-Micro,fraction=0.3-s{seed}" for seed in (7, 8, 9)]
    assert {p.config.optim.lr for p in bit} == {spec.base.optim.lr}
    assert bit[0].tags == {names.SWEEP_SETTING_TAG: names.SWEEP_SETTING_BASE}
    table = format_plan(spec, plans)
    assert "42 trial(s) = 6 grid point(s) x sweep settings (Mixer 2, ViT 4; other families 1) x 3 replicate(s)" in table


def test_study_without_sweep_or_replicates_plans_as_before(digits16: Path) -> None:
    spec = parse_study(study_dict("plain", digits16, grid={"data.fraction": [0.3, 1.0]}, train={"seed": 5}))
    plans = plan_study(spec)
    assert [p.name for p in plans] == ["fraction=0.3", "fraction=1.0"]
    assert [p.point for p in plans] == [{"data.fraction": 0.3}, {"data.fraction": 1.0}]
    assert {p.config.train.seed for p in plans} == {5} and all(p.seed is None and not p.setting for p in plans)
    assert format_plan(spec, plans).startswith("study plain: 2 trial(s), ")


def test_demo_study_plans_the_paper_design(tmp_path: Path, monkeypatch) -> None:
    """studies/demo.yaml (the README's main job) over the corpus `make demo` writes (`mixer-study shards --from
    synthetic --out data/synthetic-demo --seed 0 --pretrain-classes 16 --size 8000`; a few seconds): the smallest
    one whose 16 transfer classes have the 25 examples each that the demo's 25-shot needs (plan_study checks)."""
    shards_from_synthetic(str(tmp_path / "data" / "synthetic-demo"), seed=0, size=8000, num_pretrain=16)
    monkeypatch.chdir(tmp_path)  # the study's relative data paths resolve against the working directory
    spec = load_study(REPO / "studies" / "demo.yaml")
    plans = plan_study(spec)
    assert len(plans) == 8 and len({p.name for p in plans}) == 8
    assert {p.config.train.steps for p in plans} == {300}  # matched steps across fractions
    nano = [p for p in plans if p.config.model.variant == "Nano-4"]
    assert [p.config.data.fraction for p in nano] == [0.03, 0.1, 0.3, 1.0]
    # Epochs scale inversely with the subset, like the paper's 233/70/23/7 (19,200 images seen by every trial).
    assert [p.train_images for p in nano] == [240, 800, 2400, 8000]
    assert [round(p.epochs, 1) for p in nano] == [80.0, 24.0, 8.0, 2.4]


def test_plan_rejects_a_subset_smaller_than_the_readers(digits16: Path) -> None:
    spec = parse_study(study_dict("tiny", digits16, grid={"data.fraction": [0.5, 0.0001]}))
    with pytest.raises(StudyError, match=r"fraction=0.0001: data.fraction 0.0001 selects 1 training sample"):
        plan_study(spec)


def test_nested_grid_keys_override_the_base(tmp_path: Path) -> None:
    raw = study_dict("aug", tmp_path, grid={"data.augment.pad": [1, 2], "optim.linear_end": [0.0, 1e-5]})
    spec = parse_study(raw)
    configs = [spec.trial_config(p) for p in spec.grid_points()]
    assert [(c.data.augment.pad, c.optim.linear_end) for c in configs] == [(1, 0.0), (1, 1e-5), (2, 0.0), (2, 1e-5)]
    assert all(c.data.augment.crop == "pad" and c.data.augment.eval_crop_fraction == 1.0 for c in configs)
    assert trial_name(spec.grid_points()[1]) == "pad=1,linear_end=1e-05"


def test_plan_rejects_fewshot_shots_larger_than_a_class(digits16: Path) -> None:
    """The downstream train split capped at 30 samples cannot give 5 examples of each of the 10 digits."""
    spec = parse_study(study_dict("shots", digits16, fewshot={"shots": [1, 5], "train_samples": 30}))
    with pytest.raises(StudyError, match=r"fewshot.shots up to 5 need 5 examples of every class .* first 30 samples"):
        plan_study(spec)
    plan_study(parse_study(study_dict("shots", digits16, fewshot={"shots": [1, 5], "train_samples": 400})))


def test_cli_plan_counts_sweep_settings_and_replicates(digits16: Path, tmp_path: Path) -> None:
    study = study_dict("swept", digits16, grid={"data.fraction": [0.3, 1.0]}, replicates=2,
                       sweep={"Mixer": {"optim.lr": [0.001, 0.003]}})
    result = run_cli(["plan", str(write_study(tmp_path / "swept.yaml", study))], cli_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8 trial(s) = 2 grid point(s) x sweep settings (Mixer 2; other families 1) x 2 replicate(s)" in result.stdout
    assert "fraction=1.0-lr0.003-s1" in result.stdout
