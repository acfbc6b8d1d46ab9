"""Reading the records of a prepared split, and knowing which of them are intact.

Everything that reads records back from the shards (`shards` defines the format) and
decides whether they are damaged is here, in one place:

- `load_index` / `build_index`: the record index of a split, from its file or rebuilt by
  a scan of the shards;
- `RecordReader`: reads records by their index row (`os.pread` locally, `tf.io.gfile`
  elsewhere) and checks each against its row;
- `scan`: the one scanner. It finds the damaged records of a split, and is what builds an
  index, what `skip_corrupt` drops records by and what names the damaged shards after a
  failed read (`damage_report`, `read_failure`);
- the start-up checks: shard sizes against the index and the damaged records a pipeline
  drops (`usable_rows`), record counts against dataset.json (`check_complete`).

Integrity. The pipeline reads payloads by offset, so TFRecord's own checksums (masked
CRC-32C of the length and of the payload, checked only by a streaming TFRecord reader) are
never looked at on that path. The index therefore stores `zlib.crc32` of every payload,
computed by the writer from the bytes it serialised (index format version 2), and every
payload read is checked against it (`record_problem`): its size (a short read means the
shard was truncated) and its crc32 (any changed byte); one pass of a C routine over bytes
already in memory (about 7 GB/s on one core here, 19 us for a 4 s utterance; it releases
the GIL). zlib's CRC-32 is used rather than TFRecord's CRC-32C because no CRC-32C library
is installed (a pure Python one is far too slow for audio); both catch any flipped bit.

`scan` works in one of two ways:
- with an index, every record is read at its offset and checked against its row (size,
  crc32; a missing shard file counts as damage to all its records), in parallel threads;
- without one (building an index, or naming damaged shards after a failure), every
  TFRecord frame is walked with TF's random-access reader, which verifies the CRC-32C of
  the length and of the payload, and parsed (audio length, number of classes). After a
  damaged frame the walk goes on with the next one when the damaged frame's length header
  is intact (its CRC-32C is checked here), else the rest of that shard is lost. So the
  CRC-32 an index built this way records is that of intact data.

Scans that run at start-up are memoised per process on the state of the files (the index,
the shards' sizes and modification times): however many sources are built on a split, its
records are read once, and the `skip_corrupt` warning is given once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.lib.io import tf_record as _tf_record  # random-access, CRC-checked

from jaxser.data import shards
from jaxser.errors import JaxserError

log = logging.getLogger(__name__)

_CHUNK_BYTES = 32 << 20  # records read per task of a parallel scan
_CACHE_SIZE = 8  # memoised scans (indexes and damage) per process


class CorruptRecord(ValueError):
    """A record of a shard is damaged (truncated, checksum mismatch, unparsable)."""


class DataError(JaxserError):
    """The prepared shards cannot be read as their dataset.json describes."""


# --------------------------------------------------------------------------------------
# One record


def record_problem(payload: bytes, nbytes: int, crc: int) -> str | None:
    """What is wrong with a payload read by offset (None when it matches its index row).

    Checks the size (a short read: the shard is truncated) and the zlib.crc32 the index
    recorded (any changed byte); one C pass over bytes already in memory.
    """
    if len(payload) != nbytes:
        return f"truncated: read {len(payload)} of {nbytes} bytes (the shard ends early)"
    got = zlib.crc32(payload)
    if got != crc:
        return (f"checksum mismatch: crc32 {got:08x}, the index recorded {crc:08x} (the record "
                "was changed after it was written)")
    return None


class RecordReader:
    """Reads the payloads of index rows: `os.pread` locally, gfile otherwise.

    `read` checks every payload against its index row (size, crc32) and raises
    `CorruptRecord` naming the shard file and the record; `damaged` reports instead.
    """

    def __init__(self, data_dir: str | Path, split: str, index: shards.ShardIndex):
        data_dir = os.fspath(data_dir)
        self._paths = [os.path.join(data_dir, f) for f in index.files]
        self._split = split
        self._index = index
        self._first = index.first_of_shard()
        self._local = not re.match(r"^[a-zA-Z][\w+.-]*://", data_dir)
        self._fds: dict[int, int] = {}
        self._missing: set[int] = set()  # shards whose file does not exist
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return fd

    def read_raw(self, ids: np.ndarray) -> list[bytes]:
        """The payloads of index rows `ids`, in the given order, unchecked (a read past the
        end of a truncated shard, or from a missing file, comes back short). Read in file
        order for locality."""
        shard, offset = self._index.shard[ids], self._index.offset[ids]
        nbytes = self._index.nbytes[ids]
        out: list[bytes] = [b""] * ids.size
        order = np.lexsort((offset, shard))
        if self._local:
            for i in order:
                try:
                    fd = self._fd(int(shard[i]))
                except FileNotFoundError:
                    self._missing.add(int(shard[i]))
                    continue
                out[i] = os.pread(fd, int(nbytes[i]), int(offset[i]))
            return out
        f, cur = None, -1
        try:
            for i in order:
                if shard[i] != cur:
                    if f is not None:
                        f.close()
                    cur, f = int(shard[i]), None
                    if not tf.io.gfile.exists(self._paths[cur]):
                        self._missing.add(cur)
                    else:
                        f = tf.io.gfile.GFile(self._paths[cur], "rb")
                if f is None:
                    continue
                try:
                    f.seek(int(offset[i]))
                    out[i] = f.read(int(nbytes[i]))
                except tf.errors.OutOfRangeError:  # past the end of a truncated shard
                    out[i] = b""
        finally:
            if f is not None:
                f.close()
        return out

    def problem(self, i: int, payload: bytes) -> str | None:
        """What is wrong with the payload read for index row `i` (None: it is intact)."""
        if int(self._index.shard[i]) in self._missing:
            return "missing: the shard file does not exist"
        return record_problem(payload, int(self._index.nbytes[i]), int(self._index.crc[i]))

    def describe(self, i: int, problem: str) -> str:
        """'file: record j of the shard (...): problem' for index row `i`."""
        s = int(self._index.shard[i])
        return (f"{self._paths[s]}: record {i - int(self._first[s])} of the shard (payload at "
                f"byte {int(self._index.offset[i])}; example {i} of split {self._split!r}): "
                f"{problem}")

    def read(self, ids: np.ndarray) -> list[bytes]:
        """The payloads of index rows `ids`; CorruptRecord if any is damaged."""
        out = self.read_raw(ids)
        for i, payload in zip(ids.tolist(), out, strict=True):
            problem = self.problem(i, payload)
            if problem is not None:
                raise CorruptRecord(self.describe(i, problem))
        return out

    def damaged(self, ids: np.ndarray) -> dict[int, str]:
        """{index row: problem} of the damaged records among `ids`."""
        out = {}
        for i, payload in zip(ids.tolist(), self.read_raw(ids), strict=True):
            problem = self.problem(i, payload)
            if problem is not None:
                out[i] = problem
        return out

    def first_damaged(self, ids: np.ndarray) -> str | None:
        """The first damaged record among index rows `ids`, read and parsed in Python (after
        a failure of the tf.data pipeline), described as by `describe`; None if all are fine.
        """
        spec = shards.parse_spec(self._index.num_classes)
        for i, payload in zip(ids.tolist(), self.read_raw(ids), strict=True):
            problem = self.problem(i, payload)
            if problem is None:
                try:
                    tf.io.parse_example(tf.constant([payload]), spec)
                except (tf.errors.OpError, ValueError) as e:
                    first = str(e).strip().splitlines()
                    problem = f"unparsable: {first[0] if first else type(e).__name__}"
            if problem is not None:
                return self.describe(i, problem)
        return None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# --------------------------------------------------------------------------------------
# The scanner


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged record found by `scan`."""

    file: str  # shard base name
    record: int  # position of the record in its shard
    byte: int  # offset of its TFRecord frame in the shard
    problem: str  # what is wrong ("checksum mismatch: ...", "DataLossError: ...")
    row: int = -1  # its index row (-1: a scan without an index)

    def __str__(self) -> str:
        return f"{self.file}: record {self.record} (byte {self.byte}): {self.problem}"


@dataclasses.dataclass(frozen=True)
class Scan:
    """What `scan` found: the index (given, or built from the intact frames) and the damage."""

    index: shards.ShardIndex
    damage: tuple[Damage, ...]

    @property
    def damaged_rows(self) -> dict[int, str]:
        """{index row: problem} (a scan with an index)."""
        return {d.row: d.problem for d in self.damage if d.row >= 0}


def scan(data_dir: str | Path, split: str, index: shards.ShardIndex | None = None,
         num_classes: int | None = None) -> Scan:
    """Reads every record of `split` once and finds the damaged ones.

    With `index`, each record is read at its offset and checked against its row (size and
    crc32; a missing shard damages all its records). Without, the TFRecord frames of the
    shards on disk are walked with TF's CRC-checked reader and parsed (`num_classes`, when
    given, is the label size every record must have); the intact frames make the returned
    index, the others are `damage` (and the index's `problems`).
    """
    if index is not None:
        return Scan(index, _check_rows(data_dir, split, index))
    files = shards.shard_names(data_dir, split)
    if not files:
        raise ValueError(f"no shards of split {split!r} in {data_dir}")
    cols: dict[str, list] = {"shard": [], "offset": [], "nbytes": [], "length": [], "crc": []}
    damage: list[Damage] = []
    k = num_classes
    for s, name in enumerate(files):
        for j, pos, payload, what in _walk_frames(os.path.join(os.fspath(data_dir), name)):
            if what is None:
                what, length, labels = _check_example(payload, k)
            if what is not None:
                damage.append(Damage(name, j, pos, what))
                continue
            k = labels if k is None else k
            cols["shard"].append(s)
            cols["offset"].append(pos + shards.FRAME_HEADER)
            cols["nbytes"].append(len(payload))
            cols["length"].append(length)
            cols["crc"].append(zlib.crc32(payload))
    built = shards.ShardIndex(
        files=files, shard=np.array(cols["shard"], np.int32),
        offset=np.array(cols["offset"], np.int64), nbytes=np.array(cols["nbytes"], np.int64),
        length=np.array(cols["length"], np.int64), num_classes=int(k or 0),
        crc=np.array(cols["crc"], np.uint32), problems=tuple(str(d) for d in damage))
    return Scan(built, tuple(damage))


def _check_rows(data_dir: str | Path, split: str, index: shards.ShardIndex
                ) -> tuple[Damage, ...]:
    """The damaged index rows: every record read in chunks on a few threads and checked."""
    reader = RecordReader(data_dir, split, index)
    rows = np.arange(len(index), dtype=np.int64)
    cuts = np.flatnonzero(np.diff(np.cumsum(index.nbytes) // _CHUNK_BYTES)) + 1
    chunks = [c for c in np.split(rows, cuts) if c.size]
    workers = max(1, min(8, os.cpu_count() or 1, len(chunks)))
    bad: dict[int, str] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for part in pool.map(reader.damaged, chunks):
                bad.update(part)
    finally:
        reader.close()
    first = index.first_of_shard()
    out = []
    for i, problem in sorted(bad.items()):
        s = int(index.shard[i])
        out.append(Damage(index.files[s], i - int(first[s]),
                          int(index.offset[i]) - shards.FRAME_HEADER, problem, i))
    return tuple(out)


def _walk_frames(path: str):
    """Yields (record number, frame offset, payload or None, problem or None) of every
    TFRecord frame of the shard at `path`, read with TF's CRC-checked reader."""
    size = tf.io.gfile.stat(path).length
    reader = _tf_record.tf_record_random_reader(path)
    pos, j = 0, 0
    while pos < size:
        try:
            payload, nxt = reader.read(pos)
            what = None
        except (tf.errors.OpError, IndexError) as e:  # checksum mismatch, truncated
            payload, what = None, _first_line(e)
            nxt, lost = _next_frame(path, pos, size)
            what += lost
        yield j, pos, payload, what
        if nxt is None:
            break
        pos, j = nxt, j + 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _check_example(payload: bytes, num_classes: int | None) -> tuple[str | None, int, int]:
    """(problem or None, audio length, number of label values) of one serialized record."""
    try:
        feat = tf.train.Example.FromString(payload).features.feature
        length = int(feat["length"].int64_list.value[0])
        audio = feat["audio"].bytes_list.value[0]
        labels = len(feat["label"].float_list.value)
    except Exception as e:  # noqa: BLE001 - the reason is the report
        return f"not a record of the jaxser schema ({_first_line(e)})", 0, 0
    if len(audio) != 2 * length:
        return f"audio has {len(audio)} bytes for length {length}", 0, 0
    if num_classes is not None and labels != num_classes:
        return f"label has {labels} values, expected {num_classes}", 0, 0
    return None, length, labels


def _next_frame(path: str, pos: int, size: int) -> tuple[int | None, str]:
    """(offset of the frame after the damaged one at `pos` or None, what is lost with it).

    The walk can step over a damaged frame only when its length header is intact (its
    CRC-32C matches) and the frame ends inside the file.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(pos)
        head = f.read(shards.FRAME_HEADER)
    if len(head) == shards.FRAME_HEADER:
        (n,) = struct.unpack("<Q", head[:8])
        (crc,) = struct.unpack("<I", head[8:])
        if _masked_crc32c(head[:8]) == crc:
            end = pos + n + shards.FRAME_OVERHEAD
            return (end, "") if end <= size else (None, " (the shard ends inside it)")
    return None, (f"; its length header is damaged: the rest of the shard ({size - pos} "
                  "bytes) cannot be read")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, in pure Python: for the 8-byte length headers only."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# Scans memoised by the state of the files: key -> Scan.
_CACHE: dict[tuple, Scan] = {}


def clear_cache() -> None:
    """Forgets the memoised scans (the next start-up check reads the records again)."""
    _CACHE.clear()


def _remembered(key: tuple, compute: Callable[[], Scan]) -> tuple[Scan, bool]:
    """(the scan memoised under `key`, or computed now; whether it was computed now)."""
    found = _CACHE.get(key)
    if found is not None:
        return found, False
    found = compute()
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = found
    return found, True


def _file_stats(data_dir: str | Path, names: list[str]) -> tuple:
    stats = []
    for name in names:
        try:
            st = tf.io.gfile.stat(os.path.join(os.fspath(data_dir), name))
            stats.append((name, st.length, st.mtime_nsec))
        except tf.errors.NotFoundError:
            stats.append((name, -1, 0))
    return tuple(stats)


# --------------------------------------------------------------------------------------
# The index


def load_index(data_dir: str | Path, split: str,
               num_classes: int | None = None) -> shards.ShardIndex:
    """The record index of `split`.

    Read from its file when that is current (version 2); otherwise (missing, version 1
    without checksums, unreadable) rebuilt by a scan of the shards (`build_index`) and
    saved, unless the scan found damaged records (`problems`): such an index would go
    stale once the shard is restored, so it is kept in memory only (memoised on the shards'
    sizes and modification times, so repeated loads do not rescan).
    """
    path = os.path.join(os.fspath(data_dir), shards.index_name(shards.check_split(split)))
    why = ""
    if tf.io.gfile.exists(path):
        try:
            got = shards.read_index_file(path)
        except Exception as e:  # noqa: BLE001 - a damaged index file is rebuilt
            got = f"it cannot be read ({_first_line(e)})"
        if isinstance(got, shards.ShardIndex):
            return got
        why = got if isinstance(got, str) else (f"it has format version {got} (no record "
                                                "checksums)")
    key = ("index", os.fspath(data_dir), split, num_classes,
           _file_stats(data_dir, shards.shard_names(data_dir, split)))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached.index
    if why:
        log.warning("index of split %s in %s: %s; rebuilding it by a checked scan of the "
                    "shards", split, data_dir, why)
    found = scan(data_dir, split, num_classes=num_classes)
    idx = found.index
    if idx.problems:  # Reported by the pipeline: an error, or one skip_corrupt warning.
        log.info("split %s in %s: %d damaged record(s) left out of the index: %s", split,
                 data_dir, len(idx.problems), "; ".join(idx.problems))
    else:
        try:
            shards.save_index(data_dir, split, idx)
            return idx
        except (OSError, tf.errors.OpError) as e:  # read-only data dir: keep it in memory
            log.warning("could not save the index of split %s: %s", split, e)
    return _remembered(key, lambda: found)[0].index


def build_index(data_dir: str | Path, split: str,
                num_classes: int | None = None) -> shards.ShardIndex:
    """The index of the intact records of `split`, by a scan of its shards (`scan` without
    an index); the damaged frames it leaves out are described in `problems`."""
    return scan(data_dir, split, num_classes=num_classes).index


# --------------------------------------------------------------------------------------
# Start-up checks


def usable_rows(data_dir: str | Path, split: str, index: shards.ShardIndex,
                skip_corrupt: bool = False, train: bool = True) -> np.ndarray:
    """[n] the index rows a pipeline may plan with, after the start-up checks.

    Without `skip_corrupt`: every row, once the shards are found to end where the index
    says and a scanned index left nothing out (else CorruptRecord naming the file). With
    it: the rows of the intact records, every record read and checked (`scan`); the result
    depends only on the files, so every host finds the same rows. On the first check of a
    given state of the files in this process, one warning names each damaged file, how
    many records were dropped and "training on N of M examples" ("evaluating on" when not
    `train`).
    """
    if index.problems and not skip_corrupt:
        raise CorruptRecord(
            f"split {split!r} in {os.fspath(data_dir)} has damaged records: "
            f"{'; '.join(index.problems)}; restore the shards, or set skip_corrupt "
            "to train without them")
    _check_shard_sizes(data_dir, split, index, allow_short=skip_corrupt)
    if not skip_corrupt:
        return np.arange(len(index), dtype=np.int64)
    return _intact_rows(data_dir, split, index, train)


def _check_shard_sizes(data_dir: str | Path, split: str, index: shards.ShardIndex,
                       allow_short: bool = False) -> None:
    """Each shard must end exactly where its index says (catches a stale index and a
    truncated or missing shard: CorruptRecord); `allow_short` lets a truncated or missing
    shard through (its records are then found damaged by `_intact_rows`). Shards in which
    a scan found damaged frames (`index.problems`) are not checked: their damaged tail is
    not in the index."""
    ends = np.zeros(len(index.files), np.int64)  # payload end + crc of the last record
    np.maximum.at(ends, index.shard, index.offset + index.nbytes + 4)
    scanned_damaged = {p.split(":")[0] for p in index.problems}
    for s, (name, expected) in enumerate(zip(index.files, ends.tolist(), strict=True)):
        if name in scanned_damaged:
            continue
        path = os.path.join(os.fspath(data_dir), name)
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            if allow_short:
                continue
            raise CorruptRecord(
                f"split {split}: shard {path} is missing (its index lists "
                f"{int(np.sum(index.shard == s))} records); restore it, or set skip_corrupt to "
                "train without its records") from None
        if size == expected or (allow_short and size < expected):
            continue
        if size < expected:
            rows = np.flatnonzero(index.shard == s)
            cut = int(np.sum(index.offset[rows] + index.nbytes[rows] + 4 > size))
            raise CorruptRecord(
                f"split {split}: shard {path} is truncated: {size} "
                f"bytes, its index expects {expected} (the last {cut} of its {rows.size} "
                f"records are cut off); restore the shard, set skip_corrupt to train without "
                f"those records, or, if the shard was rewritten, delete "
                f"{shards.index_name(split)} to rebuild the index")
        raise ValueError(f"split {split}: shard {name} has {size} bytes, its index expects "
                         f"{expected}; delete {shards.index_name(split)} to rebuild it")


def _intact_rows(data_dir: str | Path, split: str, index: shards.ShardIndex,
                 train: bool) -> np.ndarray:
    """Index rows of the intact records of `split`, ascending (memoised; warns when fresh)."""
    digest = zlib.crc32(b"".join(a.tobytes() for a in (index.shard, index.offset, index.nbytes,
                                                       index.crc)))
    key = ("damage", os.fspath(data_dir), split, digest, _file_stats(data_dir, index.files),
           index.problems)
    found, fresh = _remembered(key, lambda: scan(data_dir, split, index))
    bad = found.damaged_rows
    keep = np.ones(len(index), bool)
    keep[list(bad)] = False
    kept = np.flatnonzero(keep).astype(np.int64)
    if fresh:
        _warn_skipped(data_dir, split, index, found, kept, train)
    return kept


def _warn_skipped(data_dir: str | Path, split: str, index: shards.ShardIndex, found: Scan,
                  kept_rows: np.ndarray, train: bool) -> None:
    """One warning: each damaged file, the records dropped from it, and N of M examples.

    A file's expected count is its dataset.json `shard_lengths` entry when larger than what
    its index holds (plus the frames a scan left out); M is dataset.json's `count`.
    """
    kept = np.bincount(index.shard[kept_rows], minlength=len(index.files))
    files: dict[str, list] = {}  # name -> [expected, kept, reasons]
    for s, name in enumerate(index.files):
        files[name] = [int(np.sum(index.shard == s)), int(kept[s]), set()]
    for d in found.damage:
        files[d.file][2].add(d.problem.split(":")[0])
    for problem in index.problems:  # frames a scan could not index: one record each
        entry = files.get(problem.split(":")[0])
        if entry is not None:
            entry[0] += 1
            entry[2].add("unreadable")
    info = _split_info(data_dir, split)
    for name, count in zip(info.get("files") or [], info.get("shard_lengths") or [],
                           strict=False):
        entry = files.get(name)
        if entry is None:  # a shard dataset.json lists that is not there at all
            files[name] = [int(count), 0, {"missing file"}]
        elif int(count) > entry[0]:
            entry[0] = int(count)
            entry[2].add("missing")
    total = sum(e[0] for e in files.values())
    if info.get("count") is not None:
        total = int(info["count"])
    used = int(kept_rows.size)
    damaged = [(name, e[0] - e[1], e[2]) for name, e in files.items() if e[0] > e[1]]
    if not damaged and total == used:
        return
    shown = ", ".join(f"{name} ({n} record{'s' * (n != 1)}: {', '.join(sorted(why))})"
                      for name, n, why in damaged)
    log.warning("skip_corrupt: split %r in %s: dropped %d damaged record(s): %s; %s %d of %d "
                "examples", split, data_dir, sum(n for _, n, _ in damaged), shown or "none",
                "training on" if train else "evaluating on", used, total)
    reader = RecordReader(data_dir, split, index)
    for d in found.damage[:20]:
        log.info("skipped %s", reader.describe(d.row, d.problem))
    for problem in index.problems[:20]:
        log.info("skipped (not indexed) %s", problem)


def _split_info(data_dir: str | Path, split: str) -> dict:
    """dataset.json's entry of `split` ({} when there is no dataset.json)."""
    try:
        return shards.load_dataset_info(data_dir).get("splits", {}).get(split) or {}
    except (FileNotFoundError, ValueError):
        return {}


def check_complete(data_dir: str | Path, split: str, info: dict, skip: bool = False) -> None:
    """The shards of `split` must hold every record dataset.json (`info`) counts, never
    fewer, else DataError naming the short files; `skip` (config `data.skip_corrupt`)
    turns a shortfall into a warning."""
    expected = info.get("splits", {}).get(split)
    if not expected:
        return
    try:
        index = load_index(data_dir, split)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged split
        raise DataError(f"cannot index split {split!r} in {data_dir}: {type(e).__name__}: "
                        f"{e}{damage_report(data_dir, split)}") from e
    if len(index) == int(expected["count"]):
        return
    have = dict(zip(index.files, index.shard_lengths, strict=True))
    files = expected.get("files") or []
    counts = expected.get("shard_lengths") or []
    short = [f"{f} ({have.get(f, 0)} of {want} records)"
             for f, want in zip(files, counts, strict=False) if have.get(f, 0) != want]
    where = f": {', '.join(short)}" if short else ""
    if skip and len(index) < int(expected["count"]):
        log.warning("data.skip_corrupt: split %r in %s has %d of the %s records dataset.json "
                    "counts%s; training on the rest", split, data_dir, len(index),
                    expected["count"], where)
        return
    raise DataError(f"split {split!r} in {data_dir} has {len(index)} records in its shards but "
                    f"dataset.json says {expected['count']}{where}; re-run jaxser prepare or "
                    "restore the missing shards")


# --------------------------------------------------------------------------------------
# After a failed read


def damage_report(data_dir: str | Path, split: str) -> str:
    """'; damaged shard(s): path (what), ...' for the shards of `split` with damaged frames
    or fewer intact records than the index lists; '' when none. Reads every shard once
    (`scan` without an index): for messages after a failure."""
    try:
        found = scan(data_dir, split)
    except Exception:  # noqa: BLE001 - a report must not hide the original error
        return ""
    try:
        listed = dict(zip(*_index_counts(data_dir, split), strict=True))
    except Exception:  # noqa: BLE001
        listed = {}
    intact = dict(zip(found.index.files, found.index.shard_lengths, strict=True))
    damaged = []
    for name in found.index.files:
        path = os.path.join(os.fspath(data_dir), name)
        bad = [d for d in found.damage if d.file == name]
        if bad:
            more = f"; {len(bad) - 1} more damaged" if len(bad) > 1 else ""
            damaged.append(f"{path} (record {bad[0].record} at byte {bad[0].byte}: "
                           f"{bad[0].problem}{more})")
        elif name in listed and listed[name] != intact[name]:
            damaged.append(f"{path} ({intact[name]} records, the index says {listed[name]})")
    return "; damaged shard(s): " + "; ".join(damaged) if damaged else ""


def _index_counts(data_dir: str | Path, split: str) -> tuple[list[str], list[int]]:
    index = load_index(data_dir, split)
    return index.files, index.shard_lengths


def read_failure(data_dir: str | Path, split: str, what: str, error: BaseException
                 ) -> DataError:
    """The DataError for a failed read of `what` from `split`: the first line of `error` and
    the damaged shards (`damage_report`)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return DataError(f"reading {what} of split {split!r} in {data_dir} failed "
                     f"({type(error).__name__}: {first}){damage_report(data_dir, split)}; "
                     "re-run jaxser prepare or restore the damaged files")
