"""Cached encoder features on disk: the folder `jaxser extract` writes and `data.features`
trains from, with no audio read and no encoder run.

Layout of a feature folder:

    features.json              the encoder's identity (family, config, weights fingerprint),
                               the extraction options, the corpus and the views (below)
    chunk-NNNNNN-pP.npz        one committed chunk of utterances (written by process P):
                               keys, audio lengths, labels and metadata, frame offsets
    chunk-NNNNNN-pP.mean.npy   [n, L, D] float32: masked mean of every hidden state
    chunk-NNNNNN-pP.std.npy    [n, L, D] float32: masked std (stats = mean_std)
    chunk-NNNNNN-pP.frames.npy [sum of frames, F, D] float16: the valid frames of the
                               `frame_layers` (when asked), row i at frame_offset[i]
    view-<fp>.npz / .json      a prepared dataset (dataset.json fingerprint fp): the key of
                               every record of every split, in index order, and a copy of
                               its dataset.json

Utterances are keyed by the sha1 of their record (audio, label and metadata), so the fold
datasets of one corpus (the same records split differently) share one extraction: each
fold adds a view, and only records no view had before run through the encoder. A chunk is
committed when its .npz exists (the arrays are written first, each renamed into place), so
an interrupted extraction keeps every committed chunk and resumes with the rest.

The reader (`train_iterator`, `eval_batches`) plans epochs with `jaxser.data.buckets` from
the records' audio lengths exactly as `jaxser.data.pipeline` does, so with the same config
and seed a run on features sees the same examples in the same batches in the same order
as a run on audio. A batch is the pipeline's dict with `features` [b, L, T, D] and
`frame_mask` [b, T] in place of `audio` (pooled features: T = 1, every frame valid; frame
features: float16, padded to the bucket's frame count).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxser.data import buckets, pipeline, records, shards
from jaxser.errors import JaxserError

log = logging.getLogger(__name__)

FEATURES_JSON = "features.json"
FORMAT_VERSION = 1
_CHUNK_RE = re.compile(r"^chunk-(\d{6})-p(\d+)\.npz$")
_ARRAYS = ("mean", "std", "frames")  # the large per-chunk arrays, one .npy each
_STATE_VERSION = pipeline._STATE_VERSION  # the same state format as the audio pipeline
_INT64_MAX = np.iinfo(np.int64).max
# dataset.json fields that make two prepared datasets views of one corpus (the split, the
# split seed and the resulting counts may differ).
CORPUS_FIELDS = ("labels", "taxonomy", "mapping", "neutral_smoothing", "corpora",
                 "group_columns", "min_seconds", "max_seconds", "manifests", "sample_rate")


class FeatureMismatch(JaxserError):
    """The feature folder holds features of another encoder, options or corpus."""


class FeaturesMissing(JaxserError):
    """The feature folder lacks what a run asks of it (a view, a split, frames, std)."""


# --------------------------------------------------------------------------------------
# Identity


def corpus_identity(info: Mapping) -> dict:
    """The corpus a prepared dataset is a view of (dataset.json's CORPUS_FIELDS)."""
    fields = {k: info.get(k) for k in CORPUS_FIELDS}
    text = json.dumps(fields, sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "labels": info.get("labels"),
            "manifests": info.get("manifests"), "corpora": info.get("corpora")}


def differences(recorded: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    """'a.b: recorded X, now Y' for every leaf of two JSON-like dicts that differs."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out.extend(differences(old, new, name + "."))
        elif _jsonable(old) != _jsonable(new):
            out.append(f"{name}: recorded {old!r}, now {new!r}")
    return out


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Keys of records


def record_keys(data_dir: str | Path, split: str, index: shards.ShardIndex | None = None,
                batch: int = 256) -> np.ndarray:
    """[N] the key of every record of `split` (sha1 of its payload, checked against the
    index's crc32 as it is read), in index order."""
    index = records.load_index(data_dir, split) if index is None else index
    reader = records.RecordReader(data_dir, split, index)
    keys = np.empty(len(index), dtype="<U40")
    try:
        for start in range(0, len(index), batch):
            rows = np.arange(start, min(start + batch, len(index)))
            for i, payload in zip(rows.tolist(), reader.read(rows), strict=True):
                keys[i] = hashlib.sha1(payload).hexdigest()
    finally:
        reader.close()
    return keys


def data_fingerprint(data_dir: str | Path) -> str:
    """The fingerprint of a prepared dataset (dataset.json's, else a hash of its content)."""
    info = shards.load_dataset_info(data_dir)
    return str(info.get("fingerprint") or hashlib.sha256(
        json.dumps(info, sort_keys=True).encode()).hexdigest())


# --------------------------------------------------------------------------------------
# The store


@dataclasses.dataclass
class Chunk:
    """One committed chunk: small arrays in memory, the large ones memory-mapped."""

    name: str  # chunk-NNNNNN-pP
    keys: np.ndarray  # [n] str
    arrays: dict[str, np.ndarray]  # per-utterance numeric fields: length, label, ...
    meta: dict[str, np.ndarray]  # per-utterance strings: id, speaker, ...
    frame_offset: np.ndarray | None  # [n + 1] int64 rows of the frames file
    folder: Path

    def big(self, name: str) -> np.ndarray:
        """The memory-mapped `mean`, `std` or `frames` array of the chunk."""
        path = self.folder / f"{self.name}.{name}.npy"
        if not path.is_file():
            raise FeaturesMissing(f"{path} is missing: the feature folder was not extracted "
                                  f"with what this run reads ({name})")
        return np.load(path, mmap_mode="r")


class FeatureStore:
    """A feature folder: its identity (features.json), its chunks and its views."""

    def __init__(self, folder: str | Path, info: dict):
        self.folder = Path(folder)
        self.info = info
        self._chunks: list[Chunk] | None = None

    # -- opening

    @classmethod
    def open(cls, folder: str | Path) -> FeatureStore:
        """An existing feature folder; FileNotFoundError naming `jaxser extract` if none."""
        path = Path(folder) / FEATURES_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no {FEATURES_JSON} in {folder}: not a feature folder "
                                    "(write one with `jaxser extract`)")
        info = json.loads(path.read_text())
        if int(info.get("version", 0)) > FORMAT_VERSION:
            raise FeatureMismatch(f"{path} has format version {info['version']}; this jaxser "
                                  f"reads up to {FORMAT_VERSION}")
        return cls(folder, info)

    @classmethod
    def create_or_check(cls, folder: str | Path, identity: dict) -> FeatureStore:
        """The feature folder for `identity` ({encoder, options, corpus, shapes}): created
        when absent; an existing one must have been written for the same identity, else
        FeatureMismatch naming every difference (features are never mixed)."""
        folder = Path(folder)
        if (folder / FEATURES_JSON).is_file():
            store = cls.open(folder)
            recorded = {k: store.info.get(k) for k in identity}
            diffs = differences(recorded, identity)
            if diffs:
                shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"]
                                      if len(diffs) > 12 else [])
                raise FeatureMismatch(
                    f"{folder} holds features of another encoder, options or corpus; refusing "
                    "to mix them (use another folder, or delete this one):\n  "
                    + "\n  ".join(shown))
            return store
        folder.mkdir(parents=True, exist_ok=True)
        info = {"version": FORMAT_VERSION, **identity, "views": {}}
        _atomic_write(folder / FEATURES_JSON, (json.dumps(info, indent=1) + "\n").encode())
        return cls(folder, info)

    def save_info(self) -> None:
        _atomic_write(self.folder / FEATURES_JSON,
                      (json.dumps(self.info, indent=1) + "\n").encode())

    # -- chunks

    def chunk_names(self) -> list[str]:
        """The committed chunks, in commit order."""
        return sorted(p.name[:-4] for p in self.folder.glob("chunk-*.npz")
                      if _CHUNK_RE.match(p.name))

    def chunks(self, reload: bool = False) -> list[Chunk]:
        if self._chunks is None or reload:
            self._chunks = [self._load_chunk(name) for name in self.chunk_names()]
        return self._chunks

    def _load_chunk(self, name: str) -> Chunk:
        with np.load(self.folder / f"{name}.npz") as z:
            keys = z["keys"]
            arrays = {k[4:]: z[k] for k in z.files if k.startswith("num.")}
            meta = {k[5:]: z[k] for k in z.files if k.startswith("meta.")}
            offset = z["frame_offset"] if "frame_offset" in z.files else None
        return Chunk(name, keys, arrays, meta, offset, self.folder)

    def key_table(self) -> dict[str, tuple[int, int]]:
        """key -> (chunk number in `chunks()`, row in the chunk); a later chunk wins."""
        table = {}
        for c, chunk in enumerate(self.chunks()):
            table.update((k, (c, r)) for r, k in enumerate(chunk.keys.tolist()))
        return table

    def remove_partial(self) -> list[str]:
        """Deletes the files of chunks an interrupted run left uncommitted (no .npz);
        returns their names."""
        committed = set(self.chunk_names())
        removed = []
        for p in self.folder.iterdir():
            m = re.match(r"^(chunk-\d{6}-p\d+)\.\w+\.npy$", p.name)
            stale = (m and m.group(1) not in committed) or (p.name.startswith(".chunk-")
                                                            and ".tmp-" in p.name)
            if stale:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def next_chunk_number(self) -> int:
        numbers = [int(_CHUNK_RE.match(f"{n}.npz").group(1)) for n in self.chunk_names()]
        return max(numbers, default=-1) + 1

    def write_chunk(self, number: int, process: int, keys: Sequence[str],
                    arrays: Mapping[str, np.ndarray], meta: Mapping[str, np.ndarray],
                    big: Mapping[str, np.ndarray], frame_offset: np.ndarray | None = None
                    ) -> str:
        """Writes and commits one chunk; `big` holds `mean` and optionally `std`, `frames`."""
        name = f"chunk-{number:06d}-p{process}"
        for key, value in big.items():
            if key not in _ARRAYS:
                raise ValueError(f"unknown chunk array {key!r}")
            _atomic_npy(self.folder / f"{name}.{key}.npy", np.ascontiguousarray(value))
        payload = {"keys": np.asarray(keys, dtype="<U40")}
        payload.update({f"num.{k}": np.asarray(v) for k, v in arrays.items()})
        payload.update({f"meta.{k}": np.asarray(v, dtype=str) for k, v in meta.items()})
        if frame_offset is not None:
            payload["frame_offset"] = np.asarray(frame_offset, np.int64)
        tmp = self.folder / f".{name}.npz.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, self.folder / f"{name}.npz")  # the commit
        self._chunks = None
        return name

    # -- views

    def views(self) -> dict[str, dict]:
        return dict(self.info.get("views") or {})

    def save_view(self, fingerprint: str, data_dir: str | Path, dataset_info: dict,
                  split_keys: Mapping[str, np.ndarray]) -> None:
        """Records the keys of a prepared dataset's splits (then features.json names it)."""
        stem = f"view-{fingerprint[:16]}"
        buf_path = self.folder / f"{stem}.npz"
        tmp = self.folder / f".{stem}.npz.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            np.savez(f, **{f"keys.{s}": np.asarray(k, dtype="<U40")
                           for s, k in split_keys.items()})
        os.replace(tmp, buf_path)
        _atomic_write(self.folder / f"{stem}.dataset.json",
                      (json.dumps(dataset_info, indent=1) + "\n").encode())
        views = self.views()
        views[fingerprint] = {"file": stem, "data_dir": str(Path(data_dir).resolve()),
                              "splits": {s: int(len(k)) for s, k in split_keys.items()}}
        self.info["views"] = views
        self.save_info()

    def view_keys(self, fingerprint: str) -> dict[str, np.ndarray]:
        stem = self.views()[fingerprint]["file"]
        with np.load(self.folder / f"{stem}.npz") as z:
            return {k[5:]: z[k] for k in z.files if k.startswith("keys.")}

    def view_dataset_info(self, fingerprint: str) -> dict:
        stem = self.views()[fingerprint]["file"]
        return json.loads((self.folder / f"{stem}.dataset.json").read_text())

    def find_view(self, data_dir: str | Path | None) -> str:
        """The view of the prepared dataset `data_dir` (by its fingerprint); with no
        data_dir (or one that is gone) the folder's only view. FeaturesMissing otherwise."""
        views = self.views()
        if data_dir and (Path(data_dir) / shards.DATASET_JSON).is_file():
            fp = data_fingerprint(data_dir)
            if fp in views:
                return fp
            raise FeaturesMissing(
                f"{self.folder} has no features of the prepared dataset {data_dir} (its "
                f"dataset.json fingerprint {fp[:16]} is not among the folder's "
                f"{len(views)} view(s)); run `jaxser extract` on it first")
        if len(views) == 1:
            return next(iter(views))
        raise FeaturesMissing(f"{self.folder} has {len(views)} views "
                              f"({', '.join(v['data_dir'] for v in views.values()) or 'none'}); "
                              "set data.dir to the prepared dataset to train on")

    @property
    def num_layers(self) -> int:
        return int(self.info["shapes"]["num_layers"])

    @property
    def dim(self) -> int:
        return int(self.info["shapes"]["dim"])

    @property
    def frame_layers(self) -> list[int]:
        return [int(i) for i in self.info["options"].get("frame_layers") or []]

    @property
    def stats(self) -> str:
        return str(self.info["options"].get("stats", "mean"))


def open_store(folder: str | Path) -> FeatureStore:
    """`FeatureStore.open`, memoised per folder and state of features.json and its chunks."""
    folder = Path(folder)
    try:
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.npz")))
        stamp += ((folder / FEATURES_JSON).stat().st_mtime_ns,)
    except FileNotFoundError:
        stamp = None
    key = (str(folder.resolve()), stamp)
    with _STORE_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = FeatureStore.open(folder)
            _STORES.clear()
            _STORES[key] = store
        return store


_STORES: dict[tuple, FeatureStore] = {}
_STORE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# What a head reads


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which cached features a run reads.

    Attributes:
        layers: the cached hidden states (0 = the embeddings), in the order fed to the head.
        stats: mean | mean_std (pooled: mean and std concatenated, width 2D).
        frames: read the frame features (padded per bucket) instead of the pooled ones.
    """

    layers: tuple[int, ...]
    stats: str = "mean"
    frames: bool = False


def check_spec(store: FeatureStore, spec: FeatureSpec) -> None:
    """FeaturesMissing naming what the folder lacks for `spec`."""
    bad = [i for i in spec.layers if not 0 <= i < store.num_layers]
    if bad or not spec.layers:
        raise FeaturesMissing(f"layers {list(spec.layers)}: the folder {store.folder} has "
                              f"hidden states 0..{store.num_layers - 1}")
    if spec.frames:
        missing = [i for i in spec.layers if i not in store.frame_layers]
        if missing:
            raise FeaturesMissing(
                f"frame features of layer(s) {missing} are not in {store.folder} (it has "
                f"frames of {store.frame_layers or 'no layer'}): extract with "
                "extract.frame_layers covering them")
    elif spec.stats == "mean_std" and store.stats != "mean_std":
        raise FeaturesMissing(f"{store.folder} was extracted with stats={store.stats!r}: "
                              "mean_std needs extract.stats='mean_std'")


class SplitTable:
    """The records of one split of a view: where each one's features are, its labels and
    metadata, gathered in the split's index order."""

    def __init__(self, store: FeatureStore, fingerprint: str, split: str):
        self.store, self.split = store, split
        views = store.view_keys(fingerprint)
        if split not in views:
            raise FeaturesMissing(f"split {split!r} is not in the features of "
                                  f"{store.views()[fingerprint]['data_dir']} "
                                  f"({', '.join(sorted(views))})")
        keys = views[split]
        table = store.key_table()
        missing = [k for k in keys.tolist() if k not in table]
        if missing:
            raise FeaturesMissing(f"{len(missing)} record(s) of split {split!r} have no "
                                  f"features in {store.folder} (an interrupted extraction?): "
                                  "run `jaxser extract` again to finish it")
        where = np.asarray([table[k] for k in keys.tolist()], np.int64).reshape(-1, 2)
        self.chunk, self.row = where[:, 0], where[:, 1]
        chunks = store.chunks()
        sizes = [c.keys.size for c in chunks]
        flat = (np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)[self.chunk]
                + self.row) if chunks else np.zeros(0, np.int64)
        # Everything per utterance but the features, gathered in the split's order.
        self.arrays = {k: np.concatenate([c.arrays[k] for c in chunks])[flat]
                       for k in (chunks[0].arrays if chunks else ())}
        self.meta = {k: np.concatenate([c.meta[k] for c in chunks])[flat]
                     for k in (chunks[0].meta if chunks else ())}
        self.length = self.arrays.get("length", np.zeros(0)).astype(np.int64)
        if chunks and chunks[0].frame_offset is not None:
            self.frame_count = np.concatenate([np.diff(c.frame_offset) for c in chunks])[flat]
        else:
            self.frame_count = None

    def __len__(self) -> int:
        return int(self.chunk.size)

    def pooled(self, spec: FeatureSpec) -> np.ndarray:
        """[n, L, 1, D'] float32 pooled features of the split (read once, in memory)."""
        layers = list(spec.layers)
        width = self.store.dim * (2 if spec.stats == "mean_std" else 1)
        out = np.empty((len(self), len(layers), 1, width), np.float32)
        for c, chunk in enumerate(self.store.chunks()):
            sel = np.flatnonzero(self.chunk == c)
            if not sel.size:
                continue
            rows = self.row[sel]
            out[sel, :, 0, :self.store.dim] = np.asarray(chunk.big("mean")[rows])[:, layers]
            if spec.stats == "mean_std":
                out[sel, :, 0, self.store.dim:] = np.asarray(chunk.big("std")[rows])[:, layers]
        return out

    def frames(self, rows: np.ndarray, spec: FeatureSpec, padded: int) -> np.ndarray:
        """[b, L, padded, D] float16 frame features of split rows `rows`, zero-padded."""
        chunks = self.store.chunks()
        positions = [self.store.frame_layers.index(i) for i in spec.layers]
        out = np.zeros((rows.size, len(positions), padded, self.store.dim), np.float16)
        for j, i in enumerate(rows.tolist()):
            chunk = chunks[int(self.chunk[i])]
            r = int(self.row[i])
            lo, hi = int(chunk.frame_offset[r]), int(chunk.frame_offset[r + 1])
            n = min(hi - lo, padded)
            frames = np.asarray(chunk.big("frames")[lo:lo + n])  # [n, F, D]
            out[j, :, :n] = np.transpose(frames[:, positions], (1, 0, 2))
        return out


# --------------------------------------------------------------------------------------
# The reader


class _FeatureSource:
    """A split of a view, its layout and plans; builds host batches in numpy."""

    def __init__(self, features_dir: str | Path, data_dir: str | Path | None, split: str,
                 cfg: pipeline.PipelineConfig, spec: FeatureSpec, process_index: int,
                 process_count: int, train: bool, host_batch: int | None = None):
        self.store = open_store(features_dir)
        check_spec(self.store, spec)
        self.fingerprint = self.store.find_view(data_dir)
        self.split, self.cfg, self.spec, self.train = split, cfg, spec, train
        self.process_index, self.process_count = process_index, process_count
        self.table = SplitTable(self.store, self.fingerprint, split)
        if len(self.table) == 0 and train:
            raise ValueError(f"split {split!r} of {features_dir} has no examples")
        self.ids = np.arange(len(self.table), dtype=np.int64)
        lengths = self.table.length
        if self.ids.size:
            self.layout = buckets.make_layout(lengths, cfg, process_count, 0, host_batch)
            self.bucket_of = buckets.bucket_of(lengths, self.layout)
            self.steps = int(buckets.count_batches(self.bucket_of, self.layout))
        else:
            self.layout, self.bucket_of, self.steps = None, None, 0
        self.classes = None
        if train and getattr(cfg, "class_balanced", False) and self.ids.size:
            # As the audio pipeline samples: by category, rows without one (-1) apart.
            cls = t_cls = self.table.arrays["class_index"].astype(np.int64)
            if "label_mask" in self.table.arrays:
                t_cls = np.where(self.table.arrays["label_mask"] > 0, cls, -1)
            self.classes = t_cls
        self.pooled = None if spec.frames else self.table.pooled(spec)
        if spec.frames and self.ids.size:
            # Frames of bucket k: the most any example of bucket k or below has (leftovers
            # of a bucket move up into the next one).
            most = np.zeros(self.layout.buckets.size, np.int64)
            np.maximum.at(most, self.bucket_of, self.table.frame_count)
            self.bucket_frames = np.maximum(np.maximum.accumulate(most), 1)
        self._plans: dict[int, buckets.Plan] = {}
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> buckets.Plan:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                lengths = self.table.length
                if self.train:
                    plan = buckets.train_plan(self.ids, lengths, lengths, self.bucket_of,
                                              self.layout, self.cfg.seed, epoch,
                                              self.cfg.shuffle, self.classes)
                else:
                    plan = buckets.eval_plan(self.ids, lengths, lengths, self.bucket_of,
                                             self.layout)
                self._plans[epoch] = plan
                for e in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                    del self._plans[e]
            return plan

    def host_batch(self, g: int) -> dict:
        """This host's share of global batch `g` (over epochs), as the pipeline's dict."""
        epoch, j = divmod(int(g), self.steps)
        plan = self.plan(epoch)
        k, ids, fill = buckets.host_rows(plan, j, self.layout, self.process_index,
                                         self.process_count)
        t = self.table
        batch = {key: np.asarray(value[fill]) for key, value in t.arrays.items()}
        batch["length"] = t.length[fill].astype(np.int32)
        if "class_index" in batch:
            batch["class_index"] = batch["class_index"].astype(np.int32)
        if "domain" in batch:
            batch["domain"] = batch["domain"].astype(np.int32)
        batch["valid"] = (ids >= 0).astype(np.float32)
        if self.spec.frames:
            padded = int(self.bucket_frames[k])
            batch["features"] = t.frames(fill, self.spec, padded)
            batch["frame_mask"] = np.arange(padded)[None, :] < t.frame_count[fill][:, None]
        else:
            batch["features"] = self.pooled[fill]
            batch["frame_mask"] = np.ones((fill.size, 1), bool)
        valid = ids >= 0
        meta = {key: np.where(valid, value[fill], "").astype(str)
                for key, value in t.meta.items()}
        meta["index"] = ids.astype(np.int64)
        batch["meta"] = meta
        return batch

    def describe(self) -> list[tuple[int, int]]:
        if self.layout is None:
            return []
        return list(zip(self.layout.buckets.tolist(), self.layout.host_batch.tolist(),
                        strict=True))


class _Prefetch:
    """Builds the next `depth` batches in a thread while the current one is used."""

    def __init__(self, make, first: int, stop: int, depth: int = 2):
        self._make, self._next, self._stop = make, first, stop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="features")
        self._queue: list[concurrent.futures.Future] = []
        self._depth = depth
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._depth and self._next < self._stop:
            self._queue.append(self._pool.submit(self._make, self._next))
            self._next += 1

    def get(self) -> dict:
        if not self._queue:
            raise StopIteration
        batch = self._queue.pop(0).result()
        self._fill()
        return batch

    def close(self) -> None:
        for f in self._queue:
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class TrainIterator(pipeline.TrainPosition):
    """Infinite, exactly resumable training batches of cached features for one host (the
    counterpart of `pipeline.TrainIterator`, with the same state format)."""

    def __init__(self, features_dir: str | Path, data_dir: str | Path | None, split: str,
                 cfg: pipeline.PipelineConfig, spec: FeatureSpec, state: dict | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        pi, pc = pipeline.resolve_process(process_index, process_count)
        self.cfg = cfg = pipeline.resume_config(cfg, state)
        self._src = _FeatureSource(features_dir, data_dir, split, cfg, spec, pi, pc, True)
        self.steps_per_epoch = self._src.steps
        self._g = 0 if state is None else self._position(state)
        self._prefetch: _Prefetch | None = None

    def _position(self, state: dict) -> int:
        pipeline.check_state(state, len(self._src.table), self._src.split)
        return pipeline.state_position(state, self.steps_per_epoch)

    def state(self) -> dict:
        return {"version": _STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "seed": int(self.cfg.seed), "split": self._src.split,
                "num_examples": len(self._src.table), "skipped": 0,
                "steps_per_epoch": self.steps_per_epoch}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._prefetch is None:
            self._prefetch = _Prefetch(self._src.host_batch, self._g, _INT64_MAX)
        batch = self._prefetch.get()
        self._g += 1
        return batch

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None


def train_iterator(features_dir: str | Path, data_dir: str | Path | None, split: str,
                   cfg: pipeline.PipelineConfig, spec: FeatureSpec, state: dict | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
    """Training batches of cached features of `split` of the view of `data_dir`."""
    return TrainIterator(features_dir, data_dir, split, cfg, spec, state, process_index,
                         process_count)


def epoch_steps(features_dir: str | Path, data_dir: str | Path | None, split: str,
                cfg: pipeline.PipelineConfig, spec: FeatureSpec,
                process_count: int | None = None) -> int:
    """Training batches per epoch (equal to `pipeline.epoch_steps` of the same split)."""
    pc = pipeline.resolve_process(None, None)[1] if process_count is None else process_count
    return _FeatureSource(features_dir, data_dir, split, cfg, spec, 0, pc, True).steps


def eval_batches(features_dir: str | Path, data_dir: str | Path | None, split: str,
                 batch_size: int | None, cfg: pipeline.PipelineConfig, spec: FeatureSpec,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """Every example of `split` once, over all hosts, sorted by length (as
    `pipeline.eval_batches`; the last batches filled with masked examples)."""
    pi, pc = pipeline.resolve_process(process_index, process_count)
    src = _FeatureSource(features_dir, data_dir, split, cfg, spec, pi, pc, False, batch_size)
    if src.steps == 0:
        return
    prefetch = _Prefetch(src.host_batch, 0, src.steps)
    try:
        for _ in range(src.steps):
            yield prefetch.get()
    finally:
        prefetch.close()


def dataset_info(features_dir: str | Path, data_dir: str | Path | None) -> dict:
    """The dataset.json of the view a run reads (a copy kept in the feature folder)."""
    store = open_store(features_dir)
    return store.view_dataset_info(store.find_view(data_dir))
