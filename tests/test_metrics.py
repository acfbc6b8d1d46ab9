"""Metrics against PyLDL, sklearn and numpy; accumulator batch-size/merge/group invariance."""

from __future__ import annotations

import numpy as np
import pytest
from pyldl import metrics as pyldl_metrics
from sklearn import metrics as skm

from jaxser.train import metrics as M

K = 6


def _distributions(rng: np.random.Generator, n: int, k: int = K, zero_frac: float = 0.4):
    """Random distributions [n, k] with many exact zeros (at least one non-zero per row)."""
    x = rng.dirichlet(np.full(k, 0.7), size=n)
    x[rng.random((n, k)) < zero_frac] = 0.0
    x[np.arange(n), rng.integers(0, k, n)] += 0.1
    return x / x.sum(1, keepdims=True)


def _data(seed: int = 0, n: int = 40):
    rng = np.random.default_rng(seed)
    return _distributions(rng, n), _distributions(rng, n)


@pytest.mark.parametrize("name", M.LDL_METRICS)
def test_ldl_metrics_match_pyldl(name):
    probs, targets = _data()
    probs[0] = np.eye(K)[2]  # one-hot prediction: zeros on the prediction side
    targets[1] = np.eye(K)[3]
    reference = {"kl": pyldl_metrics.kl_divergence}.get(name, getattr(pyldl_metrics, name, None))
    expected = reference(targets, probs, reduction=None)
    got = M.ldl_per_example(probs, targets)[name]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert M.ldl_metrics(probs, targets)[name] == pytest.approx(
            reference(targets, probs), rel=1e-12, abs=1e-14)


def test_ldl_identical_distributions():
    _, targets = _data()
    values = M.ldl_metrics(targets, targets)
    assert values["kl"] == pytest.approx(0.0, abs=1e-12)
    assert values["cosine"] == pytest.approx(1.0)
    assert values["intersection"] == pytest.approx(1.0)


def _labels(seed: int = 1, n: int = 50):
    """Class ids with classes 4 absent from the truth and 5 absent everywhere."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 3], size=n, p=[0.55, 0.25, 0.15, 0.05])
    y_pred = rng.choice([0, 1, 2, 4], size=n)
    return y_true, y_pred


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_matches_sklearn():
    y_true, y_pred = _labels()
    conf = M.confusion_matrix(y_true, y_pred, K)
    np.testing.assert_array_equal(conf, skm.confusion_matrix(y_true, y_pred, labels=range(K)))
    got = M.classification_from_confusion(conf)
    f1 = lambda avg: skm.f1_score(y_true, y_pred, average=avg, labels=range(K), zero_division=0)
    assert got["wa"] == got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert got["ua"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert got["ua"] == pytest.approx(skm.recall_score(
            y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0))
    assert got["macro_f1"] == pytest.approx(f1("macro"))
    assert got["micro_f1"] == pytest.approx(f1("micro"))
    assert got["weighted_f1"] == pytest.approx(f1("weighted"))


def test_confusion_rejects_bad_class():
    with pytest.raises(ValueError, match="y_pred"):
        M.confusion_matrix(np.array([0, 1]), np.array([0, K]), K)


def test_ccc_matches_numpy_formula():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(30, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]
    pred = 0.6 * true + rng.normal(size=(30, 3)) * 0.7 + 0.2
    expected = []
    for d in range(3):
        p, y = pred[:, d], true[:, d]
        cov = np.mean((p - p.mean()) * (y - y.mean()))
        expected.append(2 * cov / (p.var() + y.var() + (p.mean() - y.mean()) ** 2))
    np.testing.assert_allclose(M.ccc(pred, true), expected, rtol=1e-10)
    np.testing.assert_allclose(M.ccc(true, true), 1.0)


def _batch_data(seed: int = 3, n: int = 37):
    rng = np.random.default_rng(seed)
    probs, targets = _distributions(rng, n), _distributions(rng, n)
    groups = {
            "gender": rng.choice(["female", "male"], size=n),
            "corpus": rng.choice(["a", "b", "c"], size=n),
    }
    dims_true = rng.normal(size=(n, 3))
    dims_pred = dims_true * 0.5 + rng.normal(size=(n, 3))
    return probs, targets, groups, dims_pred, dims_true


def _accumulate(batch_size, probs, targets, groups, dims_pred, dims_true, rows=None):
    acc = M.MetricAccumulator([f"c{i}" for i in range(K)], ["gender", "corpus"])
    n = len(probs)
    rows = np.arange(n) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        r = rows[start:start + batch_size]
        acc.update(probs[r], targets[r], np.ones(len(r)), {k: v[r] for k, v in groups.items()},
                   dims_pred[r], dims_true[r])
    return acc


def _assert_results_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_results_equal(a[key], b[key])
        elif isinstance(a[key], float):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14, err_msg=key)
        else:
            assert a[key] == b[key], key


def test_accumulator_matches_direct_computation():
    probs, targets, groups, dims_pred, dims_true = _batch_data()
    result = _accumulate(5, probs, targets, groups, dims_pred, dims_true).result()
    overall = result["overall"]
    for name, value in M.ldl_metrics(probs, targets).items():
        assert overall[name] == pytest.approx(value, rel=1e-12)
    y_true, y_pred = targets.argmax(1), probs.argmax(1)
    assert overall["ua"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert overall["macro_f1"] == pytest.approx(
            skm.f1_score(y_true, y_pred, average="macro", labels=range(K), zero_division=0))
    assert overall["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=range(K)).tolist()
    ccc = M.ccc(dims_pred, dims_true)
    assert overall["ccc_arousal"] == pytest.approx(ccc[0])
    assert overall["ccc_dominance"] == pytest.approx(ccc[2])
    assert overall["ccc_mean"] == pytest.approx(ccc.mean())
    assert overall["count"] == len(probs)


def test_accumulator_batch_size_and_merge_invariance():
    data = _batch_data()
    reference = _accumulate(len(data[0]), *data).result()
    for batch_size in (1, 3, 7):
        _assert_results_equal(_accumulate(batch_size, *data).result(), reference)
    n = len(data[0])
    first = _accumulate(4, *data, rows=np.arange(n // 2))
    second = _accumulate(3, *data, rows=np.arange(n // 2, n))
    merged = M.MetricAccumulator.from_state(first.state())
    merged.merge(M.MetricAccumulator.from_bytes(second.to_bytes()))
    _assert_results_equal(merged.result(), reference)


def test_accumulator_bytes_tolerate_padding():
    acc = _accumulate(4, *_batch_data())
    data = np.concatenate([acc.to_bytes(), np.zeros(100, np.uint8)])
    _assert_results_equal(M.MetricAccumulator.from_bytes(data).result(), acc.result())


def test_accumulator_groups_equal_subset_metrics():
    probs, targets, groups, dims_pred, dims_true = _batch_data()
    result = _accumulate(6, probs, targets, groups, dims_pred, dims_true).result()
    assert sorted(result["groups"]["corpus"]) == ["a", "b", "c"]
    for column, values in groups.items():
        for value in np.unique(values):
            rows = np.flatnonzero(values == value)
            sub = _accumulate(len(rows), probs, targets, groups, dims_pred, dims_true,
                              rows=rows).result()["overall"]
            del sub["confusion"]
            _assert_results_equal(result["groups"][column][value], sub)


def test_accumulator_ignores_invalid_rows():
    probs, targets, groups, dims_pred, dims_true = _batch_data()
    valid = np.random.default_rng(4).random(len(probs)) < 0.6
    garbage = probs.copy()
    garbage[~valid] = np.eye(K)[0]
    acc = M.MetricAccumulator([f"c{i}" for i in range(K)], ["gender", "corpus"])
    acc.update(garbage, targets, valid.astype(np.float32), groups, dims_pred, dims_true)
    expected = _accumulate(len(probs), probs, targets, groups, dims_pred, dims_true,
                           rows=np.flatnonzero(valid)).result()
    _assert_results_equal(acc.result(), expected)
    assert acc.result()["overall"]["count"] == valid.sum()


def test_accumulator_errors_and_empty():
    acc = M.MetricAccumulator(["a", "b"], ["gender"])
    assert np.isnan(acc.result()["overall"]["kl"])
    with pytest.raises(ValueError, match="gender"):
        acc.update(np.eye(2), np.eye(2), np.ones(2))
    with pytest.raises(ValueError, match="K"):
        acc.update(np.eye(3), np.eye(3), np.ones(3), {"gender": np.array(["f"] * 3)})
    with pytest.raises(ValueError, match="merge"):
        acc.merge(M.MetricAccumulator(["a", "b"]))


def test_metric_direction():
    for name in ("kl", "chebyshev", "clark", "canberra", "loss", "val_loss"):
        assert M.metric_direction(name) == "min"
    for name in ("cosine", "intersection", "accuracy", "wa", "ua", "macro_f1", "micro_f1",
                 "weighted_f1", "ccc_arousal", "ccc_mean"):
        assert M.metric_direction(name) == "max"
    with pytest.raises(ValueError):
        M.metric_direction("bogus")


def test_prior_and_majority_predictions():
    prior = np.array([1.0, 5.0, 2.0])
    p = M.prior_predictions(prior, 4)
    np.testing.assert_allclose(p, np.tile([0.125, 0.625, 0.25], (4, 1)))
    np.testing.assert_array_equal(M.majority_predictions(prior, 2), [[0, 1, 0], [0, 1, 0]])
    acc = M.MetricAccumulator(["a", "b", "c"])
    targets = np.eye(3)[[1, 1, 2, 0]]
    acc.update(M.majority_predictions(prior, 4), targets, np.ones(4))
    assert acc.result()["overall"]["wa"] == pytest.approx(0.5)
    assert acc.result()["overall"]["ua"] == pytest.approx(1 / 3)
