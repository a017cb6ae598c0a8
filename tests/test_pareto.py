import numpy as np
import pandas as pd
import pytest

from analysis.pareto import pareto_front


def _front(rows):
    df = pd.DataFrame(rows, columns=["name", "cost", "acc"])
    return pareto_front(df, "cost", "acc")["name"].tolist()


def test_staircase_all_on_front_sorted_by_cost():
    assert _front([("c", 4, 0.9), ("a", 1, 0.5), ("b", 2, 0.7)]) == ["a", "b", "c"]


def test_dominated_point_dropped():
    assert _front([("a", 1, 0.5), ("x", 3, 0.6), ("b", 2, 0.7), ("c", 4, 0.9)]) == ["a", "b", "c"]


def test_tie_in_cost_keeps_best_quality():
    assert _front([("worse", 2, 0.6), ("a", 1, 0.5), ("better", 2, 0.8)]) == ["a", "better"]


def test_tie_in_quality_keeps_cheapest():
    assert _front([("dear", 3, 0.7), ("cheap", 2, 0.7), ("a", 1, 0.5)]) == ["a", "cheap"]


def test_exact_duplicates_all_kept():
    assert _front([("a", 1, 0.5), ("b1", 2, 0.7), ("b2", 2, 0.7), ("x", 3, 0.7)]) == ["a", "b1", "b2"]


def test_dominated_duplicates_dropped():
    assert _front([("a", 1, 0.9), ("x1", 2, 0.7), ("x2", 2, 0.7)]) == ["a"]


def test_nans_ignored():
    rows = [("a", 1, 0.5), ("nan_acc", 0.5, np.nan), ("nan_cost", np.nan, 0.99), ("b", 2, 0.7)]
    assert _front(rows) == ["a", "b"]


def test_single_row_and_index_kept():
    df = pd.DataFrame({"cost": [3.0], "acc": [0.1]}, index=[7])
    out = pareto_front(df, "cost", "acc")
    assert out.index.tolist() == [7]
    assert out.equals(df)


def test_empty_frame():
    df = pd.DataFrame({"cost": pd.Series(dtype=float), "acc": pd.Series(dtype=float)})
    out = pareto_front(df, "cost", "acc")
    assert out.empty and list(out.columns) == ["cost", "acc"]


def test_missing_column_names_it_and_lists_available():
    df = pd.DataFrame({"cost": [1.0], "acc": [0.5]})
    with pytest.raises(KeyError, match=r"'quality'.*\['cost', 'acc'\]"):
        pareto_front(df, "cost", "quality")
