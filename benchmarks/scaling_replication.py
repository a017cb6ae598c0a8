"""Epoch AI's Chinchilla replication (Besiroglu et al. 2024) through ``analysis.scaling``: their data, their
protocol, our fit, intervals, held-out check and timing, beside their published numbers.

    python -m benchmarks.scaling_replication --csv svg_extracted_data.csv [--json OUT]

The CSV is ``data/svg_extracted_data.csv`` of github.com/epoch-research/analyzing-chinchilla (245 runs digitised
from Hoffmann et al.'s Fig. 4; columns "Model Size", "Training FLOP", "loss"); it is not shipped here. As Epoch: the
5 highest losses are dropped and D = FLOP / (6 N).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from analysis.scaling.bootstrap import bootstrap_fit
from analysis.scaling.fit import fit_law
from analysis.scaling.forms import CHINCHILLA
from analysis.scaling.predict import holdout_check
from analysis.scaling.table import read_columns

# Epoch's estimate and the 2.5/97.5 percentiles of their 4,000 bootstrap refits (data_analysis.ipynb, cells 25-26).
EPOCH_FIT = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.348, "beta": 0.366}
EPOCH_CI95 = {"E": (1.769, 1.871), "A": (285.214, 743.626), "B": (1042.357, 5810.344), "alpha": (0.317, 0.373),
              "beta": (0.331, 0.415)}
DROPPED_HIGHEST = 5
HOLDOUT_ABOVE = 1e20


def load_epoch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(x = (N, D) per run, loss) of Epoch's CSV, the 5 highest losses dropped.

    Args:
        path: svg_extracted_data.csv.
    """
    columns = ["Model Size", "Training FLOP", "loss"]
    table = read_columns(path, columns, positive=columns)
    n, flop, loss = table["Model Size"], table["Training FLOP"], table["loss"]
    keep = loss < np.sort(loss)[-DROPPED_HIGHEST]
    return np.stack([n[keep], flop[keep] / (6 * n[keep])], axis=1), loss[keep]


def replicate(path: str | Path, draws: int = 200, seed: int = 0) -> dict:
    """Fit, intervals, held-out check and timing on Epoch's data.

    Args:
        path: svg_extracted_data.csv.
        draws: bootstrap resamples (for the intervals and the timing).
        seed: bootstrap seed.
    """
    x, loss = load_epoch(path)
    start = time.perf_counter()
    fit = fit_law(CHINCHILLA, x, loss)
    boot = bootstrap_fit(fit, draws, seed)
    seconds = time.perf_counter() - start
    ci = boot.intervals()
    holdout = holdout_check(CHINCHILLA, x, loss, holdout_above=HOLDOUT_ABOVE, draws=draws, seed=seed)
    return {"n_points": len(loss), "params": fit.params, "ci95": {k: list(v) for k, v in ci.items()},
            "epoch_params": EPOCH_FIT, "epoch_ci95": {k: list(v) for k, v in EPOCH_CI95.items()},
            "certificate": fit.certificate.as_dict(), "derived": {k: boot.point[k] for k in ("a", "d_over_n")},
            "fit_and_bootstrap_seconds": seconds, "bootstrap_draws": draws, "holdout_above_flop": HOLDOUT_ABOVE,
            "holdout": holdout}


def format_table(result: dict) -> str:
    """The replication as a text table."""
    lines = [f"Chinchilla fit of Epoch's {result['n_points']} runs   ours [95 % CI] (width)   |   Epoch [95 % CI] "
             "(width)"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = result["ci95"][name]
        elo, ehi = EPOCH_CI95[name]
        lines.append(f"  {name:>6} {result['params'][name]:10.4g} [{lo:.4g}, {hi:.4g}] ({hi - lo:.3g})   |   "
                     f"{EPOCH_FIT[name]:10.4g} [{elo:.4g}, {ehi:.4g}] ({ehi - elo:.3g})")
    cert, h = result["certificate"], result["holdout"]
    lines += [f"  a = beta/(alpha+beta) {result['derived']['a']:.3f} [{result['ci95']['a'][0]:.3f}, "
              f"{result['ci95']['a'][1]:.3f}]",
              f"  optimiser: objective {cert['objective']:.10g} (Epoch's best 0.0010182740346), gradient norm "
              f"{cert['grad_norm']:.2g}, converged {cert['converged']}",
              f"  fit + {result['bootstrap_draws']} bootstrap refits: {result['fit_and_bootstrap_seconds']:.1f} s",
              f"held-out check: fit on {h['fitted']} runs < {result['holdout_above_flop']:.0e} FLOP, predict "
              f"{h['held_out']} runs up to {h['max_decades']:.2f} decades beyond",
              f"  MAPE {100 * h['mape']:.2f} %; inside the 95 % band {100 * h['inside_band']:.0f} % (naive band: "
              f"{100 * h['inside_naive_band']:.0f} %); scatter {h['scatter']:.4f}, growth/decade "
              f"{h['growth_per_decade']:.4f} (log y)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", required=True, help="Epoch's data/svg_extracted_data.csv")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = replicate(args.csv, args.bootstrap, args.seed)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
