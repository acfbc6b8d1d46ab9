"""Host input pipeline: prepared shards -> padded, masked numpy batches for one host.

The host only reads records, crops, pads and batches; everything else runs on the device.

Every prepared split has an index (`records.load_index`): for each record its shard, byte
offset, byte size and audio length. From the lengths alone every host computes the same
global plan of each epoch (`buckets`: length buckets, a perfect seeded shuffle, batches of
one shape per bucket, no example dropped). Host h of P takes positions h, h+P, h+2P, ... of
every global batch and reads those records with one positioned read each
(`records.RecordReader`). So:

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

Evaluation uses the same machinery with the examples sorted by length and no shuffling:
each example exactly once, the last batch filled up with masked examples, and the same
number of batches on every host.

Class-balanced sampling (`class_balanced`): each training epoch is a seeded class-balanced
draw with replacement instead of a permutation (`balance`), with the same number of
examples in every length bucket, so batches per epoch and exact resume are unchanged (the
resume state records the option; changing it on resume gives a warning). The classes come
from the index (`class_index`, recorded by prepare); an older index without them costs one
read of every record of the split at start-up.

tf.data does the work in parallel with AUTOTUNE: a map reads the records of a batch (a
Python function, the reads release the GIL), a second map parses them in one
`parse_example`, crops and zero-pads the raw int16 bytes to the bucket length in one
`decode_raw`, and converts to float; batches are prefetched. TF runs on the CPU only.

A batch is a dict of numpy arrays for host h (b examples, padded length T, K classes,
D emotion dimensions):
    audio       float32 [b, T]   int16 / 32768, exactly 0 after `length`
    length      int32   [b]      valid samples (after cropping)
    label       float32 [b, K]   target distribution (zeros for a row without a category)
    label_mask  float32 [b]      1: the row has a category, 0: it has only dimensions (its
                                 weight in every categorical loss and metric is 0)
    class_index int32   [b]      argmax of the target, -1 without a category
    domain      int32   [b]      corpus id
    valid       float32 [b]      1 for a real example, 0 for a padding example
    dims        float32 [b, D]   arousal/valence/dominance... normalised to 0-1 (order: the
                                 dataset.json `dimensions.names`); 0 where unknown
    dims_mask   float32 [b, D]   1 where the value is known, 0 where it is missing
`dims` and `dims_mask` are there only when the data set has dimensions (D > 0); shards of
data sets prepared before dimensions and `label_mask` existed read with `label_mask` 1.
    meta        dict of host-only arrays [b]: `id`, `speaker`, `corpus`, `language`,
                `gender`, `age`, `attrs` (str; "" for padding examples) and `index`
                (int64 position of the example in the split's index; -1 for padding).
A padding example repeats a real example of the same batch (so no step ever sees an empty
input and no NaN can appear); only `valid` tells it apart: always weight by `valid`.

Damaged records
---------------
Every payload read is checked against its index row (size and crc32; see `records`). By
default (`skip_corrupt` False) a damaged record stops the stream with
`records.CorruptRecord` naming the shard file, the record and what is wrong; if the tf.data
pipeline fails for another reason (an unparsable record), the host's records of the failing
batch are re-read and parsed in Python to name the culprit. A shard shorter than its index
says stops the source at construction.

With `skip_corrupt` True, building a source first checks every record of the split
(`records.intact_rows`), on every host and in the same order, so every host drops the same
records and computes the same plan; one warning names each damaged file, how many records
were dropped and "training on N of M examples". The check reads every byte of the split
once per process for a given state of the files (at a few hundred MB/s to GB/s from local
disk or the page cache; from an object store it is one full download of the split per
host). Records damaged after that check still stop the stream.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from jaxser.constants import SAMPLE_RATE
from jaxser.data import balance, buckets, records, shards

log = logging.getLogger(__name__)

shards.hide_accelerators_from_tf()

_STATE_VERSION = 1
_INT64_MAX = np.iinfo(np.int64).max


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
    sample_rate: int = SAMPLE_RATE
    # Per-host batch sizes are multiples of this (the data-parallel shards of one host).
    batch_multiple: int = 1
    # Derived bucket lengths are multiples of this many samples (1600 = 0.1 s at 16 kHz).
    pad_multiple: int = 1600
    # Shuffle the training examples (off: the same file order every epoch).
    shuffle: bool = True
    # Drop damaged records (one warning naming the files) instead of stopping.
    skip_corrupt: bool = False
    # Training: a class-balanced draw each epoch instead of every example once (`balance`).
    class_balanced: bool = False

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> PipelineConfig:
        """Builds a config from the matching fields of a dict or ConfigDict (others ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in names if k in config}
        if "buckets_seconds" in kwargs:
            kwargs["buckets_seconds"] = tuple(kwargs["buckets_seconds"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------
# The batch source shared by training and evaluation


def resolve_process(process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
    """This host's (process index, process count): the given ones, JAX's where None."""
    if process_index is None or process_count is None:
        import jax  # only when the caller lets JAX decide

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def resume_config(cfg: PipelineConfig, state: Mapping | None) -> PipelineConfig:
    """A copy of `cfg` with the seed of the iterator `state` being resumed (if any)."""
    seed = cfg.seed
    if state is not None and int(state.get("seed", seed)) != seed:
        log.warning("resuming with the state's seed %s (config has %s)", state["seed"], seed)
        seed = int(state["seed"])
    return dataclasses.replace(cfg, seed=seed)


def check_state(state: Mapping, num_examples: int, split: str) -> None:
    """Raises ValueError if an iterator `state` is of another version or split size."""
    if int(state.get("version", _STATE_VERSION)) != _STATE_VERSION:
        raise ValueError(f"unknown pipeline state version {state.get('version')}")
    n = state.get("num_examples")
    if n is not None and int(n) != num_examples:
        raise ValueError(f"pipeline state is for {n} examples but split "
                         f"{split!r} has {num_examples}")


def state_position(state: Mapping, steps_per_epoch: int) -> int:
    """The global batch index an iterator `state` resumes at, with `steps_per_epoch` now."""
    epoch, step = int(state["epoch"]), int(state["step"])
    if int(state.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
        log.warning("steps per epoch changed (%s -> %s): the resumed stream is not exact",
                    state.get("steps_per_epoch"), steps_per_epoch)
        step = min(step, steps_per_epoch)
    return epoch * steps_per_epoch + step


def _seconds(seconds: float, sample_rate: int) -> int:
    return int(round(seconds * sample_rate)) if seconds and seconds > 0 else 0


class _BatchSource:
    """A split, its layout, and a plan per epoch; makes the tf.data pipeline of a host."""

    def __init__(self, data_dir: str | Path, split: str, cfg: PipelineConfig,
                 process_index: int, process_count: int, train: bool,
                 host_batch: int | None = None, rows: np.ndarray | None = None):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.cfg = cfg
        self.train = train
        self.process_index, self.process_count = process_index, process_count
        self.index = records.load_index(self.data_dir, split)
        if len(self.index) == 0 and train and not self.index.problems:
            raise ValueError(f"split {split!r} in {self.data_dir} has no examples")
        # [n] the index rows in the plan (the intact records with skip_corrupt), the same on
        # every host
        self.ids = records.usable_rows(self.data_dir, split, self.index, cfg.skip_corrupt,
                                       train)
        if rows is not None:  # Only these index rows (e.g. those `jaxser extract` lacks).
            self.ids = np.intersect1d(self.ids, np.asarray(rows, np.int64))
        self.reader = records.RecordReader(self.data_dir, split, self.index)
        if self.ids.size == 0 and train:
            raise ValueError(f"split {split!r} in {self.data_dir} has no intact examples "
                             f"({len(self.index)} indexed, all damaged)")
        self.skipped = len(self.index) - int(self.ids.size)
        self.max_samples = _seconds(cfg.max_seconds if train else cfg.eval_max_seconds,
                                    cfg.sample_rate)
        full = self.index.length
        self.eff_len = np.minimum(full, self.max_samples) if self.max_samples else full.copy()
        if self.ids.size:
            self.layout = buckets.make_layout(self.eff_len[self.ids], cfg, process_count,
                                              self.max_samples, host_batch)
            self.bucket_of = buckets.bucket_of(self.eff_len, self.layout)
            self.steps = int(buckets.count_batches(self.bucket_of[self.ids], self.layout))
        else:
            self.layout, self.bucket_of, self.steps = None, None, 0
        self.num_dims = len(shards.dimension_names(self.data_dir))
        self.spec = shards.parse_spec(self.index.num_classes, self.num_dims)
        self._class_of: np.ndarray | None = None  # read at the first balanced plan
        self._plans: dict[int, buckets.Plan] = {}
        self._lock = threading.Lock()

    @property
    def classes(self) -> np.ndarray | None:
        """[N] class of every index row for class-balanced sampling (None: not balanced)."""
        if not (self.train and self.cfg.class_balanced and self.ids.size):
            return None
        if self._class_of is None:
            self._class_of = self._classes()
            shares = balance.expected_shares(self._class_of[self.ids],
                                             self.bucket_of[self.ids], self.layout.buckets.size)
            log.info("class-balanced sampling of split %s: expected share per class %s",
                     self.split, {k: round(v, 3) for k, v in shares.items()})
        return self._class_of

    def _classes(self) -> np.ndarray:
        """[N] class_index of every index row (-1: no category), from the index, else read
        from the records (an index written before it recorded them)."""
        if self.index.class_index is not None:
            return self.index.class_index
        log.info("index of split %s has no class_index: reading every record once for "
                 "class-balanced sampling", self.split)
        spec = {"class_index": tf.io.FixedLenFeature([], tf.int64),
                "label_mask": tf.io.FixedLenFeature([], tf.float32, default_value=1.0)}
        out = np.full(len(self.index), -1, np.int64)
        for chunk in np.array_split(self.ids, max(1, self.ids.size // 256)):
            ex = tf.io.parse_example(tf.constant(self.reader.read(chunk)), spec)
            cls = ex["class_index"].numpy()
            out[chunk] = np.where(ex["label_mask"].numpy() > 0, cls, -1)
        return out

    # -- plans

    def plan(self, epoch: int) -> buckets.Plan:
        """The plan of `epoch` (cached: the current and the next epoch)."""
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._plans[epoch] = self._compute_plan(epoch)
                for e in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                    del self._plans[e]
            return plan

    def _compute_plan(self, epoch: int) -> buckets.Plan:
        if not self.train:
            return buckets.eval_plan(self.ids, self.index.length, self.eff_len,
                                     self.bucket_of, self.layout)
        return buckets.train_plan(self.ids, self.index.length, self.eff_len, self.bucket_of,
                                  self.layout, self.cfg.seed, epoch, self.cfg.shuffle,
                                  self.classes)

    # -- one host batch (runs inside tf.data through py_function)

    def _host_rows(self, g: int) -> tuple[buckets.Plan, int, np.ndarray, np.ndarray]:
        """(plan, bucket, ids, fill) of global batch `g` for this host: `ids` the index rows
        (-1 = padding example), `fill` the rows to read (padding repeats a real example)."""
        epoch, j = divmod(int(g), self.steps)
        plan = self.plan(epoch)
        k, ids, fill = buckets.host_rows(plan, j, self.layout, self.process_index,
                                         self.process_count)
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
            return self.reader.first_damaged(self._host_rows(g)[3])
        except Exception:  # noqa: BLE001 - a diagnosis must not hide the original error
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
            "label_mask": ex["label_mask"],
            "class_index": tf.cast(ex["class_index"], tf.int32),
            "domain": tf.cast(ex["domain"], tf.int32),
            "valid": valid,
            "index": ids,
        }
        if self.num_dims:
            out["dims"], out["dims_mask"] = ex["dims"], ex["dims_mask"]
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
    becomes records.CorruptRecord naming the shard file and the record."""
    try:
        return next(it)
    except StopIteration:
        raise
    except Exception as e:
        found = src.damage_in_batch(g)
        if found is not None:
            raise records.CorruptRecord(found) from e
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


class TrainPosition:
    """The position of a resumable training iterator (also `features.TrainIterator`): the
    next global batch `_g`, over `steps_per_epoch`, of the batch source `_src`."""

    _g: int
    steps_per_epoch: int
    _src: Any

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


class TrainIterator(TrainPosition):
    """Infinite iterator of training batches for one host, resumable exactly.

    `state()` is a JSON-serialisable dict; `train_iterator(..., state=s)` continues with
    exactly the batches the uninterrupted iterator would have yielded next.
    """

    def __init__(self, data_dir: str | Path, split: str, cfg: PipelineConfig,
                 state: dict | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        pi, pc = resolve_process(process_index, process_count)
        self.cfg = resume_config(cfg, state)
        self._src = _BatchSource(data_dir, split, self.cfg, pi, pc, train=True)
        self.steps_per_epoch = int(self._src.steps)
        self._g = 0
        if state is not None:
            self._g = self._position(state)
        self._it: Iterator | None = None

    def _position(self, state: dict) -> int:
        check_state(state, len(self._src.index), self._src.split)
        balanced = state.get("class_balanced")
        if balanced is not None and bool(balanced) != self.cfg.class_balanced:
            log.warning("the pipeline state was saved with class_balanced=%s, now it is %s: the "
                        "resumed stream is not exact", bool(balanced), self.cfg.class_balanced)
        skipped = state.get("skipped")
        if skipped is not None and int(skipped) != self._src.skipped:
            log.warning("the pipeline state skipped %s damaged records, now %d are skipped: the "
                        "resumed stream is not exact", skipped, self._src.skipped)
        return state_position(state, self.steps_per_epoch)

    def state(self) -> dict:
        """Position after the last batch returned (JSON-serialisable)."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "seed": int(self.cfg.seed), "split": self._src.split,
                "num_examples": len(self._src.index), "skipped": self._src.skipped,
                "steps_per_epoch": self.steps_per_epoch,
                "class_balanced": bool(self.cfg.class_balanced)}

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
    pc = resolve_process(None, None)[1] if process_count is None else process_count
    return _BatchSource(data_dir, split, cfg, 0, pc, train=True).steps


def eval_steps(data_dir: str | Path, split: str, batch_size: int | None, cfg: PipelineConfig,
               process_count: int | None = None) -> int:
    """Evaluation batches of `split` (the same on every host)."""
    pc = resolve_process(None, None)[1] if process_count is None else process_count
    return _BatchSource(data_dir, split, cfg, 0, pc, train=False, host_batch=batch_size).steps


def eval_batches(data_dir: str | Path, split: str, batch_size: int | None,
                 cfg: PipelineConfig, process_index: int | None = None,
                 process_count: int | None = None,
                 rows: np.ndarray | None = None) -> Iterator[dict]:
    """Every example of `split` exactly once, over all hosts, sorted by length.

    Args:
        batch_size: examples per host per batch (the global batch is
            batch_size * process_count); None -> the config's per-bucket sizes.
        cfg: buckets, `eval_max_seconds` (centre crop), sample rate, batch_multiple.
        rows: only these index rows of the split (None: all).

    Every host yields the same number of batches (`eval_steps`) of a fixed size per bucket;
    the last ones are filled with masked examples (`valid` 0), never dropped.
    """
    pi, pc = resolve_process(process_index, process_count)
    src = _BatchSource(data_dir, split, cfg, pi, pc, train=False, host_batch=batch_size,
                       rows=rows)
    if src.steps == 0:
        return
    try:
        it = src.dataset(0, src.steps).as_numpy_iterator()
        for g in range(src.steps):
            yield _finish(_next_or_name_damage(it, src, g))
    finally:
        src.reader.close()
