"""analysis.findings: each of the paper's findings decided from replicates, on results tables built with known
effects (and the contrast interval against a direct computation); `mixer-study findings` on a real sqlite store."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.findings import data_fraction_findings, model_scale_findings, permutation_findings
from analysis.replicates import contrast
from pipeline.cli import main

SEEDS = (0, 1, 2, 3)


def trial(family: str, variant: str, seed: int, **values: object) -> dict:
    return {"status": "FINISHED", "family": family, "variant": variant, "seed": seed, "setting": "base",
            "trial": f"{variant}-{values.get('fraction', '')}-{values.get('permute', '')}-s{seed}",
            "grid_point": f"{variant}-{values.get('fraction', '')}-{values.get('permute', '')}", **values}


def noisy(rng: np.random.Generator, mean: float) -> float:
    return float(mean + rng.normal(0, 0.005))


def test_contrast_is_the_welch_satterthwaite_interval() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(m, s, n) for m, s, n in ((0.5, 0.02, 3), (0.4, 0.05, 4), (0.3, 0.01, 5))]
    coefs = (1.0, -2.0, 1.0)
    got = contrast(list(zip(coefs, groups)))
    parts = [c * c * g.var(ddof=1) / len(g) for c, g in zip(coefs, groups)]
    dof = sum(parts) ** 2 / sum(p * p / (len(g) - 1) for p, g in zip(parts, groups))
    half = stats.t.ppf(0.975, dof) * math.sqrt(sum(parts))
    estimate = sum(c * g.mean() for c, g in zip(coefs, groups))
    assert got.diff == pytest.approx(estimate) and got.dof == pytest.approx(dof)
    assert (got.lo, got.hi) == pytest.approx((estimate - half, estimate + half))
    assert math.isnan(contrast([(1.0, [0.5]), (-1.0, [0.1, 0.2])]).lo)  # one seed: no interval


def paper_like_fractions(rng: np.random.Generator, bit_low: float = 0.45) -> pd.DataFrame:
    """Mixer/ViT/BiT x 2 fractions with the paper's pattern: all overfit at 3 % (val loss >> train loss), BiT best at
    3 %, Mixer gains the most, ViT ahead of Mixer at 3 % and level at 100 %."""
    means = {("Mixer", 0.03): 0.25, ("Mixer", 1.0): 0.60, ("ViT", 0.03): 0.32, ("ViT", 1.0): 0.61,
             ("BiT", 0.03): bit_low, ("BiT", 1.0): 0.62}
    rows = []
    for (family, fraction), mean in means.items():
        for seed in SEEDS:
            train_loss = noisy(rng, 1.5 if fraction == 0.03 else 3.0)
            rows.append(trial(family, family, seed, fraction=fraction, best_val_acc=noisy(rng, mean),
                              final_train_loss=train_loss, final_val_loss=noisy(rng, 3.1),
                              fewshot_5shot=noisy(rng, mean)))
    return pd.DataFrame(rows)


def test_data_fraction_findings_reproduce_a_paper_like_study() -> None:
    verdicts = {f.key: f.verdict for f in data_fraction_findings(paper_like_fractions(np.random.default_rng(1)))}
    assert verdicts == {"F1": "reproduced", "F2": "reproduced", "F3": "reproduced"}


def test_data_fraction_findings_say_not_reproduced_when_the_resnet_is_not_best() -> None:
    findings = data_fraction_findings(paper_like_fractions(np.random.default_rng(2), bit_low=0.15))
    assert {f.key: f.verdict for f in findings}["F2"] == "not reproduced"


def test_findings_read_only_the_recipe_kept_on_upstream_val() -> None:
    """A second lr whose few-shot is great but whose val/acc is worse is never what a finding reads."""
    df = paper_like_fractions(np.random.default_rng(3), bit_low=0.15)
    decoy = df[df["family"] == "BiT"].assign(setting="optim.lr=0.1", best_val_acc=0.01, fewshot_5shot=0.99)
    both = pd.concat([df.assign(setting="optim.lr=0.01"), decoy], ignore_index=True)
    assert {f.key: f.verdict for f in data_fraction_findings(both)}["F2"] == "not reproduced"


def test_permutation_findings() -> None:
    rng = np.random.default_rng(4)
    means = {("Mixer", "none"): 0.50, ("Mixer", "patches"): 0.50, ("Mixer", "pixels"): 0.45,
             ("BiT", "none"): 0.60, ("BiT", "patches"): 0.40, ("BiT", "pixels"): 0.30}
    rows = [trial(f, f, s, permute=p, fewshot_5shot=noisy(rng, m), best_val_acc=m)
            for (f, p), m in means.items() for s in SEEDS]
    verdicts = {f.key: f.verdict for f in permutation_findings(pd.DataFrame(rows))}
    assert verdicts == {"F4": "reproduced", "F5": "reproduced"}


def test_model_scale_finding() -> None:
    """Mixers faster at every accuracy; the smallest Mixer below a cheaper ResNet, the largest on the frontier."""
    rng = np.random.default_rng(5)
    variants = [("Mixer", "Nano-4", 0.40, 1e11, 20_000), ("Mixer", "Mini-4", 0.70, 1e13, 3_000),
                ("BiT", "BiT-Micro", 0.55, 5e10, 1_500), ("BiT", "BiT-Mini", 0.66, 8e12, 500),
                ("ViT", "ViT-Micro/4", 0.50, 2e12, 2_000)]
    rows = [trial(f, v, s, finetune_top1=noisy(rng, acc), best_val_acc=acc, train_flops=flops,
                  img_per_s_per_core=speed, img_per_s_per_core_spread=0.03)
            for f, v, acc, flops, speed in variants for s in SEEDS]
    (finding,) = model_scale_findings(pd.DataFrame(rows))
    assert finding.verdict == "reproduced", finding.measured


def test_findings_cli_on_a_store_without_the_studies(tmp_path, capsys) -> None:
    out = tmp_path / "findings"
    main(["findings", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--out", str(out)])
    found = json.loads((out / "findings.json").read_text())
    assert [f["key"] for f in found] == ["F1", "F2", "F3", "F4", "F5", "F6"]
    assert {f["verdict"] for f in found} == {"not run"}
    assert "data_fraction" in found[0]["measured"]
    assert "| F6 |" in capsys.readouterr().out


def test_every_verb_help_shows_single_percent_signs() -> None:
    # A verb's one-line help is also its `VERB --help` description, which argparse prints without %-formatting.
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert "findings" in verbs.choices
    for name, sub in verbs.choices.items():
        text = sub.format_help()
        assert "%%" not in text, name
    assert "95 % interval over seeds" in verbs.choices["findings"].format_help()
