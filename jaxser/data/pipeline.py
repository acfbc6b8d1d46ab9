"""Host input pipeline: prepared shards -> padded, masked numpy batches for one host.

The host only reads records, crops, pads and batches; everything else runs on the device.

Design: a batch plan per epoch, computed from the record index
-----------------------------------------------------------------
Every prepared split has an index (`shards.load_index`): for each record its shard, byte
offset, byte size and audio length. From the lengths alone, every host computes the same
*global* plan of an epoch, a pure function of (seed, epoch, index, config, process_count):

1. a seeded permutation of all examples of the split (a perfect shuffle, no buffer);
2. every example goes to the smallest length bucket that holds it (bucket = padded length);
3. bucket by bucket, shortest first, the examples are cut into global batches of the
   bucket's batch size; the few left over go on to the next, longer bucket (they fit), and
   the remainder of the longest bucket becomes one last batch filled up with masked
   padding examples, so no example is dropped and all batches of a bucket have one shape;
4. the batches are put in a seeded random order.

Host h of P takes positions h, h+P, h+2P, ... of every global batch and reads those records
with one positioned read each (`os.pread` on local files, `tf.io.gfile` elsewhere). So:

- every host yields the same number of batches per epoch (`epoch_steps`), and a batch's
  shape is the same on all hosts: collective steps never hang, the global batch divides
  the mesh, and the train step compiles at most once per bucket;
- each example is seen exactly once per epoch, across all hosts, whatever the number of
  shard files (hosts do not own files, so fewer files than hosts is no special case);
- resuming is exact and free: the iterator state is (epoch, step), and the plan of that
  epoch is recomputed in milliseconds; nothing is read and thrown away.

The cost of this design is random access: each record is one read at an arbitrary offset.
On local disks and the page cache that is as fast as streaming; on object stores it is one
ranged request per record, run in parallel by tf.data.

With a token budget (`batch_seconds` > 0) a bucket of padded length T holds about
`batch_seconds * sample_rate / T` examples (rounded down to `batch_multiple` per host), so
every batch carries about the same amount of audio; otherwise every batch holds
`global_batch` examples, padded to its bucket. Bucket lengths come from the config, or are
derived from the split's lengths (`derive_buckets`: least total padding for the number of
buckets, lengths rounded up to `pad_multiple` samples).

Evaluation uses the same machinery with the examples sorted by length and no shuffling:
each example exactly once, the last batch filled up with masked examples, and the same
number of batches on every host.

tf.data does the work in parallel with AUTOTUNE: a map reads the records of a batch (a
Python function, the reads release the GIL), a second map parses them in one
`parse_example`, crops and zero-pads the raw int16 bytes to the bucket length in one
`decode_raw`, and converts to float; batches are prefetched. TF runs on the CPU only.

A batch is a dict of numpy arrays for host h (b examples, padded length T, K classes):
    audio       float32 [b, T]   int16 / 32768, exactly 0 after `length`
    length      int32   [b]      valid samples (after cropping)
    label       float32 [b, K]   target distribution
    class_index int32   [b]
    domain      int32   [b]      corpus id
    valid       float32 [b]      1 for a real example, 0 for a padding example
    meta        dict of host-only arrays [b]: `id`, `speaker`, `corpus`, `language`,
                `gender`, `age`, `attrs` (str; "" for padding examples) and `index`
                (int64 position of the example in the split's index; -1 for padding).
A padding example repeats a real example of the same batch (so no step ever sees an empty
input and no NaN can appear); only `valid` tells it apart: always weight by `valid`.

Damaged records
---------------
Every payload read is checked against its index row: its size (a short read means the shard
was truncated) and the zlib.crc32 the writer recorded (any changed byte); see `shards` for
why CRC-32 and not TFRecord's CRC-32C. By default (`skip_corrupt` False) a damaged record
stops the stream with `shards.CorruptRecord` naming the shard file, the record and what is
wrong; if the tf.data pipeline fails for another reason (an unparsable record), the host's
records of the failing batch are re-read and parsed in Python to name the culprit. A shard
shorter than its index says stops the source at construction.

With `skip_corrupt` True, building a source first checks every record of the split the
same way (size and crc32), on every host and in the same order, so every host drops the
same records and computes the same plan. The damaged records (and those a scanned index
already left out) are dropped from the plan, and one warning names each damaged file, how
many records were dropped and "training on N of M examples" (M from dataset.json when it
is there). The check reads every byte of the split once (at a few hundred MB/s to GB/s
from local disk or the page cache, in parallel threads; from an object store it is one
full download of the split per host) and is done once per process for a given state of
the files (memoised on the index and the shards' sizes and modification times), however
many sources are built. Records damaged after that check still stop the stream.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from jaxser.data import shards

log = logging.getLogger(__name__)

shards.hide_accelerators_from_tf()

_STATE_VERSION = 1
_INT64_MAX = np.iinfo(np.int64).max
CorruptRecord = shards.CorruptRecord


@dataclasses.dataclass
class PipelineConfig:
    """How the host batches a split. Batch sizes are global (over all hosts)."""

    # Examples per global batch when `batch_seconds` is 0.
    global_batch: int = 16
    # Padded lengths of the length buckets, in seconds; () derives them from the split.
    buckets_seconds: tuple[float, ...] = ()
    # Number of buckets to derive when `buckets_seconds` is empty.
    num_buckets: int = 4
    # Audio budget of a global batch in seconds (padded area); 0 -> fixed `global_batch`.
    batch_seconds: float = 0.0
    # Training: random crop to this many seconds; 0 -> no crop.
    max_seconds: float = 0.0
    # Evaluation: centre crop to this many seconds; 0 -> no crop.
    eval_max_seconds: float = 0.0
    # Seed of the shuffle and the random crops.
    seed: int = 0
    # Sample rate of the shards (prepare writes 16 kHz).
    sample_rate: int = 16000
    # Per-host batch sizes are multiples of this (the data-parallel shards of one host).
    batch_multiple: int = 1
    # Derived bucket lengths are multiples of this many samples (1600 = 0.1 s at 16 kHz).
    pad_multiple: int = 1600
    # Shuffle the training examples (off: the same file order every epoch).
    shuffle: bool = True
    # Drop damaged records (one warning naming the files) instead of stopping.
    skip_corrupt: bool = False

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> PipelineConfig:
        """Builds a config from the matching fields of a dict or ConfigDict (others ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in names if k in config}
        if "buckets_seconds" in kwargs:
            kwargs["buckets_seconds"] = tuple(kwargs["buckets_seconds"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------
# Buckets


def derive_buckets(
        lengths_or_histogram: np.ndarray | list | Mapping,
        num_buckets: int,
        max_samples: int = 0,
        multiple: int = 1600,
        sample_rate: int = 16000,
) -> list[int]:
    """Padded bucket lengths (samples) with the least total padding for these lengths.

    Args:
        lengths_or_histogram: per-example lengths in samples, or a dataset.json
            `lengths_histogram` {"edges": [n+1 seconds], "counts": [n]} (each bin is taken
            at its upper edge, its examples at the bin middle).
        num_buckets: at most this many buckets.
        max_samples: lengths are capped here (the crop length); 0 -> no cap.
        multiple: bucket lengths are rounded up to multiples of this (capped at
            `max_samples`), so the feature frontend sees whole frames.
        sample_rate: to convert histogram edges from seconds.

    Returns the ascending bucket lengths; the last one holds the longest (capped) example.
    Exact dynamic programme over the distinct rounded lengths.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if isinstance(lengths_or_histogram, Mapping):
        edges = np.asarray(lengths_or_histogram["edges"], np.float64) * sample_rate
        counts = np.asarray(lengths_or_histogram["counts"], np.float64)
        if edges.shape[0] != counts.shape[0] + 1:
            raise ValueError("lengths_histogram needs len(edges) == len(counts) + 1")
        keep = counts > 0
        values = np.ceil(edges[1:][keep])
        sums = counts[keep] * (edges[:-1][keep] + edges[1:][keep]) / 2
        counts = counts[keep]
    else:
        values = np.asarray(lengths_or_histogram, np.float64).reshape(-1)
        counts, sums = np.ones_like(values), values.copy()
    if values.size == 0:
        raise ValueError("cannot derive buckets from no lengths")
    if max_samples:
        sums = np.where(values > max_samples, counts * max_samples, sums)
        values = np.minimum(values, max_samples)
    step = max(int(multiple), 1)
    while True:  # coarsen the grid until the programme is small
        top = np.ceil(values / step) * step
        if max_samples:
            top = np.minimum(top, max_samples)
        cand, inv = np.unique(top, return_inverse=True)
        if cand.size <= 1024:
            break
        step *= 2
    cnt = np.bincount(inv, weights=counts)
    tot = np.bincount(inv, weights=sums)
    c_cnt, c_sum = np.concatenate([[0], np.cumsum(cnt)]), np.concatenate([[0], np.cumsum(tot)])
    m = cand.size
    k_max = min(num_buckets, m)
    # cost[j, i]: padding when candidates j..i (inclusive) share the bucket cand[i].
    j = np.arange(m)[:, None]
    i = np.arange(m)[None, :]
    cost = cand[None, :] * (c_cnt[i + 1] - c_cnt[j]) - (c_sum[i + 1] - c_sum[j])
    cost = np.where(j <= i, np.maximum(cost, 0.0), np.inf)
    # best[i]: least padding of candidates 0..i with k buckets, the last one ending at i.
    best = cost[0].copy()
    first = []  # first[k][i]: first candidate of the last bucket in that solution
    for _ in range(1, k_max):
        total = best[:-1, None] + cost[1:, :]  # [j - 1, i]: last bucket starts at j
        arg = np.argmin(total, axis=0)
        first.append(arg + 1)
        best = total[arg, np.arange(m)]
    out, end = [int(cand[m - 1])], m - 1
    for arg in reversed(first):
        end = int(arg[end]) - 1
        out.append(int(cand[end]))
    return sorted(set(out))


# --------------------------------------------------------------------------------------
# Layout and plan


@dataclasses.dataclass(frozen=True)
class _Layout:
    buckets: np.ndarray  # [m] padded lengths (samples), ascending
    host_batch: np.ndarray  # [m] examples per host per batch
    process_count: int

    @property
    def global_batch(self) -> np.ndarray:
        return self.host_batch * self.process_count


@dataclasses.dataclass(frozen=True)
class _Plan:
    bucket: np.ndarray  # [num_batches] bucket id of each batch
    start: np.ndarray  # [num_batches] offset of each batch in `slots`
    slots: np.ndarray  # [sum of global batch sizes] example ids, -1 = padding example
    crop: np.ndarray  # [N] crop start (samples) of each example


def _make_layout(eff_len: np.ndarray, cfg: PipelineConfig, process_count: int,
                 max_samples: int, host_batch: int | None) -> _Layout:
    """Buckets and per-host batch sizes; `host_batch` None -> from the config."""
    m = int(cfg.batch_multiple)
    if m < 1:
        raise ValueError(f"batch_multiple must be >= 1, got {m}")
    sr = cfg.sample_rate
    if cfg.buckets_seconds:
        buckets = sorted({int(round(s * sr)) for s in cfg.buckets_seconds})
        if max_samples:
            buckets = sorted({min(b, max_samples) for b in buckets})
        longest = int(eff_len.max())
        if longest > buckets[-1]:
            extra = int(np.ceil(longest / cfg.pad_multiple) * cfg.pad_multiple)
            extra = min(extra, max_samples) if max_samples else extra
            log.warning("buckets_seconds end at %d samples but an example has %d: adding a "
                        "bucket of %d samples", buckets[-1], longest, extra)
            buckets.append(extra)
    else:
        buckets = derive_buckets(eff_len, cfg.num_buckets, max_samples, cfg.pad_multiple, sr)
    buckets = np.asarray(buckets, np.int64)
    if host_batch is not None:
        if host_batch < 1 or host_batch % m:
            raise ValueError(f"batch size per host {host_batch} must be a positive multiple of "
                             f"batch_multiple={m}")
        sizes = np.full(buckets.shape, host_batch, np.int64)
    elif cfg.batch_seconds > 0:
        budget = cfg.batch_seconds * sr / process_count  # samples per host per batch
        sizes = np.maximum((budget // buckets).astype(np.int64) // m * m, m)
        if sizes[-1] * buckets[-1] > budget:
            log.warning("batch_seconds=%s is too small for bucket %d: using %d examples per "
                        "host", cfg.batch_seconds, buckets[-1], sizes[-1])
    else:
        if cfg.global_batch % process_count:
            raise ValueError(f"global_batch={cfg.global_batch} is not divisible by "
                             f"process_count={process_count}")
        per_host = cfg.global_batch // process_count
        if per_host < 1 or per_host % m:
            raise ValueError(f"global_batch / process_count = {per_host} must be a positive "
                             f"multiple of batch_multiple={m}")
        sizes = np.full(buckets.shape, per_host, np.int64)
    return _Layout(buckets=buckets, host_batch=sizes, process_count=process_count)


def _bucket_of(eff_len: np.ndarray, layout: _Layout) -> np.ndarray:
    return np.searchsorted(layout.buckets, eff_len, side="left")


def _count_batches(bucket_of: np.ndarray, layout: _Layout) -> int:
    """Batches of a plan; depends on the bucket counts only, not on the order."""
    counts = np.bincount(bucket_of, minlength=layout.buckets.size)
    carry, total = 0, 0
    for k, g in enumerate(layout.global_batch):
        pool = carry + int(counts[k])
        total += pool // int(g)
        carry = pool % int(g)
        if k == layout.buckets.size - 1 and carry:
            total += 1
    return total


def _make_plan(order: np.ndarray, bucket_of: np.ndarray, layout: _Layout, crop: np.ndarray,
               rng: np.random.Generator | None) -> _Plan:
    """Cuts `order` into batches bucket by bucket (leftovers move up); `rng` shuffles them."""
    batches: list[np.ndarray] = []
    bucket_ids: list[int] = []
    carry = np.empty(0, np.int64)
    last = layout.buckets.size - 1
    for k, g in enumerate(layout.global_batch.tolist()):
        pool = np.concatenate([carry, order[bucket_of[order] == k]])
        n_full = pool.size // g
        batches.extend(pool[: n_full * g].reshape(n_full, g))
        bucket_ids.extend([k] * n_full)
        carry = pool[n_full * g:]
        if k == last and carry.size:
            batches.append(np.concatenate([carry, np.full(g - carry.size, -1, np.int64)]))
            bucket_ids.append(k)
    perm = rng.permutation(len(batches)) if rng is not None else np.arange(len(batches))
    batches = [batches[p] for p in perm]
    bucket = np.asarray(bucket_ids, np.int64)[perm] if batches else np.empty(0, np.int64)
    sizes = np.array([b.size for b in batches], np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    slots = np.concatenate(batches) if batches else np.empty(0, np.int64)
    return _Plan(bucket=bucket, start=start, slots=slots.astype(np.int64), crop=crop)


# --------------------------------------------------------------------------------------
# Record reading


class _RecordReader:
    """Reads the payloads of index rows: `os.pread` locally, gfile otherwise.

    `read` checks every payload against its index row (size, crc32) and raises
    `CorruptRecord` naming the shard file and the record; `damaged` reports instead.
    """

    def __init__(self, data_dir: str, split: str, index: shards.ShardIndex):
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
        return shards.record_problem(payload, int(self._index.nbytes[i]),
                                     int(self._index.crc[i]))

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


def _check_index(data_dir: str, split: str, index: shards.ShardIndex,
                 allow_short: bool = False) -> None:
    """Each shard must end exactly where its index says (catches a stale index and a
    truncated shard); `allow_short` lets a truncated shard through (its records past the
    end are then found damaged by the skip check). Shards in which a scan found damaged
    frames (`index.problems`) are not checked: their damaged tail is not in the index."""
    ends = np.zeros(len(index.files), np.int64)  # payload end + crc of the last record
    np.maximum.at(ends, index.shard, index.offset + index.nbytes + 4)
    scanned_damaged = {p.split(":")[0] for p in index.problems}
    for s, (name, expected) in enumerate(zip(index.files, ends.tolist(), strict=True)):
        if name in scanned_damaged:
            continue
        path = os.path.join(data_dir, name)
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


# Damaged records found by `_usable_records`, by (directory, split, index, shard stats).
_DAMAGED: dict[tuple, dict[int, str]] = {}


def _usable_records(data_dir: str, split: str, index: shards.ShardIndex,
                    reader: _RecordReader, train: bool) -> np.ndarray:
    """Index rows of the intact records of `split` (skip_corrupt), ascending.

    Reads and checks every record (size and crc32) in chunks on a few threads; the result
    depends only on the files, so every host finds the same rows. On the first check of a
    given state of the files, logs one warning naming each damaged file.
    """
    stats = []
    for name in index.files:
        try:
            st = tf.io.gfile.stat(os.path.join(data_dir, name))
            stats.append((name, st.length, st.mtime_nsec))
        except tf.errors.NotFoundError:
            stats.append((name, -1, 0))
    digest = zlib.crc32(b"".join(a.tobytes() for a in (index.shard, index.offset, index.nbytes,
                                                       index.crc)))
    key = (data_dir, split, digest, tuple(stats), index.problems)
    bad = _DAMAGED.get(key)
    fresh = bad is None
    if fresh:
        rows = np.arange(len(index), dtype=np.int64)
        budget = 32 << 20  # bytes per chunk
        cuts = np.flatnonzero(np.diff(np.cumsum(index.nbytes) // budget)) + 1
        chunks = [c for c in np.split(rows, cuts) if c.size]
        workers = max(1, min(8, os.cpu_count() or 1, len(chunks)))
        bad = {}
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for part in pool.map(reader.damaged, chunks):
                bad.update(part)
        while len(_DAMAGED) >= 8:
            _DAMAGED.pop(next(iter(_DAMAGED)))
        _DAMAGED[key] = bad
    keep = np.ones(len(index), bool)
    keep[list(bad)] = False
    kept = np.flatnonzero(keep).astype(np.int64)
    if fresh:
        _warn_skipped(data_dir, split, index, reader, bad, kept, train)
    return kept


def _warn_skipped(data_dir: str, split: str, index: shards.ShardIndex, reader: _RecordReader,
                  bad: dict[int, str], kept_rows: np.ndarray, train: bool) -> None:
    """One warning: each damaged file, the records dropped from it, and N of M examples.

    A file's expected count is its dataset.json `shard_lengths` entry when larger than what
    its index holds (plus the frames a scan left out); M is dataset.json's `count`.
    """
    kept = np.bincount(index.shard[kept_rows], minlength=len(index.files))
    files: dict[str, list] = {}  # name -> [expected, kept, reasons]
    for s, name in enumerate(index.files):
        files[name] = [int(np.sum(index.shard == s)), int(kept[s]), set()]
    for i, problem in bad.items():
        files[index.files[int(index.shard[i])]][2].add(problem.split(":")[0])
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
    for i, problem in sorted(bad.items())[:20]:
        log.info("skipped %s", reader.describe(i, problem))
    for problem in index.problems[:20]:
        log.info("skipped (not indexed) %s", problem)


def _split_info(data_dir: str, split: str) -> dict:
    """dataset.json's entry of `split` ({} when there is no dataset.json)."""
    try:
        return shards.load_dataset_info(data_dir).get("splits", {}).get(split) or {}
    except (FileNotFoundError, ValueError):
        return {}


# --------------------------------------------------------------------------------------
# The batch source shared by training and evaluation


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller lets JAX decide

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _seconds(seconds: float, sample_rate: int) -> int:
    return int(round(seconds * sample_rate)) if seconds and seconds > 0 else 0


class _BatchSource:
    """A split, its layout, and a plan per epoch; makes the tf.data pipeline of a host."""

    def __init__(self, data_dir: str | Path, split: str, cfg: PipelineConfig,
                 process_index: int, process_count: int, train: bool,
                 host_batch: int | None = None):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.cfg = cfg
        self.train = train
        self.process_index, self.process_count = process_index, process_count
        self.index = shards.load_index(self.data_dir, split)
        if len(self.index) == 0 and train and not self.index.problems:
            raise ValueError(f"split {split!r} in {self.data_dir} has no examples")
        if self.index.problems and not cfg.skip_corrupt:
            raise CorruptRecord(
                f"split {split!r} in {self.data_dir} has damaged records: "
                f"{'; '.join(self.index.problems)}; restore the shards, or set skip_corrupt "
                "to train without them")
        _check_index(self.data_dir, split, self.index, allow_short=cfg.skip_corrupt)
        self.reader = _RecordReader(self.data_dir, split, self.index)
        if cfg.skip_corrupt:
            # [n] the index rows in the plan: the intact records, the same on every host
            self.ids = _usable_records(self.data_dir, split, self.index, self.reader, train)
        else:
            self.ids = np.arange(len(self.index), dtype=np.int64)
        if self.ids.size == 0 and train:
            raise ValueError(f"split {split!r} in {self.data_dir} has no intact examples "
                             f"({len(self.index)} indexed, all damaged)")
        self.skipped = len(self.index) - int(self.ids.size)
        self.max_samples = _seconds(cfg.max_seconds if train else cfg.eval_max_seconds,
                                    cfg.sample_rate)
        full = self.index.length
        self.eff_len = np.minimum(full, self.max_samples) if self.max_samples else full.copy()
        if self.ids.size:
            self.layout = _make_layout(self.eff_len[self.ids], cfg, process_count,
                                       self.max_samples, host_batch)
            self.bucket_of = _bucket_of(self.eff_len, self.layout)
            self.steps = int(_count_batches(self.bucket_of[self.ids], self.layout))
        else:
            self.layout, self.bucket_of, self.steps = None, None, 0
        self.spec = shards.parse_spec(self.index.num_classes)
        self._plans: dict[int, _Plan] = {}
        self._lock = threading.Lock()

    # -- plans

    def plan(self, epoch: int) -> _Plan:
        """The plan of `epoch` (cached: the current and the next epoch)."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._plans[epoch] = self._compute_plan(epoch)
                for e in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                    del self._plans[e]
            return plan

    def _compute_plan(self, epoch: int) -> _Plan:
        ids = self.ids  # [n] index rows in the plan (all of them unless records were skipped)
        full = self.index.length
        over = np.maximum(full - self.eff_len, 0)
        if not self.train:
            order = ids[np.argsort(self.eff_len[ids], kind="stable")]
            return _make_plan(order, self.bucket_of, self.layout, over // 2, None)
        seq = np.random.SeedSequence([int(self.cfg.seed), int(epoch)])
        r_order, r_batches, r_crop = (np.random.default_rng(s) for s in seq.spawn(3))
        order = ids[r_order.permutation(ids.size)] if self.cfg.shuffle else ids
        crop = np.floor(r_crop.random(len(self.index)) * (over + 1)).astype(np.int64)
        return _make_plan(order.astype(np.int64), self.bucket_of, self.layout, crop,
                          r_batches if self.cfg.shuffle else None)

    # -- one host batch (runs inside tf.data through py_function)

    def _host_rows(self, g: int) -> tuple[_Plan, int, np.ndarray, np.ndarray]:
        """(plan, bucket, ids, fill) of global batch `g` for this host: `ids` the index rows
        (-1 = padding example), `fill` the rows to read (padding repeats a real example)."""
        epoch, j = divmod(int(g), self.steps)
        plan = self.plan(epoch)
        k = int(plan.bucket[j])
        size = int(self.layout.global_batch[k])
        slots = plan.slots[plan.start[j]: plan.start[j] + size]
        ids = slots[self.process_index:: self.process_count]
        fill = np.where(ids >= 0, ids, slots[slots >= 0][0])
        return plan, k, ids, fill

    def host_batch(self, g: Any):
        """The records of global batch number `g` (over epochs) for this host."""
        plan, k, ids, fill = self._host_rows(int(g))
        payloads = self.reader.read(fill)
        return (payloads, (ids >= 0).astype(np.float32), plan.crop[fill], self.eff_len[fill],
                np.int64(self.layout.buckets[k]), ids)

    def damage_in_batch(self, g: int) -> str | None:
        """What is wrong with this host's records of global batch `g`, found by reading and
        parsing them in Python (after the tf.data pipeline failed on that batch), or None."""
        try:
            fill = self._host_rows(g)[3]
            payloads = self.reader.read_raw(fill)
        except Exception:  # noqa: BLE001 - a diagnosis must not hide the original error
            return None
        for i, payload in zip(fill.tolist(), payloads, strict=True):
            problem = self.reader.problem(i, payload)
            if problem is None:
                try:
                    tf.io.parse_example(tf.constant([payload]), self.spec)
                except (tf.errors.OpError, ValueError) as e:
                    first = str(e).strip().splitlines()
                    problem = f"unparsable: {first[0] if first else type(e).__name__}"
            if problem is not None:
                return self.reader.describe(i, problem)
        return None

    def _decode(self, payload, valid, start, length, padded, ids):
        """Parses a batch of records; crops and zero-pads the int16 bytes to `padded`."""
        ex = tf.io.parse_example(payload, self.spec)
        raw = ex["audio"]
        if self.max_samples:
            raw = tf.strings.substr(raw, 2 * start, 2 * length)
        audio = tf.io.decode_raw(raw, tf.int16, fixed_length=tf.cast(2 * padded, tf.int32))
        out = {
            "audio": tf.cast(audio, tf.float32) * (1.0 / 32768.0),  # [b, T]
            "length": tf.cast(length, tf.int32),
            "label": ex["label"],
            "class_index": tf.cast(ex["class_index"], tf.int32),
            "domain": tf.cast(ex["domain"], tf.int32),
            "valid": valid,
            "index": ids,
        }
        out.update({k: ex[k] for k in shards.TEXT_KEYS})
        return out

    def dataset(self, first: int, stop: int) -> tf.data.Dataset:
        """Host batches for global batch numbers [first, stop)."""
        def read(g):
            outs = tf.py_function(self.host_batch, [g], [tf.string, tf.float32, tf.int64,
                                                          tf.int64, tf.int64, tf.int64])
            for t in outs[:4] + outs[5:]:
                t.set_shape([None])
            outs[4].set_shape([])
            return tuple(outs)

        ds = tf.data.Dataset.range(first, stop)
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        opts = tf.data.Options()
        opts.deterministic = True
        return ds.with_options(opts)

    def describe(self) -> list[tuple[int, int]]:
        """(padded length in samples, examples per host) of each bucket."""
        if self.layout is None:
            return []
        return list(zip(self.layout.buckets.tolist(), self.layout.host_batch.tolist(),
                        strict=True))


def _next_or_name_damage(it: Iterator, src: _BatchSource, g: int) -> dict:
    """The next raw batch (global batch number `g`); a failure caused by a damaged record
    becomes CorruptRecord naming the shard file and the record."""
    try:
        return next(it)
    except StopIteration:
        raise
    except Exception as e:
        found = src.damage_in_batch(g)
        if found is not None:
            raise CorruptRecord(found) from e
        raise


def _finish(batch: dict) -> dict:
    """numpy batch from tf.data -> the documented dict (strings under `meta`)."""
    valid = batch["valid"] > 0
    meta = {}
    for k in shards.TEXT_KEYS:
        meta[k] = np.array([s.decode("utf-8") if v else ""
                            for s, v in zip(batch.pop(k), valid, strict=True)], dtype=str)
    meta["index"] = batch.pop("index")
    batch["meta"] = meta
    return batch


# --------------------------------------------------------------------------------------
# Public API


class TrainIterator:
    """Infinite iterator of training batches for one host, resumable exactly.

    `state()` is a JSON-serialisable dict; `train_iterator(..., state=s)` continues with
    exactly the batches the uninterrupted iterator would have yielded next.
    """

    def __init__(self, data_dir: str | Path, split: str, cfg: PipelineConfig,
                 state: dict | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        pi, pc = _process(process_index, process_count)
        seed = cfg.seed
        if state is not None and int(state.get("seed", seed)) != seed:
            log.warning("resuming with the state's seed %s (config has %s)", state["seed"], seed)
            seed = int(state["seed"])
        self.cfg = dataclasses.replace(cfg, seed=seed)
        self._src = _BatchSource(data_dir, split, self.cfg, pi, pc, train=True)
        self.steps_per_epoch = int(self._src.steps)
        self._g = 0
        if state is not None:
            self._g = self._position(state)
        self._it: Iterator | None = None

    def _position(self, state: dict) -> int:
        if int(state.get("version", _STATE_VERSION)) != _STATE_VERSION:
            raise ValueError(f"unknown pipeline state version {state.get('version')}")
        n = state.get("num_examples")
        if n is not None and int(n) != len(self._src.index):
            raise ValueError(f"pipeline state is for {n} examples but split "
                             f"{self._src.split!r} has {len(self._src.index)}")
        skipped = state.get("skipped")
        if skipped is not None and int(skipped) != self._src.skipped:
            log.warning("the pipeline state skipped %s damaged records, now %d are skipped: the "
                        "resumed stream is not exact", skipped, self._src.skipped)
        epoch, step = int(state["epoch"]), int(state["step"])
        if int(state.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            log.warning("steps per epoch changed (%s -> %s): the resumed stream is not exact",
                        state.get("steps_per_epoch"), self.steps_per_epoch)
            step = min(step, self.steps_per_epoch)
        return epoch * self.steps_per_epoch + step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return int(self._g // self.steps_per_epoch)

    @property
    def step(self) -> int:
        """Batches already consumed in the current epoch."""
        return int(self._g % self.steps_per_epoch)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(padded length in samples, examples per host) of each bucket."""
        return self._src.describe()

    def state(self) -> dict:
        """Position after the last batch returned (JSON-serialisable)."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "seed": int(self.cfg.seed), "split": self._src.split,
                "num_examples": len(self._src.index), "skipped": self._src.skipped,
                "steps_per_epoch": self.steps_per_epoch}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._src.dataset(self._g, _INT64_MAX).as_numpy_iterator()
        batch = _next_or_name_damage(self._it, self._src, self._g)
        self._g += 1
        return _finish(batch)

    def close(self) -> None:
        """Drops the tf.data iterator and closes the shard files."""
        self._it = None
        self._src.reader.close()


def train_iterator(data_dir: str | Path, split: str, cfg: PipelineConfig,
                   state: dict | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
    """Training batches of `split` for this host, infinite over epochs, resumable from `state`.

    process_index/process_count default to JAX's; each host yields
    `global batch / process_count` examples per batch.
    """
    return TrainIterator(data_dir, split, cfg, state, process_index, process_count)


def epoch_steps(data_dir: str | Path, split: str, cfg: PipelineConfig,
                process_count: int | None = None) -> int:
    """Training batches per epoch (the same on every host)."""
    pc = _process(None, None)[1] if process_count is None else process_count
    return _BatchSource(data_dir, split, cfg, 0, pc, train=True).steps


def eval_steps(data_dir: str | Path, split: str, batch_size: int | None, cfg: PipelineConfig,
               process_count: int | None = None) -> int:
    """Evaluation batches of `split` (the same on every host)."""
    pc = _process(None, None)[1] if process_count is None else process_count
    return _BatchSource(data_dir, split, cfg, 0, pc, train=False, host_batch=batch_size).steps


def eval_batches(data_dir: str | Path, split: str, batch_size: int | None,
                 cfg: PipelineConfig, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """Every example of `split` exactly once, over all hosts, sorted by length.

    Args:
        batch_size: examples per host per batch (the global batch is
            batch_size * process_count); None -> the config's per-bucket sizes.
        cfg: buckets, `eval_max_seconds` (centre crop), sample rate, batch_multiple.

    Every host yields the same number of batches (`eval_steps`) of a fixed size per bucket;
    the last ones are filled with masked examples (`valid` 0), never dropped.
    """
    pi, pc = _process(process_index, process_count)
    src = _BatchSource(data_dir, split, cfg, pi, pc, train=False, host_batch=batch_size)
    if src.steps == 0:
        return
    try:
        it = src.dataset(0, src.steps).as_numpy_iterator()
        for g in range(src.steps):
            yield _finish(_next_or_name_damage(it, src, g))
    finally:
        src.reader.close()
