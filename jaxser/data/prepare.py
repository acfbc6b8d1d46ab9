"""`jaxser prepare`: manifests -> 16 kHz int16 shards, dataset.json and rejected.csv.

Order of work, so that mistakes surface before minutes of decoding:

1. the split spec, the taxonomy and the map files are parsed and validated (a malformed map
   or taxonomy is an immediate error naming the file and the label);
2. every manifest is read; one with the wrong columns is an immediate error naming the
   expected columns;
3. every row is checked without audio: speaker present, segment sane, label parseable and
   mappable onto the taxonomy, file exists, id not a duplicate, `column:` split value valid;
   failures become rows of rejected.csv;
4. rows are assigned to splits (speaker-independent unless the spec says otherwise); a split
   that cannot be made (too few speakers, unknown group) is an error, and so is a speaker in
   two splits unless `allow_speaker_overlap`;
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

from jaxser.data import audio as A
from jaxser.data import labels as L
from jaxser.data import manifest as M
from jaxser.data import shards
from jaxser.data import splits as S

logger = logging.getLogger(__name__)

DATASET_VERSION = 1
PREPARE_VERSION = 1  # bump when the same inputs should produce different output
REJECTED_CSV = "rejected.csv"
REJECTED_COLUMNS = ("manifest", "row", "id", "path", "reason", "detail")
UNKNOWN_SPLIT_VALUE = "unknown split value"
# Group columns with more distinct values than this are left out of splits.<name>.groups.
MAX_GROUP_VALUES = 100
# Names the shard writer owns in the output folder (removed when a run replaces them).
_WRITER_FILES = ("dataset_info.json", "features.json")
_TMP_PREFIX = ".prepare-"  # the temporary folder inside out/ a run writes into


class PrepareError(ValueError):
    """prepare cannot produce a data set (e.g. every row rejected)."""


# ----------------------------------------------------------------------------- labels


def _taxonomy_and_maps(taxonomy: str | None, map_file: str | None
                       ) -> tuple[L.Taxonomy | None, list[L.LabelMap], bool]:
    """(taxonomy or None, candidate maps, whether the maps come from the user)."""
    tax = L.load_taxonomy(taxonomy) if taxonomy else None
    if map_file:
        if tax is None:  # a map that names a built-in target brings its taxonomy along
            data = L.read_structured(Path(map_file))
            target = data.get("target") if isinstance(data, dict) else None
            if target not in L.BUILTIN_TAXONOMIES:
                raise L.MapError(f"map file {map_file} needs a taxonomy: pass --taxonomy, or "
                                 "give the map a built-in 'target'")
            tax = L.builtin_taxonomy(target)
        return tax, [L.load_map(map_file, tax)], True
    return tax, (L.builtin_maps(tax) if tax else []), False


def _own_taxonomy(manifests: Sequence[M.Manifest], records: Sequence[M.Record]) -> L.Taxonomy:
    """Without --taxonomy: class columns (manifest order) and distribution keys (first-seen
    order), then the values of `label` columns sorted."""
    ordered: dict[str, None] = {}
    for m in manifests:
        for col in m.class_columns:
            ordered.setdefault(L.normalize_name(col))
    label_form = {str(m.path): m.label_form == "label" for m in manifests}
    single: set[str] = set()
    for r in records:
        if isinstance(r.label, list):
            raise M.ManifestError(f"{r.manifest} row {r.row}: a distribution given as a list "
                                  "needs --taxonomy to name its classes")
        names = [L.normalize_name(k) for k in r.label]
        if label_form[r.manifest]:
            single.update(names)
        else:
            for k in names:
                ordered.setdefault(k)
    classes = list(ordered) + sorted(single - set(ordered))
    if not classes:
        raise PrepareError("no labels found in the manifests")
    name = next((b for b in L.BUILTIN_TAXONOMIES
                 if tuple(classes) == L.builtin_taxonomy(b).classes), "corpus")
    return L.Taxonomy(name, tuple(classes), {})


def _vocabularies(manifests: Sequence[M.Manifest], records: Sequence[M.Record]
                  ) -> dict[str, list[str]]:
    """corpus -> its source labels (class columns and labels seen), first-seen order."""
    vocab: dict[str, dict[str, None]] = {}
    by_manifest_cols = {str(m.path): [L.normalize_name(c) for c in m.class_columns]
                        for m in manifests}
    for r in records:
        v = vocab.setdefault(r.corpus, {})
        for c in by_manifest_cols[r.manifest]:
            v.setdefault(c)
        if isinstance(r.label, dict):
            for k in r.label:
                v.setdefault(L.normalize_name(k))
    return {c: list(v) for c, v in vocab.items()}


def _resolve_labels(records: list[M.Record], resolvers: dict[str, L.LabelResolver],
                    rejected: list[M.Rejection]) -> list[M.Record]:
    """Sets every record's target distribution; rejects the ones that cannot be mapped."""
    kept = []
    unknown: dict[str, Counter] = {}
    for r in records:
        res = resolvers[r.corpus]
        try:
            if isinstance(r.label, list):
                r.target = res.resolve_vector(r.label)
            else:
                r.target = res.resolve(r.label)
        except L.LabelError as e:
            rejected.append(_reject(r, e.reason, e.detail))
            if e.reason == L.UNKNOWN_LABEL and isinstance(r.label, dict):
                bad = [k for k in r.label if res.map_label(k)[0] == "unknown"]
                unknown.setdefault(r.corpus, Counter()).update(bad)
            continue
        kept.append(r)
    for corpus, counts in unknown.items():
        res = resolvers[corpus]
        maps = ", ".join(m.name for m in res.maps + res.fallback_maps) or "none"
        logger.warning("corpus %s: labels unknown to taxonomy %s (maps: %s): %s", corpus,
                       resolvers[corpus].taxonomy.name, maps,
                       ", ".join(f"{k!r} x{n}" for k, n in counts.most_common()))
    return kept


def _mapping_json(resolvers: dict[str, L.LabelResolver], vocab: dict[str, list[str]],
                  user_maps: bool) -> dict | None:
    """dataset.json `mapping`: the maps consulted and each corpus' effective label map."""
    files = sorted({m.name for r in resolvers.values() for m in r.maps + r.fallback_maps})
    corpora = {c: {"maps": [m.name for m in r.maps],
                   "fallback_maps": [m.name for m in r.fallback_maps],
                   "labels": r.effective_map(vocab[c])} for c, r in resolvers.items()}
    return {"files": files, "user_map": user_maps, "corpora": corpora}


# ----------------------------------------------------------------------------- rows


def _reject(r: M.Record, reason: str, detail: str = "") -> M.Rejection:
    return M.Rejection(r.manifest, r.row, r.id, r.shown_path, reason, detail)


def _drop_duplicates(records: list[M.Record], rejected: list[M.Rejection]) -> list[M.Record]:
    """Keeps the first row of each (corpus, id); later ones are rejected."""
    first: dict[tuple[str, str], M.Record] = {}
    kept = []
    for r in records:
        key = (r.corpus, r.id)
        if key in first:
            f = first[key]
            rejected.append(_reject(r, M.DUPLICATE_ID, f"same id as {f.manifest} row {f.row}"))
            continue
        first[key] = r
        kept.append(r)
    return kept


def _check_split_values(records: list[M.Record], rejected: list[M.Rejection]
                        ) -> list[M.Record]:
    kept = []
    for r in records:
        if S.canonical_split_value(r.split_value) is None:
            rejected.append(_reject(r, UNKNOWN_SPLIT_VALUE,
                                    f"{r.split_value!r} is not train/validation/test"))
            continue
        kept.append(r)
    return kept


def _write_rejected(path: Path, rejected: Sequence[M.Rejection], order: dict[str, int]) -> None:
    rows = sorted(rejected, key=lambda r: (order.get(r.manifest, 0), r.row))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REJECTED_COLUMNS)
    for r in rows:
        w.writerow([r.manifest, r.row, r.id, r.path, r.reason, r.detail])
    path.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------- fingerprint


def _fingerprint(options: dict, manifests: Sequence[M.Manifest], tax: L.Taxonomy,
                 maps: Sequence[L.LabelMap], records: Sequence[M.Record]) -> str:
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

    def __init__(self, num_classes: int, group_columns: Sequence[str]):
        self.count = 0
        self.samples = 0
        self.speakers: set[str] = set()
        self.label_sum = np.zeros(num_classes, np.float64)
        self.lengths: list[int] = []
        self.groups = {c: Counter() for c in group_columns}

    def add(self, r: M.Record, length: int) -> None:
        self.count += 1
        self.samples += length
        self.speakers.add(r.speaker)
        self.label_sum += r.target
        self.lengths.append(length)
        for c, counter in self.groups.items():
            counter[r.groups.get(c, "")] += 1

    def to_json(self, written: shards.ShardList) -> dict:
        prior = self.label_sum / max(self.count, 1)
        groups = {c: dict(sorted(v.items())) for c, v in self.groups.items()
                  if len(v) <= MAX_GROUP_VALUES}
        return {
            "count": self.count,
            "seconds": round(self.samples / A.SAMPLE_RATE, 3),
            "speakers": sorted(self.speakers),
            "prior": [round(float(p), 6) for p in prior],
            "files": list(written),
            "shard_lengths": list(written.shard_lengths),
            "lengths_histogram": shards.length_histogram(np.asarray(self.lengths, np.int64),
                                                         A.SAMPLE_RATE),
            "groups": groups,
        }


def _examples(records: Sequence[M.Record], stats: _SplitStats,
              corpora: list[str], executor: Any, window: int, min_seconds: float,
              max_seconds: float, rejected: list[M.Rejection], bar: tqdm,
              kept: list[M.Record]) -> Iterator[dict]:
    """Decodes `records` (in parallel, in order) and yields shard examples."""
    tasks = ((r.path, r.start, r.end, min_seconds, max_seconds) for r in records)
    for r, res in zip(records, A.ordered_map(A.decode, tasks, executor, window), strict=True):
        bar.update(1)
        if res.audio is None:
            rejected.append(_reject(r, res.reason, res.detail))
            continue
        stats.add(r, len(res.audio))
        kept.append(r)
        yield {
            "id": r.id,
            "audio": res.audio,
            "length": len(res.audio),
            "label": r.target,
            "class_index": int(np.argmax(r.target)),
            "domain": corpora.index(r.corpus),
            "speaker": r.speaker,
            "corpus": r.corpus,
            "language": r.groups.get("language", ""),
            "gender": r.groups.get("gender", ""),
            "age": r.groups.get("age", ""),
            "attrs": json.dumps(r.attrs, sort_keys=True, ensure_ascii=False),
        }


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

    tables: list[M.Manifest]
    taxonomy: L.Taxonomy
    own_taxonomy: bool
    maps: list[L.LabelMap]
    resolvers: dict[str, L.LabelResolver]
    vocab: dict[str, list[str]]
    user_maps: bool
    records: list[M.Record]  # rows that passed every check made without audio
    assignment: list[str]  # split name of each record
    rejected: list[M.Rejection]
    corpora: list[str]
    group_columns: list[str]

    @property
    def order(self) -> dict[str, int]:
        return {str(m.path): i for i, m in enumerate(self.tables)}


def _plan(manifests: Sequence[str | Path], out: Path, taxonomy: str | None,
          map_file: str | None, spec: S.SplitSpec, seed: int, neutral_smoothing: float,
          allow_speaker_overlap: bool) -> _Plan:
    """Reads and checks every input without audio; assigns splits. Raises on bad input."""
    tax, maps, user_maps = _taxonomy_and_maps(taxonomy, map_file)
    if tax is not None:
        L.check_neutral_smoothing(tax, neutral_smoothing)
    class_names = L.known_label_names(maps) | (tax.names() if tax else set())
    split_column = spec.column if spec.kind == "column" else None
    tables = [M.read_manifest(p, class_names, split_column) for p in manifests]
    records: list[M.Record] = []
    rejected: list[M.Rejection] = []
    for m in tables:
        recs, rej = M.parse_records(m)
        records += recs
        rejected += rej
    own = tax is None
    if own:
        tax = _own_taxonomy(tables, records)
        L.check_neutral_smoothing(tax, neutral_smoothing)
    vocab = _vocabularies(tables, records)
    resolvers = {}
    for corpus, v in vocab.items():
        primary, fallback = (maps, []) if user_maps else L.map_chain(maps, v)
        resolvers[corpus] = L.LabelResolver(tax, primary, neutral_smoothing, fallback)
    records = _resolve_labels(records, resolvers, rejected)
    records = _drop_duplicates(records, rejected)
    if spec.kind == "column":
        records = _check_split_values(records, rejected)
    plan = _Plan(tables, tax, own, maps, resolvers, vocab, user_maps, records, [], rejected,
                 list(dict.fromkeys(r.corpus for r in records)),
                 list(dict.fromkeys(g for r in records for g in r.groups)))
    if not records:
        _fail_all_rejected(out, plan)
    plan.assignment = S.assign_splits(records, spec, seed)
    S.check_speaker_overlap(S.speaker_overlap(records, plan.assignment), allow_speaker_overlap)
    return plan


def _fail_all_rejected(out: Path, plan: _Plan) -> None:
    """Writes rejected.csv into `out` and raises PrepareError."""
    out.mkdir(parents=True, exist_ok=True)
    _write_rejected(out / REJECTED_CSV, plan.rejected, plan.order)
    reasons = Counter(r.reason for r in plan.rejected).most_common()
    raise PrepareError(f"every row was rejected ({len(plan.rejected)}); reasons in "
                       f"{out / REJECTED_CSV}: " + ", ".join(f"{k}: {n}" for k, n in reasons))


def _write_splits(plan: _Plan, tmp: Path, seed: int, min_seconds: float, max_seconds: float,
                  workers: int, progress: bool) -> tuple[dict[str, dict], list[M.Record]]:
    """Decodes and writes every split into `tmp`: (splits.<name> of dataset.json, kept)."""
    by_split: dict[str, list[M.Record]] = {}
    for r, name in zip(plan.records, plan.assignment, strict=True):
        by_split.setdefault(name, []).append(r)
    K = plan.taxonomy.num_classes
    kept: list[M.Record] = []
    split_json: dict[str, dict] = {}
    executor = A.make_executor(workers)
    try:
        with tqdm(total=len(plan.records), disable=not progress, desc="decode",
                  unit="file") as bar:
            for s_i, name in enumerate(n for n in S.SPLITS if n in by_split):
                rows = by_split[name]
                perm = np.random.default_rng([seed, s_i]).permutation(len(rows))
                rows = [rows[i] for i in perm]  # shuffled so every shard mixes speakers
                stats = _SplitStats(K, plan.group_columns)
                gen = _examples(rows, stats, plan.corpora, executor, max(8, 4 * workers),
                                min_seconds, max_seconds, plan.rejected, bar, kept)
                written = shards.write_split(tmp, name, gen, num_classes=K)
                if stats.count == 0:
                    logger.warning("split %s: every file was rejected; split not written", name)
                    _remove_split_files(tmp, name)
                    continue
                split_json[name] = stats.to_json(written)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return split_json, kept


def _dataset_json(plan: _Plan, kept: Sequence[M.Record], split_json: dict[str, dict],
                  taxonomy: str | None, options: dict, fingerprint: str) -> dict:
    """The content of dataset.json (keys documented in `prepare`)."""
    name_of = {id(r): n for r, n in zip(plan.records, plan.assignment, strict=True)}
    pairs = S.speaker_overlap(kept, [name_of[id(r)] for r in kept])
    if pairs:
        logger.warning("speakers shared between splits (allowed): %s", "; ".join(
            f"{k}: {', '.join(v[:10])}" for k, v in pairs.items()))
    tax = plan.taxonomy
    reasons = Counter(r.reason for r in plan.rejected)
    return {
        "version": DATASET_VERSION,
        "sample_rate": A.SAMPLE_RATE,
        "labels": list(tax.classes),
        "num_classes": tax.num_classes,
        "taxonomy": {"name": tax.name, "classes": list(tax.classes),
                     "source": "corpus labels" if plan.own_taxonomy else str(taxonomy)},
        "mapping": None if plan.own_taxonomy else _mapping_json(
            plan.resolvers, plan.vocab, plan.user_maps),
        "neutral_smoothing": options["neutral_smoothing"],
        "corpora": plan.corpora,
        "group_columns": plan.group_columns,
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
    workers: decoding processes (0 decodes in this process). progress: show a tqdm bar.

    dataset.json: version, sample_rate (16000), labels, num_classes, taxonomy {name, classes,
    source}, mapping (null without a taxonomy, else {files, user_map, corpora: {corpus: {maps,
    fallback_maps, labels: {source label: {class: weight} | null}}}}), neutral_smoothing,
    corpora (domain id = index), group_columns, split_spec, seed, min_seconds, max_seconds,
    manifests, speaker_overlap {pairs: {"train/test": [speakers]}, allowed}, rejected
    {reason: count}, kept, fingerprint, and splits.<name>: count, seconds, speakers
    (corpus/speaker), prior (mean target, K floats), files (shard names), shard_lengths,
    lengths_histogram {edges (seconds), counts}, groups {column: {value: count}} (columns
    with more than MAX_GROUP_VALUES values left out).
    """
    if not manifests:
        raise ValueError("prepare needs at least one manifest")
    if not 0 <= min_seconds < max_seconds:
        raise ValueError(f"need 0 <= min_seconds < max_seconds, got {min_seconds}, "
                         f"{max_seconds}")
    out = Path(out_dir)
    spec = S.parse_split_spec(split)
    plan = _plan(manifests, out, taxonomy, map_file, spec, seed, neutral_smoothing,
                 allow_speaker_overlap)
    options = {"split": split, "seed": seed, "min_seconds": min_seconds,
               "max_seconds": max_seconds, "neutral_smoothing": neutral_smoothing,
               "allow_speaker_overlap": allow_speaker_overlap, "own_taxonomy": plan.own_taxonomy}
    fingerprint = _fingerprint(options, plan.tables, plan.taxonomy, plan.maps, plan.records)
    out.mkdir(parents=True, exist_ok=True)
    existing = _up_to_date(out, fingerprint)
    if existing is not None:
        print(_summary(existing, out, up_to_date=True))
        return existing

    for stale in out.glob(f"{_TMP_PREFIX}*"):  # left by a killed run
        if stale.is_dir():
            logger.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    try:
        split_json, kept = _write_splits(plan, tmp, seed, min_seconds, max_seconds, workers,
                                         progress)
        if not kept:
            _fail_all_rejected(out, plan)
        info = _dataset_json(plan, kept, split_json, taxonomy, options, fingerprint)
        shards.write_tfds_metadata(tmp, plan.taxonomy.num_classes,
                                   {k: v["shard_lengths"] for k, v in split_json.items()})
        _write_rejected(tmp / REJECTED_CSV, plan.rejected, plan.order)
        (tmp / shards.DATASET_JSON).write_text(json.dumps(info, indent=1) + "\n")
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(_summary(info, out))
    return info
