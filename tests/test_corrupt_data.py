"""Damaged shards (issue 12): stop naming the file and record, or skip with one warning.

A flipped byte in a record's audio, a truncated shard, a missing shard and an unparsable
record each stop the input pipeline with `CorruptRecord` naming the shard file, the record
and what is wrong (the default), and the training loop's DataError shows it. With
`skip_corrupt` the damaged records are dropped from the plan, identically on every host,
with one warning per process saying what was dropped and how many examples remain.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from jaxser.data import buckets, pipeline, records, shards

K = 3
SR = 100  # a tiny sample rate keeps the arrays small


def _examples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{
        "id": f"u{i:03d}",
        "audio": rng.integers(-32768, 32767, size=int(rng.integers(50, 400)), dtype=np.int16),
        "label": rng.dirichlet(np.ones(K)).astype(np.float32),
        "speaker": f"s{i % 4}",
    } for i in range(n)]


def _write(d, n: int = 30, json_counts: bool = True) -> list[dict]:
    """Writes split `train` (several shards) and, optionally, dataset.json's counts."""
    exs = _examples(n)
    names = shards.write_split(d, "train", exs, K, target_shard_bytes=2500)
    assert len(names) >= min(3, n // 5)
    if json_counts:
        (d / "dataset.json").write_text(json.dumps({"labels": ["a", "b", "c"], "splits": {
            "train": {"count": n, "files": list(names), "shard_lengths": names.shard_lengths}}}))
    return exs


def _cfg(**kw) -> pipeline.PipelineConfig:
    base = dict(global_batch=4, sample_rate=SR, pad_multiple=10, num_buckets=3)
    return pipeline.PipelineConfig(**{**base, **kw})


def _shard_path(d, index: shards.ShardIndex, row: int) -> str:
    return os.path.join(str(d), index.files[int(index.shard[row])])


def _record_in_shard(index: shards.ShardIndex, row: int) -> int:
    return row - int(index.first_of_shard()[int(index.shard[row])])


def _flip_audio_byte(d, index: shards.ShardIndex, row: int, ex: dict) -> None:
    """Flips one bit of a sample inside record `row`'s audio (the record stays parsable)."""
    path = _shard_path(d, index, row)
    with open(path, "r+b") as f:
        f.seek(int(index.offset[row]))
        payload = f.read(int(index.nbytes[row]))
        at = payload.find(ex["audio"].tobytes())
        assert at >= 0
        f.seek(int(index.offset[row]) + at + 7)
        byte = f.read(1)[0]
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _ids(batch: dict) -> list[str]:
    return [i for i, v in zip(batch["meta"]["id"], batch["valid"], strict=True) if v > 0]


class _Warnings:
    """Collects the WARNING records of the data loggers (pipeline, buckets, records)."""

    def __enter__(self):
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self.records.append
        logging.getLogger("jaxser.data").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jaxser.data").removeHandler(self.handler)

    @property
    def skip(self) -> list[str]:
        return [r.getMessage() for r in self.records if "skip_corrupt" in r.getMessage()]


def _epoch_ids(its, steps: int) -> list[str]:
    seen = []
    for _ in range(steps):
        batches = [next(it) for it in its]
        assert len({b["audio"].shape for b in batches}) == 1  # same shape on every host
        for b in batches:
            seen += _ids(b)
    return seen


# --------------------------------------------------------------------------------------
# Stop mode (the default)


def test_flipped_audio_byte_stops_naming_the_file_and_record(tmp_path):
    exs = _write(tmp_path)
    index = records.load_index(tmp_path, "train")
    row = int(index.first_of_shard()[1]) + 1  # record 1 of the second shard
    _flip_audio_byte(tmp_path, index, row, exs[row])
    with open(_shard_path(tmp_path, index, row), "rb") as f:  # Still parses: silent before.
        f.seek(int(index.offset[row]))
        tf.io.parse_example(tf.constant([f.read(int(index.nbytes[row]))]),
                            shards.parse_spec(K))
    expected = (f"{_shard_path(tmp_path, index, row)}: record 1 of the shard "
                f"(payload at byte {int(index.offset[row])}; example {row} of split 'train'): "
                "checksum mismatch")
    it = pipeline.train_iterator(str(tmp_path), "train", _cfg(), process_index=0,
                                 process_count=1)
    with pytest.raises(records.CorruptRecord) as err:
        for _ in range(it.steps_per_epoch):
            next(it)
    assert str(err.value).startswith(expected), err.value
    with pytest.raises(records.CorruptRecord, match="checksum mismatch") as failed:
        list(pipeline.eval_batches(str(tmp_path), "train", 4, _cfg(), process_index=0,
                                   process_count=1))

    # The DataError the training loop raises for it shows it (first line of its message)
    # and names the damaged shard.
    error = records.read_failure(str(tmp_path), "train", "the batch of step 3", failed.value)
    assert isinstance(error, records.DataError)
    message = str(error)
    assert message.startswith("reading the batch of step 3 of split 'train'"), message
    assert f"CorruptRecord: {expected}" in message, message
    assert f"damaged shard(s): {_shard_path(tmp_path, index, row)} (" in message, message


def test_unparsable_record_with_a_good_checksum_is_named(tmp_path):
    """A record whose bytes match the index but are no Example (a foreign writer's bug)."""
    _write(tmp_path, 12)
    index = records.load_index(tmp_path, "train")
    row = 5
    with open(_shard_path(tmp_path, index, row), "r+b") as f:
        f.seek(int(index.offset[row]))
        f.write(b"\xff" * int(index.nbytes[row]))
    path = tmp_path / shards.index_name("train")
    z = dict(np.load(path))
    z["crc"] = z["crc"].copy()
    z["crc"][row] = __import__("zlib").crc32(b"\xff" * int(index.nbytes[row]))
    np.savez(path, **z)
    batches = pipeline.eval_batches(str(tmp_path), "train", 2, _cfg(), process_index=0,
                                    process_count=1)
    with pytest.raises(records.CorruptRecord) as err:
        list(batches)
    message = str(err.value)
    assert message.startswith(f"{_shard_path(tmp_path, index, row)}: record "
                              f"{_record_in_shard(index, row)} of the shard"), message
    assert "unparsable" in message, message


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_truncated_or_missing_shard_stops_at_start(tmp_path, damage):
    _write(tmp_path)
    index = records.load_index(tmp_path, "train")
    path = os.path.join(tmp_path, index.files[1])
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 30)
    with pytest.raises(records.CorruptRecord) as err:
        pipeline.train_iterator(str(tmp_path), "train", _cfg(), process_index=0,
                                process_count=1)
    message = str(err.value)
    assert path in message and damage in message and "skip_corrupt" in message, message
    if damage == "truncated":
        assert "the last 1 of its" in message, message


def test_scanned_index_with_damage_stops_naming_it(tmp_path):
    """No index file and a damaged shard: the scan leaves the record out and says so."""
    exs = _write(tmp_path, json_counts=False)
    index = records.load_index(tmp_path, "train")
    _flip_audio_byte(tmp_path, index, 3, exs[3])
    os.remove(tmp_path / shards.index_name("train"))
    with pytest.raises(records.CorruptRecord) as err:
        pipeline.train_iterator(str(tmp_path), "train", _cfg(), process_index=0,
                                process_count=1)
    where = (f"{index.files[int(index.shard[3])]}: record {_record_in_shard(index, 3)} "
             f"(byte {int(index.offset[3]) - 12})")
    assert where in str(err.value), err.value
    assert "corrupted record" in str(err.value)


# --------------------------------------------------------------------------------------
# Skip mode


def test_skip_drops_exactly_the_damaged_records_the_same_on_two_hosts(tmp_path):
    exs = _write(tmp_path, 40)
    index = records.load_index(tmp_path, "train")
    first = index.first_of_shard()
    bad_rows = [int(first[0]), int(first[0]) + 2, int(first[2]) + 1]
    for row in bad_rows:
        _flip_audio_byte(tmp_path, index, row, exs[row])
    cfg = _cfg(skip_corrupt=True)
    with _Warnings() as w:
        its = []
        for host in range(2):  # Each host is its own process: nothing memoised between them.
            records.clear_cache()
            its.append(pipeline.train_iterator(str(tmp_path), "train", cfg,
                                               process_index=host, process_count=2))
        steps = pipeline.epoch_steps(str(tmp_path), "train", cfg, 2)  # Memoised: no warning.
    assert len(w.skip) == 2 and w.skip[0] == w.skip[1], w.skip
    message = w.skip[0]
    assert (f"dropped 3 damaged record(s): {index.files[0]} (2 records: checksum mismatch), "
            f"{index.files[2]} (1 record: checksum mismatch); training on 37 of 40 examples"
            in message), message

    want = sorted(e["id"] for i, e in enumerate(exs) if i not in bad_rows)
    src0, src1 = its[0]._src, its[1]._src
    np.testing.assert_array_equal(src0.ids, src1.ids)
    assert sorted(set(range(40)) - set(src0.ids.tolist())) == bad_rows
    assert steps == its[0].steps_per_epoch == its[1].steps_per_epoch
    for epoch in range(2):
        for f in dataclasses.fields(buckets.Plan):
            np.testing.assert_array_equal(getattr(src0.plan(epoch), f.name),
                                          getattr(src1.plan(epoch), f.name))
        seen = _epoch_ids(its, steps)
        assert sorted(seen) == want, epoch  # Every intact example exactly once per epoch.
    assert its[0].state()["skipped"] == 3


@pytest.mark.parametrize("with_index", [True, False])
def test_skip_a_truncated_shard(tmp_path, with_index):
    _write(tmp_path, 30)
    index = records.load_index(tmp_path, "train")
    last = len(index.files) - 1
    rows = np.flatnonzero(index.shard == last)
    assert rows.size >= 3
    cut = int(index.offset[rows[-2]]) + 10  # Inside the payload of its second-to-last record.
    path = os.path.join(tmp_path, index.files[last])
    with open(path, "r+b") as f:
        f.truncate(cut)
    if not with_index:
        os.remove(tmp_path / shards.index_name("train"))
    with pytest.raises(records.CorruptRecord, match=index.files[last]):
        pipeline.train_iterator(str(tmp_path), "train", _cfg(), process_index=0,
                                process_count=1)
    records.clear_cache()
    cfg = _cfg(skip_corrupt=True, batch_seconds=8.0)
    with _Warnings() as w:
        its = [pipeline.train_iterator(str(tmp_path), "train", cfg, process_index=h,
                                       process_count=2) for h in range(2)]
    assert len(w.skip) == 1, w.skip
    why = "truncated" if with_index else "missing, unreadable"
    assert (f"dropped 2 damaged record(s): {index.files[last]} (2 records: {why}); "
            "training on 28 of 30 examples" in w.skip[0]), w.skip[0]
    want = sorted(f"u{i:03d}" for i in range(30) if i not in rows[-2:])
    for _ in range(2):
        assert sorted(_epoch_ids(its, its[0].steps_per_epoch)) == want
    assert not with_index or (tmp_path / shards.index_name("train")).exists()
    if not with_index:  # A scanned index with damage is never saved (it would go stale).
        assert not (tmp_path / shards.index_name("train")).exists()


def test_skip_evaluation_and_a_missing_shard(tmp_path):
    _write(tmp_path, 30)
    index = records.load_index(tmp_path, "train")
    os.remove(os.path.join(tmp_path, index.files[1]))
    gone = int(np.sum(index.shard == 1))
    with _Warnings() as w:
        batches = [list(pipeline.eval_batches(str(tmp_path), "train", 3,
                                              _cfg(skip_corrupt=True), process_index=h,
                                              process_count=2)) for h in range(2)]
    assert len(w.skip) == 1 and (f"{index.files[1]} ({gone} records: missing); evaluating on "
                                 f"{30 - gone} of 30 examples") in w.skip[0], w.skip
    seen = [i for bs in batches for b in bs for i in _ids(b)]
    assert sorted(seen) == sorted(f"u{i:03d}" for i in range(30) if index.shard[i] != 1)


def test_skip_with_nothing_damaged_is_silent_and_changes_nothing(tmp_path):
    _write(tmp_path, 25)
    with _Warnings() as w:
        plain, skip = (pipeline.train_iterator(str(tmp_path), "train", _cfg(skip_corrupt=s),
                                               process_index=0, process_count=1)
                       for s in (False, True))
        for _ in range(plain.steps_per_epoch + 2):
            a, b = next(plain), next(skip)
            assert a["meta"]["id"].tolist() == b["meta"]["id"].tolist()
            np.testing.assert_array_equal(a["audio"], b["audio"])
    assert not w.records
    assert plain.state() == {**skip.state()} and skip.state()["skipped"] == 0


def test_skip_when_every_record_is_damaged_still_stops(tmp_path):
    exs = _write(tmp_path, 6)
    index = records.load_index(tmp_path, "train")
    for row in range(6):
        _flip_audio_byte(tmp_path, index, row, exs[row])
    with pytest.raises(ValueError, match="no intact examples"):
        pipeline.train_iterator(str(tmp_path), "train", _cfg(skip_corrupt=True),
                                process_index=0, process_count=1)


# --------------------------------------------------------------------------------------
# Through the training loop


def test_training_skips_a_damaged_record_when_asked(data_dir, tmp_path):
    """`data.skip_corrupt=True`: training runs on 19 of the 20 examples and says so."""
    import shutil

    from _worker import load_cfg

    from jaxser.train import loop

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    index = records.load_index(data, "train")
    row = 4
    with open(_shard_path(data, index, row), "r+b") as f:  # A byte in the middle of the audio.
        at = int(index.offset[row]) + int(index.nbytes[row]) // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))
    workdir = tmp_path / "w"
    summary = loop.train(load_cfg(workdir, data, "--config.train.max_steps=2",
                                  "--config.data.skip_corrupt=True"))
    assert summary["step"] == 2 and summary["stopped"] == "finished"
    text = (workdir / "train.log").read_text()
    warnings = [line for line in text.splitlines() if "skip_corrupt: split 'train'" in line]
    assert len(warnings) == 1, text
    assert (f"dropped 1 damaged record(s): {index.files[int(index.shard[row])]} (1 record: "
            "checksum mismatch); training on 19 of 20 examples") in warnings[0], warnings[0]
