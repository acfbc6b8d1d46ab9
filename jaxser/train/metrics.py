"""Evaluation metrics (host-side numpy): label distributions, classes, dimensions.

- The six label-distribution metrics exactly as PyLDL (python-ldl 0.1.2, `pyldl.metrics`)
  defines them: Chebyshev, Clark, Canberra, KL, cosine, intersection. Clark, Canberra and
  KL clip both distributions to [EPS, 1] (EPS = float64 machine epsilon); cosine is
  1 - 0.5 |normalize(D) - normalize(P)|^2 (sklearn's paired cosine, zero rows stay zero);
  intersection is 1 - 0.5 sum |D - P|. Per-example values, then the mean.
- Classification on the argmax of prediction and target: WA (accuracy), UA (mean recall
  over the classes present in the truth, = sklearn's balanced accuracy), macro / micro /
  weighted F1 over labels range(K) with sklearn's zero_division=0, the confusion matrix.
  A target whose largest value is shared by several classes (within TIE_TOLERANCE: 0.45 /
  0.45 after neutral smoothing, two annotator votes each) has no single true class. By
  default (`tie_rule='exclude'`, the usual practice of leaving out utterances without a
  plurality label) such rows are left out of the classification metrics and the confusion
  matrix; the LDL and CCC metrics keep them. `tie_rule='any'` keeps them and counts a
  prediction of any tied class as correct (else the row's true class is its first tied
  class); `tie_rule='first'` keeps them with the first tied class (taxonomy order) as the
  true class, so the metrics then depend on the order of the classes. Every result says how
  many rows had tied targets (`tied_targets`) and how many were classified
  (`classification_count`).
- Emotion dimensions, per dimension over the rows that have its value (`dims_mask`): the
  concordance correlation coefficient (CCC), Pearson's r and the mean absolute error (MAE),
  with their means over the dimensions (`ccc_mean`, `pearson_mean`, `mae_mean`) and
  `macro_f1_ccc`, the mean of macro-F1 and mean CCC (the MSP-Podcast challenge's two
  scores in one, for model selection of a multi-task model). Population moments; a
  constant prediction (the training-mean prior) scores CCC 0 and Pearson 0 (not NaN).
- Rows without a category (`label_mask` 0) are left out of the LDL and classification
  metrics (`labelled_count` says how many rows those average over) and keep their
  dimensions; `count` is every utterance.

`MetricAccumulator` keeps sufficient statistics only (sums of per-example values,
confusion matrices, CCC moments), overall and per group, so its result does not depend on
the batch size (up to float64 summation order) and states merge across hosts.
All inputs are computed in float64. Function arguments put the prediction first, like the
losses; KL is KL(target || prediction).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

EPS = np.finfo(np.float64).eps  # PyLDL's clipping floor

LDL_METRICS = ("kl", "cosine", "chebyshev", "clark", "canberra", "intersection")
TIE_RULES = ("exclude", "any", "first")  # see the module docstring
# Target values this close to the row's maximum tie with it (targets are stored as float32,
# whose rounding of e.g. 0.9 * 0.5 is far below this).
TIE_TOLERANCE = 1e-6
CLASSIFICATION_METRICS = ("accuracy", "wa", "ua", "macro_f1", "micro_f1", "weighted_f1")
DEFAULT_DIM_NAMES = ("arousal", "valence", "dominance")
_LOWER_IS_BETTER = {"kl", "chebyshev", "clark", "canberra"}
_HIGHER_IS_BETTER = {"cosine", "intersection", *CLASSIFICATION_METRICS, "ccc_mean",
                     "macro_f1_ccc"}
# CCC moments per dimension: sum p, sum y, sum p^2, sum y^2, sum p*y.
_NUM_MOMENTS = 5


def _as_rows(name: str, x: np.ndarray) -> np.ndarray:
    """x as a float64 [N, K] array; ValueError naming x otherwise."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, K], got shape {x.shape}")
    return x


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as sklearn's normalize does (near-zero rows unchanged)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * EPS] = 1.0
    return x / norms[:, None]


def ldl_per_example(probs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The six PyLDL label-distribution metrics per example.

    Args:
        probs: [N, K] predicted distributions.
        targets: [N, K] true distributions.
    Returns:
        {name: [N] values} for the names in LDL_METRICS.
    """
    p = _as_rows("probs", probs)
    d = _as_rows("targets", targets)
    if p.shape != d.shape:
        raise ValueError(f"probs shape {p.shape} does not match targets shape {d.shape}")
    dc, pc = np.clip(d, EPS, 1.0), np.clip(p, EPS, 1.0)
    abs_diff = np.abs(d - p)
    cos_gap = _normalize_rows(d) - _normalize_rows(p)
    return {
            "kl": np.sum(dc * (np.log(dc) - np.log(pc)), 1),
            "cosine": 1.0 - 0.5 * np.einsum("ij,ij->i", cos_gap, cos_gap),
            "chebyshev": np.max(abs_diff, 1),
            "clark": np.sqrt(np.sum(np.power(dc - pc, 2) / np.power(dc + pc, 2), 1)),
            "canberra": np.sum(np.abs(dc - pc) / (dc + pc), 1),
            "intersection": 1.0 - 0.5 * np.sum(abs_diff, 1),
    }


def ldl_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean of each LDL metric over the examples (what `pyldl.metrics.<name>` returns)."""
    return {name: float(np.mean(v)) for name, v in ldl_per_example(probs, targets).items()}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] int64 counts, rows = true class, columns = predicted class (as sklearn)."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be one [N]")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has a class outside [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def top_classes(targets: np.ndarray, tol: float = TIE_TOLERANCE) -> np.ndarray:
    """[N, K] booleans: the classes whose target is within `tol` of the row's maximum."""
    t = _as_rows("targets", targets)
    return t >= t.max(1, keepdims=True) - tol


def class_ids(probs: np.ndarray, targets: np.ndarray, tie_rule: str = "exclude"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, y_pred, keep, tied), each [N], for the classification metrics.

    y_pred is the argmax of probs; tied marks rows whose target maximum is shared (see
    `top_classes`); keep marks the rows the classification metrics use (all but the tied
    rows with tie_rule 'exclude'); y_true is the target argmax, for tied rows the predicted
    class if it is one of the tied classes ('any') or else the first tied class.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule={tie_rule!r}: use one of {', '.join(TIE_RULES)}")
    p, t = _as_rows("probs", probs), _as_rows("targets", targets)
    top = top_classes(t)
    tied = top.sum(1) > 1
    y_pred = np.argmax(p, 1)
    y_true = np.argmax(top, 1)  # the first tied class (the argmax itself when untied)
    if tie_rule == "any":
        hit = top[np.arange(len(y_pred)), y_pred]
        y_true = np.where(hit, y_pred, y_true)
    keep = ~tied if tie_rule == "exclude" else np.ones(len(y_true), bool)
    return y_true, y_pred, keep, tied


def classification_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """WA, UA and F1 scores from a [K, K] confusion matrix (rows true, columns predicted).

    Equal to sklearn's accuracy_score, balanced_accuracy_score and f1_score(average=...,
    labels=range(K), zero_division=0): macro F1 averages all K classes (a class absent from
    both truth and prediction scores 0), micro F1 equals WA, weighted F1 weights by support.
    UA averages recall over the classes present in the truth only. NaN without examples.
    """
    c = np.asarray(confusion, np.float64)
    n = c.sum()
    if n == 0:
        return {name: float("nan") for name in CLASSIFICATION_METRICS}
    tp = np.diag(c)
    support = c.sum(1)
    predicted = c.sum(0)
    present = support > 0
    wa = float(tp.sum() / n)
    ua = float(np.mean(tp[present] / support[present]))
    f1_den = 2 * tp + (predicted - tp) + (support - tp)
    f1 = np.where(f1_den > 0, 2 * tp / np.where(f1_den > 0, f1_den, 1.0), 0.0)
    return {
            "accuracy": wa,
            "wa": wa,
            "ua": ua,
            "macro_f1": float(np.mean(f1)),
            "micro_f1": wa,
            "weighted_f1": float(np.sum(f1 * support) / n),
    }


def ccc_from_moments(count: float, moments: np.ndarray) -> np.ndarray:
    """CCC per dimension from [D, 5] sums (p, y, p^2, y^2, p*y) over `count` examples.

    Population moments; NaN without examples, 0 when both sides are constant (0/0).
    """
    moments = np.asarray(moments, np.float64)
    if count == 0:
        return np.full(moments.shape[0], np.nan)
    sp, sy, spp, syy, spy = (moments[:, i] / count for i in range(_NUM_MOMENTS))
    var_p = np.maximum(spp - sp * sp, 0.0)
    var_y = np.maximum(syy - sy * sy, 0.0)
    cov = spy - sp * sy
    den = var_p + var_y + (sp - sy) ** 2
    return np.where(den > 0, 2 * cov / np.where(den > 0, den, 1.0), 0.0)


def pearson_from_moments(count, moments: np.ndarray) -> np.ndarray:
    """Pearson's r per dimension from [D, 5] sums over `count` ([D] or scalar) examples.

    NaN without examples, 0 when either side is constant (a constant prediction)."""
    moments = np.asarray(moments, np.float64)
    n = np.broadcast_to(np.asarray(count, np.float64), moments.shape[:1])
    safe = np.where(n > 0, n, 1.0)
    sp, sy, spp, syy, spy = (moments[:, i] / safe for i in range(_NUM_MOMENTS))
    # A variance within float64 rounding of 0 (a constant side: spp - sp^2 leaves ~1e-16
    # of spp) is 0, so a constant prediction gives r = 0, not rounding noise over noise.
    var_p = np.where(spp - sp * sp > 1e-12 * spp, spp - sp * sp, 0.0)
    var_y = np.where(syy - sy * sy > 1e-12 * syy, syy - sy * sy, 0.0)
    den = np.sqrt(var_p * var_y)
    r = np.where(den > 0, (spy - sp * sy) / np.where(den > 0, den, 1.0), 0.0)
    return np.where(n > 0, np.clip(r, -1.0, 1.0), np.nan)


def _moments(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[D, 5] sums (p, y, p^2, y^2, p*y) over rows of pred, true [N, D] (where mask [N, D])."""
    if mask is not None:
        pred, true = np.where(mask, pred, 0.0), np.where(mask, true, 0.0)
    return np.stack(
            [pred.sum(0), true.sum(0), (pred * pred).sum(0), (true * true).sum(0),
             (pred * true).sum(0)], axis=1)


def ccc(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Concordance correlation coefficient per dimension of [N, D] arrays -> [D]."""
    pred = _as_rows("pred", pred)
    true = _as_rows("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"pred shape {pred.shape} does not match true shape {true.shape}")
    return ccc_from_moments(pred.shape[0], _moments(pred, true))


def dimension_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """{"ccc", "pearson", "mae", "count"}: [D] each, per dimension over its masked rows."""
    pred, true = _as_rows("pred", pred), _as_rows("true", true)
    mask = np.ones(pred.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if pred.shape != true.shape or mask.shape != pred.shape:
        raise ValueError(f"pred {pred.shape}, true {true.shape} and mask {mask.shape} differ")
    n = mask.sum(0).astype(np.float64)
    moments = _moments(pred, true, mask)
    ccc_d = np.array([ccc_from_moments(n[d], moments[d:d + 1])[0] for d in range(n.size)])
    mae = np.where(mask, np.abs(pred - true), 0.0).sum(0)
    return {"ccc": ccc_d, "pearson": pearson_from_moments(n, moments),
            "mae": np.where(n > 0, mae / np.where(n > 0, n, 1.0), np.nan), "count": n}


def metric_direction(name: str) -> str:
    """'min' if lower is better for the metric (or any loss), 'max' if higher is better."""
    if name in _LOWER_IS_BETTER or name == "loss" or name.endswith("_loss") \
            or name.startswith("mae_"):
        return "min"
    if name in _HIGHER_IS_BETTER or name.startswith(("ccc_", "pearson_")):
        return "max"
    raise ValueError(f"unknown metric {name!r}")


def prior_predictions(prior: np.ndarray, n: int) -> np.ndarray:
    """n copies of the (normalised) prior distribution [K] -> [n, K]: a know-nothing model."""
    prior = np.asarray(prior, np.float64)
    if prior.ndim != 1 or prior.sum() <= 0 or np.any(prior < 0):
        raise ValueError("prior must be a non-negative [K] vector with a positive sum")
    return np.tile(prior / prior.sum(), (n, 1))


def majority_predictions(prior: np.ndarray, n: int) -> np.ndarray:
    """n one-hot predictions [n, K] of the prior's most frequent class."""
    prior = np.asarray(prior, np.float64)
    if prior.ndim != 1 or prior.size == 0:
        raise ValueError("prior must be a [K] vector")
    out = np.zeros((n, prior.size))
    out[:, int(np.argmax(prior))] = 1.0
    return out


class _Stats:
    """Sufficient statistics of one slice of the data (overall, or one group value)."""

    def __init__(self, num_classes: int, num_dims: int):
        self.count = 0  # every row
        self.labelled = 0  # rows with a category: the LDL metrics' denominator
        self.tied = 0  # examples whose target argmax is tied (see class_ids)
        self.ldl_sums = np.zeros(len(LDL_METRICS), np.float64)
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.dim_counts = np.zeros(num_dims, np.int64)  # rows with each dimension's value
        self.moments = np.zeros((num_dims, _NUM_MOMENTS), np.float64)
        self.abs_err = np.zeros(num_dims, np.float64)

    def add(self, ldl: np.ndarray, classes: tuple[np.ndarray, ...],
            dims: tuple[np.ndarray, np.ndarray, np.ndarray] | None, rows: int | None = None
            ) -> None:
        """Adds examples: ldl [n, 6] per-example LDL values and classes = `class_ids()`
        (y_true, y_pred, keep, tied) [n] each of the n rows with a category; dims
        (pred, true, mask) [m, D] of all m rows (`rows`, default n)."""
        y_true, y_pred, keep, tied = classes
        self.count += len(y_true) if rows is None else int(rows)
        self.labelled += len(y_true)
        self.tied += int(np.sum(tied))
        self.ldl_sums += ldl.sum(0)
        self.confusion += confusion_matrix(y_true[keep], y_pred[keep], self.confusion.shape[0])
        if dims is not None:
            pred, true, mask = dims
            self.dim_counts += mask.sum(0).astype(np.int64)
            self.moments += _moments(pred, true, mask)
            self.abs_err += np.where(mask, np.abs(pred - true), 0.0).sum(0)

    def merge(self, other: _Stats) -> None:
        self.count += other.count
        self.labelled += other.labelled
        self.tied += other.tied
        self.ldl_sums += other.ldl_sums
        self.confusion += other.confusion
        self.dim_counts += other.dim_counts
        self.moments += other.moments
        self.abs_err += other.abs_err

    def arrays(self) -> dict[str, np.ndarray]:
        return {
                "count": np.asarray(self.count, np.int64),
                "labelled": np.asarray(self.labelled, np.int64),
                "ldl_sums": self.ldl_sums.copy(),
                "tied": np.asarray(self.tied, np.int64),
                "confusion": self.confusion.copy(),
                "dim_counts": self.dim_counts.copy(),
                "moments": self.moments.copy(),
                "abs_err": self.abs_err.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> _Stats:
        stats = cls(arrays["confusion"].shape[0], arrays["moments"].shape[0])
        stats.count = int(arrays["count"])
        stats.labelled = int(arrays.get("labelled", arrays["count"]))
        stats.tied = int(arrays["tied"])
        stats.ldl_sums = np.array(arrays["ldl_sums"], np.float64)
        stats.confusion = np.array(arrays["confusion"], np.int64)
        stats.dim_counts = np.array(arrays["dim_counts"], np.int64)
        stats.moments = np.array(arrays["moments"], np.float64)
        stats.abs_err = np.array(arrays["abs_err"], np.float64)
        return stats

    def result(self, dim_names: Sequence[str]) -> dict:
        """Metrics of this slice (NaN where there are no examples)."""
        out: dict = {}
        for name, total in zip(LDL_METRICS, self.ldl_sums, strict=True):
            out[name] = float(total / self.labelled) if self.labelled else float("nan")
        out.update(classification_from_confusion(self.confusion))
        if self.dim_counts.any():
            n = self.dim_counts.astype(np.float64)
            ccc_d = np.array([ccc_from_moments(n[d], self.moments[d:d + 1])[0]
                              for d in range(n.size)])
            pearson = pearson_from_moments(n, self.moments)
            mae = np.where(n > 0, self.abs_err / np.where(n > 0, n, 1.0), np.nan)
            for i, name in enumerate(dim_names):
                out[f"ccc_{name}"] = float(ccc_d[i])
                out[f"pearson_{name}"] = float(pearson[i])
                out[f"mae_{name}"] = float(mae[i])
                out[f"count_{name}"] = int(n[i])
            has = n > 0
            out["ccc_mean"] = float(np.mean(ccc_d[has]))
            out["pearson_mean"] = float(np.mean(pearson[has]))
            out["mae_mean"] = float(np.mean(mae[has]))
            if not np.isnan(out["macro_f1"]):
                out["macro_f1_ccc"] = 0.5 * (out["macro_f1"] + out["ccc_mean"])
        out["count"] = int(self.count)
        out["labelled_count"] = int(self.labelled)
        out["tied_targets"] = int(self.tied)
        out["classification_count"] = int(self.confusion.sum())
        return out


class MetricAccumulator:
    """Accumulates evaluation metrics over batches, overall and per group.

    Usage: `update()` per batch, `result()` at the end. `state()` gives plain numpy arrays
    (with `to_bytes()` a single uint8 array, for an all-gather across hosts);
    `from_state()` / `from_bytes()` rebuild an accumulator and `merge()` adds another one.

    Args:
        label_names: the K class names of the taxonomy (order of the probability columns).
        group_columns: names of the group columns (gender, age, corpus, ...) reported
            separately; `update()` must then receive an array of values for each.
        dim_names: names of the emotion dimensions passed as dims_pred / dims_true
            (keys `ccc_<name>` plus `ccc_mean`).
        tie_rule: what the classification metrics do with rows whose target argmax is
            tied: 'exclude' (default: left out, counted in `tied_targets`), 'any' or
            'first' (see the module docstring).
    """

    def __init__(
            self,
            label_names: Sequence[str],
            group_columns: Sequence[str] = (),
            dim_names: Sequence[str] = DEFAULT_DIM_NAMES,
            tie_rule: str = "exclude",
    ):
        if not label_names:
            raise ValueError("label_names is empty")
        if tie_rule not in TIE_RULES:
            raise ValueError(f"tie_rule={tie_rule!r}: use one of {', '.join(TIE_RULES)}")
        self.tie_rule = tie_rule
        self.label_names = [str(n) for n in label_names]
        self.group_columns = [str(c) for c in group_columns]
        self.dim_names = [str(n) for n in dim_names]
        self._overall = self._new_stats()
        self._groups: dict[str, dict[str, _Stats]] = {c: {} for c in self.group_columns}

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def _new_stats(self) -> _Stats:
        return _Stats(self.num_classes, len(self.dim_names))

    def _check_dims(self, dims_pred, dims_true, n: int, dims_mask=None):
        """(pred, true, mask) [n, D] arrays, or None when neither is given."""
        if dims_pred is None and dims_true is None:
            return None
        if dims_pred is None or dims_true is None:
            raise ValueError("dims_pred and dims_true must be given together")
        pred, true = _as_rows("dims_pred", dims_pred), _as_rows("dims_true", dims_true)
        if pred.shape != true.shape or pred.shape != (n, len(self.dim_names)):
            raise ValueError(
                    f"dims_pred {pred.shape} and dims_true {true.shape} must be "
                    f"[{n}, {len(self.dim_names)}] (dim_names={self.dim_names})")
        mask = np.ones(pred.shape, bool) if dims_mask is None else \
            np.asarray(dims_mask).astype(bool)
        if mask.shape != pred.shape:
            raise ValueError(f"dims_mask {mask.shape} is not {pred.shape}")
        return pred, true, mask

    def update(
            self,
            probs: np.ndarray,
            targets: np.ndarray,
            valid: np.ndarray,
            groups: dict[str, np.ndarray] | None = None,
            dims_pred: np.ndarray | None = None,
            dims_true: np.ndarray | None = None,
            dims_mask: np.ndarray | None = None,
            label_mask: np.ndarray | None = None,
    ) -> None:
        """Adds a batch; rows with valid == 0 (batch padding) are ignored.

        Args:
            probs: [b, K] predicted distributions.
            targets: [b, K] true distributions (one-hot for hard labels).
            valid: [b] booleans or 0/1.
            groups: {column: [b] values} for every column in group_columns (values are
                compared as strings).
            dims_pred, dims_true: optional [b, D] predicted and true emotion dimensions.
            dims_mask: [b, D], 1 where the row has the dimension's value (default: all).
            label_mask: [b], 0 for a row without a category: it counts in `count` and in
                the dimensions only (default: every row has one).
        """
        probs = _as_rows("probs", probs)
        targets = _as_rows("targets", targets)
        b = probs.shape[0]
        if probs.shape != targets.shape or probs.shape[1] != self.num_classes:
            raise ValueError(
                    f"probs {probs.shape} and targets {targets.shape} must be "
                    f"[b, {self.num_classes}] (K = len(label_names))")
        keep = np.asarray(valid).astype(bool).reshape(-1)
        if keep.shape != (b,):
            raise ValueError(f"valid shape {np.shape(valid)} is not [{b}]")
        dims = self._check_dims(dims_pred, dims_true, b, dims_mask)
        labelled = np.ones(b, bool) if label_mask is None else \
            np.asarray(label_mask).astype(bool).reshape(-1)
        if labelled.shape != (b,):
            raise ValueError(f"label_mask shape {np.shape(label_mask)} is not [{b}]")
        groups = groups or {}
        missing = [c for c in self.group_columns if c not in groups]
        if missing:
            raise ValueError(f"update() is missing group columns {missing}")
        values = {}
        for column in self.group_columns:
            v = np.asarray(groups[column]).astype(str).reshape(-1)
            if v.shape != (b,):
                raise ValueError(f"group column {column!r} has shape {v.shape}, not [{b}]")
            values[column] = v[keep]
        cat = labelled[keep]  # among the kept rows: those with a category
        probs, targets = probs[keep][cat], targets[keep][cat]
        if dims is not None:
            dims = tuple(d[keep] for d in dims)
        per_example = ldl_per_example(probs, targets)
        ldl = np.stack([per_example[name] for name in LDL_METRICS], axis=1)  # [n, 6]
        classes = class_ids(probs, targets, self.tie_rule)
        self._overall.add(ldl, classes, dims, int(cat.size))
        where = np.cumsum(cat) - 1  # kept row -> its position among the labelled rows
        for column, v in values.items():
            for value in np.unique(v):
                rows = v == value
                sub = where[rows & cat]
                sub_dims = None if dims is None else tuple(d[rows] for d in dims)
                stats = self._groups[column].setdefault(str(value), self._new_stats())
                stats.add(ldl[sub], tuple(c[sub] for c in classes), sub_dims, int(rows.sum()))

    def _check_compatible(self, other: MetricAccumulator) -> None:
        if (other.label_names, other.group_columns, other.dim_names, other.tie_rule) != (
                self.label_names, self.group_columns, self.dim_names, self.tie_rule):
            raise ValueError("cannot merge accumulators with different labels, groups, dims "
                             "or tie rules")

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Adds the statistics of another accumulator (same labels/groups) to this one."""
        self._check_compatible(other)
        self._overall.merge(other._overall)
        for column, by_value in other._groups.items():
            for value, stats in by_value.items():
                self._groups[column].setdefault(value, self._new_stats()).merge(stats)
        return self

    def result(self) -> dict:
        """{"overall": {metric: value, ..., "count", "tied_targets", "classification_count",
        "tie_rule", "confusion"}, "groups": {col: {val: {..}}}}.

        Group values are sorted; a group has the same metric keys as overall, without the
        confusion matrix and the tie rule. Metrics of an empty slice are NaN.
        """
        overall = self._overall.result(self.dim_names)
        overall["tie_rule"] = self.tie_rule
        overall["confusion"] = self._overall.confusion.tolist()
        groups = {
                column: {value: by_value[value].result(self.dim_names)
                         for value in sorted(by_value)}
                for column, by_value in self._groups.items()
        }
        return {"overall": overall, "groups": groups}

    def state(self) -> dict[str, np.ndarray]:
        """All statistics as a flat {key: numpy array} dict (keys name labels and groups)."""
        out = {
                "meta/label_names": np.asarray(self.label_names, dtype=str),
                "meta/group_columns": np.asarray(self.group_columns, dtype=str),
                "meta/dim_names": np.asarray(self.dim_names, dtype=str),
                "meta/tie_rule": np.asarray(self.tie_rule, dtype=str),
        }
        for key, value in self._overall.arrays().items():
            out[f"overall/{key}"] = value
        for c, column in enumerate(self.group_columns):
            group_values = sorted(self._groups[column])
            out[f"groups/{c}/values"] = np.asarray(group_values, dtype=str)
            for v, value in enumerate(group_values):
                for key, arr in self._groups[column][value].arrays().items():
                    out[f"groups/{c}/{v}/{key}"] = arr
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MetricAccumulator:
        """Rebuilds an accumulator from `state()`."""
        acc = cls(
                [str(x) for x in state["meta/label_names"]],
                [str(x) for x in state["meta/group_columns"]],
                [str(x) for x in state["meta/dim_names"]],
                str(state["meta/tie_rule"]))
        acc._overall = _Stats.from_arrays(_sub(state, "overall/"))
        for c, column in enumerate(acc.group_columns):
            for v, value in enumerate(state[f"groups/{c}/values"]):
                acc._groups[column][str(value)] = _Stats.from_arrays(
                        _sub(state, f"groups/{c}/{v}/"))
        return acc

    def to_bytes(self) -> np.ndarray:
        """`state()` serialised into one uint8 array, for an all-gather across hosts.

        The first 8 bytes hold the payload length (little-endian), so the array may be
        right-padded with anything (to a common length) before it is gathered.
        """
        buffer = io.BytesIO()
        np.savez(buffer, **self.state())
        payload = buffer.getvalue()
        header = np.asarray([len(payload)], "<u8").view(np.uint8)
        return np.concatenate([header, np.frombuffer(payload, np.uint8)])

    @classmethod
    def from_bytes(cls, data: np.ndarray) -> MetricAccumulator:
        """Rebuilds an accumulator from `to_bytes()` output (trailing padding allowed)."""
        data = np.asarray(data, np.uint8).reshape(-1)
        if data.size < 8:
            raise ValueError("accumulator bytes are too short")
        length = int(data[:8].view("<u8")[0])
        if data.size < 8 + length:
            raise ValueError(f"accumulator bytes are truncated ({data.size - 8} < {length})")
        with np.load(io.BytesIO(data[8:8 + length].tobytes())) as loaded:
            return cls.from_state({key: loaded[key] for key in loaded.files})


def _sub(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Entries of state under prefix, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
