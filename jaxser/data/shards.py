"""The on-disk format of a prepared data set: TFRecord shards, a record index, TFDS metadata.

A prepared directory holds, per split, files named in the TFDS convention

    jaxser-{split}.tfrecord-{i:05d}-of-{n:05d}      serialized tf.train.Example records
    jaxser-{split}.index.npz                       one row per record: shard, byte offset,
                                                   byte size, audio length in samples,
                                                   crc32 of the payload

plus `dataset_info.json` / `features.json` (so `tfds.builder_from_directory(DIR)` reads the
shards) and `dataset.json` (written by `jaxser prepare`; see `load_dataset_info`).

Records are encoded with the `tfds.features.FeaturesDict` of `features_spec`: the audio is
int16 stored as raw bytes (`Encoding.BYTES`: 2 bytes a sample, parsed with one
`decode_raw`), the label a float32 distribution over the K classes, strings as Text;
`label_mask` (float32, 1: the record has a category, 0: only dimensions; its `label` is then
zeros and `class_index` -1) and, in data sets with D emotion dimensions, `dims` (float32 [D],
normalised to 0-1) and `dims_mask` (float32 [D], 1 where the value is known). Shards written
before these fields existed (prepare's dataset.json version 1) are read with `label_mask` 1
and no dimensions: `parse_spec` gives the new fields defaults.

The index is what makes the input pipeline exact and cheap: it knows every example's length
(to plan length buckets for a whole epoch without reading audio) and where each record's
payload sits in its shard (to read any record with one positioned read). The writer records
it for free: a TFRecord frame is `len:u64 | crc:u32 | payload | crc:u32`, so the payload of
record j sits at 12 + sum_{i<j}(size_i + 16). For shards written by other tools the index is
rebuilt by scanning the files once. The index also holds the zlib.crc32 of every payload
(format version 2), computed by the writer from the bytes it serialised, so a reader can
check every payload it reads by offset.

This module writes; reading the records back, rebuilding a missing index and checking
every record is `records`' job.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxser.constants import SAMPLE_RATE

log = logging.getLogger(__name__)


def hide_accelerators_from_tf() -> None:
    """Keeps TF on the CPU: the accelerators belong to JAX (TF would grab their memory)."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass


hide_accelerators_from_tf()

DATASET_NAME = "jaxser"
DATASET_JSON = "dataset.json"
TEXT_KEYS = ("id", "speaker", "corpus", "language", "gender", "age", "attrs")
INT_KEYS = ("length", "class_index", "domain")
FRAME_HEADER = 12  # TFRecord frame: u64 length + u32 masked crc of the length
FRAME_OVERHEAD = 16  # header + u32 masked crc of the payload
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
INDEX_VERSION = 2  # 1: no payload crc32; 2: `crc` per record


# --------------------------------------------------------------------------------------
# Names


def check_split(split: str) -> str:
    """`split`, checked to be usable in the TFDS file names."""
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r} must match [A-Za-z0-9_-]+ (TFDS file names)")
    return split


def shard_name(split: str, index: int, num_shards: int) -> str:
    """TFDS-convention file name of shard `index` of `num_shards` of `split`."""
    return f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def index_name(split: str) -> str:
    """File name of the record index of `split` (does not match the TFDS shard pattern)."""
    return f"{DATASET_NAME}-{split}.index.npz"


def _join(directory: str | Path, name: str) -> str:
    return os.path.join(os.fspath(directory), name)


# --------------------------------------------------------------------------------------
# Features


def features_spec(num_classes: int, num_dims: int = 0,
                  label_mask: bool = True) -> tfds.features.FeaturesDict:
    """The record schema: 16 kHz mono int16 audio, a K-class distribution, `label_mask`,
    D dimensions and their mask (when num_dims > 0), group strings. `label_mask` False
    gives the schema of shards written before it existed."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_dims < 0:
        raise ValueError(f"num_dims must be >= 0, got {num_dims}")
    f = tfds.features
    text = {k: f.Text() for k in TEXT_KEYS}
    spec = {
        **text,
        "audio": f.Tensor(shape=(None,), dtype=np.int16, encoding=f.Encoding.BYTES),
        "length": f.Scalar(dtype=np.int64),
        "label": f.Tensor(shape=(num_classes,), dtype=np.float32),
        "class_index": f.Scalar(dtype=np.int64),
        "domain": f.Scalar(dtype=np.int64),
    }
    if label_mask:
        spec["label_mask"] = f.Scalar(dtype=np.float32)
    if num_dims:
        spec["dims"] = f.Tensor(shape=(num_dims,), dtype=np.float32)
        spec["dims_mask"] = f.Tensor(shape=(num_dims,), dtype=np.float32)
    return f.FeaturesDict(spec)


def parse_spec(num_classes: int, num_dims: int = 0) -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_example` spec of the serialized records (audio stays raw bytes).

    Matches what `features_spec(num_classes, num_dims)` writes; used by the fast pipeline,
    which pads and crops the raw bytes itself instead of going through TFDS decoding.
    Records without `label_mask` (older shards) parse with 1, without `dims` with zeros
    and a zero mask.
    """
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in TEXT_KEYS}
    spec["audio"] = tf.io.FixedLenFeature([], tf.string)
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in INT_KEYS})
    spec["label"] = tf.io.FixedLenFeature([num_classes], tf.float32)
    spec["label_mask"] = tf.io.FixedLenFeature([], tf.float32, default_value=1.0)
    if num_dims:
        zeros = [0.0] * num_dims
        spec["dims"] = tf.io.FixedLenFeature([num_dims], tf.float32, default_value=zeros)
        spec["dims_mask"] = tf.io.FixedLenFeature([num_dims], tf.float32, default_value=zeros)
    return spec


def _normalise_example(ex: dict, num_classes: int, position: int, num_dims: int = 0) -> dict:
    """Fills defaults and checks one example dict; raises ValueError naming the bad field."""
    name = ex.get("id", f"#{position}")
    audio = ex.get("audio")
    if not isinstance(audio, np.ndarray) or audio.dtype != np.int16 or audio.ndim != 1:
        got = type(audio).__name__ if not isinstance(audio, np.ndarray) else (
            f"{audio.dtype} with shape {audio.shape}")
        raise ValueError(f"example {name}: audio must be a 1-D np.int16 array, got {got}")
    label = np.asarray(ex.get("label"), dtype=np.float32)
    if label.shape != (num_classes,):
        raise ValueError(f"example {name}: label must have shape ({num_classes},), "
                         f"got {label.shape}")
    length = int(ex.get("length", audio.shape[0]))
    if length != audio.shape[0]:
        raise ValueError(f"example {name}: length {length} != audio samples {audio.shape[0]}")
    attrs = ex.get("attrs", "")
    if not isinstance(attrs, str):
        attrs = json.dumps(attrs, sort_keys=True)
    out = {k: str(ex.get(k, "") or "") for k in TEXT_KEYS if k != "attrs"}
    label_mask = float(ex.get("label_mask", 1.0))
    if label_mask not in (0.0, 1.0):
        raise ValueError(f"example {name}: label_mask must be 0 or 1, got {label_mask}")
    default_class = int(np.argmax(label)) if label_mask else -1
    out.update(
        attrs=attrs,
        audio=audio,
        length=length,
        label=label,
        label_mask=np.float32(label_mask),
        class_index=int(ex.get("class_index", default_class)),
        domain=int(ex.get("domain", 0)),
    )
    if num_dims:
        for key in ("dims", "dims_mask"):
            value = np.asarray(ex.get(key, np.zeros(num_dims)), dtype=np.float32)
            if value.shape != (num_dims,):
                raise ValueError(f"example {name}: {key} must have shape ({num_dims},), got "
                                 f"{value.shape}")
            out[key] = value
        if not np.all(np.isin(out["dims_mask"], (0.0, 1.0))):
            raise ValueError(f"example {name}: dims_mask must hold 0 or 1")
        if not np.all(np.isfinite(out["dims"])):
            raise ValueError(f"example {name}: dims must be finite")
    elif "dims" in ex and np.size(ex["dims"]):
        raise ValueError(f"example {name}: has dims but the split is written with num_dims=0")
    return out


# --------------------------------------------------------------------------------------
# Index


@dataclass
class ShardIndex:
    """Where every record of one split is: shard, payload offset/size, audio length."""

    files: list[str]  # shard base names, in shard order
    shard: np.ndarray  # [N] int32
    offset: np.ndarray  # [N] int64, payload byte offset in its shard
    nbytes: np.ndarray  # [N] int64, payload byte size
    length: np.ndarray  # [N] int64, audio samples
    num_classes: int
    crc: np.ndarray  # [N] uint32, zlib.crc32 of each payload
    # Damaged frames a scan found and left out ("file: record j (byte b): what"); never
    # saved: an index with problems is kept in memory only (see `records.load_index`).
    problems: tuple[str, ...] = ()
    # [N] int64 class_index of each record (-1: no category), for class-balanced sampling;
    # None in indexes written before it was recorded, or rebuilt by a scan.
    class_index: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    @property
    def shard_lengths(self) -> list[int]:
        """Number of records in each shard."""
        return np.bincount(self.shard, minlength=len(self.files)).astype(int).tolist()

    def first_of_shard(self) -> np.ndarray:
        """[S] position in the index of the first record of each shard."""
        return np.concatenate([[0], np.cumsum(self.shard_lengths)[:-1]]).astype(np.int64)


def save_index(out_dir: str | Path, split: str, idx: ShardIndex) -> None:
    """Writes the index file of `split` (atomically, current format version)."""
    buf = io.BytesIO()
    extra = {} if idx.class_index is None else {"class_index": idx.class_index.astype(np.int64)}
    np.savez(buf, files=np.array(idx.files, dtype=str), shard=idx.shard, offset=idx.offset,
             nbytes=idx.nbytes, length=idx.length, num_classes=np.int64(idx.num_classes),
             crc=idx.crc.astype(np.uint32), version=np.int64(INDEX_VERSION), **extra)
    _atomic_write(_join(out_dir, index_name(split)), buf.getvalue())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_index_file(path: str) -> ShardIndex | int:
    """The index in the file `path`, or its format version when that is older than
    INDEX_VERSION (`records.load_index` rebuilds those)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        z = np.load(io.BytesIO(f.read()))
        version = int(z["version"]) if "version" in z.files else 1
        if version > INDEX_VERSION:
            raise ValueError(f"{path} has index format version {version}; this jaxser reads "
                             f"up to {INDEX_VERSION}")
        if version < INDEX_VERSION:
            return version
        idx = ShardIndex(files=[str(s) for s in z["files"]], shard=z["shard"],
                         offset=z["offset"], nbytes=z["nbytes"], length=z["length"],
                         num_classes=int(z["num_classes"]), crc=z["crc"].astype(np.uint32),
                         class_index=(z["class_index"].astype(np.int64)
                                      if "class_index" in z.files else None))
    n = len(idx)
    keys = ("offset", "nbytes", "length", "crc") + (("class_index",)
                                                    if idx.class_index is not None else ())
    if not all(getattr(idx, k).shape == (n,) for k in keys):
        raise ValueError(f"{path}: index arrays of different lengths")
    return idx


def _current_index(data_dir: str | Path, split: str) -> ShardIndex | None:
    """The index in the file of `split` when it is there, readable and current, else None."""
    path = _join(data_dir, index_name(check_split(split)))
    if not tf.io.gfile.exists(path):
        return None
    try:
        got = read_index_file(path)
    except Exception:  # noqa: BLE001 - no usable index
        return None
    return got if isinstance(got, ShardIndex) else None


def shard_names(data_dir: str | Path, split: str) -> list[str]:
    """Base names of the shard files of `split` in `data_dir`, in shard order."""
    pattern = _join(data_dir, f"{DATASET_NAME}-{split}.tfrecord-*-of-*")
    return sorted(os.path.basename(p) for p in tf.io.gfile.glob(pattern))


# --------------------------------------------------------------------------------------
# Writing


class ShardList(list):
    """The shard base names written for a split, with `.shard_lengths` and `.num_bytes`."""

    shard_lengths: list[int]
    num_bytes: int


def write_split(
        out_dir: str | Path,
        split: str,
        examples: Iterable[dict],
        num_classes: int,
        num_examples: int | None = None,
        target_shard_bytes: int = 150_000_000,
        num_dims: int = 0,
) -> ShardList:
    """Writes one split as TFRecord shards of about `target_shard_bytes` each, plus its index.

    Shards are written under temporary names and renamed once complete (the shard count
    is only known at the end), so a crash never leaves a readable half split; shards of
    an earlier write of the same split are removed. `examples` are dicts with the keys of
    `features_spec` (audio a 1-D np.int16 array; `length`, `class_index`, `domain`,
    `label_mask` (1), `dims`/`dims_mask` (zeros, with `num_dims` > 0) and the strings are
    filled in when missing; `attrs` may be a dict, stored as JSON). The index records every
    record's `class_index` too. `num_examples`, if given, is only checked against the count
    written.

    Returns the shard base names (a list with `.shard_lengths` and `.num_bytes`).
    """
    check_split(split)
    tf.io.gfile.makedirs(os.fspath(out_dir))
    features = features_spec(num_classes, num_dims)
    serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
    tag = uuid.uuid4().hex[:8]
    tmp_paths: list[str] = []
    shard, offset, nbytes, length, crc, classes = [], [], [], [], [], []
    writer, pos = None, 0
    try:
        for n, raw in enumerate(examples):
            ex = _normalise_example(raw, num_classes, n, num_dims)
            # Deterministic protobuf bytes: the same inputs give byte-identical shards.
            payload = serializer.get_tf_example(features.encode_example(ex)).SerializeToString(
                deterministic=True)
            if writer is None or pos >= target_shard_bytes:
                if writer is not None:
                    writer.close()
                tmp_paths.append(_join(out_dir, f".tmp-{tag}-{split}-{len(tmp_paths):05d}"))
                writer, pos = tf.io.TFRecordWriter(tmp_paths[-1]), 0
            writer.write(payload)
            shard.append(len(tmp_paths) - 1)
            offset.append(pos + FRAME_HEADER)
            nbytes.append(len(payload))
            length.append(ex["length"])
            crc.append(zlib.crc32(payload))
            classes.append(ex["class_index"])
            pos += len(payload) + FRAME_OVERHEAD
        if writer is None:  # an empty split still gets one (empty) shard
            tmp_paths.append(_join(out_dir, f".tmp-{tag}-{split}-00000"))
            writer = tf.io.TFRecordWriter(tmp_paths[-1])
        writer.close()
    except BaseException:
        for p in tmp_paths:
            if tf.io.gfile.exists(p):
                tf.io.gfile.remove(p)
        raise
    if num_examples is not None and num_examples != len(shard):
        log.warning("split %s: expected %d examples, wrote %d", split, num_examples, len(shard))

    names = [shard_name(split, i, len(tmp_paths)) for i in range(len(tmp_paths))]
    for old in shard_names(out_dir, split):
        if old not in names:
            tf.io.gfile.remove(_join(out_dir, old))
    num_bytes = 0
    for tmp, name in zip(tmp_paths, names, strict=True):
        num_bytes += tf.io.gfile.stat(tmp).length
        tf.io.gfile.rename(tmp, _join(out_dir, name), overwrite=True)
    idx = ShardIndex(files=names, shard=np.array(shard, np.int32),
                     offset=np.array(offset, np.int64), nbytes=np.array(nbytes, np.int64),
                     length=np.array(length, np.int64), num_classes=num_classes,
                     crc=np.array(crc, np.uint32), class_index=np.array(classes, np.int64))
    save_index(out_dir, split, idx)
    out = ShardList(names)
    out.shard_lengths = idx.shard_lengths
    out.num_bytes = num_bytes
    return out


def write_tfds_metadata(
        out_dir: str | Path,
        num_classes: int,
        shard_lengths: dict[str, list[int]] | None = None,
        num_dims: int = 0,
) -> None:
    """Writes `dataset_info.json` and `features.json` so TFDS can read the shards.

    `shard_lengths` maps every split present in `out_dir` to its per-shard record counts;
    splits left out (or all, when None) are taken from their index files.
    """
    out_dir = os.fspath(out_dir)
    splits = sorted({m.group(1) for p in tf.io.gfile.glob(_join(out_dir, f"{DATASET_NAME}-*"))
                     if (m := re.match(rf"{DATASET_NAME}-(.+)\.tfrecord-\d{{5,}}-of-\d{{5,}}$",
                                       os.path.basename(p)))})
    if not splits:
        raise ValueError(f"no shards in {out_dir}")
    given = dict(shard_lengths or {})
    unknown = set(given) - set(splits)
    if unknown:
        raise ValueError(f"shard_lengths names splits without shards: {sorted(unknown)}")
    infos = []
    for split in splits:
        files = shard_names(out_dir, split)
        lengths = given.get(split)
        if not lengths:
            index = _current_index(out_dir, split)
            if index is None:
                raise ValueError(f"split {split}: no current {index_name(split)} to count its "
                                 "records; pass its shard_lengths")
            lengths = index.shard_lengths
        if len(lengths) != len(files):
            raise ValueError(f"split {split}: {len(lengths)} shard lengths for {len(files)} "
                             "shards")
        size = sum(tf.io.gfile.stat(_join(out_dir, f)).length for f in files)
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[int(x) for x in lengths],
                                         num_bytes=size))
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir,
        features=features_spec(num_classes, num_dims),
        split_infos=infos,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        check_data=False,
        description="jaxser speech emotion recognition shards (16 kHz int16 audio, "
                    "soft labels)",
    )


def length_histogram(lengths: np.ndarray, sample_rate: int = SAMPLE_RATE,
                     bin_seconds: float = 0.5) -> dict:
    """The `lengths_histogram` of dataset.json: {"edges": seconds [n+1], "counts": [n]}.

    Bins are `bin_seconds` wide from 0 to the first edge at or above the longest example.
    """
    sec = np.asarray(lengths, dtype=np.float64) / sample_rate
    top = max(float(np.ceil(sec.max() / bin_seconds)) if sec.size else 1.0, 1.0) * bin_seconds
    edges = np.round(np.arange(0.0, top + bin_seconds / 2, bin_seconds), 6)
    counts, _ = np.histogram(sec, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


# --------------------------------------------------------------------------------------
# Reading


def load_dataset_info(data_dir: str | Path) -> dict:
    """Reads DIR/dataset.json (labels, corpora, sample_rate, splits...) written by prepare."""
    path = _join(data_dir, DATASET_JSON)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {data_dir} a prepared data directory?")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def dimension_names(data_dir: str | Path) -> list[str]:
    """The emotion dimensions the records of `data_dir` carry (dataset.json `dimensions`;
    none without a dataset.json or in a data set prepared before dimensions existed)."""
    try:
        info = load_dataset_info(data_dir)
    except FileNotFoundError:
        return []
    return list((info.get("dimensions") or {}).get("names") or [])


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """Full paths of the shards of `split`, in shard order (from the index, else a glob)."""
    index = _current_index(data_dir, split)
    files = index.files if index is not None else shard_names(data_dir, split)
    if not files:
        raise ValueError(f"no shards of split {split!r} in {data_dir}")
    return [_join(data_dir, f) for f in files]


def _first_record_keys(files: list[str]) -> set[str]:
    """The feature names of the first record of `files` (empty when there is none)."""
    for raw in tf.data.TFRecordDataset(files).take(1):
        return set(tf.train.Example.FromString(raw.numpy()).features.feature)
    return set()


def read_split(data_dir: str | Path, split: str, num_classes: int) -> tf.data.Dataset:
    """All examples of `split` in file order, decoded by TFDS (audio int16 [length]), with the
    schema the records were written with (`label_mask`, `dims` when they have them)."""
    files = split_files(data_dir, split)
    keys = _first_record_keys(files)
    num_dims = len(dimension_names(data_dir)) if "dims" in keys else 0
    features = features_spec(num_classes, num_dims, label_mask="label_mask" in keys or not keys)
    parser = tfds.core.example_parser.ExampleParser(features.get_serialized_info())
    ds = tf.data.TFRecordDataset(files)
    return ds.map(lambda x: features.decode_example(parser.parse_example(x)),
                  num_parallel_calls=tf.data.AUTOTUNE)
