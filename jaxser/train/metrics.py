"""Evaluation metrics (host-side numpy): label distributions, classes, dimensions.

- The six label-distribution metrics exactly as PyLDL (python-ldl 0.1.2, `pyldl.metrics`)
  defines them: Chebyshev, Clark, Canberra, KL, cosine, intersection. Clark, Canberra and
  KL clip both distributions to [EPS, 1] (EPS = float64 machine epsilon); cosine is
  1 - 0.5 |normalize(D) - normalize(P)|^2 (sklearn's paired cosine, zero rows stay zero);
  intersection is 1 - 0.5 sum |D - P|. Per-example values, then the mean.
- Classification on the argmax of prediction and target: WA (accuracy), UA (mean recall
  over the classes present in the truth, = sklearn's balanced accuracy), macro / micro /
  weighted F1 over labels range(K) with sklearn's zero_division=0, the confusion matrix.
- Concordance correlation coefficient per emotion dimension.

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
CLASSIFICATION_METRICS = ("accuracy", "wa", "ua", "macro_f1", "micro_f1", "weighted_f1")
DEFAULT_DIM_NAMES = ("arousal", "valence", "dominance")
_LOWER_IS_BETTER = {"kl", "chebyshev", "clark", "canberra"}
_HIGHER_IS_BETTER = {"cosine", "intersection", *CLASSIFICATION_METRICS, "ccc_mean"}
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


def _moments(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[D, 5] sums (p, y, p^2, y^2, p*y) over rows of pred, true [N, D]."""
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


def metric_direction(name: str) -> str:
    """'min' if lower is better for the metric (or any loss), 'max' if higher is better."""
    if name in _LOWER_IS_BETTER or name == "loss" or name.endswith("_loss"):
        return "min"
    if name in _HIGHER_IS_BETTER or name.startswith("ccc_"):
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
        self.count = 0
        self.ldl_sums = np.zeros(len(LDL_METRICS), np.float64)
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.dim_count = 0
        self.moments = np.zeros((num_dims, _NUM_MOMENTS), np.float64)

    def add(self, ldl: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
            dims: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Adds examples: ldl [n, 6] per-example LDL values, class ids [n], dims [n, D]."""
        self.count += len(y_true)
        self.ldl_sums += ldl.sum(0)
        self.confusion += confusion_matrix(y_true, y_pred, self.confusion.shape[0])
        if dims is not None:
            self.dim_count += len(y_true)
            self.moments += _moments(*dims)

    def merge(self, other: _Stats) -> None:
        self.count += other.count
        self.ldl_sums += other.ldl_sums
        self.confusion += other.confusion
        self.dim_count += other.dim_count
        self.moments += other.moments

    def arrays(self) -> dict[str, np.ndarray]:
        return {
                "count": np.asarray(self.count, np.int64), "ldl_sums": self.ldl_sums.copy(),
                "confusion": self.confusion.copy(),
                "dim_count": np.asarray(self.dim_count, np.int64),
                "moments": self.moments.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> _Stats:
        stats = cls(arrays["confusion"].shape[0], arrays["moments"].shape[0])
        stats.count = int(arrays["count"])
        stats.ldl_sums = np.array(arrays["ldl_sums"], np.float64)
        stats.confusion = np.array(arrays["confusion"], np.int64)
        stats.dim_count = int(arrays["dim_count"])
        stats.moments = np.array(arrays["moments"], np.float64)
        return stats

    def result(self, dim_names: Sequence[str]) -> dict:
        """Metrics of this slice (NaN where there are no examples)."""
        out: dict = {}
        for name, total in zip(LDL_METRICS, self.ldl_sums, strict=True):
            out[name] = float(total / self.count) if self.count else float("nan")
        out.update(classification_from_confusion(self.confusion))
        if self.dim_count:
            values = ccc_from_moments(self.dim_count, self.moments)
            for name, value in zip(dim_names, values, strict=True):
                out[f"ccc_{name}"] = float(value)
            out["ccc_mean"] = float(np.mean(values))
        out["count"] = int(self.count)
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
    """

    def __init__(
            self,
            label_names: Sequence[str],
            group_columns: Sequence[str] = (),
            dim_names: Sequence[str] = DEFAULT_DIM_NAMES,
    ):
        if not label_names:
            raise ValueError("label_names is empty")
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

    def _check_dims(self, dims_pred, dims_true, n: int):
        """(pred, true) [n, D] float64 arrays, or None when neither is given."""
        if dims_pred is None and dims_true is None:
            return None
        if dims_pred is None or dims_true is None:
            raise ValueError("dims_pred and dims_true must be given together")
        pred, true = _as_rows("dims_pred", dims_pred), _as_rows("dims_true", dims_true)
        if pred.shape != true.shape or pred.shape != (n, len(self.dim_names)):
            raise ValueError(
                    f"dims_pred {pred.shape} and dims_true {true.shape} must be "
                    f"[{n}, {len(self.dim_names)}] (dim_names={self.dim_names})")
        return pred, true

    def update(
            self,
            probs: np.ndarray,
            targets: np.ndarray,
            valid: np.ndarray,
            groups: dict[str, np.ndarray] | None = None,
            dims_pred: np.ndarray | None = None,
            dims_true: np.ndarray | None = None,
    ) -> None:
        """Adds a batch; rows with valid == 0 (batch padding) are ignored.

        Args:
            probs: [b, K] predicted distributions.
            targets: [b, K] true distributions (one-hot for hard labels).
            valid: [b] booleans or 0/1.
            groups: {column: [b] values} for every column in group_columns (values are
                compared as strings).
            dims_pred, dims_true: optional [b, D] predicted and true emotion dimensions.
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
        dims = self._check_dims(dims_pred, dims_true, b)
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
        probs, targets = probs[keep], targets[keep]
        if dims is not None:
            dims = (dims[0][keep], dims[1][keep])
        per_example = ldl_per_example(probs, targets)
        ldl = np.stack([per_example[name] for name in LDL_METRICS], axis=1)  # [n, 6]
        y_true, y_pred = np.argmax(targets, 1), np.argmax(probs, 1)
        self._overall.add(ldl, y_true, y_pred, dims)
        for column, v in values.items():
            for value in np.unique(v):
                rows = v == value
                sub_dims = None if dims is None else (dims[0][rows], dims[1][rows])
                stats = self._groups[column].setdefault(str(value), self._new_stats())
                stats.add(ldl[rows], y_true[rows], y_pred[rows], sub_dims)

    def _check_compatible(self, other: MetricAccumulator) -> None:
        if (other.label_names, other.group_columns, other.dim_names) != (
                self.label_names, self.group_columns, self.dim_names):
            raise ValueError("cannot merge accumulators with different labels, groups or dims")

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Adds the statistics of another accumulator (same labels/groups) to this one."""
        self._check_compatible(other)
        self._overall.merge(other._overall)
        for column, by_value in other._groups.items():
            for value, stats in by_value.items():
                self._groups[column].setdefault(value, self._new_stats()).merge(stats)
        return self

    def result(self) -> dict:
        """{"overall": {metric: value, ..., "count", "confusion"}, "groups": {col: {val: {..}}}}.

        Group values are sorted; a group has the same metric keys as overall, without the
        confusion matrix. Metrics of an empty slice are NaN.
        """
        overall = self._overall.result(self.dim_names)
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
                [str(x) for x in state["meta/dim_names"]])
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
