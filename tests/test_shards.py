"""Shard format: writer/reader round trip, TFDS compatibility, index, metadata helpers."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxser.data import records, shards

K = 4


def _examples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = rng.dirichlet(np.ones(K)).astype(np.float32)
        out.append({
            "id": f"utt{i:03d}",
            "audio": rng.integers(-32768, 32767, size=int(rng.integers(50, 400)),
                                  dtype=np.int16),
            "label": label,
            "domain": i % 3,
            "speaker": f"spk{i % 5}",
            "corpus": ["a", "b", "c"][i % 3],
            "language": "en",
            "gender": "female" if i % 2 else "male",
            "age": "adult",
            "attrs": {"personality": "x", "i": i} if i % 2 else "",
        })
    return out


def _check_same(got: dict, ex: dict) -> None:
    def s(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    np.testing.assert_array_equal(got["audio"], ex["audio"])
    assert got["audio"].dtype == np.int16
    np.testing.assert_array_equal(got["label"], ex["label"])
    assert int(got["length"]) == ex["audio"].shape[0]
    assert int(got["class_index"]) == int(np.argmax(ex["label"]))
    assert int(got["domain"]) == ex["domain"]
    for k in ("id", "speaker", "corpus", "language", "gender", "age"):
        assert s(got[k]) == ex[k]
    attrs = ex["attrs"] if isinstance(ex["attrs"], str) else json.dumps(ex["attrs"],
                                                                        sort_keys=True)
    assert s(got["attrs"]) == attrs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    exs = _examples(23)
    names = shards.write_split(d, "train", iter(exs), K, target_shard_bytes=3000)
    shards.write_split(d, "test", iter(exs[:5]), K)
    shards.write_tfds_metadata(d, K, {"train": names.shard_lengths})
    return d, exs, names


def test_write_names_and_lengths(data_dir):
    d, exs, names = data_dir
    assert len(names) > 2
    n = len(names)
    assert list(names) == [f"jaxser-train.tfrecord-{i:05d}-of-{n:05d}" for i in range(n)]
    assert sum(names.shard_lengths) == len(exs)
    assert names.num_bytes == sum(os.path.getsize(d / f) for f in names)
    assert shards.split_files(d, "train") == [os.path.join(str(d), f) for f in names]
    assert not [f for f in os.listdir(d) if ".tmp" in f]


def test_round_trip_exact(data_dir):
    d, exs, _ = data_dir
    got = list(shards.read_split(d, "train", K).as_numpy_iterator())
    assert len(got) == len(exs)
    for g, ex in zip(got, exs, strict=True):
        _check_same(g, ex)


def test_tfds_builder_reads_the_same(data_dir):
    d, exs, names = data_dir
    builder = tfds.builder_from_directory(str(d))
    assert builder.info.splits["train"].num_examples == len(exs)
    assert builder.info.splits["train"].shard_lengths == names.shard_lengths
    assert builder.info.splits["test"].num_examples == 5
    got = list(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())
    by_id = {g["id"].decode(): g for g in got}
    assert len(by_id) == len(exs)
    for ex in exs:
        _check_same(by_id[ex["id"]], ex)


def test_index_matches_a_scan(data_dir):
    d, exs, _ = data_dir
    idx = records.load_index(d, "train")
    scan = records.build_index(d, "train")
    assert idx.files == scan.files and idx.num_classes == scan.num_classes == K
    for k in ("shard", "offset", "nbytes", "length", "crc"):
        np.testing.assert_array_equal(getattr(idx, k), getattr(scan, k))
    np.testing.assert_array_equal(idx.length, [e["audio"].shape[0] for e in exs])
    assert scan.problems == ()


def test_index_holds_the_crc32_of_every_payload(data_dir):
    d, _, _ = data_dir
    idx = records.load_index(d, "train")
    assert int(np.load(d / shards.index_name("train"))["version"]) == shards.INDEX_VERSION
    for row in range(len(idx)):
        with open(d / idx.files[int(idx.shard[row])], "rb") as f:
            f.seek(int(idx.offset[row]))
            payload = f.read(int(idx.nbytes[row]))
        assert zlib.crc32(payload) == int(idx.crc[row])
        assert records.record_problem(payload, int(idx.nbytes[row]), int(idx.crc[row])) is None
    bad = bytes([payload[0] ^ 1]) + payload[1:]
    assert "checksum mismatch" in records.record_problem(bad, len(payload), int(idx.crc[-1]))
    assert "truncated" in records.record_problem(payload[:-3], len(payload), int(idx.crc[-1]))


def test_masked_crc32c_matches_tfrecord_headers(data_dir):
    d, _, names = data_dir
    with open(d / names[0], "rb") as f:
        head = f.read(12)
    assert records._masked_crc32c(head[:8]) == struct.unpack("<I", head[8:])[0]


@pytest.mark.parametrize("old", ["version_1", "garbage"])
def test_old_or_unreadable_index_is_rebuilt_with_checksums(tmp_path, old):
    shards.write_split(tmp_path, "train", _examples(9), K, target_shard_bytes=1500)
    path = tmp_path / shards.index_name("train")
    want = records.load_index(tmp_path, "train")
    if old == "version_1":  # The format before checksums: no `crc`, no `version`.
        z = dict(np.load(path))
        np.savez(path, **{k: v for k, v in z.items() if k not in ("crc", "version")})
    else:
        path.write_bytes(b"PK\x03\x04 not a zip")
    got = records.load_index(tmp_path, "train")
    np.testing.assert_array_equal(got.crc, want.crc)
    np.testing.assert_array_equal(got.offset, want.offset)
    assert int(np.load(path)["version"]) == shards.INDEX_VERSION  # Saved again, current.


def _flip(path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))


def test_scan_leaves_out_a_damaged_frame_and_goes_on(tmp_path):
    names = shards.write_split(tmp_path, "train", _examples(12), K, target_shard_bytes=1500)
    want = records.load_index(tmp_path, "train")
    rows = np.flatnonzero(want.shard == 0)
    assert rows.size >= 3
    _flip(tmp_path / names[0], int(want.offset[1]) + 20)  # A payload byte of record 1.
    os.remove(tmp_path / shards.index_name("train"))
    got = records.load_index(tmp_path, "train")
    assert got.problems == (f"{names[0]}: record 1 (byte {int(want.offset[1]) - 12}): "
                            f"DataLossError: corrupted record at {int(want.offset[1])}",)
    keep = np.arange(len(want)) != 1
    for k in ("shard", "offset", "nbytes", "length", "crc"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k)[keep])
    # Not saved (it would go stale when the shard is restored); memoised instead.
    assert not (tmp_path / shards.index_name("train")).exists()
    assert records.load_index(tmp_path, "train") is got


def test_scan_stops_in_a_shard_whose_length_header_is_damaged(tmp_path):
    names = shards.write_split(tmp_path, "train", _examples(12), K, target_shard_bytes=1500)
    want = records.load_index(tmp_path, "train")
    n0 = int(np.sum(want.shard == 0))
    _flip(tmp_path / names[0], int(want.offset[1]) - 12 + 1)  # The length of record 1.
    got = records.build_index(tmp_path, "train")
    assert len(got.problems) == 1 and got.problems[0].startswith(f"{names[0]}: record 1 ")
    assert "length header is damaged: the rest of the shard" in got.problems[0]
    assert len(got) == len(want) - (n0 - 1)  # Records 1.. of shard 0 are lost, not others.
    assert got.shard_lengths[1:] == want.shard_lengths[1:]


def test_missing_index_is_rebuilt(tmp_path):
    exs = _examples(4)
    shards.write_split(tmp_path, "train", exs, K)
    os.remove(tmp_path / shards.index_name("train"))
    idx = records.load_index(tmp_path, "train")
    assert len(idx) == 4
    assert (tmp_path / shards.index_name("train")).exists()


def test_rewrite_removes_stale_shards(tmp_path):
    exs = _examples(12)
    first = shards.write_split(tmp_path, "train", exs, K, target_shard_bytes=1500)
    second = shards.write_split(tmp_path, "train", exs[:3], K)
    assert len(first) > 1 and len(second) == 1
    left = sorted(f for f in os.listdir(tmp_path) if ".tfrecord-" in f)
    assert left == list(second)
    assert len(records.load_index(tmp_path, "train")) == 3


def test_empty_split_gets_one_empty_shard(tmp_path):
    names = shards.write_split(tmp_path, "dev", [], K)
    assert names.shard_lengths == [0]
    assert len(list(shards.read_split(tmp_path, "dev", K))) == 0


@pytest.mark.parametrize("bad, match", [
    ({"audio": np.zeros(10, np.float32)}, "audio"),
    ({"audio": np.zeros((2, 10), np.int16)}, "audio"),
    ({"label": np.ones(K + 1, np.float32)}, "label"),
    ({"length": 3}, "length"),
])
def test_bad_examples_raise(tmp_path, bad, match):
    ex = {**_examples(1)[0], **bad}
    with pytest.raises(ValueError, match=match):
        shards.write_split(tmp_path, "train", [ex], K)
    assert not os.listdir(tmp_path) or not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="split"):
        shards.write_split(tmp_path, "a/b", _examples(1), K)


def test_length_histogram_schema():
    h = shards.length_histogram(np.array([8000, 16000, 40000]), 16000, 0.5)
    assert h["edges"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert h["counts"] == [0, 1, 1, 0, 1]
    assert sum(h["counts"]) == 3


def test_load_dataset_info(tmp_path):
    with pytest.raises(FileNotFoundError):
        shards.load_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": ["a", "b"]}))
    assert shards.load_dataset_info(tmp_path)["labels"] == ["a", "b"]
