"""Tests for the corpus adapters: tiny fake corpus trees named like the real releases.

The files are empty: adapters read names and label files only, never audio.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from jaxser.data import adapters
from jaxser.data.adapters import EM2LDL_CLASSES, write_manifest


def _touch(root: Path, *relpaths: str) -> None:
    """Create empty files (and their folders) under root."""
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _manifest(corpus: str, root: Path, out: Path, **options) -> list[dict[str, str]]:
    """Write the manifest and read it back, checking the invariants every manifest keeps."""
    n = write_manifest(corpus, root, out, **options)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert n == len(rows) > 0
    assert header[:7] == ["path", "id", "speaker", "corpus", "language", "gender", "age"]
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert not Path(row["path"]).is_absolute()
    return rows


def _by_id(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in rows}


def _assert_files_exist(rows: list[dict[str, str]], out: Path) -> None:
    for row in rows:
        assert (out.parent / row["path"]).is_file(), row["path"]


def test_ravdess(tmp_path):
    root = tmp_path / "ravdess"
    _touch(
        root,
        "Actor_01/03-01-05-02-01-01-01.wav",  # angry, strong, male
        "Actor_02/03-01-02-01-02-02-02.wav",  # calm, female
        "Actor_02/03-02-03-01-01-01-02.wav",  # song: skipped
        "Actor_02/01-01-03-01-01-01-02.wav",  # full AV: skipped
        "Actor_02/notes.txt",
        "Actor_02/foo.wav",
    )
    out = tmp_path / "manifests" / "ravdess.csv"
    rows = _manifest("ravdess", root, out)
    _assert_files_exist(rows, out)
    assert [r["id"] for r in rows] == ["03-01-05-02-01-01-01", "03-01-02-01-02-02-02"]
    a, b = rows
    assert a["path"] == "../ravdess/Actor_01/03-01-05-02-01-01-01.wav"
    assert (a["speaker"], a["gender"], a["label"], a["intensity"]) == (
        "Actor_01", "male", "angry", "strong",
    )  # fmt: skip
    assert (b["speaker"], b["gender"], b["label"], b["statement"]) == (
        "Actor_02", "female", "calm", "02",
    )  # fmt: skip
    assert a["corpus"] == "ravdess" and a["language"] == "en" and a["age"] == ""


def test_ravdess_kaggle_duplicate_kept_once(tmp_path, caplog):
    root = tmp_path / "r"
    name = "03-01-01-01-01-01-03.wav"
    _touch(root, f"Actor_03/{name}", f"audio_speech_actors_01-24/Actor_03/{name}")
    with caplog.at_level(logging.WARNING):
        rows = _manifest("ravdess", root, tmp_path / "m.csv")
    assert len(rows) == 1 and rows[0]["path"] == f"r/Actor_03/{name}"
    assert "duplicate" in caplog.text


def test_cremad_with_demographics(tmp_path):
    root = tmp_path / "CREMA-D"
    _touch(root, "AudioWAV/1001_DFA_ANG_XX.wav", "AudioWAV/1002_IEO_HAP_HI.wav",
           "AudioWAV/1001_DFA_BOR_XX.wav", "AudioMP3/1001_DFA_ANG_XX.mp3")  # fmt: skip
    (root / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
        "1002,21,Female,Caucasian,Not Hispanic\n"
    )
    out = root / "manifest.csv"
    rows = _by_id(_manifest("crema-d", root, out))
    _assert_files_exist(rows.values(), out)
    assert set(rows) == {"1001_DFA_ANG_XX", "1002_IEO_HAP_HI"}
    a, b = rows["1001_DFA_ANG_XX"], rows["1002_IEO_HAP_HI"]
    assert a["path"] == "AudioWAV/1001_DFA_ANG_XX.wav"
    assert (a["speaker"], a["gender"], a["age"], a["label"], a["sentence"]) == (
        "1001", "male", "51", "ang", "DFA",
    )  # fmt: skip
    assert (b["gender"], b["label"], b["level"], b["intensity"]) == (
        "female", "hap", "HI", "high",
    )  # fmt: skip


def test_cremad_without_demographics(tmp_path):
    _touch(tmp_path / "c", "AudioWAV/1003_TIE_SAD_XX.wav")
    (row,) = _manifest("cremad", tmp_path / "c", tmp_path / "m.csv")
    assert (row["gender"], row["age"], row["label"]) == ("", "", "sad")


def test_emodb(tmp_path):
    root = tmp_path / "emodb"
    _touch(root, "wav/03a01Fa.wav", "wav/08b02Wb.wav", "wav/16a05Lc.wav", "wav/readme.wav")
    rows = _by_id(_manifest("emodb", root, tmp_path / "emodb.csv"))
    assert set(rows) == {"03a01Fa", "08b02Wb", "16a05Lc"}
    assert [rows["03a01Fa"][k] for k in ("speaker", "gender", "age", "label", "text")] == [
        "03", "male", "31", "happiness", "a01",
    ]  # fmt: skip
    assert [rows["08b02Wb"][k] for k in ("gender", "age", "label", "version")] == [
        "female", "34", "anger", "b",
    ]  # fmt: skip
    assert rows["16a05Lc"]["label"] == "boredom" and rows["16a05Lc"]["language"] == "de"


def test_tess(tmp_path):
    root = tmp_path / "TESS"
    _touch(
        root,
        "OAF_angry/OAF_back_angry.wav",
        "OAF_Pleasant_surprise/OAF_back_ps.wav",
        "YAF_pleasant_surprised/YAF_yard_ps.wav",
        "YAF_fear/YAF_youth_fear.wav",
        "YAF_neutral/yaf_bite_neutral.wav",
        "YAF_neutral/bogus.wav",  # no word and emotion: skipped
        "YAF_sad/bite_sad.wav",  # speaker from the folder
        # Kaggle nests a second copy of the corpus: kept once.
        "tess copy/TESS/OAF_angry/OAF_back_angry.wav",
    )
    rows = _by_id(_manifest("tess", root, tmp_path / "tess.csv"))
    assert set(rows) == {
        "OAF_back_angry", "OAF_back_pleasant_surprise", "YAF_yard_pleasant_surprise",
        "YAF_youth_fear", "YAF_bite_neutral", "YAF_bite_sad",
    }  # fmt: skip
    yard = rows["YAF_yard_pleasant_surprise"]
    assert (yard["speaker"], yard["gender"], yard["age"], yard["word"], yard["label"]) == (
        "YAF", "female", "26", "yard", "pleasant_surprise",
    )  # fmt: skip
    assert rows["OAF_back_angry"]["path"] == "TESS/OAF_angry/OAF_back_angry.wav"
    assert rows["OAF_back_angry"]["age"] == "64"


def test_savee_nested_and_flat(tmp_path):
    nested = tmp_path / "savee"
    _touch(nested, "AudioData/DC/a01.wav", "AudioData/JE/sa03.wav", "AudioData/KL/su15.wav",
           "AudioData/KL/n30.wav", "AudioData/XX/a01.wav", "AudioData/DC/info.wav")  # fmt: skip
    rows = _by_id(_manifest("savee", nested, tmp_path / "a.csv"))
    assert set(rows) == {"DC_a01", "JE_sa03", "KL_su15", "KL_n30"}
    assert [rows["JE_sa03"][k] for k in ("speaker", "gender", "label", "sentence")] == [
        "JE", "male", "sadness", "sa03",
    ]  # fmt: skip
    assert rows["KL_su15"]["label"] == "surprise" and rows["DC_a01"]["label"] == "anger"

    flat = tmp_path / "kaggle"
    _touch(flat, "ALL/DC_a01.wav", "ALL/JK_h07.wav", "ALL/JK_x07.wav")
    rows = _by_id(_manifest("savee", flat, tmp_path / "b.csv"))
    assert set(rows) == {"DC_a01", "JK_h07"}
    assert rows["JK_h07"]["label"] == "happiness" and rows["JK_h07"]["speaker"] == "JK"


_IEMOCAP_EVAL = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[4.0000, 3.5000, 3.0000]

[14.8872 - 18.0175]\tSes01F_impro01_F001\tfru\t[2.0000, 3.5000, 3.5000]
"""


def _iemocap_tree(root: Path) -> None:
    evald = root / "Session1" / "dialog" / "EmoEvaluation"
    evald.mkdir(parents=True)
    (evald / "Ses01F_impro01.txt").write_text(_IEMOCAP_EVAL)
    (evald / "Categorical").mkdir()
    (evald / "Categorical" / "Ses01F_impro01_e2_cat.txt").write_text(
        "Ses01F_impro01_F000 :Neutral;"
    )
    (evald / "Ses02M_script01_1.txt").write_text(
        "[1.0 - 2.0]\tSes02M_script01_1_M003\txxx\t[3.0000, 2.0000, 2.5000]\n"
    )
    wav = "Session1/sentences/wav/Ses01F_impro01"
    _touch(root, f"{wav}/Ses01F_impro01_F000.wav", f"{wav}/Ses01F_impro01_M000.wav",
           f"{wav}/Ses01F_impro01_F001.wav")  # fmt: skip


def test_iemocap(tmp_path, caplog):
    root = tmp_path / "IEMOCAP_full_release"
    _iemocap_tree(root)
    out = tmp_path / "iemocap.csv"
    with caplog.at_level(logging.WARNING):
        rows = _by_id(_manifest("iemocap", root, out))
    assert "1 labelled utterances have no wav" in caplog.text
    assert set(rows) == {
        "Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_F001",
        "Ses02M_script01_1_M003",
    }  # fmt: skip
    f0, m0 = rows["Ses01F_impro01_F000"], rows["Ses01F_impro01_M000"]
    assert (
        f0["path"]
        == "IEMOCAP_full_release/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    )
    assert (f0["speaker"], f0["gender"], f0["label"], f0["method"], f0["session"]) == (
        "Ses01_F", "female", "neu", "improvised", "Ses01",
    )  # fmt: skip
    assert (m0["speaker"], m0["gender"], m0["label"], m0["original_label"]) == (
        "Ses01_M", "male", "hap", "exc",
    )  # fmt: skip
    assert (m0["valence"], m0["arousal"], m0["dominance"]) == ("4.0000", "3.5000", "3.0000")
    # the dialog times must not become start/end: those would cut the sentence wav
    assert (m0["dialog_start"], m0["dialog_end"]) == ("10.0100", "11.3925")
    assert "start" not in m0 and "end" not in m0
    assert m0["dimension_scale"] == "1-5"
    assert rows["Ses01F_impro01_F001"]["label"] == "fru"
    scripted = rows["Ses02M_script01_1_M003"]
    assert (scripted["method"], scripted["label"], scripted["speaker"]) == (
        "scripted", "xxx", "Ses02_M",
    )  # fmt: skip
    # the missing wav keeps its row, with the path the release would have
    assert not (out.parent / scripted["path"]).exists()
    assert scripted["path"].endswith("Ses02M_script01_1/Ses02M_script01_1_M003.wav")

    rows = _by_id(_manifest("iemocap", root, tmp_path / "raw.csv", merge_excited=False))
    assert rows["Ses01F_impro01_M000"]["label"] == "exc"


_MSP_EVAL = """UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:4.000000; V:2.000000; D:2.500000; N:0.000000;
1001; Angry; A:4; V:2; D:3; N:1;
UTD-IMPROV-S01A-M01-R-MF02.avi; N; A:3.0; V:3.0; D:3.0; N:4.0;
UTD-IMPROV-S02H-F03-S-FM01.avi; X; A:2.5; V:3.5; D:3.0; N:4.5;
UTD-IMPROV-S03S-M06-T-MM05.avi; H; A:3.0; V:4.0; D:2.0; N:3.0;
"""


def test_msp_improv(tmp_path, caplog):
    root = tmp_path / "MSP-IMPROV"
    (root).mkdir()
    (root / "Evalution.txt").write_text(_MSP_EVAL)  # the release's spelling
    _touch(
        root,
        "Audio/session1/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.wav",
        "Audio/session1/S01A/R/MSP-IMPROV-S01A-M01-R-MF02.wav",
        "Audio/session3/S02H/S/MSP-IMPROV-S02H-F03-S-FM01.wav",
        "Audio/session2/S05N/P/MSP-IMPROV-S05N-M02-P-MF09.wav",  # no label line: skipped
    )
    out = tmp_path / "msp.csv"
    with caplog.at_level(logging.WARNING):
        rows = _by_id(_manifest("msp_improv", root, out))
    assert "1 labelled clips have no wav" in caplog.text
    assert "1 wav files have no label line" in caplog.text
    assert set(rows) == {
        "MSP-IMPROV-S01A-F01-P-FM01", "MSP-IMPROV-S01A-M01-R-MF02",
        "MSP-IMPROV-S02H-F03-S-FM01", "MSP-IMPROV-S03S-M06-T-MM05",
    }  # fmt: skip
    a = rows["MSP-IMPROV-S01A-F01-P-FM01"]
    assert (a["speaker"], a["gender"], a["label"], a["method"], a["session"]) == (
        "F01", "female", "angry", "natural", "1",
    )  # fmt: skip
    assert (a["arousal"], a["valence"], a["dominance"], a["naturalness"]) == (
        "4.000000", "2.000000", "2.500000", "0.000000",
    )  # fmt: skip
    assert (a["target_emotion"], a["sentence"], a["method_code"]) == ("angry", "S01A", "P")
    assert (out.parent / a["path"]).is_file()
    read = rows["MSP-IMPROV-S01A-M01-R-MF02"]
    assert (read["speaker"], read["gender"], read["label"], read["method"]) == (
        "M01", "male", "neutral", "read",
    )  # fmt: skip
    assert rows["MSP-IMPROV-S02H-F03-S-FM01"]["label"] == "no_agreement"
    missing = rows["MSP-IMPROV-S03S-M06-T-MM05"]
    assert missing["path"] == "MSP-IMPROV/Audio/session6/S03S/T/MSP-IMPROV-S03S-M06-T-MM05.wav"
    assert missing["label"] == "happy" and missing["method"] == "improvised"


def test_msp_improv_without_label_file(tmp_path):
    _touch(tmp_path / "m", "Audio/session1/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.wav")
    with pytest.raises(ValueError, match=r"msp_improv: no Evaluation.txt"):
        write_manifest("msp_improv", tmp_path / "m", tmp_path / "m.csv")


def test_esd(tmp_path):
    root = tmp_path / "ESD"
    _touch(
        root,
        "0001/Angry/0001_000351.wav",
        "0001/Neutral/0001_000001.wav",
        "0011/Surprise/test/0011_001401.wav",
        "0015/Happy/train/0015_000701.wav",
        "0020/Sad/evaluation/0020_001400.wav",
        "0011/Bored/0011_000100.wav",  # not an ESD emotion: skipped
        "0001/0001.txt",
    )
    rows = _by_id(_manifest("esd", root, tmp_path / "esd.csv"))
    assert set(rows) == {"0001_000351", "0001_000001", "0011_001401", "0015_000701",
                         "0020_001400"}  # fmt: skip
    zh = rows["0001_000351"]
    assert [zh[k] for k in ("speaker", "language", "gender", "label", "text_id", "esd_split")] == [
        "0001", "zh", "female", "angry", "1", "",
    ]  # fmt: skip
    en = rows["0011_001401"]
    assert [en[k] for k in ("language", "gender", "label", "text_id", "esd_split")] == [
        "en", "male", "surprise", "1", "test",
    ]  # fmt: skip
    assert rows["0015_000701"]["gender"] == "female" and rows["0015_000701"]["label"] == "happy"
    assert rows["0020_001400"]["text_id"] == "350" and rows["0020_001400"]["label"] == "sad"


def _em2ldl_tree(root: Path, label_folder: str = "labels", released_spelling=False) -> None:
    classes = [("aggresiveness" if released_spelling and c == "aggressiveness" else c)
               for c in EM2LDL_CLASSES]
    header = ["AudioID", *classes, "speaker ID", "gender", "age", "ageClass",
              "mbtiSingle", "mbtiDouble", "lang"]  # fmt: skip
    votes_a = ["0"] * 32
    votes_a[2] = "0.6"  # serenity
    votes_a[1] = "0.4"  # joy
    votes_b = ["0"] * 32
    votes_b[19] = "3"  # anger, as a vote count
    lines = [
        ", ".join(header),
        ", ".join(["utt_0002", *votes_b, "spk2", "M", "41", "middle", "E", "ENTJ", "zh"]),
        ", ".join(["utt_0001", *votes_a, "spk1", "F", "23", "young", "I", "INFP", "en"]),
        ", ".join(["utt_0003", *votes_a, "spk1", "F", "23", "young", "I", "INFP", "yue"]),
    ]
    (root / label_folder).mkdir(parents=True)
    (root / label_folder / "EM2LDL.csv").write_text("\n".join(lines) + "\n")
    _touch(root, "wav/utt_0001.wav", "wav/utt_0002.wav")


def test_em2ldl(tmp_path, caplog):
    root = tmp_path / "EM2LDL"
    _em2ldl_tree(root)
    out = tmp_path / "em2ldl.csv"
    with caplog.at_level(logging.WARNING):
        rows = _manifest("em2ldl", root, out)
    assert "1 of 3 rows have no wav" in caplog.text
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header[7:39] == list(EM2LDL_CLASSES)
    assert {"ageClass", "mbtiSingle", "mbtiDouble"} <= set(header)
    assert "label" not in header and "speaker ID" not in header and "lang" not in header
    assert [r["id"] for r in rows] == ["utt_0001", "utt_0002", "utt_0003"]
    a, b, c = rows
    assert a["path"] == "EM2LDL/wav/utt_0001.wav" and (out.parent / a["path"]).is_file()
    assert (a["speaker"], a["gender"], a["age"], a["language"], a["corpus"]) == (
        "spk1", "female", "23", "en", "em2ldl",
    )  # fmt: skip
    assert (a["serenity"], a["joy"], a["anger"], a["ecstacy"]) == ("0.6", "0.4", "0", "0")
    assert (a["ageClass"], a["mbtiSingle"], a["mbtiDouble"]) == ("young", "I", "INFP")
    assert b["anger"] == "3" and b["gender"] == "male" and b["language"] == "zh"
    assert c["path"] == "EM2LDL/wav/utt_0003.wav" and not (out.parent / c["path"]).exists()


def test_em2ldl_released_spelling_of_aggressiveness(tmp_path):
    root = tmp_path / "EM2LDL"
    _em2ldl_tree(root, released_spelling=True)
    rows = _manifest("em2ldl", root, tmp_path / "m.csv")
    assert "aggressiveness" in rows[0] and "aggresiveness" not in rows[0]


def test_em2ldl_csv_in_root_and_missing_class(tmp_path):
    root = tmp_path / "e"
    _em2ldl_tree(root, label_folder="label")
    assert write_manifest("em2ldl", root, tmp_path / "x.csv") == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.csv").write_text("AudioID, joy\nu1, 1\n")
    with pytest.raises(ValueError, match="lacks class columns"):
        write_manifest("em2ldl", bad, tmp_path / "y.csv")


@pytest.mark.parametrize("corpus", sorted(adapters.ADAPTERS))
def test_empty_root_names_corpus_and_layout(tmp_path, corpus):
    _touch(tmp_path / "root", "unrelated/file.wav", "readme.txt")
    with pytest.raises(ValueError) as err:
        write_manifest(corpus, tmp_path / "root", tmp_path / "out.csv")
    message = str(err.value)
    assert message.startswith(f"{corpus}:")
    assert "expected layout" in message and adapters.LAYOUTS[corpus] in message
    assert not (tmp_path / "out.csv").exists()


def test_missing_root_and_unknown_corpus(tmp_path):
    with pytest.raises(ValueError, match="ravdess: root .* is not a folder"):
        write_manifest("ravdess", tmp_path / "nope", tmp_path / "m.csv")
    with pytest.raises(ValueError, match="unknown corpus 'foo'; valid corpora: .*cremad.*ravdess"):
        write_manifest("foo", tmp_path, tmp_path / "m.csv")


def test_deterministic_output(tmp_path):
    root = tmp_path / "emodb"
    _touch(root, "wav/16a05Lc.wav", "wav/03a01Fa.wav", "wav/08b02Wb.wav")
    write_manifest("emodb", root, tmp_path / "a.csv")
    write_manifest("emodb", root, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_manifest_outside_root_uses_relative_path(tmp_path):
    _touch(tmp_path / "data" / "emodb", "wav/03a01Fa.wav")
    out = tmp_path / "work" / "deep" / "m.csv"
    (row,) = _manifest("emodb", tmp_path / "data" / "emodb", out)
    assert row["path"] == "../../data/emodb/wav/03a01Fa.wav"
    assert (out.parent / row["path"]).is_file()
