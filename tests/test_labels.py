"""Taxonomies, harmonisation maps and label resolution (jaxser.data.labels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxser.data import labels


def _dist(res: labels.LabelResolver, weights) -> dict[str, float]:
    vec = res.resolve(weights) if isinstance(weights, dict) else res.resolve_vector(weights)
    return {c: round(float(p), 6) for c, p in zip(res.taxonomy.classes, vec, strict=True) if p}


def _resolver(taxonomy: str, vocabulary, smoothing: float = 0.0) -> labels.LabelResolver:
    """A resolver with the built-in maps ordered for a corpus with `vocabulary`."""
    tax = labels.builtin_taxonomy(taxonomy)
    primary, fallback = labels.map_chain(labels.builtin_maps(tax), vocabulary)
    return labels.LabelResolver(tax, primary, smoothing, fallback)


def test_builtin_taxonomies():
    em = labels.builtin_taxonomy("em2ldl32")
    assert em.num_classes == 32 and len(set(em.classes)) == 32
    assert em.classes[:3] == ("ecstacy", "joy", "serenity") and em.classes[-1] == "optimism"
    assert em.index("ecstasy") == em.index("Ecstacy") == 0  # both spellings
    assert labels.builtin_taxonomy("basic").classes == (
        "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "contempt")
    assert labels.builtin_taxonomy("iemocap4").classes == ("neutral", "happy", "sad", "angry")
    with pytest.raises(ValueError, match="taxonomy 'nope' is neither.*em2ldl32"):
        labels.load_taxonomy("nope")


def test_user_taxonomy_json_and_yaml(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"name": "mine", "classes": ["a", "b"],
                                                 "aliases": {"alpha": "a"}}))
    t = labels.load_taxonomy(tmp_path / "t.json")
    assert (t.name, t.classes, t.index("ALPHA")) == ("mine", ("a", "b"), 0)
    (tmp_path / "l.json").write_text(json.dumps(["x", "y", "z"]))
    assert labels.load_taxonomy(str(tmp_path / "l.json")).name == "l"
    pytest.importorskip("yaml")
    (tmp_path / "t.yaml").write_text("name: y\nclasses: [neutral, happy]\n")
    assert labels.load_taxonomy(tmp_path / "t.yaml").classes == ("neutral", "happy")
    (tmp_path / "dup.json").write_text(json.dumps(["a", "A"]))
    with pytest.raises(labels.MapError, match="twice"):
        labels.load_taxonomy(tmp_path / "dup.json")


@pytest.mark.parametrize("target", ["basic", "iemocap4"])
def test_builtin_maps_valid_and_cover_plutchik(target):
    tax = labels.builtin_taxonomy(target)
    maps = {m.source: m for m in labels.builtin_maps(tax)}
    assert set(maps) == {"common", "em2ldl32"}
    em = labels.builtin_taxonomy("em2ldl32")
    assert {labels.normalize_name(c) for c in em.classes} <= set(maps["em2ldl32"].entries)
    for m in maps.values():
        for label, dist in m.entries.items():
            if dist is not None:
                assert abs(sum(dist.values()) - 1) < 1e-9, (m.name, label)


def test_plutchik_to_basic_structure():
    res = _resolver("basic", labels.builtin_taxonomy("em2ldl32").classes)
    assert [m.source for m in res.maps] == ["em2ldl32", "common"]
    assert _dist(res, {"contempt": 1}) == {"angry": 0.5, "disgust": 0.5}
    assert _dist(res, {"love": 1}) == {"calm": 0.5, "happy": 0.5}
    assert _dist(res, {"awe": 1}) == {"fearful": 0.5, "surprised": 0.5}
    assert _dist(res, {"ecstacy": 1}) == _dist(res, {"ecstasy": 1}) == {"happy": 1.0}
    assert _dist(res, {"rage": 1}) == {"angry": 1.0}
    assert _dist(res, {"boredom": 1}) == {"disgust": 1.0}  # Plutchik's mild disgust
    # A random 32-class distribution collapses to a distribution over basic.
    rng = np.random.default_rng(0)
    em = labels.builtin_taxonomy("em2ldl32")
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
    with pytest.raises(labels.LabelError) as e:
        res.resolve({"fru": 1})
    assert e.value.reason == labels.UNMAPPED_LABEL and "fru" in e.value.detail
    with pytest.raises(labels.LabelError) as e:
        res.resolve({"grumpy": 1})
    assert e.value.reason == labels.UNKNOWN_LABEL and "grumpy" in e.value.detail
    assert "common_to_basic.json" in e.value.detail

    assert _dist(res, {"serenity": 1}) == {"happy": 1.0}  # found in the fallback map
    res4 = _resolver("iemocap4", ["neu", "hap", "fru"])
    assert _dist(res4, {"calm": 1}) == {"neutral": 1.0}
    assert _dist(res4, {"exc": 1}) == {"happy": 1.0}
    for label in ("fru", "frustration", "fea", "disgust", "contempt"):
        with pytest.raises(labels.LabelError, match="unmapped label"):
            res4.resolve({label: 1})
    # Mass on unmapped labels is dropped from a distribution, the rest renormalised.
    assert _dist(res4, {"ang": 3, "fru": 2, "neu": 1}) == {"neutral": 0.25, "angry": 0.75}


def test_votes_and_bad_weights():
    tax = labels.builtin_taxonomy("iemocap4")
    res = labels.LabelResolver(tax)
    assert _dist(res, {"happy": 3, "sad": 1}) == {"happy": 0.75, "sad": 0.25}
    assert _dist(res, [0, 2, 2, 0]) == {"happy": 0.5, "sad": 0.5}
    cases = [({"happy": -1, "sad": 2}, labels.NEGATIVE_WEIGHTS), ({"happy": 0, "sad": 0},
             labels.ZERO_WEIGHTS), ({"happy": float("nan")}, labels.BAD_DISTRIBUTION),
             ({"happy": "x"}, labels.BAD_DISTRIBUTION), ([1, 0, 0], labels.WRONG_LENGTH),
             ([0, 0, 0, 0], labels.ZERO_WEIGHTS), ([1, -1, 1, 1], labels.NEGATIVE_WEIGHTS)]
    for weights, reason in cases:
        with pytest.raises(labels.LabelError) as e:
            res.resolve(weights) if isinstance(weights, dict) else res.resolve_vector(weights)
        assert e.value.reason == reason, weights
    # A zero weight on a label nobody knows is harmless.
    assert _dist(res, {"happy": 1, "whatever": 0}) == {"happy": 1.0}


def test_neutral_smoothing():
    tax = labels.builtin_taxonomy("basic")
    res = labels.LabelResolver(tax, labels.builtin_maps(tax), neutral_smoothing=0.2)
    assert _dist(res, {"angry": 1}) == {"neutral": 0.2, "angry": 0.8}
    assert _dist(res, {"neutral": 1}) == {"neutral": 1.0}
    with pytest.raises(ValueError, match="neutral.*em2ldl32"):
        labels.LabelResolver(labels.builtin_taxonomy("em2ldl32"), neutral_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        labels.LabelResolver(tax, neutral_smoothing=1.0)


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
    with pytest.raises(labels.MapError, match=match) as e:
        labels.load_map(path, labels.builtin_taxonomy("basic"))
    assert "bad_map.json" in str(e.value)


def test_map_file_forms(tmp_path):
    basic = labels.builtin_taxonomy("basic")
    (tmp_path / "m.json").write_text(json.dumps({"Excited": "happy", "meh": None,
                                                 "contempt": {"disgust": 1, "angry": 1}}))
    m = labels.load_map(tmp_path / "m.json", basic)
    res = labels.LabelResolver(basic, [m])
    assert _dist(res, {"excited": 1}) == {"happy": 1.0}
    assert _dist(res, {"contempt": 1}) == {"angry": 0.5, "disgust": 0.5}
    assert res.effective_map(["excited", "meh", "sad", "nope"]) == {
        "excited": {"happy": 1.0}, "meh": None, "sad": {"sad": 1.0}}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(labels.MapError, match="bad.json.*invalid JSON"):
        labels.load_map(tmp_path / "bad.json", basic)


def test_basic8_harmonises_contempt_as_the_generalizable_ser_paper():
    """Issue 19: the whisper_soft_adv recipe's taxonomy has no contempt class; contempt is
    disgust with weight 0.5 (arXiv 2311.08607), the other half neutral, before the recipe's
    neutral smoothing a = 0.1: (1 - a) * [disgust 0.5, neutral 0.5] + a * neutral."""
    basic8 = labels.builtin_taxonomy("basic8")
    assert basic8.classes == tuple(c for c in labels.builtin_taxonomy("basic").classes
                                   if c != "contempt")
    maps = {m.source: m for m in labels.builtin_maps(basic8)}
    assert set(maps) == {"common", "em2ldl32"}
    for m in maps.values():
        for label, dist in m.entries.items():
            assert dist is None or abs(sum(dist.values()) - 1) < 1e-9, (m.name, label)
    mead = ["angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised"]
    res = _resolver("basic8", mead)
    assert [m.source for m in res.maps] == ["common"]
    assert _dist(res, {"contempt": 1}) == {"disgust": 0.5, "neutral": 0.5}
    assert _dist(res, {"Contemptuous": 1}) == {"disgust": 0.5, "neutral": 0.5}
    assert _dist(res, {"disgusted": 1}) == {"disgust": 1.0}
    assert _dist(res, {"contempt": 1, "angry": 1}) == {"angry": 0.5, "disgust": 0.25,
                                                       "neutral": 0.25}
    # The rest of `common` is unchanged from basic.
    basic = _resolver("basic", mead)
    for label in ("ps", "boredom", "exc", "calm", "fear", "anger"):
        assert _dist(res, {label: 1}) == _dist(basic, {label: 1}), label
    # With the recipe's prepare flags.
    ws = _recipe()
    smoothed = _resolver(ws.TAXONOMY, mead, smoothing=ws.NEUTRAL_SMOOTHING)
    a = ws.NEUTRAL_SMOOTHING
    assert _dist(smoothed, {"contempt": 1}) == {"disgust": round(0.5 * (1 - a), 6),
                                                "neutral": round(0.5 * (1 - a) + a, 6)}
    # EM2LDL's contempt is Plutchik's disgust + anger dyad, kept for its 32 classes.
    em = _resolver("basic8", labels.builtin_taxonomy("em2ldl32").classes)
    assert _dist(em, {"contempt": 1}) == {"angry": 0.5, "disgust": 0.5}


def _recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "whisper_soft_adv.py"
    spec = importlib.util.spec_from_file_location("whisper_soft_adv_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whisper_soft_adv_recipe_prepares_basic8():
    ws = _recipe()
    assert ws.TAXONOMY == "basic8"
    assert "--taxonomy basic8" in ws.prepare_command()
    assert "contempt" not in labels.load_taxonomy(ws.TAXONOMY).classes
