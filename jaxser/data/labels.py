"""Emotion taxonomies, harmonisation maps and label resolution for `jaxser prepare`.

A *taxonomy* is the ordered class list a model predicts (built-in: `em2ldl32`, `basic`,
`basic8`, `iemocap4`, stored as JSON in `jaxser/data/taxonomies/`; or a user JSON/YAML file). A
*harmonisation map* (JSON data in `jaxser/data/maps/`, or a user file) sends each label of a
source vocabulary to a soft distribution over a target taxonomy, or to null (the label has no
place: rows carrying it are rejected as "unmapped label").

Map file format (JSON, or YAML when PyYAML is installed)::

    {"source": "common", "target": "basic", "description": "...",
     "map": {"contempt": {"disgust": 0.5, "angry": 0.5}, "exc": "happy", "fru": null}}

A bare mapping without the "map" key is accepted too. A value is a class name (weight 1), a
mapping of class -> non-negative weight (normalised to sum 1), or null. Labels are matched
case-insensitively, with runs of spaces and hyphens read as "_" ("Pleasant surprise" ==
"pleasant_surprise").

Resolution of one source label with a target taxonomy (first match wins): the corpus'
primary maps (those whose source vocabulary holds the corpus' labels, then `common`, see
`map_chain`; or the user's map file alone); a label naming a taxonomy class (or an alias) is
that class; the other built-in maps for the taxonomy; else it is an "unknown label". Without
a taxonomy the corpus' own labels are the classes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# basic8 is basic without contempt, the generalizable-SER recipe's label set: its `common`
# map harmonises contempt as that paper does (disgust 0.5, the other half neutral).
BUILTIN_TAXONOMIES = ("em2ldl32", "basic", "basic8", "iemocap4")
NEUTRAL = "neutral"

# Reasons a row's label is rejected (rejected.csv "reason" column).
UNKNOWN_LABEL = "unknown label"
UNMAPPED_LABEL = "unmapped label"
WRONG_LENGTH = "distribution wrong length"
NEGATIVE_WEIGHTS = "negative weights"
ZERO_WEIGHTS = "all-zero weights"
BAD_DISTRIBUTION = "bad distribution"
MISSING_LABEL = "missing label"


class MapError(ValueError):
    """A harmonisation map or taxonomy file is malformed (raised before any audio is read)."""


class LabelError(ValueError):
    """A row's label cannot be turned into a target distribution; `reason` is its category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def normalize_name(name: Any) -> str:
    """Canonical spelling of a label or column name: lower case, spaces/hyphens as '_'."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def read_structured(path: Path) -> Any:
    """Reads a JSON file, or YAML when the suffix says so and PyYAML is installed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MapError(f"cannot read {path}: {e}") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise MapError(f"{path}: YAML needs PyYAML (pip install pyyaml); or use JSON") from e
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MapError(f"{path}: invalid YAML: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MapError(f"{path}: invalid JSON: {e}") from e


@dataclass(frozen=True)
class Taxonomy:
    """An ordered set of class names; `aliases` maps other spellings to a class."""

    name: str
    classes: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)

    _table: Mapping[str, int] = field(default_factory=dict, init=False, repr=False,
                                      compare=False)

    def __post_init__(self):
        if not self.classes:
            raise MapError(f"taxonomy {self.name!r} has no classes")
        table: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            key = normalize_name(c)
            if key in table:
                raise MapError(f"taxonomy {self.name!r} lists class {c!r} twice")
            table[key] = i
        for alias, target in self.aliases.items():
            if normalize_name(target) not in table:
                raise MapError(
                    f"taxonomy {self.name!r}: alias {alias!r} points to unknown class {target!r}"
                )
            table.setdefault(normalize_name(alias), table[normalize_name(target)])
        object.__setattr__(self, "_table", table)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, label: Any) -> int | None:
        """Class index of `label` (case-insensitive, aliases accepted), or None."""
        return self._table.get(normalize_name(label))

    def names(self) -> set[str]:
        """Every normalised spelling that names a class (classes and aliases)."""
        return set(self._table)

    def to_json(self) -> dict:
        return {"name": self.name, "classes": list(self.classes)}


def _taxonomy_from_data(data: Any, default_name: str, where: str) -> Taxonomy:
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise MapError(f"{where}: a taxonomy is a list of class names or "
                       f"{{'name': ..., 'classes': [...], 'aliases': {{...}}}}")
    classes = data["classes"]
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise MapError(f"{where}: every class must be a non-empty string")
    aliases = data.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise MapError(f"{where}: 'aliases' must be a mapping alias -> class")
    name = str(data.get("name") or default_name)
    try:
        return Taxonomy(name, tuple(c.strip() for c in classes), dict(aliases))
    except MapError as e:
        raise MapError(f"{where}: {e}") from e


def builtin_taxonomy(name: str) -> Taxonomy:
    """One of the built-in taxonomies (`em2ldl32`, `basic`, `basic8`, `iemocap4`)."""
    if name not in BUILTIN_TAXONOMIES:
        raise ValueError(f"unknown taxonomy {name!r}; built-in: {', '.join(BUILTIN_TAXONOMIES)}")
    text = resources.files("jaxser.data").joinpath("taxonomies", f"{name}.json").read_text()
    return _taxonomy_from_data(json.loads(text), name, f"built-in taxonomy {name}")


def load_taxonomy(name_or_file: str | Path) -> Taxonomy:
    """A built-in taxonomy by name, or a user taxonomy from a JSON/YAML file."""
    if str(name_or_file) in BUILTIN_TAXONOMIES:
        return builtin_taxonomy(str(name_or_file))
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(
            f"taxonomy {str(name_or_file)!r} is neither a built-in name "
            f"({', '.join(BUILTIN_TAXONOMIES)}) nor an existing JSON/YAML file"
        )
    return _taxonomy_from_data(read_structured(path), path.stem, str(path))


@dataclass(frozen=True)
class LabelMap:
    """A validated harmonisation map: normalised source label -> {class index: weight} | None."""

    name: str
    source: str | None
    target: str | None
    entries: Mapping[str, Mapping[int, float] | None]

    def lookup(self, label: str) -> tuple[bool, Mapping[int, float] | None]:
        """(found, distribution or None) for a normalised label."""
        if label in self.entries:
            return True, self.entries[label]
        return False, None


def _map_entry(value: Any, label: str, taxonomy: Taxonomy, where: str) -> dict[int, float] | None:
    """Validates one map value and returns its normalised distribution over class indices."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, dict):
        raise MapError(f"{where}: label {label!r} must map to a class name, a mapping "
                       f"class -> weight, or null; got {value!r}")
    if not value:
        raise MapError(f"{where}: label {label!r} maps to an empty distribution "
                       "(use null to reject the label)")
    dist: dict[int, float] = {}
    for cls, weight in value.items():
        idx = taxonomy.index(cls)
        if idx is None:
            raise MapError(f"{where}: label {label!r} maps to {cls!r}, which is not a class of "
                           f"taxonomy {taxonomy.name!r} ({', '.join(taxonomy.classes)})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise MapError(f"{where}: label {label!r}: weight for {cls!r} is not a number")
        if not math.isfinite(weight) or weight < 0:
            raise MapError(f"{where}: label {label!r} has a negative or non-finite weight "
                           f"{weight!r} for {cls!r}")
        dist[idx] = dist.get(idx, 0.0) + float(weight)
    total = sum(dist.values())
    if total <= 0:
        raise MapError(f"{where}: label {label!r} has only zero weights (use null to reject it)")
    return {i: w / total for i, w in sorted(dist.items()) if w > 0}


def map_from_data(data: Any, taxonomy: Taxonomy, name: str) -> LabelMap:
    """Validates parsed map data against `taxonomy`; `name` is used in error messages."""
    if not isinstance(data, dict):
        raise MapError(f"map file {name}: expected a mapping label -> distribution")
    source = target = None
    entries_data = data
    if "map" in data:
        entries_data = data["map"]
        source, target = data.get("source"), data.get("target")
        if not isinstance(entries_data, dict):
            raise MapError(f"map file {name}: 'map' must be a mapping label -> distribution")
    if target is not None and str(target) != taxonomy.name:
        raise MapError(f"map file {name} targets taxonomy {target!r}, "
                       f"but the taxonomy is {taxonomy.name!r}")
    if not entries_data:
        raise MapError(f"map file {name} has no entries")
    entries: dict[str, dict[int, float] | None] = {}
    for label, value in entries_data.items():
        key = normalize_name(label)
        if not key:
            raise MapError(f"map file {name}: empty label")
        entry = _map_entry(value, str(label), taxonomy, f"map file {name}")
        if key in entries and entries[key] != entry:
            raise MapError(f"map file {name}: label {label!r} is listed twice, differently")
        entries[key] = entry
    return LabelMap(name, None if source is None else str(source), taxonomy.name, entries)


def load_map(path: str | Path, taxonomy: Taxonomy) -> LabelMap:
    """Reads and validates a user map file (JSON, or YAML with PyYAML) for `taxonomy`."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f"map file {path} does not exist")
    return map_from_data(read_structured(path), taxonomy, str(path))


def builtin_map_names() -> list[str]:
    """File names of the built-in maps (sorted)."""
    folder = resources.files("jaxser.data").joinpath("maps")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))


def known_label_names(extra_maps: Sequence[LabelMap] = ()) -> set[str]:
    """Every normalised label the built-in taxonomies and maps (and `extra_maps`) know.

    Used to recognise class columns in a manifest (the EM2LDL layout) without a taxonomy.
    """
    names: set[str] = set()
    for name in BUILTIN_TAXONOMIES:
        names |= builtin_taxonomy(name).names()
    for fname in builtin_map_names():
        data = json.loads(resources.files("jaxser.data").joinpath("maps", fname).read_text())
        names |= {normalize_name(k) for k in data.get("map", {})}
    for m in extra_maps:
        names |= set(m.entries)
    return names


def builtin_maps(taxonomy: Taxonomy) -> list[LabelMap]:
    """The built-in maps whose target is `taxonomy` (by name), validated, sorted by file name."""
    out = []
    for fname in builtin_map_names():
        text = resources.files("jaxser.data").joinpath("maps", fname).read_text()
        data = json.loads(text)
        if data.get("target") == taxonomy.name:
            out.append(map_from_data(data, taxonomy, fname))
    return out


def map_chain(maps: Sequence[LabelMap], vocabulary: Iterable[str]
              ) -> tuple[list[LabelMap], list[LabelMap]]:
    """Orders maps for a corpus: (primary maps, fallback maps).

    Primary: the maps whose source taxonomy holds every label of the corpus' vocabulary
    (e.g. `em2ldl32` for EM2LDL's class columns), then `common`. Fallback (consulted only
    after a label failed to name a taxonomy class): the rest. Each group is sorted by name.
    This lets `boredom` mean Plutchik's mild disgust in EM2LDL and EmoDB's boredom
    elsewhere, and `contempt` stay contempt in a basic-taxonomy corpus.
    """
    vocab = {normalize_name(v) for v in vocabulary}

    def rank(m: LabelMap) -> int:
        if m.source in BUILTIN_TAXONOMIES and vocab <= builtin_taxonomy(m.source).names():
            return 0
        return 1 if m.source == "common" else 2

    ordered = sorted(maps, key=lambda m: (rank(m), m.name))
    return [m for m in ordered if rank(m) < 2], [m for m in ordered if rank(m) == 2]


class LabelResolver:
    """Turns one row's source label weights into a float32 distribution over the taxonomy.

    Weights are source label -> non-negative number (a hard label is {label: 1}; class
    columns give probabilities or vote counts). Each label is mapped (see the module
    docstring), mass on labels mapped to null is dropped, the rest is normalised to sum 1,
    then `neutral_smoothing` a mixes in: (1 - a) * p + a * onehot(neutral).
    """

    def __init__(self, taxonomy: Taxonomy, maps: Sequence[LabelMap] = (),
                 neutral_smoothing: float = 0.0, fallback_maps: Sequence[LabelMap] = ()):
        self.taxonomy = taxonomy
        self.maps = list(maps)
        self.fallback_maps = list(fallback_maps)
        self.neutral_smoothing = float(neutral_smoothing)
        self.neutral_index = check_neutral_smoothing(taxonomy, neutral_smoothing)
        self._cache: dict[str, tuple[str, Mapping[int, float] | None]] = {}

    def map_label(self, label: str) -> tuple[str, Mapping[int, float] | None]:
        """('ok', dist) | ('null', None) | ('unknown', None) for one source label."""
        key = normalize_name(label)
        if key not in self._cache:
            idx = self.taxonomy.index(key)
            identity = [] if idx is None else [("ok", {idx: 1.0})]
            result = next(
                (r for r in [*(self._lookup(m, key) for m in self.maps), *identity,
                             *(self._lookup(m, key) for m in self.fallback_maps)] if r),
                ("unknown", None))
            self._cache[key] = result
        return self._cache[key]

    @staticmethod
    def _lookup(m: LabelMap, key: str) -> tuple[str, Mapping[int, float] | None] | None:
        found, dist = m.lookup(key)
        if not found:
            return None
        return ("ok", dist) if dist is not None else ("null", None)

    def effective_map(self, labels: Iterable[str]) -> dict[str, dict[str, float] | None]:
        """label -> {class name: weight} | None for the labels given (for dataset.json)."""
        out: dict[str, dict[str, float] | None] = {}
        for label in labels:
            status, dist = self.map_label(label)
            if status == "ok":
                out[label] = {self.taxonomy.classes[i]: w for i, w in dist.items()}
            elif status == "null":
                out[label] = None
        return out

    def _finish(self, vec: np.ndarray) -> np.ndarray:
        vec = vec / vec.sum()
        a = self.neutral_smoothing
        if a > 0:
            vec = (1.0 - a) * vec
            vec[self.neutral_index] += a
        return vec.astype(np.float32)

    def resolve(self, weights: Mapping[str, float]) -> np.ndarray:
        """Distribution [K] for source label weights; raises LabelError with a reason."""
        if not weights:
            raise LabelError(MISSING_LABEL, "no label")
        _check_weights(list(weights.values()), list(weights))
        if sum(weights.values()) <= 0:
            raise LabelError(ZERO_WEIGHTS, "every weight is zero")
        vec = np.zeros(self.taxonomy.num_classes, np.float64)
        unmapped = []
        for label, w in weights.items():
            status, dist = self.map_label(label)
            if status == "unknown":
                if w == 0:
                    continue
                raise LabelError(UNKNOWN_LABEL, f"label {label!r} is not a class of "
                                 f"{self.taxonomy.name!r} and no map lists it{self._maps_note()}")
            if status == "null":
                unmapped.append(label)
                continue
            for i, p in dist.items():
                vec[i] += w * p
        if vec.sum() <= 0:
            raise LabelError(UNMAPPED_LABEL, f"{', '.join(map(repr, unmapped))} has no place in "
                             f"{self.taxonomy.name!r}{self._maps_note()}")
        return self._finish(vec)

    def resolve_vector(self, values: Sequence[float]) -> np.ndarray:
        """Distribution [K] for a list already in taxonomy order (raises LabelError)."""
        k = self.taxonomy.num_classes
        if len(values) != k:
            raise LabelError(WRONG_LENGTH, f"{len(values)} values for {k} classes")
        _check_weights(values, [str(i) for i in range(k)])
        vec = np.asarray(values, np.float64)
        if vec.sum() <= 0:
            raise LabelError(ZERO_WEIGHTS, "every weight is zero")
        return self._finish(vec)

    def _maps_note(self) -> str:
        names = [m.name for m in self.maps + self.fallback_maps]
        return f" (maps: {', '.join(names)})" if names else ""


def _check_weights(values: Sequence[Any], names: Sequence[str]) -> None:
    """Raises LabelError for non-numeric, non-finite or negative weights."""
    for name, v in zip(names, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LabelError(BAD_DISTRIBUTION, f"weight of {name!r} is {v!r}, not a finite number")
        if v < 0:
            raise LabelError(NEGATIVE_WEIGHTS, f"weight of {name!r} is {v}")


def check_neutral_smoothing(taxonomy: Taxonomy, amount: float) -> int | None:
    """Index of the neutral class when smoothing is asked for; ValueError if impossible."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"neutral_smoothing must be in [0, 1), got {amount}")
    if amount == 0:
        return None
    idx = taxonomy.index(NEUTRAL)
    if idx is None:
        raise ValueError(f"neutral_smoothing={amount} needs a 'neutral' class, which taxonomy "
                         f"{taxonomy.name!r} lacks ({', '.join(taxonomy.classes)})")
    return idx
