"""Pareto frontier of a cost/quality trade-off (Fig. 2 left of the paper)."""

import numpy as np
import pandas as pd


def pareto_front(df: pd.DataFrame, cost: str, quality: str) -> pd.DataFrame:
    """Non-dominated rows of `df`, sorted by cost (ascending); the index is kept.

    Lower cost and higher quality are better. A row is dominated if another row
    has cost <= and quality >= with at least one inequality strict. Exact
    duplicates of a frontier point are all kept. Rows with NaN in either column
    are ignored.
    """
    for col in (cost, quality):
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the DataFrame; available: {list(df.columns)}")
    df = df[df[cost].notna() & df[quality].notna()]
    # Sweep by increasing cost, best quality first among equal costs. A row is
    # dominated iff some row before it in this order has quality >= its own,
    # except the exact duplicate (same cost, same quality) of that row.
    df = df.sort_values([cost, quality], ascending=[True, False], kind="stable")
    keep = np.zeros(len(df), dtype=bool)
    best_cost, best_quality = None, -np.inf
    for i, (c, q) in enumerate(zip(df[cost].to_numpy(), df[quality].to_numpy())):
        if q > best_quality:
            keep[i], best_cost, best_quality = True, c, q
        elif q == best_quality and c == best_cost:
            keep[i] = True
    return df[keep]
