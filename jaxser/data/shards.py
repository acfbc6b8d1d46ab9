"""The on-disk format of a prepared data set: TFRecord shards, a record index, TFDS metadata.

A prepared directory holds, per split, files named in the TFDS convention

    jaxser-{split}.tfrecord-{i:05d}-of-{n:05d}      serialized tf.train.Example records
    jaxser-{split}.index.npz                       one row per record: shard, byte offset,
                                                   byte size, audio length in samples

plus `dataset_info.json` / `features.json` (so `tfds.builder_from_directory(DIR)` reads the
shards) and `dataset.json` (written by `jaxser prepare`; see `load_dataset_info`).

Records are encoded with the `tfds.features.FeaturesDict` of `features_spec`: the audio is
int16 stored as raw bytes (`Encoding.BYTES`: 2 bytes a sample, parsed with one
`decode_raw`), the label a float32 distribution over the K classes, strings as Text.

The index is what makes the input pipeline exact and cheap: it knows every example's length
(to plan length buckets for a whole epoch without reading audio) and where each record's
payload sits in its shard (to read any record with one positioned read). The writer records
it for free: a TFRecord frame is `len:u64 | crc:u32 | payload | crc:u32`, so the payload of
record j sits at 12 + sum_{i<j}(size_i + 16). For shards written by other tools the index is
rebuilt by scanning the files once (`load_index`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

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
_FRAME_HEADER = 12  # u64 length + u32 masked crc of the length
_FRAME_OVERHEAD = 16  # header + u32 masked crc of the payload
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------------------
# Names


def _check_split(split: str) -> str:
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


def features_spec(num_classes: int) -> tfds.features.FeaturesDict:
    """The record schema: 16 kHz mono int16 audio, a K-class distribution, group strings."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    f = tfds.features
    text = {k: f.Text() for k in TEXT_KEYS}
    return f.FeaturesDict({
        **text,
        "audio": f.Tensor(shape=(None,), dtype=np.int16, encoding=f.Encoding.BYTES),
        "length": f.Scalar(dtype=np.int64),
        "label": f.Tensor(shape=(num_classes,), dtype=np.float32),
        "class_index": f.Scalar(dtype=np.int64),
        "domain": f.Scalar(dtype=np.int64),
    })


def parse_spec(num_classes: int) -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_example` spec of the serialized records (audio stays raw bytes).

    Matches what `features_spec(num_classes)` writes; used by the fast pipeline, which
    pads and crops the raw bytes itself instead of going through TFDS decoding.
    """
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in TEXT_KEYS}
    spec["audio"] = tf.io.FixedLenFeature([], tf.string)
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in INT_KEYS})
    spec["label"] = tf.io.FixedLenFeature([num_classes], tf.float32)
    return spec


def _normalise_example(ex: dict, num_classes: int, position: int) -> dict:
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
    out.update(
        attrs=attrs,
        audio=audio,
        length=length,
        label=label,
        class_index=int(ex.get("class_index", int(np.argmax(label)))),
        domain=int(ex.get("domain", 0)),
    )
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

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    @property
    def shard_lengths(self) -> list[int]:
        """Number of records in each shard."""
        return np.bincount(self.shard, minlength=len(self.files)).astype(int).tolist()


def _save_index(out_dir: str | Path, split: str, idx: ShardIndex) -> None:
    buf = io.BytesIO()
    np.savez(buf, files=np.array(idx.files, dtype=str), shard=idx.shard, offset=idx.offset,
             nbytes=idx.nbytes, length=idx.length, num_classes=np.int64(idx.num_classes))
    _atomic_write(_join(out_dir, index_name(split)), buf.getvalue())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_index(data_dir: str | Path, split: str, num_classes: int | None = None) -> ShardIndex:
    """The record index of `split`; rebuilt by scanning the shards if the file is missing."""
    path = _join(data_dir, index_name(_check_split(split)))
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            return ShardIndex(files=[str(s) for s in z["files"]], shard=z["shard"],
                              offset=z["offset"], nbytes=z["nbytes"], length=z["length"],
                              num_classes=int(z["num_classes"]))
    idx = build_index(data_dir, split, num_classes)
    try:
        _save_index(data_dir, split, idx)
    except (OSError, tf.errors.OpError) as e:  # read-only data dir: keep it in memory
        log.warning("could not save the index of split %s: %s", split, e)
    return idx


def build_index(data_dir: str | Path, split: str, num_classes: int | None = None) -> ShardIndex:
    """Scans the TFRecord frames of `split` (reads every record once)."""
    files = _glob_split(data_dir, split)
    if not files:
        raise ValueError(f"no shards of split {split!r} in {data_dir}")
    shard, offset, nbytes, length = [], [], [], []
    k = num_classes
    for s, name in enumerate(files):
        with tf.io.gfile.GFile(_join(data_dir, name), "rb") as f:
            pos = 0
            while True:
                head = f.read(_FRAME_HEADER)
                if len(head) < _FRAME_HEADER:
                    break
                (size,) = struct.unpack("<Q", head[:8])
                payload = f.read(size)
                f.read(4)
                ex = tf.train.Example.FromString(payload).features.feature
                shard.append(s)
                offset.append(pos + _FRAME_HEADER)
                nbytes.append(size)
                length.append(ex["length"].int64_list.value[0])
                if k is None:
                    k = len(ex["label"].float_list.value)
                pos += size + _FRAME_OVERHEAD
    return ShardIndex(files=files, shard=np.array(shard, np.int32),
                      offset=np.array(offset, np.int64), nbytes=np.array(nbytes, np.int64),
                      length=np.array(length, np.int64), num_classes=int(k or 0))


def _glob_split(data_dir: str | Path, split: str) -> list[str]:
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
) -> ShardList:
    """Writes one split as TFRecord shards of about `target_shard_bytes` each, plus its index.

    Shards are written under temporary names and renamed once complete (the shard count
    is only known at the end), so a crash never leaves a readable half split; shards of
    an earlier write of the same split are removed. `examples` are dicts with the keys of
    `features_spec` (audio a 1-D np.int16 array; `length`, `class_index`, `domain` and the
    strings are filled in when missing; `attrs` may be a dict, stored as JSON).
    `num_examples`, if given, is only checked against the count written.

    Returns the shard base names (a list with `.shard_lengths` and `.num_bytes`).
    """
    _check_split(split)
    tf.io.gfile.makedirs(os.fspath(out_dir))
    features = features_spec(num_classes)
    serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
    tag = uuid.uuid4().hex[:8]
    tmp_paths: list[str] = []
    shard, offset, nbytes, length = [], [], [], []
    writer, pos = None, 0
    try:
        for n, raw in enumerate(examples):
            ex = _normalise_example(raw, num_classes, n)
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
            offset.append(pos + _FRAME_HEADER)
            nbytes.append(len(payload))
            length.append(ex["length"])
            pos += len(payload) + _FRAME_OVERHEAD
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
    for old in _glob_split(out_dir, split):
        if old not in names:
            tf.io.gfile.remove(_join(out_dir, old))
    num_bytes = 0
    for tmp, name in zip(tmp_paths, names, strict=True):
        num_bytes += tf.io.gfile.stat(tmp).length
        tf.io.gfile.rename(tmp, _join(out_dir, name), overwrite=True)
    idx = ShardIndex(files=names, shard=np.array(shard, np.int32),
                     offset=np.array(offset, np.int64), nbytes=np.array(nbytes, np.int64),
                     length=np.array(length, np.int64), num_classes=num_classes)
    _save_index(out_dir, split, idx)
    out = ShardList(names)
    out.shard_lengths = idx.shard_lengths
    out.num_bytes = num_bytes
    return out


def write_tfds_metadata(
        out_dir: str | Path,
        num_classes: int,
        shard_lengths: dict[str, list[int]] | None = None,
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
        files = _glob_split(out_dir, split)
        lengths = given.get(split) or load_index(out_dir, split, num_classes).shard_lengths
        if len(lengths) != len(files):
            raise ValueError(f"split {split}: {len(lengths)} shard lengths for {len(files)} "
                             "shards")
        size = sum(tf.io.gfile.stat(_join(out_dir, f)).length for f in files)
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[int(x) for x in lengths],
                                         num_bytes=size))
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir,
        features=features_spec(num_classes),
        split_infos=infos,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        check_data=False,
        description="jaxser speech emotion recognition shards (16 kHz int16 audio, "
                    "soft labels)",
    )


def length_histogram(lengths: np.ndarray, sample_rate: int = 16000,
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


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """Full paths of the shards of `split`, in shard order (from the index, else a glob)."""
    _check_split(split)
    if tf.io.gfile.exists(_join(data_dir, index_name(split))):
        files = load_index(data_dir, split).files
    else:
        files = _glob_split(data_dir, split)
    if not files:
        raise ValueError(f"no shards of split {split!r} in {data_dir}")
    return [_join(data_dir, f) for f in files]


def read_split(data_dir: str | Path, split: str, num_classes: int) -> tf.data.Dataset:
    """All examples of `split` in file order, decoded by TFDS (audio int16 [length])."""
    features = features_spec(num_classes)
    parser = tfds.core.example_parser.ExampleParser(features.get_serialized_info())
    ds = tf.data.TFRecordDataset(split_files(data_dir, split))
    return ds.map(lambda x: features.decode_example(parser.parse_example(x)),
                  num_parallel_calls=tf.data.AUTOTUNE)
