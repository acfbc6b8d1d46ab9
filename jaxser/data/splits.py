"""Train / validation / test splits for `jaxser prepare`, speaker-independent by default.

Spec strings (positional parts after the kind, then optional `key=value` options):

- `speaker:80/10/10` - speakers shuffled by the seed and dealt into train/validation/test
  in these proportions of *speakers* (two numbers: train/test). Every split with a non-zero
  share gets at least one speaker. Option `balance=gender+age`: speakers are stratified by
  those columns (a speaker's value is its most frequent one) and each stratum is spread over
  the splits in the same proportions.
- `kfold:K:I` - speakers dealt into K folds of (nearly) equal size; fold I (0-based) is the
  test split; validation is a fraction `val` (default 0.1, at least one speaker) of the
  remaining speakers; the rest is train. Options: `val=0.1`, `balance=...`.
- `logo:COLUMN=VALUE` - leave one group out: rows whose COLUMN equals VALUE (case-insensitive)
  are the test split; the other speakers are dealt into train and validation (`val`).
- `loco:CORPUS` - leave one corpus out (zero-shot evaluation): that corpus is the test split;
  the other corpora's speakers are dealt into train and validation (`val`).
- `column:NAME` - the manifest column NAME says train / validation / test per row (also
  accepted: val, valid, dev -> validation; eval -> test); other values are rejected rows.

Everything is deterministic by the seed. Speakers are namespaced (`corpus/speaker`). The
speaker overlap between splits is computed by `speaker_overlap`; `prepare` refuses overlap
unless explicitly allowed.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_VALUE_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "val": "validation", "valid": "validation",
    "dev": "validation", "development": "validation",
    "test": "test", "eval": "test", "evaluation": "test",
}
KINDS = ("speaker", "kfold", "logo", "loco", "column")
SPEC_HELP = ("split specs: speaker:80/10/10[:balance=gender+age], kfold:K:I[:val=0.1], "
             "logo:COLUMN=VALUE[:val=0.1], loco:CORPUS[:val=0.1], column:NAME")
DEFAULT_VAL_FRACTION = 0.1


class SplitError(ValueError):
    """A split spec is malformed or cannot be satisfied by the data."""


class SpeakerOverlapError(SplitError):
    """The same speaker appears in two splits (and overlap was not allowed)."""


class SplitItem(Protocol):
    """What a split needs to know about one row."""

    speaker: str
    corpus: str
    groups: Mapping[str, str]
    split_value: str


@dataclass(frozen=True)
class Item:
    """A plain SplitItem (for tests and callers without manifest records)."""

    speaker: str
    corpus: str = ""
    groups: Mapping[str, str] = field(default_factory=dict)
    split_value: str = ""


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split spec; `text` is the original string."""

    kind: str
    text: str
    ratios: tuple[float, ...] = ()  # speaker: shares of train/validation/test
    folds: int = 0  # kfold
    fold: int = 0  # kfold
    column: str = ""  # logo, column
    value: str = ""  # logo value, loco corpus
    balance: tuple[str, ...] = ()
    val_fraction: float = DEFAULT_VAL_FRACTION


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _spec_options(text: str, kind: str, parts: list[str]) -> tuple[list[str], dict[str, str]]:
    """(positional parts, key=value options) of a spec, options checked against the kind."""
    positional: list[str] = []
    options: dict[str, str] = {}
    for j, p in enumerate(parts):
        if "=" in p and not (kind == "logo" and j == 0):
            key, _, value = p.partition("=")
            options[_norm(key)] = value.strip()
        else:
            positional.append(p)
    allowed = {"speaker": {"balance"}, "column": set()}.get(kind, {"balance", "val"})
    unknown = set(options) - allowed
    if unknown:
        raise SplitError(f"unknown option(s) {sorted(unknown)} in split spec {text!r}; "
                         f"{kind} takes: {', '.join(sorted(allowed)) or 'no options'}")
    return positional, options


def _val_fraction(text: str, options: dict[str, str]) -> float:
    if "val" not in options:
        return DEFAULT_VAL_FRACTION
    try:
        val = float(options["val"])
    except ValueError:
        raise SplitError(f"val={options['val']!r} is not a number in {text!r}") from None
    if not 0.0 <= val < 1.0:
        raise SplitError(f"val must be in [0, 1), got {val} in {text!r}")
    return val


def _ratios(text: str, part: str) -> tuple[float, ...]:
    """train/validation/test shares (sum 1) from '80/10/10' or '80/20' (train/test)."""
    try:
        nums = [float(x) for x in part.split("/")]
    except ValueError:
        raise SplitError(f"split ratios {part!r} in {text!r} are not numbers") from None
    if len(nums) not in (2, 3) or any(not math.isfinite(x) or x < 0 for x in nums) \
            or sum(nums) <= 0:
        raise SplitError(f"split ratios {part!r} in {text!r} must be 2 or 3 non-negative "
                         "numbers with a positive sum")
    if len(nums) == 2:
        nums = [nums[0], 0.0, nums[1]]
    return tuple(x / sum(nums) for x in nums)


_FORMS = {"speaker": (1, "speaker:80/10/10 (train/validation/test) or speaker:80/20"),
          "kfold": (2, "kfold:K:I (K folds, fold I is test)"),
          "logo": (1, "logo:COLUMN=VALUE (e.g. logo:gender=female)"),
          "loco": (1, "loco:CORPUS"),
          "column": (1, "column:NAME (a manifest column with train/validation/test)")}


def parse_split_spec(text: str) -> SplitSpec:
    """Parses a spec string (see the module docstring); SplitError naming the problem."""
    parts = [p.strip() for p in str(text).split(":")]
    kind = parts[0].lower()
    if kind not in KINDS:
        raise SplitError(f"unknown split kind {parts[0]!r} in {text!r}; {SPEC_HELP}")
    positional, options = _spec_options(text, kind, parts[1:])
    count, form = _FORMS[kind]
    if len(positional) != count or not all(positional):
        raise SplitError(f"split spec {text!r} must look like {form}")
    balance = tuple(c.strip() for c in options.get("balance", "").split("+") if c.strip())
    val = _val_fraction(text, options)
    if kind == "speaker":
        return SplitSpec(kind, text, ratios=_ratios(text, positional[0]), balance=balance)
    if kind == "kfold":
        try:
            k, i = int(positional[0]), int(positional[1])
        except ValueError:
            raise SplitError(f"kfold needs integers K and I, got {text!r}") from None
        if k < 2 or not 0 <= i < k:
            raise SplitError(f"kfold:{k}:{i} needs K >= 2 and 0 <= I < K")
        return SplitSpec(kind, text, folds=k, fold=i, balance=balance, val_fraction=val)
    if kind == "logo":
        column, eq, value = positional[0].partition("=")
        if not eq or not column.strip() or not value.strip():
            raise SplitError(f"split spec {text!r} must look like {form}")
        return SplitSpec(kind, text, column=column.strip(), value=value.strip(),
                         balance=balance, val_fraction=val)
    if kind == "loco":
        return SplitSpec(kind, text, value=positional[0], balance=balance, val_fraction=val)
    return SplitSpec(kind, text, column=positional[0])


def canonical_split_value(value: str) -> str | None:
    """train / validation / test for a `column:` cell, or None when it is not one."""
    return SPLIT_VALUE_ALIASES.get(_norm(value)) if value else None


def _group_value(item: SplitItem, column: str) -> str | None:
    """The item's value of a group column matched case-insensitively (None if absent)."""
    key = _norm(column)
    aliases = {"lang": "language", "sex": "gender"}
    key = aliases.get(key, key)
    for k, v in item.groups.items():
        if _norm(k) == key:
            return v
    return None


def _counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Integer split sizes for n units (ratios normalised) by largest remainder; at least 1
    for each positive ratio."""
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    positive = [i for i, r in enumerate(ratios) if r > 0]
    if n < len(positive):
        raise SplitError(f"too few speakers: {n} speaker(s) for {len(positive)} non-empty "
                         "splits (ask for fewer splits, e.g. speaker:80/20, or use column:NAME)")
    exact = [r * n for r in ratios]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in positive:
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _deal(units: Sequence[str], counts: Sequence[int]) -> dict[str, int]:
    """Assigns units in order so every prefix is spread over the bins like `counts`.

    The next unit goes to the bin furthest below its quota (counts[b] * (i+1) / n); with
    units sorted by stratum this spreads every stratum proportionally (balanced splits).
    """
    n = len(units)
    have = [0] * len(counts)
    out = {}
    for i, unit in enumerate(units):
        open_bins = [b for b in range(len(counts)) if have[b] < counts[b]]
        b = max(open_bins, key=lambda b: (counts[b] * (i + 1) - have[b] * n, -b))
        have[b] += 1
        out[unit] = b
    return out


def _speaker_order(items: Sequence[SplitItem], speakers: Sequence[str],
                   balance: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Speakers shuffled by `rng`, then stably grouped by their balance stratum."""
    order = [speakers[i] for i in rng.permutation(len(speakers))]
    if not balance:
        return order
    values: dict[str, dict[str, Counter]] = {s: {c: Counter() for c in balance}
                                             for s in speakers}
    for it in items:
        if it.speaker in values:
            for c in balance:
                v = _group_value(it, c)
                if v is None:
                    raise SplitError(f"balance column {c!r} is not a column of the data "
                                     f"(columns: {', '.join(sorted(it.groups))})")
                values[it.speaker][c][v] += 1

    def stratum(s: str) -> tuple[str, ...]:
        return tuple(sorted(values[s][c].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
                     for c in balance)

    return sorted(order, key=stratum)


def _by_speaker(items: Sequence[SplitItem], idx: Sequence[int], ratios: Sequence[float],
                names: Sequence[str], balance: Sequence[str],
                rng: np.random.Generator) -> dict[int, str]:
    """Row index -> split name for rows `idx`, dealing their speakers by `ratios`."""
    speakers = sorted({items[i].speaker for i in idx})
    counts = _counts(len(speakers), ratios)
    order = _speaker_order([items[i] for i in idx], speakers, balance, rng)
    dealt = _deal(order, counts)
    return {i: names[dealt[items[i].speaker]] for i in idx}


def _train_val(items: Sequence[SplitItem], idx: Sequence[int], val: float,
               balance: Sequence[str], rng: np.random.Generator) -> dict[int, str]:
    """Rows `idx` into train and a `val` fraction of their speakers for validation."""
    if not idx:
        return {}
    n = len({items[i].speaker for i in idx})
    if val <= 0 or n < 2:
        return dict.fromkeys(idx, "train")
    return _by_speaker(items, idx, (1 - val, val), ("train", "validation"), balance, rng)


def _leave_one_out(items: Sequence[SplitItem], spec: SplitSpec,
                   rng: np.random.Generator) -> dict[int, str]:
    """logo / loco: the named group (or corpus) is test, the rest train + validation."""
    if spec.kind == "logo":
        values = [_group_value(it, spec.column) for it in items]
        if all(v is None for v in values):
            raise SplitError(f"split {spec.text!r}: no column {spec.column!r} in the data")
        label = f"{spec.column}={spec.value}"
        seen = sorted({v for v in values if v is not None})
    else:
        values = [it.corpus for it in items]
        label = f"corpus {spec.value}"
        seen = sorted(set(values))
    out = {i: "test" for i, v in enumerate(values)
           if v is not None and _norm(v) == _norm(spec.value)}
    if not out:
        raise SplitError(f"split {spec.text!r}: no row has {label} "
                         f"(values: {', '.join(seen[:20])})")
    rest = [i for i in range(len(items)) if i not in out]
    if not rest:
        raise SplitError(f"split {spec.text!r}: every row is in the test group")
    out.update(_train_val(items, rest, spec.val_fraction, spec.balance, rng))
    return out


def assign_splits(items: Sequence[SplitItem], spec: SplitSpec | str, seed: int = 0) -> list[str]:
    """The split name of every item (train / validation / test); SplitError if infeasible."""
    if isinstance(spec, str):
        spec = parse_split_spec(spec)
    if not items:
        raise SplitError("no rows to split")
    rng = np.random.default_rng(seed)
    all_idx = list(range(len(items)))
    if spec.kind == "speaker":
        out = _by_speaker(items, all_idx, spec.ratios, SPLITS, spec.balance, rng)
    elif spec.kind == "kfold":
        speakers = sorted({it.speaker for it in items})
        if len(speakers) < spec.folds:
            raise SplitError(f"too few speakers: {len(speakers)} speaker(s) for "
                             f"{spec.folds} folds")
        names = [str(f) for f in range(spec.folds)]
        folds = _by_speaker(items, all_idx, [1.0] * spec.folds, names, spec.balance, rng)
        out = {i: "test" for i, f in folds.items() if f == names[spec.fold]}
        rest = [i for i in all_idx if i not in out]
        out.update(_train_val(items, rest, spec.val_fraction, spec.balance, rng))
    elif spec.kind in ("logo", "loco"):
        out = _leave_one_out(items, spec, rng)
    else:
        out = {}
        for i, it in enumerate(items):
            value = canonical_split_value(it.split_value)
            if value is None:
                raise SplitError(f"split column value {it.split_value!r} is not one of "
                                 f"{', '.join(SPLIT_VALUE_ALIASES)}")
            out[i] = value
    return [out[i] for i in all_idx]


def speaker_overlap(items: Sequence[SplitItem], assignment: Sequence[str]) -> dict[str, list[str]]:
    """{"train/test": [speakers in both], ...} for every pair of splits sharing speakers."""
    by_split: dict[str, set[str]] = {}
    for it, name in zip(items, assignment, strict=True):
        by_split.setdefault(name, set()).add(it.speaker)
    names = [s for s in SPLITS if s in by_split] + sorted(set(by_split) - set(SPLITS))
    pairs = {}
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            both = sorted(by_split[a] & by_split[b])
            if both:
                pairs[f"{a}/{b}"] = both
    return pairs


def check_speaker_overlap(pairs: Mapping[str, Sequence[str]], allow: bool) -> None:
    """Raises SpeakerOverlapError describing `pairs` unless `allow` (or no overlap)."""
    if not pairs or allow:
        return
    desc = "; ".join(f"{k}: {len(v)} speaker(s) ({', '.join(list(v)[:5])}"
                     f"{', ...' if len(v) > 5 else ''})" for k, v in pairs.items())
    raise SpeakerOverlapError(f"speakers appear in more than one split ({desc}); a "
                              "speaker-independent evaluation needs disjoint speakers. Fix the "
                              "split, or pass allow_speaker_overlap=True "
                              "(--allow-speaker-overlap) to record it in dataset.json instead")
