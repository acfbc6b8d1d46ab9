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
            del sub["confusion"], sub["tie_rule"]
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


# ----------------------------------------------------------------------------- tied targets


def _tied_data(seed: int = 5, n: int = 60):
    """Predictions and targets where known rows have a tied target argmax (issue 19).

    Ties as they arise: two classes at 0.45 after neutral smoothing (float32 arithmetic),
    two annotator votes each out of four, a three-way tie; plus near misses (0.46 / 0.45)
    that are not ties. Returns (probs, targets, tied_rows, first_tied_class, tied_sets).
    """
    rng = np.random.default_rng(seed)
    probs = _distributions(rng, n)
    targets = _distributions(rng, n, zero_frac=0.0)
    tied_sets = {}
    for i in rng.choice(n, size=18, replace=False):
        kind = len(tied_sets) % 3
        a, b, c = rng.choice(K, size=3, replace=False)
        row = np.zeros(K, np.float32)
        if kind == 0:  # 0.5 / 0.5 smoothed by 0.1 towards class c: 0.45 / 0.45 / 0.1
            row[[a, b]] = np.float32(0.9) * np.float32(0.5)
            row[c] += np.float32(0.1)
            tied_sets[i] = {a, b}
        elif kind == 1:  # votes 2 / 2 / 1 of 5
            row[[a, b]], row[c] = 2 / 5, 1 / 5
            tied_sets[i] = {a, b}
        else:  # a three-way tie
            row[[a, b, c]] = 1 / 3
            tied_sets[i] = {a, b, c}
        targets[i] = row
    for i in sorted(set(range(n)) - set(tied_sets))[:6]:  # near misses stay untied
        a, b = rng.choice(K, size=2, replace=False)
        targets[i] = 0.0
        targets[i, a], targets[i, b] = 0.46, 0.45
        targets[i, (b + 1) % K if (b + 1) % K != a else (b + 2) % K] = 0.09
    tied = np.zeros(n, bool)
    tied[list(tied_sets)] = True
    return probs, targets.astype(np.float32), tied, tied_sets


def _sklearn_classification(y_true, y_pred):
    f1 = lambda avg: skm.f1_score(y_true, y_pred, average=avg, labels=range(K), zero_division=0)
    return {"wa": skm.accuracy_score(y_true, y_pred),
            "ua": skm.balanced_accuracy_score(y_true, y_pred),
            "macro_f1": f1("macro"), "micro_f1": f1("micro"), "weighted_f1": f1("weighted")}


def _tie_accumulate(probs, targets, tie_rule, batch_size=7, groups=None):
    acc = M.MetricAccumulator([f"c{i}" for i in range(K)], list(groups or {}),
                              tie_rule=tie_rule)
    for s in range(0, len(probs), batch_size):
        sub = {c: v[s:s + batch_size] for c, v in (groups or {}).items()}
        acc.update(probs[s:s + batch_size], targets[s:s + batch_size],
                   np.ones(len(probs[s:s + batch_size])), sub)
    return acc


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_tied_targets_left_out_by_default_match_sklearn_on_untied_rows():
    probs, targets, tied, _ = _tied_data()
    acc = _tie_accumulate(probs, targets, "exclude")
    assert acc.tie_rule == "exclude"
    overall = acc.result()["overall"]
    keep = ~tied
    y_true, y_pred = targets[keep].argmax(1), probs[keep].argmax(1)
    for name, value in _sklearn_classification(y_true, y_pred).items():
        assert overall[name] == pytest.approx(value, rel=1e-12), name
    assert overall["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=range(K)).tolist()
    assert overall["tied_targets"] == tied.sum() == 18
    assert overall["classification_count"] == keep.sum()
    assert overall["count"] == len(probs) and overall["tie_rule"] == "exclude"
    # The LDL metrics keep every row (PyLDL on all of them).
    assert overall["kl"] == pytest.approx(pyldl_metrics.kl_divergence(targets, probs), rel=1e-9)
    assert overall["cosine"] == pytest.approx(pyldl_metrics.cosine(targets, probs), rel=1e-9)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_tied_targets_do_not_depend_on_class_order():
    """With the default rule a permutation of the taxonomy leaves WA/UA/F1 unchanged; with
    'first' (the old argmax behaviour) it changes them on these ties."""
    probs, targets, _, _ = _tied_data(6)
    perm = np.random.default_rng(0).permutation(K)
    while np.array_equal(perm, np.arange(K)):
        perm = np.random.default_rng(1).permutation(K)
    names = ("wa", "ua", "macro_f1", "micro_f1", "weighted_f1")
    moved = {}
    for rule in ("exclude", "any", "first"):
        a = _tie_accumulate(probs, targets, rule).result()["overall"]
        b = _tie_accumulate(probs[:, perm], targets[:, perm], rule).result()["overall"]
        moved[rule] = any(abs(a[m] - b[m]) > 1e-12 for m in names)
        if rule == "exclude":
            for m in names:
                assert a[m] == pytest.approx(b[m], rel=1e-12), m
    assert moved["first"]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_tie_rules_first_and_any_match_sklearn():
    probs, targets, tied, tied_sets = _tied_data(7)
    y_pred = probs.argmax(1)
    first = targets.argmax(1)
    for i, classes in tied_sets.items():
        first[i] = min(classes)
    any_true = first.copy()
    for i, classes in tied_sets.items():
        if y_pred[i] in classes:
            any_true[i] = y_pred[i]
    # make sure 'any' differs from 'first' somewhere: predict the last tied class of a row
    i, classes = next(iter(tied_sets.items()))
    probs[i] = np.eye(K)[max(classes)]
    y_pred[i] = any_true[i] = max(classes)
    for rule, y_true in (("first", first), ("any", any_true)):
        overall = _tie_accumulate(probs, targets, rule).result()["overall"]
        for name, value in _sklearn_classification(y_true, y_pred).items():
            assert overall[name] == pytest.approx(value, rel=1e-12), (rule, name)
        assert overall["tied_targets"] == tied.sum()
        assert overall["classification_count"] == len(probs)


def test_tied_counts_per_group_merge_and_state():
    probs, targets, tied, _ = _tied_data(8)
    gender = np.where(np.arange(len(probs)) % 3 == 0, "female", "male")
    acc = _tie_accumulate(probs, targets, "exclude", groups={"gender": gender})
    result = acc.result()
    for value in ("female", "male"):
        g = result["groups"]["gender"][value]
        rows = gender == value
        assert g["tied_targets"] == (tied & rows).sum()
        assert g["classification_count"] == (~tied & rows).sum()
    rebuilt = M.MetricAccumulator.from_bytes(acc.to_bytes())
    assert rebuilt.tie_rule == "exclude"
    _assert_results_equal(rebuilt.result(), result)
    half = _tie_accumulate(probs[:30], targets[:30], "exclude", groups={"gender": gender[:30]})
    rest = _tie_accumulate(probs[30:], targets[30:], "exclude", groups={"gender": gender[30:]})
    _assert_results_equal(half.merge(rest).result(), result)
    with pytest.raises(ValueError, match="tie rule"):
        half.merge(_tie_accumulate(probs, targets, "first", groups={"gender": gender}))
    with pytest.raises(ValueError, match="tie_rule"):
        M.MetricAccumulator(["a", "b"], tie_rule="random")


def test_report_says_how_many_tied_rows_were_left_out():
    from jaxser import report as report_lib

    probs, targets, tied, _ = _tied_data(9)
    for rule in ("exclude", "first"):
        overall = _tie_accumulate(probs, targets, rule).result()["overall"]
        report = {"split": "test", "data_dir": "d", "checkpoint_step": 3, "labels": list("abcdef"),
                  "metrics": overall}
        text = report_lib.text_report(report)
        assert f"{tied.sum()} utterances with a tied top target class" in text
        assert f"tie rule {rule!r}" in text
        assert ("left out of" in text) == (rule == "exclude")
