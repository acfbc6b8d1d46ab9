"""Split specs, speaker-independent assignment and the speaker-overlap check."""

from __future__ import annotations

from collections import Counter

import pytest

from jaxser.data import splits


def _items(num_speakers: int = 20, per_speaker: int = 3, corpora=("a",)) -> list[splits.Item]:
    out = []
    for c in corpora:
        for s in range(num_speakers):
            groups = {"corpus": c, "gender": "female" if s % 2 else "male",
                      "age": "young" if s % 4 < 2 else "old"}
            out += [splits.Item(f"{c}/spk{s:02d}", c, groups) for _ in range(per_speaker)]
    return out


def _speakers(items, assignment) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for it, name in zip(items, assignment, strict=True):
        out.setdefault(name, set()).add(it.speaker)
    return out


def test_parse_specs():
    s = splits.parse_split_spec("speaker:80/10/10")
    assert (s.kind, s.ratios) == ("speaker", (0.8, 0.1, 0.1))
    s = splits.parse_split_spec("speaker:70/10/20:balance=gender+age")
    assert s.balance == ("gender", "age") and s.ratios[2] == pytest.approx(0.2)
    assert splits.parse_split_spec("speaker:3/1").ratios == (0.75, 0.0, 0.25)
    s = splits.parse_split_spec("kfold:5:2:val=0.2")
    assert (s.folds, s.fold, s.val_fraction) == (5, 2, 0.2)
    s = splits.parse_split_spec("logo:gender=female")
    assert (s.column, s.value) == ("gender", "female")
    assert splits.parse_split_spec("loco:CREMA-D").value == "CREMA-D"
    assert splits.parse_split_spec("column:split").column == "split"
    for bad, match in [("random:5", "unknown split kind"), ("speaker:80/x/10", "not numbers"),
                       ("speaker:1/2/3/4", "2 or 3"), ("speaker:-1/1/1", "non-negative"),
                       ("kfold:5:5", "0 <= I < K"), ("kfold:1:0", "K >= 2"),
                       ("kfold:5", "kfold:K:I"), ("logo:gender", "COLUMN=VALUE"),
                       ("loco:", "loco:CORPUS"), ("speaker:80/10/10:val=0.1", "unknown option"),
                       ("kfold:5:0:val=2", r"\[0, 1\)")]:
        with pytest.raises(splits.SplitError, match=match):
            splits.parse_split_spec(bad)


def test_speaker_ratios_disjoint_and_deterministic():
    items = _items(20)
    a = splits.assign_splits(items, "speaker:80/10/10", seed=0)
    spk = _speakers(items, a)
    assert {k: len(v) for k, v in spk.items()} == {"train": 16, "validation": 2, "test": 2}
    assert splits.speaker_overlap(items, a) == {}
    assert splits.assign_splits(items, "speaker:80/10/10", seed=0) == a
    assert splits.assign_splits(items, "speaker:80/10/10", seed=1) != a
    # Every split with a share gets a speaker, even when rounding says 0.
    a = splits.assign_splits(_items(3), "speaker:80/10/10")
    assert Counter(a) == {"train": 3, "validation": 3, "test": 3}
    assert set(splits.assign_splits(_items(4), "speaker:90/10")) == {"train", "test"}
    with pytest.raises(splits.SplitError, match="too few speakers: 2"):
        splits.assign_splits(_items(2), "speaker:80/10/10")


def test_balanced_split():
    items = _items(20)  # 10 female / 10 male, age young/old alternating in pairs
    a = splits.assign_splits(items, "speaker:60/20/20:balance=gender", seed=3)
    for name, spk in _speakers(items, a).items():
        genders = Counter("female" if int(s[-2:]) % 2 else "male" for s in spk)
        assert genders["female"] == genders["male"], (name, genders)
    a = splits.assign_splits(items, "speaker:50/25/25:balance=gender+age", seed=0)
    spk = _speakers(items, a)
    assert len(spk["test"]) == 5 and len(spk["train"]) == 10
    with pytest.raises(splits.SplitError, match="balance column 'mbti'"):
        splits.assign_splits(items, "speaker:80/10/10:balance=mbti")


def test_kfold_covers_every_speaker_once():
    items = _items(10)
    tests = []
    for i in range(5):
        a = splits.assign_splits(items, f"kfold:5:{i}", seed=7)
        spk = _speakers(items, a)
        assert len(spk["test"]) == 2 and len(spk["validation"]) == 1
        assert len(spk["train"]) == 7 and splits.speaker_overlap(items, a) == {}
        tests.append(spk["test"])
    assert set().union(*tests) == {it.speaker for it in items}
    assert sum(len(t) for t in tests) == 10
    sizes = sorted(len(_speakers(_items(11), splits.assign_splits(_items(11), f"kfold:5:{i}"))[
        "test"]) for i in range(5))
    assert sizes == [2, 2, 2, 2, 3]
    a = splits.assign_splits(items, "kfold:5:0:val=0", seed=7)
    assert set(a) == {"train", "test"}
    with pytest.raises(splits.SplitError, match="too few speakers: 10 speaker.*12 folds"):
        splits.assign_splits(items, "kfold:12:0")


def test_leave_one_group_and_corpus_out():
    items = _items(10, corpora=("a", "b"))
    a = splits.assign_splits(items, "logo:Gender=FEMALE")
    for it, name in zip(items, a, strict=True):
        assert (name == "test") == (it.groups["gender"] == "female")
    assert splits.speaker_overlap(items, a) == {} and "validation" in a
    with pytest.raises(splits.SplitError, match="no row has gender=other"):
        splits.assign_splits(items, "logo:gender=other")
    with pytest.raises(splits.SplitError, match="no column 'mbti'"):
        splits.assign_splits(items, "logo:mbti=INTJ")
    a = splits.assign_splits(items, "loco:b")
    assert {it.corpus for it, n in zip(items, a, strict=True) if n == "test"} == {"b"}
    assert {it.corpus for it, n in zip(items, a, strict=True) if n != "test"} == {"a"}
    with pytest.raises(splits.SplitError, match="no row has corpus zz.*a, b"):
        splits.assign_splits(items, "loco:zz")


def test_column_split_and_overlap_check():
    items = [splits.Item("c/s1", "c", split_value="train"),
             splits.Item("c/s1", "c", split_value="test"),
             splits.Item("c/s2", "c", split_value="dev"),
             splits.Item("c/s3", "c", split_value="Test")]
    a = splits.assign_splits(items, "column:split")
    assert a == ["train", "test", "validation", "test"]
    pairs = splits.speaker_overlap(items, a)
    assert pairs == {"train/test": ["c/s1"]}
    with pytest.raises(splits.SpeakerOverlapError, match="train/test: 1 speaker.*c/s1"):
        splits.check_speaker_overlap(pairs, allow=False)
    splits.check_speaker_overlap(pairs, allow=True)
    assert splits.canonical_split_value("VALID") == "validation"
    assert splits.canonical_split_value("holdout") is None
