"""Manifest reading: column aliases, label forms, the EM2LDL layout, row checks without audio."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from jaxser.data import labels, manifest

EM2LDL = labels.builtin_taxonomy("em2ldl32").classes
KNOWN = labels.known_label_names()


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")  # existence is all these tests look at


def test_em2ldl_layout_aliases_and_wav_folder(tmp_path):
    header = ["AudioID", *EM2LDL, "speaker ID", "gender", "age", "ageClass", "mbtiSingle",
              "mbtiDouble", "lang"]
    votes = [3, 1] + [0] * 30
    _touch(tmp_path / "wav" / "a001.wav")
    _touch(tmp_path / "a002.wav")
    path = _csv(tmp_path / "em2ldl.csv", header, [
        ["a001", *votes, "S1", "female", "23", "2", "I", "IN", "zh"],
        ["a002", *votes, "S2", "male", "31", "3", "E", "EN", "en"],
        ["a003", *votes, "S2", "male", "31", "3", "E", "EN", "en"],
    ])
    m = manifest.read_manifest(path, KNOWN)
    assert m.label_form == "classes" and m.class_columns == list(EM2LDL)
    assert m.columns["id"] == "AudioID" and m.columns["speaker"] == "speaker ID"
    assert m.columns["language"] == "lang" and "path" not in m.columns
    assert m.group_columns == ["ageClass", "mbtiSingle", "mbtiDouble"]
    records, rejected = manifest.parse_records(m)
    assert [r.id for r in records] == ["a001", "a002"]
    assert records[0].path == str(tmp_path / "wav" / "a001.wav")
    assert records[1].path == str(tmp_path / "a002.wav")
    r = records[0]
    assert (r.speaker, r.corpus) == ("em2ldl/S1", "em2ldl")
    assert r.groups == {"corpus": "em2ldl", "language": "zh", "gender": "female", "age": "23",
                        "ageClass": "2", "mbtiSingle": "I", "mbtiDouble": "IN"}
    assert r.label["ecstacy"] == 3.0 and r.label["joy"] == 1.0 and len(r.label) == 32
    assert [(x.row, x.id, x.reason) for x in rejected] == [(3, "a003", manifest.MISSING_FILE)]
    assert "a003.wav" in rejected[0].detail and "wav/a003.wav" in rejected[0].detail


def test_wrong_columns_fail_naming_expected(tmp_path):
    path = _csv(tmp_path / "x.csv", ["file_name_x", "who", "feeling"], [["a.wav", "s", "sad"]])
    with pytest.raises(manifest.ManifestError) as e:
        manifest.read_manifest(path, KNOWN)
    msg = str(e.value)
    assert "x.csv" in msg and "speaker" in msg and "'path'" in msg and "'label'" in msg
    assert "'distribution'" in msg and "one column per class" in msg
    path = _csv(tmp_path / "y.csv", ["path", "label"], [["a.wav", "sad"]])
    with pytest.raises(manifest.ManifestError, match="missing speaker"):
        manifest.read_manifest(path, KNOWN)
    path = _csv(tmp_path / "z.csv", ["path", "speaker"], [["a.wav", "s"]])
    with pytest.raises(manifest.ManifestError, match="missing a label"):
        manifest.read_manifest(path, KNOWN)
    with pytest.raises(manifest.ManifestError, match="no column 'fold'"):
        manifest.read_manifest(_csv(tmp_path / "w.csv", ["path", "speaker", "label"],
                                    [["a.wav", "s", "sad"]]), KNOWN, split_column="fold")


def test_jsonl_distributions_and_row_checks(tmp_path):
    _touch(tmp_path / "a.flac")
    rows = [
        {"path": "a.flac", "speaker": "s1", "distribution": [0.5, 0.5, 0, 0]},
        {"path": "a.flac", "speaker": "s1", "distribution": {"happy": 2, "sad": 1},
         "start": 0.1, "end": 0.4, "corpus": "mine", "extra": 7},
        {"path": "a.flac", "speaker": "", "distribution": [1, 0, 0, 0]},
        {"path": "a.flac", "speaker": "s2", "distribution": "not json"},
        {"path": "a.flac", "speaker": "s2", "distribution": [1, 0, 0, 0], "start": 2, "end": 1},
        {"path": "missing.wav", "speaker": "s2", "distribution": [1, 0, 0, 0]},
        {"path": "", "speaker": "s2", "distribution": [1, 0, 0, 0]},
        {"path": "a.flac", "speaker": "s3", "distribution": ""},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n[1, 2]\n"
    (tmp_path / "c.jsonl").write_text(text)
    m = manifest.read_manifest(tmp_path / "c.jsonl", KNOWN)
    assert m.label_form == "distribution" and m.group_columns == ["extra"]
    records, rejected = manifest.parse_records(m)
    assert [r.label for r in records] == [[0.5, 0.5, 0, 0], {"happy": 2, "sad": 1}]
    seg = records[1]
    assert (seg.start, seg.end, seg.id, seg.corpus, seg.speaker) == (
        0.1, 0.4, "a@0.1-0.4", "mine", "mine/s1")
    assert records[0].id == "a" and records[0].corpus == "c"
    assert seg.attrs == {"extra": "7"}
    assert [(r.row, r.reason) for r in rejected] == [
        (3, manifest.MISSING_SPEAKER), (4, labels.BAD_DISTRIBUTION), (5, manifest.BAD_SEGMENT),
        (6, manifest.MISSING_FILE), (7, manifest.MISSING_PATH), (8, labels.MISSING_LABEL),
        (9, manifest.MALFORMED_ROW)]


def test_label_column_aliases_and_bad_cells(tmp_path):
    _touch(tmp_path / "d" / "x.wav")
    path = _csv(tmp_path / "d" / "manifest.csv",
                ["File", "Speaker", "Emotion", "happy", "sad"],
                [["x.wav", "s", "ang", "1", "0"], ["x.wav", "s", "neu", "oops", "1"]])
    m = manifest.read_manifest(path, KNOWN)
    # Class columns win over a label column; the corpus is the folder name here.
    assert m.label_form == "classes" and m.class_columns == ["happy", "sad"]
    assert m.default_corpus == "d" and m.columns["path"] == "File"
    records, rejected = manifest.parse_records(m)
    assert records[0].label == {"happy": 1.0, "sad": 0.0}
    assert rejected[0].reason == labels.BAD_DISTRIBUTION and "'happy'" in rejected[0].detail
    path = _csv(tmp_path / "d" / "labels2.csv", ["path", "speaker", "emotion"],
                [["x.wav", "s", "Angry"], ["x.wav", "s", ""]])
    m = manifest.read_manifest(path, KNOWN)
    records, rejected = manifest.parse_records(m)
    assert m.label_form == "label" and records[0].label == {"Angry": 1.0}
    assert rejected[0].reason == labels.MISSING_LABEL
