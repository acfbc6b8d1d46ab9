"""`jaxser prepare` end to end on tiny synthetic files: decode, labels, splits, shards, rejects."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
from _files import write_csv

from jaxser.data import decode, labels, manifest, prepare, shards, splits

EM2LDL = labels.builtin_taxonomy("em2ldl32").classes


# ----------------------------------------------------------------------------- helpers


def _tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Sine + noise, float32 [frames] or [frames, channels]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    y = 0.3 * np.sin(2 * np.pi * (180 + 20 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    if channels == 2:
        y = np.stack([y, 0.5 * y + 0.02 * rng.standard_normal(t.size)], axis=1)
    return y.astype(np.float32)


def _write(path: Path, seconds: float = 0.3, sr: int = 16000, channels: int = 1, seed: int = 0,
           **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _tone(seconds, sr, channels, seed), sr, **kw)
    return path


def _expected(path: Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """What prepare should store, computed independently with soundfile + librosa.resample."""
    y, sr = sf.read(path, dtype="float32", always_2d=True)
    if start is not None or end is not None:
        y = y[int(round((start or 0) * sr)):None if end is None else int(round(end * sr))]
    mono = y.mean(axis=1) if y.shape[1] > 1 else y[:, 0]
    if sr != 16000:
        mono = librosa.resample(mono, orig_sr=sr, target_sr=16000, res_type="soxr_hq")
    return np.clip(np.round(mono.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples(out: Path, split: str) -> list[dict]:
    """The examples of a written split, read back through the shard reader."""
    info = json.loads((out / "dataset.json").read_text())
    ds = shards.read_split(out, split, len(info["labels"]))
    return [{k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()}
            for ex in ds.as_numpy_iterator()]


def _read(out: Path, split: str) -> dict[str, dict]:
    """id -> example of a written split (ids of one corpus)."""
    return {ex["id"]: ex for ex in _examples(out, split)}


def _rejected(out: Path) -> list[dict]:
    with open(out / "rejected.csv", newline="") as f:
        return list(csv.DictReader(f))


def _no_decoding(monkeypatch):
    """Makes any audio decode fail the test (checks that errors come before decoding)."""
    def boom(task):
        raise AssertionError(f"audio decoded: {task}")
    monkeypatch.setattr(decode, "decode", boom)


def _corpus(root: Path, name: str, speakers: int = 6, per_speaker: int = 2,
            labels=("neutral", "happy", "sad", "angry")) -> Path:
    """A small label-form corpus: `speakers` x `per_speaker` 0.25 s files."""
    rows = []
    for s in range(speakers):
        for u in range(per_speaker):
            rel = f"wav/{name}_{s}_{u}.wav"
            _write(root / rel, 0.25, seed=s * 10 + u)
            rows.append({"path": rel, "speaker": f"s{s}", "corpus": name,
                         "gender": "female" if s % 2 else "male",
                         "label": labels[(s + u) % len(labels)]})
    return write_csv(root / f"{name}.csv", rows)


# ----------------------------------------------------------------------------- tests


def test_round_trip_formats_rates_channels_segments(tmp_path):
    files = {
        "w8k": _write(tmp_path / "a" / "w8k.wav", sr=8000, seed=1),
        "w16k": _write(tmp_path / "a" / "w16k.wav", sr=16000, seed=2, subtype="PCM_16"),
        "st22k": _write(tmp_path / "a" / "st22k.wav", sr=22050, channels=2, seed=3),
        "fl44k": _write(tmp_path / "a" / "fl44k.flac", sr=44100, seed=4),
        "og16k": _write(tmp_path / "a" / "og16k.ogg", sr=16000, seed=5, format="OGG",
                        subtype="VORBIS"),
        "mp3": _write(tmp_path / "a" / "m.mp3", sr=16000, seed=6, format="MP3"),
        "st48k": _write(tmp_path / "a" / "st48k.flac", sr=48000, channels=2, seed=7),
    }
    rows = [{"path": str(p.relative_to(tmp_path)), "id": k, "speaker": "s1", "label": "happy",
             "split": "train", "mood": "x"} for k, p in files.items()]
    rows.append({"path": "a/fl44k.flac", "id": "seg", "speaker": "s1", "label": "sad",
                 "start": "0.05", "end": "0.2", "split": "train", "mood": "y"})
    manifest = write_csv(tmp_path / "corp.csv", rows)
    info = prepare.prepare([manifest], tmp_path / "out", taxonomy="iemocap4", split="column:split",
                           workers=0, progress=False)
    got = _read(tmp_path / "out", "train")
    assert sorted(got) == sorted([*files, "seg"]) and info["kept"] == len(files) + 1
    for k, path in files.items():
        np.testing.assert_array_equal(got[k]["audio"], _expected(path), err_msg=k)
        assert got[k]["length"] == got[k]["audio"].shape[0]
    src16, _ = sf.read(files["w16k"], dtype="int16")
    np.testing.assert_array_equal(got["w16k"]["audio"], src16)  # 16-bit 16 kHz is bit exact
    assert got["w8k"]["length"] == 2 * 2400 and got["st48k"]["length"] == 4800
    np.testing.assert_array_equal(got["seg"]["audio"], _expected(files["fl44k"], 0.05, 0.2))
    assert got["seg"]["length"] == int(np.ceil(round(0.15 * 44100) * 16000 / 44100))
    assert got["w8k"]["label"].tolist() == [0, 1, 0, 0] and got["w8k"]["class_index"] == 1
    assert got["seg"]["label"].tolist() == [0, 0, 1, 0]
    assert got["seg"]["speaker"] == "corp/s1" and got["seg"]["corpus"] == "corp"
    assert json.loads(got["seg"]["attrs"]) == {"mood": "y"} and got["seg"]["domain"] == 0
    train = info["splits"]["train"]
    assert train["count"] == 8 and train["speakers"] == ["corp/s1"]
    assert train["prior"] == pytest.approx([0, 7 / 8, 1 / 8, 0])
    assert train["groups"]["mood"] == {"x": 7, "y": 1}
    assert sum(train["lengths_histogram"]["counts"]) == 8
    assert train["shard_lengths"] == [8] and len(train["files"]) == 1


def test_label_forms_votes_distributions(tmp_path):
    for i in range(4):
        _write(tmp_path / f"f{i}.wav", seed=i)
    label = write_csv(tmp_path / "lab.csv", [
        {"path": "f0.wav", "speaker": "a", "label": "ang"},
        {"path": "f1.wav", "speaker": "b", "label": "Happy"}])
    votes = write_csv(tmp_path / "votes.csv", [
        {"path": "f0.wav", "speaker": "a", "neutral": 1, "happy": 3, "sad": 0, "angry": 0},
        {"path": "f1.wav", "speaker": "b", "neutral": 0, "happy": "", "sad": 2, "angry": 2}])
    dist_list = _jsonl(tmp_path / "dlist.jsonl", [
        {"path": "f2.wav", "speaker": "c", "distribution": [0.1, 0.2, 0.3, 0.4]},
        {"path": "f3.wav", "speaker": "d", "distribution": "[0, 0, 5, 5]"}])
    dist_map = _jsonl(tmp_path / "dmap.jsonl", [
        {"path": "f2.wav", "speaker": "c", "distribution": {"neu": 1, "exc": 1}},
        {"path": "f3.wav", "speaker": "d", "distribution": {"sadness": 0.25, "anger": 0.75}}])
    info = prepare.prepare([label, votes, dist_list, dist_map], tmp_path / "out",
                           taxonomy="iemocap4", split="speaker:50/50", seed=1, workers=0,
                           progress=False)
    assert info["labels"] == ["neutral", "happy", "sad", "angry"]
    assert info["corpora"] == ["lab", "votes", "dlist", "dmap"]
    got = {}
    for split in info["splits"]:
        got.update({(ex["corpus"], ex["id"]): ex for ex in _examples(tmp_path / "out", split)})
    expect = {("lab", "f0"): [0, 0, 0, 1], ("lab", "f1"): [0, 1, 0, 0],
              ("votes", "f0"): [0.25, 0.75, 0, 0], ("votes", "f1"): [0, 0, 0.5, 0.5],
              ("dlist", "f2"): [0.1, 0.2, 0.3, 0.4], ("dlist", "f3"): [0, 0, 0.5, 0.5],
              ("dmap", "f2"): [0.5, 0.5, 0, 0], ("dmap", "f3"): [0, 0, 0.25, 0.75]}
    assert set(got) == set(expect)
    for key, vec in expect.items():
        np.testing.assert_array_equal(got[key]["label"], np.asarray(vec, np.float32) /
                                      np.float32(np.sum(vec)), err_msg=str(key))
        assert got[key]["domain"] == info["corpora"].index(key[0])
    labels = info["mapping"]["corpora"]["dmap"]["labels"]
    assert labels["exc"] == {"happy": 1.0} and info["mapping"]["corpora"]["dmap"]["maps"] == [
        "common_to_iemocap4.json"]


def test_em2ldl_layout_harmonised_to_basic_with_smoothing(tmp_path):
    header_rows = []
    for s in range(4):
        votes = dict.fromkeys(EM2LDL, 0)
        votes["contempt"], votes["serenity"] = 2, 2 + s
        _write(tmp_path / "wav" / f"{s:04d}.wav", seed=s)
        header_rows.append({"AudioID": f"{s:04d}", **votes, "speaker ID": f"P{s}",
                            "gender": "female", "age": 20 + s, "ageClass": "young",
                            "mbtiSingle": "I", "mbtiDouble": "IN", "lang": "zh"})
    manifest = write_csv(tmp_path / "em2ldl.csv", header_rows)
    info = prepare.prepare([manifest], tmp_path / "out", taxonomy="basic", split="kfold:4:1",
                           neutral_smoothing=0.1, workers=2, progress=False)
    assert info["mapping"]["corpora"]["em2ldl"]["maps"][0] == "em2ldl32_to_basic.json"
    assert info["mapping"]["corpora"]["em2ldl"]["labels"]["contempt"] == {
        "disgust": 0.5, "angry": 0.5}
    assert info["group_columns"] == ["corpus", "language", "gender", "age", "ageClass",
                                     "mbtiSingle", "mbtiDouble"]
    test = _read(tmp_path / "out", "test")
    assert len(test) == 1
    (ident, ex), = test.items()
    s = int(ident)
    total = 4 + s
    want = {"neutral": 0.1, "happy": 0.9 * (2 + s) / total, "disgust": 0.9 * 1 / total,
            "angry": 0.9 * 1 / total}
    vec = dict(zip(info["labels"], ex["label"].tolist(), strict=True))
    assert vec == pytest.approx({c: want.get(c, 0.0) for c in info["labels"]}, abs=1e-6)
    assert abs(sum(vec.values()) - 1) < 1e-6
    assert ex["speaker"] == f"em2ldl/P{s}" and ex["language"] == "zh" and ex["age"] == str(
        20 + s)
    assert json.loads(ex["attrs"]) == {"ageClass": "young", "mbtiDouble": "IN",
                                       "mbtiSingle": "I"}
    assert {k: v["count"] for k, v in info["splits"].items()} == {
        "train": 2, "validation": 1, "test": 1}


def test_bad_inputs_go_to_rejected_csv(tmp_path, capsys):
    d = tmp_path
    _write(d / "ok1.wav", seed=1)
    _write(d / "ok2.wav", seed=2)
    _write(d / "ok3.wav", seed=3)
    (d / "garbage.wav").write_bytes(b"RIFF....WAVEfmt nonsense" * 10)
    (d / "notes.wav").write_text("this is not audio\n")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "silent.wav", np.zeros(8000, np.float32), 16000)
    nan = _tone(0.3, 16000)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = _tone(0.3, 16000)
    inf[5] = np.inf
    sf.write(d / "inf.wav", inf, 16000, subtype="FLOAT")
    _write(d / "short.wav", seconds=0.05)
    _write(d / "long.wav", seconds=2.5)
    rows = [
        {"path": "ok1.wav", "id": "ok1", "speaker": "s1", "label": "happy"},
        {"path": "gone.wav", "id": "gone", "speaker": "s1", "label": "happy"},
        {"path": "garbage.wav", "id": "garbage", "speaker": "s1", "label": "happy"},
        {"path": "notes.wav", "id": "notes", "speaker": "s1", "label": "happy"},
        {"path": "empty.wav", "id": "empty", "speaker": "s1", "label": "happy"},
        {"path": "silent.wav", "id": "silent", "speaker": "s1", "label": "happy"},
        {"path": "nan.wav", "id": "nan", "speaker": "s1", "label": "happy"},
        {"path": "inf.wav", "id": "inf", "speaker": "s1", "label": "happy"},
        {"path": "short.wav", "id": "short", "speaker": "s1", "label": "happy"},
        {"path": "long.wav", "id": "long", "speaker": "s1", "label": "happy"},
        {"path": "ok2.wav", "id": "grumpy", "speaker": "s2", "label": "grumpy"},
        {"path": "ok2.wav", "id": "fru", "speaker": "s2", "label": "fru"},
        {"path": "ok2.wav", "id": "ok1", "speaker": "s2", "label": "sad"},
        {"path": "ok2.wav", "id": "nospk", "speaker": "", "label": "sad"},
        {"path": "ok2.wav", "id": "seg", "speaker": "s2", "label": "sad", "start": "0.2",
         "end": "0.1"},
        {"path": "ok2.wav", "id": "ok2", "speaker": "s2", "label": "sad", "start": "",
         "end": ""},
    ]
    label_csv = write_csv(d / "lab.csv", rows)
    dists = _jsonl(d / "dist.jsonl", [
        {"path": "ok3.wav", "id": "len", "speaker": "s3", "distribution": [1, 0]},
        {"path": "ok3.wav", "id": "neg", "speaker": "s3", "distribution": [1, -1, 1, 0]},
        {"path": "ok3.wav", "id": "zero", "speaker": "s3", "distribution": {"sad": 0}},
        {"path": "ok3.wav", "id": "ok3", "speaker": "s3", "distribution": {"sad": 1}},
    ])
    info = prepare.prepare([label_csv, dists], d / "out", taxonomy="iemocap4",
                           split="speaker:1/1/1", max_seconds=2.0, workers=0, progress=False)
    rejected = {(r["manifest"].rsplit("/", 1)[-1], r["id"]): r for r in _rejected(d / "out")}
    want = {
        ("lab.csv", "gone"): manifest.MISSING_FILE, ("lab.csv", "garbage"): decode.UNREADABLE,
        ("lab.csv", "notes"): decode.UNREADABLE, ("lab.csv", "empty"): decode.EMPTY,
        ("lab.csv", "silent"): decode.SILENT, ("lab.csv", "nan"): decode.NON_FINITE,
        ("lab.csv", "inf"): decode.NON_FINITE, ("lab.csv", "short"): decode.TOO_SHORT,
        ("lab.csv", "long"): decode.TOO_LONG, ("lab.csv", "grumpy"): labels.UNKNOWN_LABEL,
        ("lab.csv", "fru"): labels.UNMAPPED_LABEL, ("lab.csv", "ok1"): manifest.DUPLICATE_ID,
        ("lab.csv", "nospk"): manifest.MISSING_SPEAKER, ("lab.csv", "seg"): manifest.BAD_SEGMENT,
        ("dist.jsonl", "len"): labels.WRONG_LENGTH, ("dist.jsonl", "neg"): labels.NEGATIVE_WEIGHTS,
        ("dist.jsonl", "zero"): labels.ZERO_WEIGHTS,
    }
    assert {k: r["reason"] for k, r in rejected.items()} == want
    assert rejected[("lab.csv", "gone")]["row"] == "2"
    assert rejected[("lab.csv", "gone")]["path"] == "gone.wav"
    assert rejected[("lab.csv", "ok1")]["row"] == "13"
    assert "row 1" in rejected[("lab.csv", "ok1")]["detail"]
    assert info["kept"] == 3 and sum(info["rejected"].values()) == len(want)
    assert info["rejected"][decode.NON_FINITE] == 2
    out = capsys.readouterr().out
    assert "kept 3 of 20 rows" in out and "non-finite samples: 2" in out


def test_wrong_columns_and_bad_map_fail_before_decoding(tmp_path, monkeypatch):
    _no_decoding(monkeypatch)
    _write(tmp_path / "a.wav")
    bad = write_csv(tmp_path / "bad.csv", [{"wav": "a.wav", "who": "s", "feeling": "sad"}])
    with pytest.raises(manifest.ManifestError,
                       match="expected columns: 'path'.*'speaker'.*'label'"):
        prepare.prepare([bad], tmp_path / "out", workers=0, progress=False)
    good = write_csv(tmp_path / "good.csv", [{"path": "a.wav", "speaker": "s", "label": "meh"}])
    (tmp_path / "map.json").write_text(json.dumps({"map": {"meh": {"sad": -1}}}))
    with pytest.raises(labels.MapError, match=r"map\.json.*'meh'.*negative"):
        prepare.prepare([good], tmp_path / "out", taxonomy="basic",
                        map_file=str(tmp_path / "map.json"), workers=0, progress=False)
    (tmp_path / "map.json").write_text(json.dumps({"map": {"meh": {"bored": 1}}}))
    with pytest.raises(labels.MapError, match=r"map\.json.*'meh'.*'bored'.*not a class"):
        prepare.prepare([good], tmp_path / "out", taxonomy="basic",
                        map_file=str(tmp_path / "map.json"), workers=0, progress=False)
    with pytest.raises(ValueError, match="neutral_smoothing.*'neutral'"):
        prepare.prepare([good], tmp_path / "out", taxonomy="em2ldl32", neutral_smoothing=0.1,
                        workers=0, progress=False)
    with pytest.raises(splits.SplitError, match="too few speakers"):
        prepare.prepare([good], tmp_path / "out", workers=0, progress=False)
    with pytest.raises(splits.SplitError, match="unknown split kind"):
        prepare.prepare([good], tmp_path / "out", split="bogus:1", workers=0, progress=False)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_user_map_file(tmp_path):
    corpus = _corpus(tmp_path, "c", speakers=3, per_speaker=1, labels=("meh", "yay", "ugh"))
    (tmp_path / "map.json").write_text(json.dumps(
        {"meh": {"neutral": 0.5, "sad": 0.5}, "yay": "happy", "ugh": None}))
    info = prepare.prepare([corpus], tmp_path / "out", taxonomy="iemocap4", split="speaker:1/1",
                           map_file=str(tmp_path / "map.json"), workers=0, progress=False)
    assert info["mapping"]["corpora"]["c"]["labels"] == {
        "meh": {"neutral": 0.5, "sad": 0.5}, "yay": {"happy": 1.0}, "ugh": None}
    assert info["rejected"] == {labels.UNMAPPED_LABEL: 1} and info["kept"] == 2


def test_speaker_overlap_refused_then_recorded(tmp_path, capsys, caplog):
    for i in range(3):
        _write(tmp_path / f"{i}.wav", seed=i)
    rows = [{"path": "0.wav", "speaker": "s1", "label": "sad", "split": "train"},
            {"path": "1.wav", "speaker": "s1", "label": "sad", "split": "test"},
            {"path": "2.wav", "speaker": "s2", "label": "happy", "split": "dev"}]
    manifest = write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(splits.SpeakerOverlapError, match="train/test.*c/s1"):
        prepare.prepare([manifest], tmp_path / "out", split="column:split", workers=0,
                        progress=False)
    info = prepare.prepare([manifest], tmp_path / "out", split="column:split", workers=0,
                           progress=False, allow_speaker_overlap=True)
    assert info["speaker_overlap"] == {"pairs": {"train/test": ["c/s1"]}, "allowed": True}
    disk = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert disk["speaker_overlap"] == info["speaker_overlap"]
    assert "WARNING: speakers shared between splits" in capsys.readouterr().out
    assert any("shared between splits" in r.message for r in caplog.records)
    assert {k: v["count"] for k, v in info["splits"].items()} == {
        "train": 1, "validation": 1, "test": 1}


@pytest.mark.parametrize("spec, test_corpora", [
    ("loco:b", {"b"}), ("logo:gender=female", {"a", "b"}), ("speaker:60/20/20:balance=gender",
                                                             {"a", "b"})])
def test_split_kinds_end_to_end(tmp_path, spec, test_corpora):
    manifests = [_corpus(tmp_path, "a", speakers=5, per_speaker=1),
                 _corpus(tmp_path, "b", speakers=5, per_speaker=1)]
    info = prepare.prepare(manifests, tmp_path / "out", split=spec, seed=2, workers=0,
                           progress=False)
    assert info["split_spec"] == spec and info["speaker_overlap"]["pairs"] == {}
    assert info["corpora"] == ["a", "b"] and info["labels"] == ["angry", "happy", "neutral",
                                                                "sad"]
    test = info["splits"]["test"]
    assert set(test["groups"]["corpus"]) == test_corpora
    if spec.startswith("logo"):
        assert test["groups"]["gender"] == {"female": 4}
    speakers = [set(v["speakers"]) for v in info["splits"].values()]
    assert sum(len(s) for s in speakers) == len(set().union(*speakers)) == 10
    ids = [ex["speaker"] for ex in _read(tmp_path / "out", "test").values()]
    assert sorted(set(ids)) == test["speakers"]


def test_idempotent_rerun_and_rebuild(tmp_path, capsys):
    manifest = _corpus(tmp_path, "c", speakers=4, per_speaker=2)
    out = tmp_path / "out"
    kw = dict(split="speaker:50/25/25", workers=0, progress=False)
    info = prepare.prepare([manifest], out, **kw)
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = prepare.prepare([manifest], out, **kw)
    assert again == info and "up to date" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == stamp
    before = {s: _read(out, s) for s in info["splits"]}
    # A missing shard forces a rebuild, with the same content.
    (out / info["splits"]["train"]["files"][0]).unlink()
    rebuilt = prepare.prepare([manifest], out, **kw)
    assert rebuilt == info
    for s in info["splits"]:
        after = _read(out, s)
        assert sorted(after) == sorted(before[s])
        for k in after:
            np.testing.assert_array_equal(after[k]["audio"], before[s][k]["audio"])
    # Another seed rewrites everything; no stale files, no temporary folders remain.
    other = prepare.prepare([manifest], out, **{**kw, "seed": 5})
    assert other["fingerprint"] != info["fingerprint"]
    names = {p.name for p in out.iterdir()}
    want = {f for v in other["splits"].values() for f in v["files"]}
    want |= {f"jaxser-{s}.index.npz" for s in other["splits"]}
    want |= {"dataset.json", "rejected.csv", "dataset_info.json", "features.json"}
    assert names == want


def test_own_taxonomy_and_all_rejected(tmp_path):
    _write(tmp_path / "a.wav")
    _write(tmp_path / "b.wav", seed=1)
    votes = write_csv(tmp_path / "v.csv", [
        {"path": "a.wav", "speaker": "x", "sad": 1, "happy": 0, "anger": 2},
        {"path": "b.wav", "speaker": "y", "sad": 0, "happy": 1, "anger": 0}])
    extra = write_csv(tmp_path / "l.csv", [{"path": "a.wav", "speaker": "z", "label": "Calm"}])
    info = prepare.prepare([votes, extra], tmp_path / "out", split="speaker:2/1", workers=0,
                           progress=False)
    assert info["labels"] == ["sad", "happy", "anger", "calm"]
    assert info["taxonomy"]["name"] == "corpus" and info["mapping"] is None
    dmap = _jsonl(tmp_path / "m.jsonl", [
        {"path": "a.wav", "speaker": "x", "distribution": {"zest": 1, "awe": 0}},
        {"path": "b.wav", "speaker": "y", "distribution": {"awe": 1, "bliss": 1}}])
    info = prepare.prepare([dmap], tmp_path / "out4", split="speaker:1/1", workers=0,
                           progress=False)
    assert info["labels"] == ["zest", "awe", "bliss"]  # first-seen order of the keys
    lst = _jsonl(tmp_path / "d.jsonl", [{"path": "a.wav", "speaker": "x",
                                         "distribution": [1, 0]}])
    with pytest.raises(manifest.ManifestError, match="needs --taxonomy"):
        prepare.prepare([lst], tmp_path / "out2", workers=0, progress=False)

    silent = tmp_path / "s.wav"
    sf.write(silent, np.zeros(4000, np.float32), 16000)
    bad = write_csv(tmp_path / "bad.csv", [
        {"path": "s.wav", "speaker": "x", "label": "sad"},
        {"path": "s.wav", "id": "again", "speaker": "y", "label": "sad"},
        {"path": "nothere.wav", "speaker": "z", "label": "sad"}])
    with pytest.raises(prepare.PrepareError, match="every row was rejected"):
        prepare.prepare([bad], tmp_path / "out3", split="speaker:1/1", workers=0, progress=False)
    reasons = sorted(r["reason"] for r in _rejected(tmp_path / "out3"))
    assert reasons == [manifest.MISSING_FILE, decode.SILENT, decode.SILENT]
    assert not (tmp_path / "out3" / "dataset.json").exists()
    assert not [p for p in (tmp_path / "out3").iterdir() if p.name.startswith(".prepare")]
