"""Taxonomies, harmonisation maps and label resolution (jaxser.data.labels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxser.data import labels as L


def _dist(res: L.LabelResolver, weights) -> dict[str, float]:
    vec = res.resolve(weights) if isinstance(weights, dict) else res.resolve_vector(weights)
    return {c: round(float(p), 6) for c, p in zip(res.taxonomy.classes, vec, strict=True) if p}


def _resolver(taxonomy: str, vocabulary, smoothing: float = 0.0) -> L.LabelResolver:
    """A resolver with the built-in maps ordered for a corpus with `vocabulary`."""
    tax = L.builtin_taxonomy(taxonomy)
    primary, fallback = L.map_chain(L.builtin_maps(tax), vocabulary)
    return L.LabelResolver(tax, primary, smoothing, fallback)


def test_builtin_taxonomies():
    em = L.builtin_taxonomy("em2ldl32")
    assert em.num_classes == 32 and len(set(em.classes)) == 32
    assert em.classes[:3] == ("ecstacy", "joy", "serenity") and em.classes[-1] == "optimism"
    assert em.index("ecstasy") == em.index("Ecstacy") == 0  # both spellings
    assert L.builtin_taxonomy("basic").classes == (
        "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "contempt")
    assert L.builtin_taxonomy("iemocap4").classes == ("neutral", "happy", "sad", "angry")
    with pytest.raises(ValueError, match="taxonomy 'nope' is neither.*em2ldl32"):
        L.load_taxonomy("nope")


def test_user_taxonomy_json_and_yaml(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"name": "mine", "classes": ["a", "b"],
                                                 "aliases": {"alpha": "a"}}))
    t = L.load_taxonomy(tmp_path / "t.json")
    assert (t.name, t.classes, t.index("ALPHA")) == ("mine", ("a", "b"), 0)
    (tmp_path / "l.json").write_text(json.dumps(["x", "y", "z"]))
    assert L.load_taxonomy(str(tmp_path / "l.json")).name == "l"
    pytest.importorskip("yaml")
    (tmp_path / "t.yaml").write_text("name: y\nclasses: [neutral, happy]\n")
    assert L.load_taxonomy(tmp_path / "t.yaml").classes == ("neutral", "happy")
    (tmp_path / "dup.json").write_text(json.dumps(["a", "A"]))
    with pytest.raises(L.MapError, match="twice"):
        L.load_taxonomy(tmp_path / "dup.json")


@pytest.mark.parametrize("target", ["basic", "iemocap4"])
def test_builtin_maps_valid_and_cover_plutchik(target):
    tax = L.builtin_taxonomy(target)
    maps = {m.source: m for m in L.builtin_maps(tax)}
    assert set(maps) == {"common", "em2ldl32"}
    em = L.builtin_taxonomy("em2ldl32")
    assert {L.normalize_name(c) for c in em.classes} <= set(maps["em2ldl32"].entries)
    for m in maps.values():
        for label, dist in m.entries.items():
            if dist is not None:
                assert abs(sum(dist.values()) - 1) < 1e-9, (m.name, label)


def test_plutchik_to_basic_structure():
    res = _resolver("basic", L.builtin_taxonomy("em2ldl32").classes)
    assert [m.source for m in res.maps] == ["em2ldl32", "common"]
    assert _dist(res, {"contempt": 1}) == {"angry": 0.5, "disgust": 0.5}
    assert _dist(res, {"love": 1}) == {"calm": 0.5, "happy": 0.5}
    assert _dist(res, {"awe": 1}) == {"fearful": 0.5, "surprised": 0.5}
    assert _dist(res, {"ecstacy": 1}) == _dist(res, {"ecstasy": 1}) == {"happy": 1.0}
    assert _dist(res, {"rage": 1}) == {"angry": 1.0}
    assert _dist(res, {"boredom": 1}) == {"disgust": 1.0}  # Plutchik's mild disgust
    # A random 32-class distribution collapses to a distribution over basic.
    rng = np.random.default_rng(0)
    em = L.builtin_taxonomy("em2ldl32")
    for _ in range(5):
        w = rng.random(32) * (rng.random(32) < 0.4)
        w[0] += 0.1
        vec = res.resolve(dict(zip(em.classes, w.tolist(), strict=True)))
        assert vec.shape == (9,) and vec.dtype == np.float32
        assert abs(float(vec.sum()) - 1) < 1e-6 and np.all(vec >= 0)


def test_common_vocabularies():
    emodb = ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]
    res = _resolver("basic", emodb)
    assert [m.source for m in res.maps] == ["common"]
    assert [m.source for m in res.fallback_maps] == ["em2ldl32"]
    assert _dist(res, {"boredom": 1}) == {"neutral": 0.5, "sad": 0.5}
    assert _dist(res, {"exc": 1}) == {"happy": 1.0}
    assert _dist(res, {"HAP": 1}) == {"happy": 1.0}
    assert _dist(res, {"Pleasant surprise": 1}) == {"happy": 0.5, "surprised": 0.5}
    assert _dist(res, {"ps": 1}) == _dist(res, {"pleasant_surprised": 1})
    assert _dist(res, {"calm": 1}) == {"calm": 1.0}
    assert _dist(res, {"contempt": 1}) == {"contempt": 1.0}
    with pytest.raises(L.LabelError) as e:
        res.resolve({"fru": 1})
    assert e.value.reason == L.UNMAPPED_LABEL and "fru" in e.value.detail
    with pytest.raises(L.LabelError) as e:
        res.resolve({"grumpy": 1})
    assert e.value.reason == L.UNKNOWN_LABEL and "grumpy" in e.value.detail
    assert "common_to_basic.json" in e.value.detail

    assert _dist(res, {"serenity": 1}) == {"happy": 1.0}  # found in the fallback map
    res4 = _resolver("iemocap4", ["neu", "hap", "fru"])
    assert _dist(res4, {"calm": 1}) == {"neutral": 1.0}
    assert _dist(res4, {"exc": 1}) == {"happy": 1.0}
    for label in ("fru", "frustration", "fea", "disgust", "contempt"):
        with pytest.raises(L.LabelError, match="unmapped label"):
            res4.resolve({label: 1})
    # Mass on unmapped labels is dropped from a distribution, the rest renormalised.
    assert _dist(res4, {"ang": 3, "fru": 2, "neu": 1}) == {"neutral": 0.25, "angry": 0.75}


def test_votes_and_bad_weights():
    tax = L.builtin_taxonomy("iemocap4")
    res = L.LabelResolver(tax)
    assert _dist(res, {"happy": 3, "sad": 1}) == {"happy": 0.75, "sad": 0.25}
    assert _dist(res, [0, 2, 2, 0]) == {"happy": 0.5, "sad": 0.5}
    cases = [({"happy": -1, "sad": 2}, L.NEGATIVE_WEIGHTS), ({"happy": 0, "sad": 0},
             L.ZERO_WEIGHTS), ({"happy": float("nan")}, L.BAD_DISTRIBUTION),
             ({"happy": "x"}, L.BAD_DISTRIBUTION), ([1, 0, 0], L.WRONG_LENGTH),
             ([0, 0, 0, 0], L.ZERO_WEIGHTS), ([1, -1, 1, 1], L.NEGATIVE_WEIGHTS)]
    for weights, reason in cases:
        with pytest.raises(L.LabelError) as e:
            res.resolve(weights) if isinstance(weights, dict) else res.resolve_vector(weights)
        assert e.value.reason == reason, weights
    # A zero weight on a label nobody knows is harmless.
    assert _dist(res, {"happy": 1, "whatever": 0}) == {"happy": 1.0}


def test_neutral_smoothing():
    tax = L.builtin_taxonomy("basic")
    res = L.LabelResolver(tax, L.builtin_maps(tax), neutral_smoothing=0.2)
    assert _dist(res, {"angry": 1}) == {"neutral": 0.2, "angry": 0.8}
    assert _dist(res, {"neutral": 1}) == {"neutral": 1.0}
    with pytest.raises(ValueError, match="neutral.*em2ldl32"):
        L.LabelResolver(L.builtin_taxonomy("em2ldl32"), neutral_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        L.LabelResolver(tax, neutral_smoothing=1.0)


@pytest.mark.parametrize("content, match", [
    ({"map": {"contempt": {"disgust": -0.5}}}, r"contempt.*negative"),
    ({"map": {"contempt": {}}}, r"contempt.*empty distribution"),
    ({"map": {"contempt": {"disgust": 0}}}, r"contempt.*zero weights"),
    ({"map": {"contempt": {"rage": 1}}}, r"contempt.*'rage'.*not a class"),
    ({"map": {"contempt": ["disgust"]}}, r"contempt.*must map"),
    ({"map": {"contempt": {"disgust": "half"}}}, r"contempt.*not a number"),
    ({"map": {}}, r"no entries"),
    ({"target": "iemocap4", "map": {"x": "happy"}}, r"targets taxonomy 'iemocap4'"),
    (["contempt"], r"expected a mapping"),
])
def test_bad_map_files(tmp_path, content, match):
    path = tmp_path / "bad_map.json"
    path.write_text(json.dumps(content))
    with pytest.raises(L.MapError, match=match) as e:
        L.load_map(path, L.builtin_taxonomy("basic"))
    assert "bad_map.json" in str(e.value)


def test_map_file_forms(tmp_path):
    basic = L.builtin_taxonomy("basic")
    (tmp_path / "m.json").write_text(json.dumps({"Excited": "happy", "meh": None,
                                                 "contempt": {"disgust": 1, "angry": 1}}))
    m = L.load_map(tmp_path / "m.json", basic)
    res = L.LabelResolver(basic, [m])
    assert _dist(res, {"excited": 1}) == {"happy": 1.0}
    assert _dist(res, {"contempt": 1}) == {"angry": 0.5, "disgust": 0.5}
    assert res.effective_map(["excited", "meh", "sad", "nope"]) == {
        "excited": {"happy": 1.0}, "meh": None, "sad": {"sad": 1.0}}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(L.MapError, match="bad.json.*invalid JSON"):
        L.load_map(tmp_path / "bad.json", basic)
