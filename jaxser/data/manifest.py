"""Manifests for `jaxser prepare`: CSV/TSV or JSONL tables, one row per utterance.

Columns (names are matched case-insensitively, spaces and hyphens read as '_'):

- `path`: the audio file, relative to the manifest's folder (absolute paths work too).
  When there is no `path` column (or the cell is empty), the audio is `<id>.wav` beside the
  manifest or in a `wav/` folder under it (the EM2LDL layout; an id that already ends in an
  audio extension is used as is).
- `speaker` (required column; a row without one is rejected), optional `id` (default: the
  path without its extension, plus `@start-end` for segments), `corpus` (default: the
  manifest's file name without extension, or its folder's name when the file is called
  manifest/metadata/labels/index), `language`, `gender`, `age`, optional `start` / `end`
  (seconds) to cut a segment, and any other column, kept as a group column.
- Emotion dimensions: any of `arousal`, `valence`, `dominance` (see `jaxser.data.dimensions`
  for aliases and scales), numbers on the corpus' scale, an empty cell a missing value; an
  optional `dimension_scale` column declares the scale (e.g. `1-7`).
- The label (a category), one of (first found wins, in this order):
  `distribution`: JSON, a list in taxonomy order or a mapping label -> weight;
  one column per class holding probabilities or vote counts (detected by matching column
  names against the known class names: the taxonomy's, the built-in taxonomies' and the
  maps' labels; at least two);
  `label`: one class name of the corpus' own vocabulary.
  A row may carry a category, dimensions or both: with dimension columns, an empty label
  (empty `label`/`distribution` cell, or every class cell empty) means "no category" and the
  row keeps its dimensions; a row with neither is rejected ("missing label").
- Unknown speakers: a speaker cell `unknown` or `?` (any case) marks a row whose speaker is
  not known; `jaxser prepare` decides what such rows may do (`unknown_speakers`).

Aliases: `AudioID`/`audio_id`/`utt_id` -> id, `speaker ID`/`spk` -> speaker, `lang` -> language,
`emotion` -> label, `file`/`filename`/`filepath`/`audio_path` -> path, `sex` -> gender (an alias
applies only when the canonical column is absent). Speaker ids are namespaced by corpus
(`corpus/speaker`) so corpora never share a speaker; utterance ids are kept as given and must
be unique within their corpus.

Row numbers in rejected.csv count data records from 1 (the header is not a record).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxser.data import dimensions, labels

log = logging.getLogger(__name__)

RESERVED = ("path", "id", "speaker", "corpus", "language", "gender", "age", "label",
            "distribution", "start", "end", dimensions.SCALE_COLUMN)
UNKNOWN_SPEAKERS = ("unknown", "?")
KNOWN_GROUPS = ("corpus", "language", "gender", "age")
COLUMN_ALIASES = {
    "audioid": "id", "audio_id": "id", "utt_id": "id", "utterance_id": "id", "file_id": "id",
    "speaker_id": "speaker", "speakerid": "speaker", "spk": "speaker", "spk_id": "speaker",
    "lang": "language", "emotion": "label", "sex": "gender",
    "file": "path", "filename": "path", "file_name": "path", "filepath": "path",
    "file_path": "path", "audio_path": "path", "wav_path": "path",
}
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aiff", ".aif", ".au")
_GENERIC_STEMS = {"manifest", "metadata", "meta", "labels", "label", "index", "data"}
LABEL_FORMS = ("distribution", "classes", "label")

# Row-level rejection reasons decided from the manifest alone.
MISSING_FILE = "missing file"
MISSING_PATH = "missing path"
MISSING_SPEAKER = "missing speaker"
BAD_SEGMENT = "bad segment"
MALFORMED_ROW = "malformed row"
DUPLICATE_ID = "duplicate id"


class ManifestError(ValueError):
    """The file is not a usable manifest (wrong columns, unreadable, empty)."""


@dataclass(frozen=True)
class Rejection:
    """One rejected input row, as written to rejected.csv."""

    manifest: str
    row: int
    id: str
    path: str
    reason: str
    detail: str = ""


@dataclass
class Manifest:
    """A manifest read from disk, its columns classified."""

    path: Path
    header: list[str]  # original column names, in order
    columns: dict[str, str]  # reserved canonical name -> original column name
    label_form: str  # one of LABEL_FORMS
    class_columns: list[str]  # original names of the class columns (label_form "classes")
    group_columns: list[str]  # original names of the extra group columns
    split_column: str | None  # original name of the column a `column:` split reads
    rows: list[tuple[int, dict[str, Any] | None]]  # (row number, cells); None: malformed
    default_corpus: str = ""
    dim_columns: dict[str, str] = field(default_factory=dict)  # dimension -> original column

    def cell(self, row: dict[str, Any], name: str) -> Any:
        """The cell of reserved column `name` ('' when the column is absent or empty)."""
        col = self.columns.get(name)
        value = row.get(col) if col is not None else None
        return "" if value is None else value


@dataclass
class Record:
    """One manifest row that passed the checks made without audio."""

    manifest: str
    row: int
    id: str  # as given (or derived from the path); unique within its corpus
    path: str  # resolved audio file
    shown_path: str  # the path as the manifest gives it (for rejected.csv)
    speaker: str  # corpus/speaker
    corpus: str
    groups: dict[str, str]  # group column -> value (corpus, language, gender, age, extras)
    attrs: dict[str, str]  # the extra group columns only
    start: float | None
    end: float | None
    label: dict[str, Any] | list[Any] | None  # source weights, a list in taxonomy order, or
    # None: the row has no category (it has dimensions)
    split_value: str = ""
    target: Any = field(default=None, repr=False)  # np.float32 [K] or None, set by prepare
    dims: dict[str, float] = field(default_factory=dict)  # dimension -> value as given
    dim_scale: str = ""  # the row's dimension_scale cell
    unknown_speaker: bool = False  # the speaker cell said `unknown`
    dims_target: Any = field(default=None, repr=False)  # np.float32 [D] 0-1, set by prepare
    dims_mask: Any = field(default=None, repr=False)  # np.float32 [D], set by prepare

    @property
    def has_label(self) -> bool:
        return self.label is not None


def _text(value: Any) -> str:
    """A cell as a stripped string (JSONL numbers -> their JSON text)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any] | None]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        sample = f.read(4096)
        f.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        if path.suffix.lower() != ".tsv":
            first = sample.splitlines()[0] if sample else ""
            counts = {d: first.count(d) for d in (",", "\t", ";")}
            if counts[","] == 0 and max(counts.values()) > 0:
                delimiter = max(counts, key=counts.get)
        reader = csv.DictReader(f, delimiter=delimiter, skipinitialspace=True, restkey="\0extra")
        header = [(h or "").strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows: list[tuple[int, dict[str, Any] | None]] = []
        for n, rec in enumerate(reader, start=1):
            rows.append((n, None if "\0extra" in rec else rec))
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any] | None]]]:
    header: list[str] = []
    seen: set[str] = set()
    rows: list[tuple[int, dict[str, Any] | None]] = []
    with open(path, encoding="utf-8-sig") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            n += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                rows.append((n, None))
                continue
            rec = {str(k).strip(): v for k, v in rec.items()}
            for k in rec:
                if k not in seen:
                    seen.add(k)
                    header.append(k)
            rows.append((n, rec))
    return header, rows


def _read_json_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any] | None]]]:
    """JSONL; a `.json` file holding one JSON list of objects is read as the rows too."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            header: list[str] = []
            rows: list[tuple[int, dict[str, Any] | None]] = []
            for n, rec in enumerate(data, start=1):
                if not isinstance(rec, dict):
                    rows.append((n, None))
                    continue
                rec = {str(k).strip(): v for k, v in rec.items()}
                header.extend(k for k in rec if k not in header)
                rows.append((n, rec))
            return header, rows
    return _read_jsonl(path)


def default_corpus_name(path: Path) -> str:
    """The corpus of a manifest without a `corpus` column: its stem (or its folder's name)."""
    stem = path.stem
    if stem.lower() in _GENERIC_STEMS and path.resolve().parent.name:
        return path.resolve().parent.name
    return stem


def expected_columns_message() -> str:
    """The columns a manifest must have, for error messages."""
    return ("expected columns: 'path' (or 'id'/'AudioID' with the audio at <id>.wav beside the "
            "manifest or in wav/), 'speaker' (or 'speaker ID'), and a label: 'label' (a class "
            "name), 'distribution' (JSON list or mapping), or one column per class named like "
            "the taxonomy's classes (e.g. EM2LDL's ecstacy, joy, serenity, ...) and/or emotion "
            "dimensions (arousal, valence, dominance); optional: id, corpus, language, gender, "
            "age, start, end, dimension_scale, and other group columns")


def _reserved_columns(header: list[str]) -> dict[str, str]:
    """reserved canonical name -> original column: exact names first, then aliases."""
    columns: dict[str, str] = {}
    for h in header:
        key = labels.normalize_name(h)
        if key in RESERVED and key not in columns:
            columns[key] = h
    for h in header:
        key = COLUMN_ALIASES.get(labels.normalize_name(h))
        if key is not None and key not in columns:
            columns[key] = h
    return columns


def _dimension_columns(header: list[str], used: set[str]) -> dict[str, str]:
    """dimension -> original column: canonical names first, then aliases."""
    found: dict[str, str] = {}
    for canonical in (True, False):
        for h in header:
            if h in used:
                continue
            key = labels.normalize_name(h)
            dim = dimensions.column_dimension(key)
            if dim is None or (key == dim) != canonical or dim in found:
                continue
            found[dim] = h
    return {d: found[d] for d in dimensions.DIMENSIONS if d in found}


def _find_split_column(path: Path, header: list[str], split_column: str) -> str:
    matches = [h for h in header if labels.normalize_name(h) == labels.normalize_name(split_column)]
    if not matches:
        raise ManifestError(f"manifest {path} has no column {split_column!r} for the split "
                            f"spec 'column:{split_column}' (columns: {', '.join(header)})")
    return matches[0]


def _label_form(columns: dict[str, str], class_cols: list[str]) -> str:
    """distribution > class columns (at least two) > label; '' when there is none."""
    if "distribution" in columns:
        return "distribution"
    if len(class_cols) >= 2:
        return "classes"
    return "label" if "label" in columns else ""


def read_manifest(path: str | Path, class_names: set[str],
                  split_column: str | None = None) -> Manifest:
    """Reads and classifies a manifest's columns; ManifestError if it is not a manifest.

    `class_names` are the normalised names that count as class columns; `split_column` the
    column a `column:NAME` split spec reads (required then).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            header, rows = _read_json_rows(path)
        else:
            header, rows = _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise ManifestError(f"manifest {path}: duplicate columns {dup}")
    columns = _reserved_columns(header)
    split_col = None
    if split_column is not None:
        split_col = _find_split_column(path, header, split_column)
        columns = {k: v for k, v in columns.items() if v != split_col}
    used = set(columns.values()) | {split_col}
    dim_cols = _dimension_columns(header, used)
    used |= set(dim_cols.values())
    class_cols = [h for h in header if h not in used and labels.normalize_name(h) in class_names]
    form = _label_form(columns, class_cols)
    missing = [n for n, ok in (("speaker", "speaker" in columns),
                               ("path or id", "path" in columns or "id" in columns),
                               ("a label or a dimension", bool(form) or bool(dim_cols)))
               if not ok]
    if missing:
        raise ManifestError(f"manifest {path} is missing {', '.join(missing)}: it has columns "
                            f"[{', '.join(header)}]; {expected_columns_message()}")
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    class_cols = class_cols if form == "classes" else []
    groups = [h for h in header if h not in used and h not in class_cols]
    log.info("manifest %s: %d rows, label as %s%s%s", path, len(rows), form or "none",
             f" ({len(class_cols)} class columns)" if class_cols else "",
             f", dimensions {', '.join(dim_cols)}" if dim_cols else "")
    return Manifest(path=path, header=header, columns=columns, label_form=form,
                    class_columns=class_cols, group_columns=groups, split_column=split_col,
                    rows=rows, default_corpus=default_corpus_name(path), dim_columns=dim_cols)


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    return float(str(value).strip())


def _empty(cell: Any) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip())


def _parse_label(m: Manifest, row: dict[str, Any], has_dims: bool
                 ) -> dict[str, Any] | list[Any] | None:
    """The row's label payload, None for "no category" (an empty label, allowed when the
    manifest has dimension columns: `has_dims`); raises LabelError (missing label, bad
    distribution)."""
    if not m.label_form:
        return None
    if m.label_form == "label":
        label = _text(m.cell(row, "label"))
        if not label:
            if has_dims:
                return None
            raise labels.LabelError(labels.MISSING_LABEL, "empty label cell")
        return {label: 1.0}
    if m.label_form == "classes":
        if has_dims and all(_empty(row.get(col)) for col in m.class_columns):
            return None
        weights: dict[str, Any] = {}
        for col in m.class_columns:
            cell = row.get(col)
            if cell is None or (isinstance(cell, str) and not cell.strip()):
                weights[labels.normalize_name(col)] = 0.0
                continue
            try:
                weights[labels.normalize_name(col)] = _parse_float(cell)
            except ValueError:
                raise labels.LabelError(labels.BAD_DISTRIBUTION,
                                        f"column {col!r}: {cell!r} is not a number") from None
        return weights
    value = m.cell(row, "distribution")
    if isinstance(value, str):
        if not value.strip():
            if has_dims:
                return None
            raise labels.LabelError(labels.MISSING_LABEL, "empty distribution cell")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise labels.LabelError(labels.BAD_DISTRIBUTION, f"not JSON: {e}") from None
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    raise labels.LabelError(labels.BAD_DISTRIBUTION, "a distribution is a JSON list or mapping, "
                            f"got {type(value).__name__}")


def _parse_segment(m: Manifest, row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(start, end) seconds or None each; raises ValueError for bad values."""
    out = []
    for name in ("start", "end"):
        cell = _text(m.cell(row, name))
        if not cell:
            out.append(None)
            continue
        v = _parse_float(cell)
        if not v >= 0 or v == float("inf"):
            raise ValueError(f"{name}={cell!r}")
        out.append(v)
    start, end = out
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end {end} <= start {start}")
    return start, end


def _resolve_path(m: Manifest, row: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(resolved path or '', path as shown, candidates tried)."""
    base = m.path.resolve().parent
    cell = _text(m.cell(row, "path"))
    if cell:
        p = Path(cell).expanduser()
        p = p if p.is_absolute() else base / p
        return (str(p) if p.is_file() else ""), cell, [str(p)]
    ident = _text(m.cell(row, "id"))
    if not ident:
        return "", "", []
    name = ident if ident.lower().endswith(AUDIO_EXTENSIONS) else f"{ident}.wav"
    candidates = [base / name, base / "wav" / name]
    for c in candidates:
        if c.is_file():
            return str(c), str(c.relative_to(base)), [str(c)]
    return "", name, [str(c) for c in candidates]


def _default_id(shown_path: str, start: float | None, end: float | None) -> str:
    ident = shown_path
    for ext in AUDIO_EXTENSIONS:
        if ident.lower().endswith(ext):
            ident = ident[: -len(ext)]
            break
    if start is not None or end is not None:
        ident += f"@{start or 0:g}-{'' if end is None else f'{end:g}'}"
    return ident


def _parse_dims(m: Manifest, row: dict[str, Any]) -> dict[str, float]:
    """dimension -> value of the row's non-empty dimension cells; LabelError (bad dimension)
    for a cell that is not a finite number."""
    out = {}
    for dim, col in m.dim_columns.items():
        try:
            value = dimensions.parse_value(row.get(col))
        except ValueError as e:
            raise labels.LabelError(dimensions.BAD_DIMENSION, f"column {col!r}: {e}") from None
        if value is not None:
            out[dim] = value
    return out


def parse_records(m: Manifest) -> tuple[list[Record], list[Rejection]]:
    """Checks every row without touching audio: speaker, segment, label form, dimension
    values are numbers, file exists.

    Labels are only parsed here (into weights or a list); mapping them onto the taxonomy is
    the caller's job, and so are the dimensions' scales. Duplicate ids are the caller's job
    too (they span manifests). A row with neither a category nor a dimension value is
    rejected ("missing label").
    """
    records: list[Record] = []
    rejected: list[Rejection] = []
    name = str(m.path)
    for n, row in m.rows:
        if row is None:
            rejected.append(Rejection(name, n, "", "", MALFORMED_ROW,
                                      "not a JSON object / wrong number of fields"))
            continue
        corpus = _text(m.cell(row, "corpus")) or m.default_corpus
        resolved, shown, tried = _resolve_path(m, row)
        raw_id = _text(m.cell(row, "id")) or (_default_id(shown, None, None) if shown else "")

        def reject(reason: str, detail: str, ident: str = raw_id, shown: str = shown,
                   n: int = n) -> None:
            rejected.append(Rejection(name, n, ident, shown, reason, detail))

        speaker = _text(m.cell(row, "speaker"))
        if not speaker:
            reject(MISSING_SPEAKER, "empty speaker cell")
            continue
        try:
            start, end = _parse_segment(m, row)
        except ValueError as e:
            reject(BAD_SEGMENT, str(e))
            continue
        try:
            dims = _parse_dims(m, row)
            label = _parse_label(m, row, bool(m.dim_columns))
        except labels.LabelError as e:
            reject(e.reason, e.detail)
            continue
        if label is None and not dims:
            reject(labels.MISSING_LABEL, "no label and no dimension values" if m.label_form
                   else "no dimension values")
            continue
        if not shown:
            reject(MISSING_PATH, "no path and no id")
            continue
        ident = _text(m.cell(row, "id")) or _default_id(shown, start, end)
        if not resolved:
            reject(MISSING_FILE, "not found: " + " or ".join(tried), ident)
            continue
        groups = {"corpus": corpus}
        for g in KNOWN_GROUPS[1:]:
            if g in m.columns:
                groups[g] = _text(m.cell(row, g))
        attrs = {c: _text(row.get(c)) for c in m.group_columns}
        groups.update(attrs)
        split_value = _text(row.get(m.split_column)) if m.split_column else ""
        records.append(Record(
            manifest=name, row=n, id=ident, path=resolved, shown_path=shown,
            speaker=f"{corpus}/{speaker}", corpus=corpus, groups=groups, attrs=attrs,
            start=start, end=end, label=label, split_value=split_value, dims=dims,
            dim_scale=_text(m.cell(row, dimensions.SCALE_COLUMN)),
            unknown_speaker=speaker.lower() in UNKNOWN_SPEAKERS))
    return records, rejected
