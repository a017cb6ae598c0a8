"""The paper's findings, each decided from a study's replicates with a 95 % interval (``mixer-study findings``).

Every finding is a linear contrast of per-grid-point means over seeds (``replicates.contrast``: Welch-Satterthwaite
intervals over independent groups of seeds), computed on the recipe each grid point kept on upstream validation
(``replicates.select_recipe``). A finding is "reproduced" only where its interval lies on the paper's side of 0;
an interval that straddles 0 is "not resolved", one on the other side "not reproduced".

- F1 (§3.3) all models overfit on the smallest subset: per family, the generalisation gap at the end of training
  (upstream val loss - training loss, both the sigmoid loss summed over classes) at the smallest fraction > 0, and
  larger than at the largest fraction.
- F2 (§3.3, Fig. 2 right) with little data the ResNet is best: BiT - each other family at the smallest fraction
  > 0; and Mixer gains more from data than BiT: (Mixer@max - Mixer@min) - (BiT@max - BiT@min) > 0.
- F3 (§3.3) the gap between Mixer and ViT shrinks as data grows: ViT ahead at the smallest fraction (ViT - Mixer
  > 0: there is a gap) and (ViT - Mixer)@min - (ViT - Mixer)@max > 0 (Mixer gains on ViT as data grows).
- F4 (§3.4, Fig. 4) Mixer is invariant to the patch + within-patch permutation: Mixer's patches - original
  interval contains 0 (the exact invariance is proven by tests/test_permute.py; trained runs start from different
  weights, so a study can only show equality in distribution).
- F5 (§3.4, Fig. 4) a global pixel permutation hurts the ResNet more than Mixer: (BiT original - BiT pixels) -
  (Mixer original - Mixer pixels) > 0.
- F6 (§3.2, Fig. 3, Table 3) at a given accuracy Mixer has the highest throughput: every other family's variant is
  matched by a Mixer that is not worse (difference interval reaches 0 or above) and faster beyond its measured
  spread; and Mixer sits below the accuracy/compute frontier at small scale and approaches it as it grows: the
  gap to the best other-family variant of no more compute is larger for the smallest Mixer than for the largest.

Pure pandas: the studies' results tables (``analysis.results.load_study``) in, a table of findings out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.replicates import Difference, contrast, select_recipe

REFERENCE = "Mixer"
DATA_FRACTION_KEYS, PERMUTATION_KEYS, MODEL_SCALE_KEYS = ("F1", "F2", "F3"), ("F4", "F5"), ("F6",)


@dataclass(frozen=True)
class Finding:
    """One finding: its id, the paper's statement, what was measured (with intervals) and the verdict."""

    key: str
    statement: str
    measured: str
    verdict: str  # "reproduced", "not reproduced", "not resolved", "not run"


def not_run(keys: tuple[str, ...], reason: str) -> list[Finding]:
    """The findings ``keys`` as "not run", with the reason."""
    return [Finding(key, "", reason, "not run") for key in keys]


def verdict(intervals: list[Difference], want: str = "positive") -> str:
    """"reproduced" when every interval is on the wanted side of 0 ("positive", or "contains 0"), "not reproduced"
    when one is significantly on the other side, else "not resolved"."""
    if want == "contains 0":
        return "reproduced" if all(d.lo <= 0 <= d.hi for d in intervals) else "not reproduced"
    if all(d.lo > 0 for d in intervals):
        return "reproduced"
    if any(d.hi < 0 for d in intervals):
        return "not reproduced"
    return "not resolved"


def fmt(d: Difference, scale: float = 100.0) -> str:
    """``+12.3 [8.1, 16.5]``: the estimate and its interval, times ``scale`` (100: accuracy points)."""
    return f"{scale * d.diff:+.1f} [{scale * d.lo:+.1f}, {scale * d.hi:+.1f}]"


def kept_finished(df: pd.DataFrame) -> pd.DataFrame:
    """The finished trials of each grid point's kept recipe (selected on upstream val only)."""
    finished = df[df["status"] == "FINISHED"]
    return select_recipe(finished)[0] if len(finished) else finished


def seeds(df: pd.DataFrame, column: str, **where: object) -> np.ndarray:
    """One value per seed of ``column`` for the trials matching every ``where`` (column == value)."""
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        mask &= df[key].astype(str) == str(value)
    return pd.to_numeric(df.loc[mask, column], errors="coerce").to_numpy(dtype=float)


def data_fraction_findings(df: pd.DataFrame, quality: str = "fewshot_5shot") -> list[Finding]:
    """F1, F2 and F3 from a data-fraction study (families x nested fractions x seeds)."""
    df = kept_finished(df)
    families = sorted(df["family"].dropna().unique())
    fractions = sorted(pd.to_numeric(df["fraction"], errors="coerce").dropna().unique())
    if len(fractions) < 2 or REFERENCE not in families:
        return not_run(DATA_FRACTION_KEYS, "the study has no Mixer or fewer than 2 fractions")
    low, high = fractions[0], fractions[-1]

    def gap(family: str, fraction: float) -> list[tuple[float, np.ndarray]]:
        return [(1, seeds(df, "final_val_loss", family=family, fraction=fraction)),
                (-1, seeds(df, "final_train_loss", family=family, fraction=fraction))]

    overfit = {f: contrast(gap(f, low)) for f in families}
    stronger = {f: contrast(gap(f, low) + [(-c, v) for c, v in gap(f, high)]) for f in families}
    out = [Finding(
        "F1", "all models overfit strongly on the smallest subset",
        "; ".join(f"{f}: val - train loss {fmt(overfit[f], 1)} at {low:g}, {fmt(stronger[f], 1)} more than at "
                  f"{high:g}" for f in families),
        verdict([*overfit.values(), *stronger.values()]))]

    def q(family: str, fraction: float) -> np.ndarray:
        return seeds(df, quality, family=family, fraction=fraction)

    if "BiT" in families:
        best = {f: contrast([(1, q("BiT", low)), (-1, q(f, low))]) for f in families if f != "BiT"}
        gains = contrast([(1, q(REFERENCE, high)), (-1, q(REFERENCE, low)), (-1, q("BiT", high)), (1, q("BiT", low))])
        out.append(Finding(
            "F2", "with little data the ResNet is best, and Mixer gains more from more data than the ResNet",
            "; ".join(f"BiT - {f} at {low:g}: {fmt(d)} pts" for f, d in best.items())
            + f"; Mixer's gain {low:g}->{high:g} minus BiT's: {fmt(gains)} pts",
            verdict([*best.values(), gains])))
    else:
        out.append(Finding("F2", "", "no BiT in the study", "not run"))
    if "ViT" in families:
        gap_low = contrast([(1, q("ViT", low)), (-1, q(REFERENCE, low))])
        gap_high = contrast([(1, q("ViT", high)), (-1, q(REFERENCE, high))])
        shrink = contrast([(1, q("ViT", low)), (-1, q(REFERENCE, low)), (-1, q("ViT", high)), (1, q(REFERENCE, high))])
        out.append(Finding(
            "F3", "the gap between Mixer and ViT shrinks as data grows (ViT ahead with little data)",
            f"ViT - Mixer at {low:g}: {fmt(gap_low)} pts, at {high:g}: {fmt(gap_high)} pts; Mixer's gain on ViT "
            f"from {low:g} to {high:g}: {fmt(shrink)} pts", verdict([gap_low, shrink])))
    else:
        out.append(Finding("F3", "", "no ViT in the study", "not run"))
    return out


def permutation_findings(df: pd.DataFrame, quality: str = "fewshot_5shot") -> list[Finding]:
    """F4 and F5 from a permutation study (Mixer and BiT x none/patches/pixels x seeds)."""
    df = kept_finished(df)

    def q(family: str, permute: str) -> np.ndarray:
        return seeds(df, quality, family=family, permute=permute)

    if not {REFERENCE, "BiT"} <= set(df["family"].dropna()):
        return not_run(PERMUTATION_KEYS, "the study needs Mixer and BiT runs")
    patches = contrast([(1, q(REFERENCE, "patches")), (-1, q(REFERENCE, "none"))])
    bit_patches = contrast([(1, q("BiT", "patches")), (-1, q("BiT", "none"))])
    drop = {f: contrast([(1, q(f, "none")), (-1, q(f, "pixels"))]) for f in (REFERENCE, "BiT")}
    more = contrast([(1, q("BiT", "none")), (-1, q("BiT", "pixels")), (-1, q(REFERENCE, "none")),
                     (1, q(REFERENCE, "pixels"))])
    return [
        Finding("F4", "Mixer is invariant to the patch + within-patch permutation",
                f"Mixer patches - original: {fmt(patches)} pts (BiT: {fmt(bit_patches)} pts); exact invariance of "
                "the function: tests/test_permute.py", verdict([patches], "contains 0")),
        Finding("F5", "a global pixel permutation hurts the ResNet more than Mixer",
                f"drop under pixels: Mixer {fmt(drop[REFERENCE])} pts, BiT {fmt(drop['BiT'])} pts; BiT's drop minus "
                f"Mixer's: {fmt(more)} pts", verdict([more])),
    ]


def model_scale_findings(df: pd.DataFrame, quality: str = "finetune_top1") -> list[Finding]:
    """F6 from a model-scale study (variants of the three families x seeds, throughput measured once per variant)."""
    df = kept_finished(df)
    if quality not in df or df[quality].isna().all():
        quality = "fewshot_5shot"
    rows = []
    for variant, group in df.groupby("variant"):
        spread = pd.to_numeric(group.get("img_per_s_per_core_spread", pd.Series(dtype=float)), errors="coerce")
        rows.append({"variant": variant, "family": group["family"].iloc[0],
                     "acc": pd.to_numeric(group[quality], errors="coerce").to_numpy(dtype=float),
                     "flops": float(pd.to_numeric(group["train_flops"], errors="coerce").mean()),
                     "speed": float(pd.to_numeric(group["img_per_s_per_core"], errors="coerce").median()),
                     "spread": float(spread.max()) if spread.notna().any() else 0.0})
    mixers = sorted((r for r in rows if r["family"] == REFERENCE), key=lambda r: r["flops"])
    others = [r for r in rows if r["family"] != REFERENCE]
    if not mixers or not others:
        return not_run(MODEL_SCALE_KEYS, "the study needs Mixer and other families' variants")
    matched, texts = [], []
    for other in others:
        candidates = [(m, contrast([(1, m["acc"]), (-1, other["acc"])])) for m in mixers
                      if m["speed"] > other["speed"] * (1 + other["spread"]) * (1 + m["spread"])]
        fine = [(m, d) for m, d in candidates if d.hi >= 0]
        if fine:
            m, d = max(fine, key=lambda item: item[1].diff)
            texts.append(f"{other['variant']} ({other['speed']:,.0f} img/s/core): {m['variant']} "
                         f"({m['speed']:,.0f}) accuracy {fmt(d)} pts")
        else:
            texts.append(f"{other['variant']} ({other['speed']:,.0f} img/s/core): no faster Mixer as accurate")
        matched.append(bool(fine))
    throughput = "reproduced" if all(matched) else "not reproduced"

    def best_cheaper(m: dict) -> dict | None:
        cheaper = [o for o in others if o["flops"] <= m["flops"]]
        return max(cheaper, key=lambda o: np.nanmean(o["acc"])) if cheaper else None

    def gap(m: dict) -> tuple[Difference | None, str]:
        best = best_cheaper(m)
        if best is None:
            return None, f"{m['variant']}: none (the cheapest model: on the frontier)"
        d = contrast([(1, best["acc"]), (-1, m["acc"])])
        return d, f"{m['variant']}: {best['variant']} - it {fmt(d)} pts"

    gaps = [(m, *gap(m)) for m in mixers]
    frontier_text = "gap to the best other-family variant of no more compute: " + "; ".join(t for _, _, t in gaps)
    small = gaps[0][1]
    if small is None:  # the smallest Mixer is the cheapest model of all: on the frontier by construction
        frontier = "not reproduced"
    elif len(mixers) < 2:  # (a largest Mixer always has the smallest's cheaper rival)
        frontier = "not resolved"
    else:
        approach = contrast([(1, best_cheaper(mixers[0])["acc"]), (-1, mixers[0]["acc"]),
                             (-1, best_cheaper(mixers[-1])["acc"]), (1, mixers[-1]["acc"])])
        frontier = verdict([small, approach])
        frontier_text += f"; the gap closes by {fmt(approach)} pts from the smallest Mixer to the largest"
    verdicts = {throughput, frontier}
    overall = "reproduced" if verdicts == {"reproduced"} else (
        "not reproduced" if "not reproduced" in verdicts else "not resolved")
    return [Finding("F6", "at a given accuracy Mixer has the highest throughput; Mixer sits below the "
                    "accuracy/compute frontier at small scale and approaches it as it grows",
                    f"throughput ({throughput}, {quality}): " + "; ".join(texts)
                    + f". Frontier ({frontier}): {frontier_text}", overall)]


def markdown(findings: list[Finding]) -> str:
    """The findings as a markdown table."""
    lines = ["| | paper's finding | measured (95 % intervals; accuracies in points) | verdict |", "|---|---|---|---|"]
    lines += [f"| {f.key} | {f.statement} | {f.measured} | {f.verdict} |" for f in findings]
    return "\n".join(lines) + "\n"
