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
`decode_raw`), the label a float32 distribution over the K classes, strings as Text.

The index is what makes the input pipeline exact and cheap: it knows every example's length
(to plan length buckets for a whole epoch without reading audio) and where each record's
payload sits in its shard (to read any record with one positioned read). The writer records
it for free: a TFRecord frame is `len:u64 | crc:u32 | payload | crc:u32`, so the payload of
record j sits at 12 + sum_{i<j}(size_i + 16). For shards written by other tools the index is
rebuilt by scanning the files once (`load_index`).

Integrity. The pipeline reads payloads by offset, so TFRecord's own checksums (masked
CRC-32C of the length and of the payload, checked only by a streaming TFRecord reader) are
never looked at on that path. The index therefore stores `zlib.crc32` of every payload,
computed by the writer from the bytes it serialised (index format version 2), and the
reader checks each payload it reads against it: one pass of a C routine over bytes already
in memory (about 7 GB/s on one core here, 19 us for a 4 s utterance; it releases the GIL).
zlib's CRC-32 is used rather than TFRecord's CRC-32C because no CRC-32C library is
installed (a pure Python one is far too slow for audio); both catch any flipped bit. When
an index is built by scanning (`build_index`: no index, an index of version 1, or an
unreadable one), every frame is read through TF's random-access TFRecord reader, which
verifies the CRC-32C of the length and of the payload, so the CRC-32 recorded is that of
intact data. Damaged frames are left out of a scanned index and described in
`ShardIndex.problems`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow.python.lib.io import tf_record as _tf_record  # random-access, CRC-checked

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
INDEX_VERSION = 2  # 1: no payload crc32; 2: `crc` per record


class CorruptRecord(ValueError):
    """A record of a shard is damaged (truncated, checksum mismatch, unparsable)."""


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
    crc: np.ndarray  # [N] uint32, zlib.crc32 of each payload
    # Damaged frames a scan found and left out ("file: record j (byte b): what"); never
    # saved: an index with problems is kept in memory only (see `load_index`).
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.shard.shape[0])

    @property
    def shard_lengths(self) -> list[int]:
        """Number of records in each shard."""
        return np.bincount(self.shard, minlength=len(self.files)).astype(int).tolist()

    def first_of_shard(self) -> np.ndarray:
        """[S] position in the index of the first record of each shard."""
        return np.concatenate([[0], np.cumsum(self.shard_lengths)[:-1]]).astype(np.int64)


def _save_index(out_dir: str | Path, split: str, idx: ShardIndex) -> None:
    buf = io.BytesIO()
    np.savez(buf, files=np.array(idx.files, dtype=str), shard=idx.shard, offset=idx.offset,
             nbytes=idx.nbytes, length=idx.length, num_classes=np.int64(idx.num_classes),
             crc=idx.crc.astype(np.uint32), version=np.int64(INDEX_VERSION))
    _atomic_write(_join(out_dir, index_name(split)), buf.getvalue())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_index(data_dir: str | Path, split: str, num_classes: int | None = None) -> ShardIndex:
    """The record index of `split`.

    Read from its file when that is current (version 2); otherwise (missing, version 1
    without checksums, unreadable) rebuilt by a checked scan of the shards (`build_index`)
    and saved, unless the scan found damaged records (`problems`): such an index would go
    stale once the shard is restored, so it is kept in memory only (memoised on the shards'
    sizes and modification times, so repeated loads do not rescan).
    """
    path = _join(data_dir, index_name(_check_split(split)))
    why = ""
    if tf.io.gfile.exists(path):
        try:
            got = _read_index(path)
        except Exception as e:  # noqa: BLE001 - a damaged index file is rebuilt
            got = f"it cannot be read ({_first_line(e)})"
        if isinstance(got, ShardIndex):
            return got
        why = got if isinstance(got, str) else (f"it has format version {got} (no record "
                                                "checksums)")
    key = _scan_key(data_dir, split, num_classes)
    idx = _SCANNED.get(key)
    if idx is None:
        if why:
            log.warning("index of split %s in %s: %s; rebuilding it by a checked scan of the "
                        "shards", split, data_dir, why)
        idx = build_index(data_dir, split, num_classes)
        if idx.problems:  # Reported by the pipeline: an error, or one skip_corrupt warning.
            log.info("split %s in %s: %d damaged record(s) left out of the index: %s", split,
                     data_dir, len(idx.problems), "; ".join(idx.problems))
        else:
            try:
                _save_index(data_dir, split, idx)
                return idx
            except (OSError, tf.errors.OpError) as e:  # read-only data dir: keep it in memory
                log.warning("could not save the index of split %s: %s", split, e)
        while len(_SCANNED) >= 8:
            _SCANNED.pop(next(iter(_SCANNED)))
        _SCANNED[key] = idx
    return idx


# Indexes built by a scan but not saved, by (directory, split, classes, shard stats).
_SCANNED: dict[tuple, ShardIndex] = {}


def _scan_key(data_dir: str | Path, split: str, num_classes: int | None) -> tuple:
    stats = []
    for name in _glob_split(data_dir, split):
        st = tf.io.gfile.stat(_join(data_dir, name))
        stats.append((name, st.length, st.mtime_nsec))
    return (os.fspath(data_dir), split, num_classes, tuple(stats))


def _read_index(path: str) -> ShardIndex | int:
    """The index in `path`, or its format version when that is older than INDEX_VERSION."""
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
                         num_classes=int(z["num_classes"]), crc=z["crc"].astype(np.uint32))
    n = len(idx)
    if not all(getattr(idx, k).shape == (n,) for k in ("offset", "nbytes", "length", "crc")):
        raise ValueError(f"{path}: index arrays of different lengths")
    return idx


def build_index(data_dir: str | Path, split: str, num_classes: int | None = None) -> ShardIndex:
    """Scans the TFRecord frames of `split` (reads every record once, checksums verified).

    Every frame is read with TF's CRC-checked random-access reader and parsed; a frame that
    fails (truncated, checksum mismatch, not an Example of the record schema) is left out
    and described in `problems`. After a damaged frame the scan goes on with the next one
    when the damaged frame's length header is intact (its CRC-32C is checked here), else
    the rest of that shard is lost (also reported).
    """
    files = _glob_split(data_dir, split)
    if not files:
        raise ValueError(f"no shards of split {split!r} in {data_dir}")
    cols: dict[str, list] = {"shard": [], "offset": [], "nbytes": [], "length": [], "crc": []}
    problems: list[str] = []
    k = num_classes
    for s, name in enumerate(files):
        path = _join(data_dir, name)
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
            if payload is not None:
                what, length, labels = _check_example(payload, k)
                if what is None:
                    k = labels if k is None else k
                    cols["shard"].append(s)
                    cols["offset"].append(pos + _FRAME_HEADER)
                    cols["nbytes"].append(len(payload))
                    cols["length"].append(length)
                    cols["crc"].append(zlib.crc32(payload))
            if what is not None:
                problems.append(f"{name}: record {j} (byte {pos}): {what}")
            if nxt is None:
                break
            pos, j = nxt, j + 1
    return ShardIndex(files=files, shard=np.array(cols["shard"], np.int32),
                      offset=np.array(cols["offset"], np.int64),
                      nbytes=np.array(cols["nbytes"], np.int64),
                      length=np.array(cols["length"], np.int64), num_classes=int(k or 0),
                      crc=np.array(cols["crc"], np.uint32), problems=tuple(problems))


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

    The scan can step over a damaged frame only when its length header is intact (its
    CRC-32C matches) and the frame ends inside the file.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(pos)
        head = f.read(_FRAME_HEADER)
    if len(head) == _FRAME_HEADER:
        (n,) = struct.unpack("<Q", head[:8])
        (crc,) = struct.unpack("<I", head[8:])
        if _masked_crc32c(head[:8]) == crc:
            end = pos + n + _FRAME_OVERHEAD
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
    shard, offset, nbytes, length, crc = [], [], [], [], []
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
            crc.append(zlib.crc32(payload))
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
                     length=np.array(length, np.int64), num_classes=num_classes,
                     crc=np.array(crc, np.uint32))
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
