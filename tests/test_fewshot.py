import numpy as np
import pytest
from sklearn.linear_model import Ridge

from analysis.fewshot import fewshot_metrics, kshot_indices, linear_fewshot, ridge_classify, ridge_weights

L2 = 2.0**10


def _reference(train_x, train_y, test_x, num_classes, l2_reg=L2):
    """scikit-learn ridge on the same design: standardised features + constant 100, ±1 targets."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5

    def design(x):
        return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])

    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    ridge = Ridge(alpha=l2_reg, fit_intercept=False).fit(design(train_x), y)
    return design(train_x), y, ridge.coef_.T, ridge.predict(design(test_x)).argmax(1)


@pytest.mark.parametrize(
    "shots,dim",
    [(2, 64), (25, 16)],  # n = 20 points < d = 65 and n = 250 points > d = 17
    ids=["n<d", "n>d"],
)
def test_matches_sklearn_ridge(shots, dim):
    rng = np.random.default_rng(0)
    num_classes = 10
    centres = rng.normal(size=(num_classes, dim))
    train_y = np.repeat(np.arange(num_classes), shots)
    test_y = rng.integers(0, num_classes, size=300)
    train_x = centres[train_y] + rng.normal(scale=2.0, size=(len(train_y), dim)) + 3.0
    test_x = centres[test_y] + rng.normal(scale=2.0, size=(len(test_y), dim)) + 3.0

    x, y, w_ref, pred_ref = _reference(train_x, train_y, test_x, num_classes)
    w = ridge_weights(x, y, L2)
    np.testing.assert_allclose(w, w_ref, rtol=1e-8, atol=1e-8 * np.abs(w_ref).max())

    pred = ridge_classify(train_x, train_y, test_x, num_classes, L2)
    np.testing.assert_array_equal(pred, pred_ref)
    assert np.mean(pred == test_y) == np.mean(pred_ref == test_y)


def test_kshot_sets_nested_per_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=500)
    for seed in range(3):
        sets = {k: kshot_indices(labels, k, seed) for k in (1, 5, 10, 25)}
        for k, idx in sets.items():
            assert len(idx) == 7 * k and len(set(idx)) == 7 * k
            np.testing.assert_array_equal(np.bincount(labels[idx], minlength=7), np.full(7, k))
        for small, large in [(1, 5), (5, 10), (10, 25)]:
            assert set(sets[small]) <= set(sets[large])


def test_kshot_sets_differ_between_seeds():
    labels = np.repeat(np.arange(5), 40)
    a, b = (set(kshot_indices(labels, 5, seed)) for seed in (0, 1))
    assert a != b
    assert set(kshot_indices(labels, 5, 0)) == a  # and are reproducible


def test_class_with_too_few_examples_errors():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    with pytest.raises(ValueError, match=r"class 2 has 3 .* 5"):
        kshot_indices(labels, 5, seed=0)
    with pytest.raises(ValueError, match=r"class 3 has 0"):
        kshot_indices(labels, 1, seed=0, num_classes=4)
    x = np.zeros((len(labels), 4))
    with pytest.raises(ValueError, match=r"class 2"):
        linear_fewshot(x, labels, x, labels, shots=(5,))


def test_separable_problem_is_solved_at_5_shots():
    rng = np.random.default_rng(2)
    num_classes, dim = 5, 32
    centres = 5.0 * rng.normal(size=(num_classes, dim))
    train_y, test_y = np.repeat(np.arange(num_classes), 30), np.repeat(np.arange(num_classes), 40)
    train_x = centres[train_y] + 0.1 * rng.normal(size=(len(train_y), dim))
    test_x = centres[test_y] + 0.1 * rng.normal(size=(len(test_y), dim))
    res = linear_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5))
    assert res[5]["mean"] >= 0.99
    assert min(res[5]["per_seed"]) >= 0.99


def test_random_features_are_at_chance():
    rng = np.random.default_rng(3)
    num_classes, dim = 10, 64
    train_y, test_y = np.repeat(np.arange(num_classes), 30), rng.integers(0, num_classes, 3000)
    train_x, test_x = rng.normal(size=(len(train_y), dim)), rng.normal(size=(len(test_y), dim))
    res = linear_fewshot(train_x, train_y, test_x, test_y)
    for k in (1, 5, 10, 25):
        assert 0.06 < res[k]["mean"] < 0.14, (k, res[k])


def test_result_structure_and_metrics():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 10)
    x = rng.normal(size=(30, 8))
    res = linear_fewshot(x, y, x, y, shots=(1, 5), seeds=(0, 1, 2))
    assert set(res) == {1, 5}
    for r in res.values():
        assert len(r["per_seed"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"]))
        assert r["std"] == pytest.approx(np.std(r["per_seed"]))
    metrics = fewshot_metrics(res)
    assert metrics == {
        "fewshot/1shot": res[1]["mean"],
        "fewshot/1shot_std": res[1]["std"],
        "fewshot/5shot": res[5]["mean"],
        "fewshot/5shot_std": res[5]["std"],
    }


def test_input_validation():
    x, y = np.zeros((6, 4)), np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"train_y: expected shape \(6,\)"):
        linear_fewshot(x, y[:5], x, y, shots=(1,))
    with pytest.raises(ValueError, match=r"test_x: expected 4 features .* got 3"):
        linear_fewshot(x, y, x[:, :3], y, shots=(1,))
    with pytest.raises(ValueError, match=r"train_x: expected a 2-D"):
        linear_fewshot(x[0], y, x, y, shots=(1,))
    with pytest.raises(ValueError, match=r"test_y: expected labels in \[0, 2\)"):
        linear_fewshot(x, np.minimum(y, 1), x, y, shots=(1,), num_classes=2)
    with pytest.raises(ValueError, match=r"train_y: expected integer"):
        linear_fewshot(x, y.astype(float), x, y, shots=(1,))
