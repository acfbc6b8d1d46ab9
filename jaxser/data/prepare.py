"""`jaxser prepare`: manifests -> 16 kHz int16 shards, dataset.json and rejected.csv.

Order of work, so that mistakes surface before minutes of decoding:

1. the split spec, the taxonomy and the map files are parsed and validated (a malformed map
   or taxonomy is an immediate error naming the file and the label);
2. every manifest is read; one with the wrong columns is an immediate error naming the
   expected columns;
3. every row is checked without audio: speaker present, segment sane, label parseable and
   mappable onto the taxonomy, dimension values numbers inside their scale (`dimensions`),
   file exists, id not a duplicate, `column:` split value valid; failures become rows of
   rejected.csv;
4. rows are assigned to splits (speaker-independent unless the spec says otherwise); a split
   that cannot be made (too few speakers, unknown group) is an error, and so is a speaker in
   two splits unless `allow_speaker_overlap`. Rows whose speaker is unknown (`unknown_speakers`)
   take part in a `column:` split (they are left out of the overlap check), and are rejected
   from the splits that deal speakers unless each is made its own speaker;
5. audio is decoded in worker processes and streamed split by split into the shard writer;
   files that fail (unreadable, empty, silent, NaN/inf, too short/long) join rejected.csv.

Re-running is idempotent: dataset.json stores a fingerprint of everything that determines the
output (manifest bytes, every audio file's path, size and mtime, the taxonomy, the maps and
the options). When `out/dataset.json` has the same fingerprint and its shards exist, nothing
is rewritten. Otherwise the new output is written into a temporary folder inside `out` and
moved into place at the end, dataset.json last (its presence marks a complete data set);
shards of the previous run are removed, and so are temporary folders left by a killed run
(so two runs must not write into the same folder at once). A run whose every row is rejected
writes rejected.csv and raises, leaving the rest of `out` as it was.

Decoding workers are spawned processes (safe after TensorFlow/JAX started threads): a script
that calls `prepare(workers>0)` needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxser.constants import SAMPLE_RATE
from jaxser.data import decode, dimensions, labels, manifest, shards, splits

log = logging.getLogger(__name__)

# 2: records carry `label_mask` (and `dims`, `dims_mask` with dimensions); dataset.json has
# `dimensions` and per split `labelled`, `class_counts`, `dims`.
DATASET_VERSION = 2
PREPARE_VERSION = 2  # bump when the same inputs should produce different output
REJECTED_CSV = "rejected.csv"
REJECTED_COLUMNS = ("manifest", "row", "id", "path", "reason", "detail")
UNKNOWN_SPLIT_VALUE = "unknown split value"
UNKNOWN_SPEAKER = "unknown speaker"
# What rows with an unknown speaker do: auto (kept with a column: split, rejected from the
# splits that deal speakers), reject, utterance (each row its own speaker: it then takes
# part in any split, at the risk of putting one person on both sides).
UNKNOWN_SPEAKER_MODES = ("auto", "reject", "utterance")
# Group columns with more distinct values than this are left out of splits.<name>.groups.
MAX_GROUP_VALUES = 100
# Names the shard writer owns in the output folder (removed when a run replaces them).
_WRITER_FILES = ("dataset_info.json", "features.json")
_TMP_PREFIX = ".prepare-"  # the temporary folder inside out/ a run writes into


class PrepareError(ValueError):
    """prepare cannot produce a data set (e.g. every row rejected)."""


# ----------------------------------------------------------------------------- labels


def _taxonomy_and_maps(taxonomy: str | None, map_file: str | None
                       ) -> tuple[labels.Taxonomy | None, list[labels.LabelMap], bool]:
    """(taxonomy or None, candidate maps, whether the maps come from the user)."""
    tax = labels.load_taxonomy(taxonomy) if taxonomy else None
    if map_file:
        if tax is None:  # a map that names a built-in target brings its taxonomy along
            data = labels.read_structured(Path(map_file))
            target = data.get("target") if isinstance(data, dict) else None
            if target not in labels.BUILTIN_TAXONOMIES:
                raise labels.MapError(f"map file {map_file} needs a taxonomy: pass --taxonomy, or "
                                      "give the map a built-in 'target'")
            tax = labels.builtin_taxonomy(target)
        return tax, [labels.load_map(map_file, tax)], True
    return tax, (labels.builtin_maps(tax) if tax else []), False


def _own_taxonomy(manifests: Sequence[manifest.Manifest],
                  records: Sequence[manifest.Record]) -> labels.Taxonomy:
    """Without --taxonomy: class columns (manifest order) and distribution keys (first-seen
    order), then the values of `label` columns sorted."""
    ordered: dict[str, None] = {}
    for m in manifests:
        for col in m.class_columns:
            ordered.setdefault(labels.normalize_name(col))
    label_form = {str(m.path): m.label_form == "label" for m in manifests}
    single: set[str] = set()
    for r in records:
        if r.label is None:
            continue
        if isinstance(r.label, list):
            raise manifest.ManifestError(f"{r.manifest} row {r.row}: a distribution given as a "
                                         "list needs --taxonomy to name its classes")
        names = [labels.normalize_name(k) for k in r.label]
        if label_form[r.manifest]:
            single.update(names)
        else:
            for k in names:
                ordered.setdefault(k)
    classes = list(ordered) + sorted(single - set(ordered))
    if not classes:
        raise PrepareError("no labels found in the manifests (a data set with dimensions only "
                           "needs --taxonomy to name the classes of the emotion head)")
    name = next((b for b in labels.BUILTIN_TAXONOMIES
                 if tuple(classes) == labels.builtin_taxonomy(b).classes), "corpus")
    return labels.Taxonomy(name, tuple(classes), {})


def _vocabularies(manifests: Sequence[manifest.Manifest], records: Sequence[manifest.Record]
                  ) -> dict[str, list[str]]:
    """corpus -> its source labels (class columns and labels seen), first-seen order."""
    vocab: dict[str, dict[str, None]] = {}
    by_manifest_cols = {str(m.path): [labels.normalize_name(c) for c in m.class_columns]
                        for m in manifests}
    for r in records:
        v = vocab.setdefault(r.corpus, {})
        for c in by_manifest_cols[r.manifest]:
            v.setdefault(c)
        if isinstance(r.label, dict):
            for k in r.label:
                v.setdefault(labels.normalize_name(k))
    return {c: list(v) for c, v in vocab.items()}


def _resolve_labels(records: list[manifest.Record], resolvers: dict[str, labels.LabelResolver],
                    rejected: list[manifest.Rejection]) -> list[manifest.Record]:
    """Sets every record's target distribution; rejects the ones that cannot be mapped."""
    kept = []
    unknown: dict[str, Counter] = {}
    for r in records:
        if r.label is None:  # no category: the row carries dimensions only
            kept.append(r)
            continue
        res = resolvers[r.corpus]
        try:
            if isinstance(r.label, list):
                r.target = res.resolve_vector(r.label)
            else:
                r.target = res.resolve(r.label)
        except labels.LabelError as e:
            rejected.append(_reject(r, e.reason, e.detail))
            if e.reason == labels.UNKNOWN_LABEL and isinstance(r.label, dict):
                bad = [k for k in r.label if res.map_label(k)[0] == "unknown"]
                unknown.setdefault(r.corpus, Counter()).update(bad)
            continue
        kept.append(r)
    for corpus, counts in unknown.items():
        res = resolvers[corpus]
        maps = ", ".join(m.name for m in res.maps + res.fallback_maps) or "none"
        log.warning("corpus %s: labels unknown to taxonomy %s (maps: %s): %s", corpus,
                    resolvers[corpus].taxonomy.name, maps,
                    ", ".join(f"{k!r} x{n}" for k, n in counts.most_common()))
    return kept


def _mapping_json(resolvers: dict[str, labels.LabelResolver], vocab: dict[str, list[str]],
                  user_maps: bool) -> dict | None:
    """dataset.json `mapping`: the maps consulted and each corpus' effective label map."""
    files = sorted({m.name for r in resolvers.values() for m in r.maps + r.fallback_maps})
    corpora = {c: {"maps": [m.name for m in r.maps],
                   "fallback_maps": [m.name for m in r.fallback_maps],
                   "labels": r.effective_map(vocab[c])} for c, r in resolvers.items()}
    return {"files": files, "user_map": user_maps, "corpora": corpora}


# ----------------------------------------------------------------------------- rows


def _reject(r: manifest.Record, reason: str, detail: str = "") -> manifest.Rejection:
    return manifest.Rejection(r.manifest, r.row, r.id, r.shown_path, reason, detail)


def _drop_duplicates(records: list[manifest.Record], rejected: list[manifest.Rejection]
                     ) -> list[manifest.Record]:
    """Keeps the first row of each (corpus, id); later ones are rejected."""
    first: dict[tuple[str, str], manifest.Record] = {}
    kept = []
    for r in records:
        key = (r.corpus, r.id)
        if key in first:
            f = first[key]
            rejected.append(_reject(r, manifest.DUPLICATE_ID,
                                    f"same id as {f.manifest} row {f.row}"))
            continue
        first[key] = r
        kept.append(r)
    return kept


def _check_split_values(records: list[manifest.Record], rejected: list[manifest.Rejection]
                        ) -> list[manifest.Record]:
    kept = []
    for r in records:
        if splits.canonical_split_value(r.split_value) is None:
            rejected.append(_reject(r, UNKNOWN_SPLIT_VALUE,
                                    f"{r.split_value!r} is not train/validation/test"))
            continue
        kept.append(r)
    return kept


def _unknown_speakers(records: list[manifest.Record], spec: splits.SplitSpec, mode: str,
                      rejected: list[manifest.Rejection]) -> list[manifest.Record]:
    """Applies `unknown_speakers` to the rows whose speaker is unknown (see UNKNOWN_SPEAKER_MODES).
    """
    if mode not in UNKNOWN_SPEAKER_MODES:
        raise ValueError(f"unknown_speakers must be one of {UNKNOWN_SPEAKER_MODES}, got {mode!r}")
    kept = []
    for r in records:
        if not r.unknown_speaker:
            kept.append(r)
        elif mode == "utterance":
            r.speaker = f"{r.corpus}/unknown:{r.id}"
            kept.append(r)
        elif mode == "auto" and spec.kind == "column":
            r.speaker = f"{r.corpus}/unknown"
            kept.append(r)
        else:
            why = ("unknown_speakers=reject" if mode == "reject" else
                   f"a {spec.kind}: split deals speakers and this row's speaker is not known; "
                   "use a column: split (e.g. the corpus' official one), or "
                   "unknown_speakers=utterance (--unknown-speakers utterance) to make each such "
                   "row its own speaker")
            rejected.append(_reject(r, UNKNOWN_SPEAKER, why))
    return kept


def _known(records: Sequence[manifest.Record], assignment: Sequence[str]
           ) -> tuple[list[manifest.Record], list[str]]:
    """The records (and their splits) whose speaker is known: the overlap check's input."""
    pairs = [(r, a) for r, a in zip(records, assignment, strict=True)
             if not (r.unknown_speaker and r.speaker.endswith("/unknown"))]
    return [r for r, _ in pairs], [a for _, a in pairs]


def _dimension_names(records: Sequence[manifest.Record]) -> list[str]:
    """The dimensions with a value in some row, in DIMENSIONS order."""
    seen = {d for r in records for d in r.dims}
    return [d for d in dimensions.DIMENSIONS if d in seen]


def _resolve_dimensions(records: list[manifest.Record], names: Sequence[str],
                        spec: dimensions.ScaleSpec, rejected: list[manifest.Rejection]
                        ) -> tuple[list[manifest.Record], dimensions.Resolution]:
    """Scales of every (corpus, dimension); rows with a value outside its scale are rejected;
    the others get `dims_target` (0-1, 0 where missing) and `dims_mask`."""
    values: dict[tuple[str, str], list[float]] = {}
    declared: dict[str, set[str]] = {}
    for r in records:
        for d, v in r.dims.items():
            values.setdefault((r.corpus, d), []).append(v)
        if r.dims and r.dim_scale:
            declared.setdefault(r.corpus, set()).add(r.dim_scale)
    try:
        res = dimensions.resolve_scales(values, declared, spec)
    except dimensions.ScaleError as e:
        raise manifest.ManifestError(str(e)) from None
    kept = []
    for r in records:
        scales = res.scales.get(r.corpus, {})
        bad = [f"{d}={v:g} is outside {scales[d]} ({res.sources[r.corpus][d]} scale of corpus "
               f"{r.corpus})" for d, v in r.dims.items() if not scales[d].contains(v)]
        if bad:
            rejected.append(_reject(r, dimensions.OUT_OF_RANGE, "; ".join(bad)))
            continue
        r.dims_target = np.array([scales[d].normalise(r.dims[d]) if d in r.dims else 0.0
                                  for d in names], np.float32)
        r.dims_mask = np.array([d in r.dims for d in names], np.float32)
        kept.append(r)
    return kept, res


def _write_rejected(path: Path, rejected: Sequence[manifest.Rejection],
                    order: dict[str, int]) -> None:
    rows = sorted(rejected, key=lambda r: (order.get(r.manifest, 0), r.row))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REJECTED_COLUMNS)
    for r in rows:
        w.writerow([r.manifest, r.row, r.id, r.path, r.reason, r.detail])
    path.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------- fingerprint


def _fingerprint(options: dict, manifests: Sequence[manifest.Manifest], tax: labels.Taxonomy,
                 maps: Sequence[labels.LabelMap], records: Sequence[manifest.Record]) -> str:
    """sha256 of everything that determines the output."""
    h = hashlib.sha256()
    payload = {
        "prepare_version": PREPARE_VERSION,
        "options": options,
        "taxonomy": [tax.name, list(tax.classes), sorted(tax.aliases.items())],
        "maps": [[m.name, sorted((k, None if v is None else sorted(v.items()))
                                 for k, v in m.entries.items())] for m in maps],
        "manifests": [[str(m.path.resolve()), hashlib.sha256(m.path.read_bytes()).hexdigest()]
                      for m in manifests],
    }
    h.update(json.dumps(payload, sort_keys=True).encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> dict | None:
    """The existing dataset.json when it has this fingerprint and its shards exist."""
    path = out / shards.DATASET_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != fingerprint:
        return None
    files = [f for s in info.get("splits", {}).values() for f in s.get("files", [])]
    if not all((out / f).is_file() for f in files) or not (out / REJECTED_CSV).is_file():
        return None
    return info


# ----------------------------------------------------------------------------- writing


class _SplitStats:
    """Running statistics of one split while its examples stream to the writer."""

    def __init__(self, num_classes: int, group_columns: Sequence[str],
                 dim_names: Sequence[str] = ()):
        self.count = 0
        self.samples = 0
        self.speakers: set[str] = set()
        self.unknown_speaker_rows = 0
        self.labelled = 0
        self.label_sum = np.zeros(num_classes, np.float64)
        self.class_counts = np.zeros(num_classes, np.int64)
        self.dim_names = list(dim_names)
        self.dim_n = np.zeros(len(dim_names), np.int64)
        self.dim_sum = np.zeros(len(dim_names), np.float64)
        self.dim_sq = np.zeros(len(dim_names), np.float64)
        self.lengths: list[int] = []
        self.groups = {c: Counter() for c in group_columns}

    def add(self, r: manifest.Record, length: int) -> None:
        self.count += 1
        self.samples += length
        if r.unknown_speaker and r.speaker.endswith("/unknown"):
            self.unknown_speaker_rows += 1
        else:
            self.speakers.add(r.speaker)
        if r.target is not None:
            self.labelled += 1
            self.label_sum += r.target
            self.class_counts[int(np.argmax(r.target))] += 1
        if self.dim_names:
            m = r.dims_mask.astype(bool)
            self.dim_n += m
            self.dim_sum += np.where(m, r.dims_target, 0.0)
            self.dim_sq += np.where(m, np.square(r.dims_target.astype(np.float64)), 0.0)
        self.lengths.append(length)
        for c, counter in self.groups.items():
            counter[r.groups.get(c, "")] += 1

    def _dims_json(self) -> dict:
        """dim -> {count, mean, std} of the normalised (0-1) values with a value."""
        out = {}
        for i, d in enumerate(self.dim_names):
            n = int(self.dim_n[i])
            mean = self.dim_sum[i] / n if n else 0.0
            var = max(self.dim_sq[i] / n - mean * mean, 0.0) if n else 0.0
            out[d] = {"count": n, "mean": round(float(mean), 6),
                      "std": round(float(np.sqrt(var)), 6)}
        return out

    def to_json(self, written: shards.ShardList) -> dict:
        prior = self.label_sum / max(self.labelled, 1)
        groups = {c: dict(sorted(v.items())) for c, v in self.groups.items()
                  if len(v) <= MAX_GROUP_VALUES}
        return {
            "count": self.count,
            "labelled": self.labelled,
            "seconds": round(self.samples / SAMPLE_RATE, 3),
            "speakers": sorted(self.speakers),
            "unknown_speaker_rows": self.unknown_speaker_rows,
            "prior": [round(float(p), 6) for p in prior],
            "class_counts": self.class_counts.astype(int).tolist(),
            "dims": self._dims_json(),
            "files": list(written),
            "shard_lengths": list(written.shard_lengths),
            "lengths_histogram": shards.length_histogram(np.asarray(self.lengths, np.int64),
                                                         SAMPLE_RATE),
            "groups": groups,
        }


def _examples(records: Sequence[manifest.Record], stats: _SplitStats,
              corpora: list[str], executor: Any, window: int, min_seconds: float,
              max_seconds: float, rejected: list[manifest.Rejection], bar: tqdm,
              kept: list[manifest.Record]) -> Iterator[dict]:
    """Decodes `records` (in parallel, in order) and yields shard examples."""
    tasks = ((r.path, r.start, r.end, min_seconds, max_seconds) for r in records)
    results = decode.ordered_map(decode.decode, tasks, executor, window)
    for r, res in zip(records, results, strict=True):
        bar.update(1)
        if res.audio is None:
            rejected.append(_reject(r, res.reason, res.detail))
            continue
        stats.add(r, len(res.audio))
        kept.append(r)
        labelled = r.target is not None
        ex = {
            "id": r.id,
            "audio": res.audio,
            "length": len(res.audio),
            "label": r.target if labelled else np.zeros(stats.label_sum.size, np.float32),
            "label_mask": 1.0 if labelled else 0.0,
            "class_index": int(np.argmax(r.target)) if labelled else -1,
            "domain": corpora.index(r.corpus),
            "speaker": r.speaker,
            "corpus": r.corpus,
            "language": r.groups.get("language", ""),
            "gender": r.groups.get("gender", ""),
            "age": r.groups.get("age", ""),
            "attrs": json.dumps(r.attrs, sort_keys=True, ensure_ascii=False),
        }
        if stats.dim_names:
            ex["dims"], ex["dims_mask"] = r.dims_target, r.dims_mask
        yield ex


def _remove_split_files(folder: Path, split: str) -> None:
    for p in folder.glob(f"{shards.DATASET_NAME}-{split}.*"):
        p.unlink()


def _commit(tmp: Path, out: Path) -> None:
    """Moves the finished output from `tmp` into `out`, dataset.json last."""
    (out / shards.DATASET_JSON).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and (p.name.startswith(f"{shards.DATASET_NAME}-")
                            or p.name in _WRITER_FILES):
            p.unlink()
    for p in sorted(tmp.iterdir()):
        if p.name == shards.DATASET_JSON:
            continue
        target = out / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(p, target)
    os.replace(tmp / shards.DATASET_JSON, out / shards.DATASET_JSON)


def _summary(info: dict, out: Path, up_to_date: bool = False) -> str:
    splits = ", ".join(f"{k} {v['count']}" for k, v in info["splits"].items())
    hours = sum(v["seconds"] for v in info["splits"].values()) / 3600
    total = info["kept"] + sum(info["rejected"].values())
    lines = [f"jaxser prepare: {'up to date, ' if up_to_date else ''}kept {info['kept']} of "
             f"{total} rows ({splits}; {hours:.2f} h of audio) in {out}"]
    dims = (info.get("dimensions") or {}).get("names") or []
    if dims:
        unlabelled = sum(v["count"] - v.get("labelled", v["count"])
                         for v in info["splits"].values())
        lines.append(f"dimensions: {', '.join(dims)} (scales: " + ", ".join(
            f"{d} {dimensions.parse_scale(s) if s else 'per corpus'}"
            for d, s in info["dimensions"]["scale"].items())
            + f"); rows without a category: {unlabelled}")
    if info["rejected"]:
        lines.append(f"rejected {sum(info['rejected'].values())} rows "
                     f"(see {out / REJECTED_CSV}):")
        lines += [f"  {reason}: {n}" for reason, n in info["rejected"].items()]
    if info["speaker_overlap"]["pairs"]:
        lines.append("WARNING: speakers shared between splits (allowed): " + "; ".join(
            f"{k}: {len(v)}" for k, v in info["speaker_overlap"]["pairs"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- prepare


@dataclass
class _Plan:
    """Everything decided before any audio is decoded."""

    tables: list[manifest.Manifest]
    taxonomy: labels.Taxonomy
    own_taxonomy: bool
    maps: list[labels.LabelMap]
    resolvers: dict[str, labels.LabelResolver]
    vocab: dict[str, list[str]]
    user_maps: bool
    records: list[manifest.Record]  # rows that passed every check made without audio
    assignment: list[str]  # split name of each record
    rejected: list[manifest.Rejection]
    corpora: list[str]
    group_columns: list[str]
    dim_names: list[str]
    dim_scales: dimensions.Resolution

    @property
    def order(self) -> dict[str, int]:
        return {str(m.path): i for i, m in enumerate(self.tables)}


def _plan(manifests: Sequence[str | Path], out: Path, taxonomy: str | None,
          map_file: str | None, spec: splits.SplitSpec, seed: int, neutral_smoothing: float,
          allow_speaker_overlap: bool, scale_spec: dimensions.ScaleSpec,
          unknown_speakers: str) -> _Plan:
    """Reads and checks every input without audio; assigns splits. Raises on bad input."""
    tax, maps, user_maps = _taxonomy_and_maps(taxonomy, map_file)
    if tax is not None:
        labels.check_neutral_smoothing(tax, neutral_smoothing)
    class_names = labels.known_label_names(maps) | (tax.names() if tax else set())
    split_column = spec.column if spec.kind == "column" else None
    tables = [manifest.read_manifest(p, class_names, split_column) for p in manifests]
    records: list[manifest.Record] = []
    rejected: list[manifest.Rejection] = []
    for m in tables:
        recs, rej = manifest.parse_records(m)
        records += recs
        rejected += rej
    own = tax is None
    if own:
        tax = _own_taxonomy(tables, records)
        labels.check_neutral_smoothing(tax, neutral_smoothing)
    vocab = _vocabularies(tables, records)
    resolvers = {}
    for corpus, v in vocab.items():
        primary, fallback = (maps, []) if user_maps else labels.map_chain(maps, v)
        resolvers[corpus] = labels.LabelResolver(tax, primary, neutral_smoothing, fallback)
    records = _resolve_labels(records, resolvers, rejected)
    dim_names = _dimension_names(records)
    records, scales = _resolve_dimensions(records, dim_names, scale_spec, rejected)
    records = _drop_duplicates(records, rejected)
    if spec.kind == "column":
        records = _check_split_values(records, rejected)
    records = _unknown_speakers(records, spec, unknown_speakers, rejected)
    plan = _Plan(tables, tax, own, maps, resolvers, vocab, user_maps, records, [], rejected,
                 list(dict.fromkeys(r.corpus for r in records)),
                 list(dict.fromkeys(g for r in records for g in r.groups)), dim_names, scales)
    if not records:
        _fail_all_rejected(out, plan)
    plan.assignment = splits.assign_splits(records, spec, seed)
    splits.check_speaker_overlap(splits.speaker_overlap(*_known(records, plan.assignment)),
                                 allow_speaker_overlap)
    return plan


def _fail_all_rejected(out: Path, plan: _Plan) -> None:
    """Writes rejected.csv into `out` and raises PrepareError."""
    out.mkdir(parents=True, exist_ok=True)
    _write_rejected(out / REJECTED_CSV, plan.rejected, plan.order)
    reasons = Counter(r.reason for r in plan.rejected).most_common()
    raise PrepareError(f"every row was rejected ({len(plan.rejected)}); reasons in "
                       f"{out / REJECTED_CSV}: " + ", ".join(f"{k}: {n}" for k, n in reasons))


def _write_splits(plan: _Plan, tmp: Path, seed: int, min_seconds: float, max_seconds: float,
                  workers: int, progress: bool) -> tuple[dict[str, dict], list[manifest.Record]]:
    """Decodes and writes every split into `tmp`: (splits.<name> of dataset.json, kept)."""
    by_split: dict[str, list[manifest.Record]] = {}
    for r, name in zip(plan.records, plan.assignment, strict=True):
        by_split.setdefault(name, []).append(r)
    K = plan.taxonomy.num_classes
    kept: list[manifest.Record] = []
    split_json: dict[str, dict] = {}
    executor = decode.make_executor(workers)
    try:
        with tqdm(total=len(plan.records), disable=not progress, desc="decode",
                  unit="file") as bar:
            for s_i, name in enumerate(n for n in splits.SPLITS if n in by_split):
                rows = by_split[name]
                perm = np.random.default_rng([seed, s_i]).permutation(len(rows))
                rows = [rows[i] for i in perm]  # shuffled so every shard mixes speakers
                stats = _SplitStats(K, plan.group_columns, plan.dim_names)
                gen = _examples(rows, stats, plan.corpora, executor, max(8, 4 * workers),
                                min_seconds, max_seconds, plan.rejected, bar, kept)
                written = shards.write_split(tmp, name, gen, num_classes=K,
                                             num_dims=len(plan.dim_names))
                if stats.count == 0:
                    log.warning("split %s: every file was rejected; split not written", name)
                    _remove_split_files(tmp, name)
                    continue
                split_json[name] = stats.to_json(written)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return split_json, kept


def _dataset_json(plan: _Plan, kept: Sequence[manifest.Record], split_json: dict[str, dict],
                  taxonomy: str | None, options: dict, fingerprint: str) -> dict:
    """The content of dataset.json (keys documented in `prepare`)."""
    name_of = {id(r): n for r, n in zip(plan.records, plan.assignment, strict=True)}
    pairs = splits.speaker_overlap(*_known(kept, [name_of[id(r)] for r in kept]))
    if pairs:
        log.warning("speakers shared between splits (allowed): %s", "; ".join(
            f"{k}: {', '.join(v[:10])}" for k, v in pairs.items()))
    tax = plan.taxonomy
    reasons = Counter(r.reason for r in plan.rejected)
    return {
        "version": DATASET_VERSION,
        "sample_rate": SAMPLE_RATE,
        "labels": list(tax.classes),
        "num_classes": tax.num_classes,
        "taxonomy": {"name": tax.name, "classes": list(tax.classes),
                     "source": "corpus labels" if plan.own_taxonomy else str(taxonomy)},
        "mapping": None if plan.own_taxonomy else _mapping_json(
            plan.resolvers, plan.vocab, plan.user_maps),
        "neutral_smoothing": options["neutral_smoothing"],
        "corpora": plan.corpora,
        "group_columns": plan.group_columns,
        "dimensions": dimensions.dataset_json(plan.dim_names, plan.dim_scales),
        "unknown_speakers": options["unknown_speakers"],
        "split_spec": options["split"],
        "seed": options["seed"],
        "min_seconds": options["min_seconds"],
        "max_seconds": options["max_seconds"],
        "manifests": [str(m.path) for m in plan.tables],
        "speaker_overlap": {"pairs": pairs, "allowed": bool(options["allow_speaker_overlap"])},
        "rejected": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "kept": len(kept),
        "splits": split_json,
        "fingerprint": fingerprint,
    }


def prepare(
        manifests: Sequence[str | Path],
        out_dir: str | Path,
        *,
        taxonomy: str | None = None,
        map_file: str | None = None,
        split: str = "speaker:80/10/10",
        seed: int = 0,
        min_seconds: float = 0.1,
        max_seconds: float = 60.0,
        neutral_smoothing: float = 0.0,
        allow_speaker_overlap: bool = False,
        dimension_scale: str | None = None,
        unknown_speakers: str = "auto",
        workers: int = 2,
        progress: bool = True,
) -> dict:
    """Builds a prepared data set in `out_dir` from manifests; returns dataset.json's content.

    taxonomy: a built-in name (em2ldl32, basic, iemocap4) or a JSON/YAML file; None keeps the
      corpus' own labels. map_file: a harmonisation map replacing the built-in ones.
    split: a split spec (see `jaxser.data.splits`). seed: makes splits and shard order
      reproducible. min_seconds / max_seconds: duration limits (after segment cutting).
    neutral_smoothing: mixes this fraction of `neutral` into every target.
    allow_speaker_overlap: record speakers shared between splits instead of failing.
    dimension_scale: the scales of the emotion dimensions, `[CORPUS:][DIMENSION=]LO-HI[,...]`
      (see `jaxser.data.dimensions`); without it the manifest's `dimension_scale` column, else
      inferred from the values.
    unknown_speakers: what rows whose speaker is `unknown` do (UNKNOWN_SPEAKER_MODES): auto
      keeps them with a column: split and rejects them from splits that deal speakers;
      reject; utterance makes each its own speaker.
    workers: decoding processes (0 decodes in this process). progress: show a tqdm bar.

    Records carry `label` (zeros for a row without a category), `label_mask` (1 with a
    category, else 0), `class_index` (argmax, -1 without a category) and, with dimensions,
    `dims` [D] (0-1) and `dims_mask` [D] (1 where the row has the value).

    dataset.json: version, sample_rate (16000), labels, num_classes, taxonomy {name, classes,
    source}, mapping (null without a taxonomy, else {files, user_map, corpora: {corpus: {maps,
    fallback_maps, labels: {source label: {class: weight} | null}}}}), neutral_smoothing,
    corpora (domain id = index), group_columns, dimensions {names (order of `dims`), scale
    {dim: [lo, hi] reports use, null when corpora differ}, corpora {corpus: {dim: {scale,
    source: declared | manifest | inferred}}}, normalised [0, 1]}, unknown_speakers,
    split_spec, seed, min_seconds, max_seconds, manifests, speaker_overlap {pairs:
    {"train/test": [speakers]}, allowed}, rejected {reason: count}, kept, fingerprint, and
    splits.<name>: count, labelled (rows with a category), seconds, speakers (corpus/speaker;
    unknown ones left out), unknown_speaker_rows, prior (mean target over the labelled rows, K
    floats), class_counts (labelled rows per argmax class), dims {dim: {count, mean, std} of
    the 0-1 values present}, files (shard names), shard_lengths, lengths_histogram {edges
    (seconds), counts}, groups {column: {value: count}} (columns with more than
    MAX_GROUP_VALUES values left out).
    """
    if not manifests:
        raise ValueError("prepare needs at least one manifest")
    if not 0 <= min_seconds < max_seconds:
        raise ValueError(f"need 0 <= min_seconds < max_seconds, got {min_seconds}, "
                         f"{max_seconds}")
    out = Path(out_dir)
    spec = splits.parse_split_spec(split)
    scale_spec = dimensions.parse_scale_spec(dimension_scale)
    if unknown_speakers not in UNKNOWN_SPEAKER_MODES:
        raise ValueError(f"unknown_speakers must be one of {UNKNOWN_SPEAKER_MODES}, got "
                         f"{unknown_speakers!r}")
    plan = _plan(manifests, out, taxonomy, map_file, spec, seed, neutral_smoothing,
                 allow_speaker_overlap, scale_spec, unknown_speakers)
    options = {"split": split, "seed": seed, "min_seconds": min_seconds,
               "max_seconds": max_seconds, "neutral_smoothing": neutral_smoothing,
               "allow_speaker_overlap": allow_speaker_overlap, "own_taxonomy": plan.own_taxonomy,
               "dimension_scale": dimension_scale or "", "unknown_speakers": unknown_speakers}
    fingerprint = _fingerprint(options, plan.tables, plan.taxonomy, plan.maps, plan.records)
    out.mkdir(parents=True, exist_ok=True)
    existing = _up_to_date(out, fingerprint)
    if existing is not None:
        print(_summary(existing, out, up_to_date=True))
        return existing

    for stale in out.glob(f"{_TMP_PREFIX}*"):  # left by a killed run
        if stale.is_dir():
            log.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    try:
        split_json, kept = _write_splits(plan, tmp, seed, min_seconds, max_seconds, workers,
                                         progress)
        if not kept:
            _fail_all_rejected(out, plan)
        info = _dataset_json(plan, kept, split_json, taxonomy, options, fingerprint)
        shards.write_tfds_metadata(tmp, plan.taxonomy.num_classes,
                                   {k: v["shard_lengths"] for k, v in split_json.items()},
                                   num_dims=len(plan.dim_names))
        _write_rejected(tmp / REJECTED_CSV, plan.rejected, plan.order)
        (tmp / shards.DATASET_JSON).write_text(json.dumps(info, indent=1) + "\n")
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(_summary(info, out))
    return info
