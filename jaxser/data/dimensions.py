"""Emotion dimensions (arousal, valence, dominance): columns, scales, normalisation.

A manifest may carry any subset of the columns `arousal`, `valence`, `dominance` (aliases:
`activation`/`EmoAct` -> arousal, `EmoVal` -> valence, `EmoDom` -> dominance), on the scale
of its corpus: 1-7 for MSP-Podcast, 1-5 for IEMOCAP and MSP-IMPROV, 0-1, -1..1, ...
An empty cell is a missing value: masked out of the losses and the metrics, never imputed.

The scale of each (corpus, dimension) comes from, first match wins:

1. the `dimension_scale` option of `jaxser prepare` (`--dimension-scale`), a comma list of
   `[CORPUS:][DIMENSION=]LO-HI` items, e.g. `1-7`, `iemocap:1-5`, `msp_podcast:arousal=1-7`
   (the most specific item wins);
2. the manifest's `dimension_scale` column (e.g. `1-7`, written by the corpus adapters);
   every row of a corpus must give the same scale;
3. inference: the narrowest of STANDARD_SCALES that holds every value of the corpus
   (recorded as inferred in dataset.json, with a warning: declare the scale when you know it).

A value outside its declared scale, or one that is not a finite number, rejects the row
(rejected.csv reasons "dimension out of range" / "bad dimension"). Training sees every
dimension normalised to 0-1, (v - lo) / (hi - lo); reports give the metrics on the original
scale (CCC and Pearson do not change under a common affine map of truth and prediction; the
MAE and the means do) when all corpora of the data set share it, else on 0-1.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DIMENSIONS = ("arousal", "valence", "dominance")
# Normalised column name -> dimension (applies only when the canonical column is absent).
ALIASES = {"activation": "arousal", "emoact": "arousal", "emo_act": "arousal",
           "emoval": "valence", "emo_val": "valence",
           "emodom": "dominance", "emo_dom": "dominance"}
SCALE_COLUMN = "dimension_scale"
# Candidates of scale inference, narrowest first.
STANDARD_SCALES = ((0.0, 1.0), (-1.0, 1.0), (1.0, 5.0), (1.0, 7.0), (1.0, 9.0), (0.0, 10.0),
                   (0.0, 100.0), (-100.0, 100.0))

# rejected.csv reasons.
BAD_DIMENSION = "bad dimension"
OUT_OF_RANGE = "dimension out of range"

_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*(?:-|\.\.|to|:)\s*(-?\d+(?:\.\d*)?)\s*$")


class ScaleError(ValueError):
    """A scale or scale spec is malformed, or the rows of a corpus disagree on it."""


@dataclass(frozen=True)
class Scale:
    """A closed value range [lo, hi] of one dimension."""

    lo: float
    hi: float

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ScaleError(f"a scale needs finite lo < hi, got {self.lo}, {self.hi}")

    def __str__(self) -> str:
        return f"{self.lo:g}-{self.hi:g}"

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def normalise(self, value):
        """value on this scale -> 0-1."""
        return (value - self.lo) / (self.hi - self.lo)

    def original(self, value):
        """0-1 -> this scale."""
        return self.lo + value * (self.hi - self.lo)

    def to_json(self) -> list[float]:
        return [self.lo, self.hi]


def parse_scale(text: Any) -> Scale:
    """'1-7', '1..7', '-1-1', '0 to 100' -> Scale; ScaleError otherwise."""
    if isinstance(text, Scale):
        return text
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return Scale(float(text[0]), float(text[1]))
    m = _RANGE.match(str(text))
    if not m:
        raise ScaleError(f"{text!r} is not a scale like 1-7, 1..5 or -1..1")
    return Scale(float(m.group(1)), float(m.group(2)))


def column_dimension(normalised_name: str) -> str | None:
    """The dimension a (normalised) column name holds, or None."""
    if normalised_name in DIMENSIONS:
        return normalised_name
    return ALIASES.get(normalised_name)


@dataclass(frozen=True)
class ScaleSpec:
    """The parsed `dimension_scale` option: (corpus or '', dimension or '') -> Scale."""

    items: tuple[tuple[str, str, Scale], ...] = ()
    text: str = ""

    def lookup(self, corpus: str, dim: str) -> Scale | None:
        """The most specific item for (corpus, dim), or None."""
        best, rank = None, -1
        for c, d, scale in self.items:
            if (c and c != corpus) or (d and d != dim):
                continue
            r = 2 * bool(c) + bool(d)
            if r > rank:
                best, rank = scale, r
        return best


def parse_scale_spec(text: str | None) -> ScaleSpec:
    """`[CORPUS:][DIMENSION=]LO-HI[, ...]` -> ScaleSpec; ScaleError naming the bad item."""
    if not text:
        return ScaleSpec()
    items = []
    for raw in str(text).split(","):
        item = raw.strip()
        if not item:
            continue
        corpus = dim = ""
        rest = item
        if "=" in rest:
            head, _, rest = rest.partition("=")
            if ":" in head:
                corpus, _, head = head.partition(":")
            dim = column_dimension(re.sub(r"[\s\-]+", "_", head.strip().lower())) or ""
            if not dim:
                raise ScaleError(f"dimension_scale item {item!r}: {head.strip()!r} is not one "
                                 f"of {', '.join(DIMENSIONS)}")
        elif ":" in rest and not _RANGE.match(rest):
            corpus, _, rest = rest.partition(":")
        try:
            scale = parse_scale(rest)
        except ScaleError as e:
            raise ScaleError(f"dimension_scale item {item!r}: {e}") from None
        items.append((corpus.strip(), dim, scale))
    return ScaleSpec(tuple(items), str(text))


def parse_value(cell: Any) -> float | None:
    """A dimension cell -> float, None when empty; ValueError for non-numbers and NaN/inf."""
    if cell is None:
        return None
    if isinstance(cell, bool):
        raise ValueError(f"{cell!r} is not a number")
    if isinstance(cell, (int, float)):
        value = float(cell)
    else:
        text = str(cell).strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{cell!r} is not a finite number")
    return value


def infer_scale(values: Iterable[float]) -> Scale:
    """The narrowest standard scale holding all `values`; ScaleError when none does."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        raise ScaleError("no values to infer a scale from")
    lo, hi = float(v.min()), float(v.max())
    for a, b in STANDARD_SCALES:
        if a <= lo and hi <= b:
            return Scale(a, b)
    raise ScaleError(f"values from {lo:g} to {hi:g} fit none of the standard scales; declare "
                     "the scale (dimension_scale)")


@dataclass
class Resolution:
    """Where each (corpus, dimension) scale came from."""

    scales: dict[str, dict[str, Scale]]  # corpus -> dim -> scale
    sources: dict[str, dict[str, str]]  # corpus -> dim -> declared | manifest | inferred


def resolve_scales(values: Mapping[tuple[str, str], Sequence[float]],
                   manifest_scales: Mapping[str, set[str]], spec: ScaleSpec) -> Resolution:
    """The scale of every (corpus, dim) with values.

    values: (corpus, dim) -> the values seen; manifest_scales: corpus -> the distinct
    `dimension_scale` cells of its rows (empty cells left out).
    """
    scales: dict[str, dict[str, Scale]] = {}
    sources: dict[str, dict[str, str]] = {}
    for (corpus, dim), vals in sorted(values.items()):
        scale = spec.lookup(corpus, dim)
        source = "declared"
        if scale is None and manifest_scales.get(corpus):
            cells = {str(parse_scale(c)) for c in manifest_scales[corpus]}
            if len(cells) > 1:
                raise ScaleError(f"corpus {corpus}: rows give different dimension_scale values "
                                 f"{sorted(cells)}; one scale per corpus (or pass "
                                 "dimension_scale to prepare)")
            scale, source = parse_scale(cells.pop()), "manifest"
        if scale is None:
            scale, source = infer_scale(vals), "inferred"
            log.warning("corpus %s: %s scale inferred as %s from its values (%g to %g); "
                        "declare it with dimension_scale if that is wrong", corpus, dim, scale,
                        min(vals), max(vals))
        scales.setdefault(corpus, {})[dim] = scale
        sources.setdefault(corpus, {})[dim] = source
    return Resolution(scales, sources)


def reporting_scales(names: Sequence[str], scales: Mapping[str, Mapping[str, Scale]]
                     ) -> dict[str, Scale | None]:
    """dim -> the one scale all corpora share (the scale reports use), None when they differ."""
    out: dict[str, Scale | None] = {}
    for dim in names:
        found = {s for per in scales.values() for d, s in per.items() if d == dim}
        out[dim] = found.pop() if len(found) == 1 else None
    return out


def dataset_json(names: Sequence[str], res: Resolution) -> dict:
    """dataset.json `dimensions`: names (the order of `dims` in records and batches), scale
    (dim -> [lo, hi] that reports use, or null when corpora differ: reports use 0-1), corpora
    (corpus -> dim -> {scale, source}), normalised (always [0, 1])."""
    report = reporting_scales(names, res.scales)
    return {
        "names": list(names),
        "scale": {d: (s.to_json() if s is not None else None) for d, s in report.items()},
        "corpora": {c: {d: {"scale": s.to_json(), "source": res.sources[c][d]}
                        for d, s in per.items()} for c, per in res.scales.items()},
        "normalised": [0.0, 1.0],
    }


def names_of(info: Mapping) -> list[str]:
    """The dimension names of a dataset.json (empty for data sets without dimensions)."""
    dims = info.get("dimensions") or {}
    return list(dims.get("names") or [])


def report_scale(info: Mapping, dim: str) -> Scale:
    """The scale a report gives `dim` in: the data set's shared scale, else 0-1."""
    scale = ((info.get("dimensions") or {}).get("scale") or {}).get(dim)
    return parse_scale(scale) if scale else Scale(0.0, 1.0)


def to_report_scale(info: Mapping, values: np.ndarray) -> np.ndarray:
    """[..., D] normalised values -> the report scale of each dimension (`report_scale`)."""
    names = names_of(info)
    out = np.asarray(values, np.float64).copy()
    for i, dim in enumerate(names):
        out[..., i] = report_scale(info, dim).original(out[..., i])
    return out
