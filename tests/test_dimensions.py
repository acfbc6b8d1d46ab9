"""Emotion dimensions through the data layer (manifest -> prepare -> shards -> batches), the
MSP-Podcast adapter, unknown speakers, and the class-imbalance tools (class weights, the
class-balanced sampler and its exact resume)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from _files import write_csv
from scipy import stats

from jaxser.data import (
    adapters,
    balance,
    buckets,
    dimensions,
    manifest,
    pipeline,
    prepare,
    shards,
    synthetic,
)

SR = 16000


def _wav(path: Path, seconds: float = 0.4, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = 0.3 * np.sin(2 * np.pi * (150 + 10 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    sf.write(path, y.astype(np.float32), SR)
    return path


def _rejected(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / "rejected.csv", newline="") as f:
        return {r["id"]: (r["reason"], r["detail"]) for r in csv.DictReader(f)}


def _all(out: Path, split: str) -> dict[str, dict]:
    """id -> host arrays of every example of `split`, through the real input pipeline."""
    cfg = pipeline.PipelineConfig(global_batch=4, num_buckets=1)
    got = {}
    for b in pipeline.eval_batches(out, split, 4, cfg, 0, 1):
        for i, ident in enumerate(b["meta"]["id"]):
            if b["valid"][i] > 0:
                got[str(ident)] = {k: v[i] for k, v in b.items() if k != "meta"}
    return got


# ----------------------------------------------------------------------------- scales


def test_scales_parse_infer_and_lookup():
    assert dimensions.parse_scale("1-7") == dimensions.Scale(1, 7)
    assert dimensions.parse_scale("-1..1") == dimensions.Scale(-1, 1)
    assert dimensions.parse_scale("-1-1") == dimensions.Scale(-1, 1)
    assert dimensions.parse_scale("0 to 100") == dimensions.Scale(0, 100)
    for bad in ("7-1", "high", "1-"):
        with pytest.raises(dimensions.ScaleError):
            dimensions.parse_scale(bad)
    spec = dimensions.parse_scale_spec("1-5, msp_podcast:1-7, msp_podcast:valence=0-10, "
                                       "dominance=-1..1")
    assert spec.lookup("iemocap", "arousal") == dimensions.Scale(1, 5)
    assert spec.lookup("iemocap", "dominance") == dimensions.Scale(-1, 1)
    assert spec.lookup("msp_podcast", "arousal") == dimensions.Scale(1, 7)
    assert spec.lookup("msp_podcast", "valence") == dimensions.Scale(0, 10)
    with pytest.raises(dimensions.ScaleError, match="not one of"):
        dimensions.parse_scale_spec("happiness=1-5")
    assert dimensions.infer_scale([0.1, 0.9]) == dimensions.Scale(0, 1)
    assert dimensions.infer_scale([1.5, 4.5]) == dimensions.Scale(1, 5)
    assert dimensions.infer_scale([1.0, 6.5]) == dimensions.Scale(1, 7)
    assert dimensions.infer_scale([-0.5, 0.5]) == dimensions.Scale(-1, 1)
    with pytest.raises(dimensions.ScaleError, match="declare"):
        dimensions.infer_scale([-500, 3])
    s = dimensions.Scale(1, 7)
    assert s.normalise(4.0) == 0.5 and s.original(0.5) == 4.0


# ----------------------------------------------------------------------------- manifest


def test_manifest_rows_with_category_dimensions_or_both(tmp_path):
    for i in range(6):
        _wav(tmp_path / f"u{i}.wav", seed=i)
    path = write_csv(tmp_path / "m.csv", [
        {"path": "u0.wav", "speaker": "a", "label": "happy", "EmoAct": "3", "valence": "4"},
        {"path": "u1.wav", "speaker": "a", "label": "", "EmoAct": "2.5", "valence": ""},
        {"path": "u2.wav", "speaker": "b", "label": "sad", "EmoAct": "", "valence": ""},
        {"path": "u3.wav", "speaker": "b", "label": "", "EmoAct": "", "valence": ""},
        {"path": "u4.wav", "speaker": "b", "label": "sad", "EmoAct": "high", "valence": "1"},
        {"path": "u5.wav", "speaker": "b", "label": "sad", "EmoAct": "nan", "valence": "1"},
    ])
    m = manifest.read_manifest(path, set())
    assert m.dim_columns == {"arousal": "EmoAct", "valence": "valence"}
    assert "EmoAct" not in m.group_columns
    recs, rej = manifest.parse_records(m)
    by_id = {r.id: r for r in recs}
    assert by_id["u0"].label == {"happy": 1.0} and by_id["u0"].dims == {"arousal": 3.0,
                                                                         "valence": 4.0}
    assert by_id["u1"].label is None and by_id["u1"].dims == {"arousal": 2.5}
    assert by_id["u2"].label == {"sad": 1.0} and by_id["u2"].dims == {}
    reasons = {r.id: (r.reason, r.detail) for r in rej}
    assert reasons["u3"][0] == "missing label" and "no dimension" in reasons["u3"][1]
    assert reasons["u4"] == ("bad dimension", "column 'EmoAct': 'high' is not a number")
    assert reasons["u5"][0] == "bad dimension" and "finite" in reasons["u5"][1]
    # a manifest with dimensions and no label column is a manifest
    only = write_csv(tmp_path / "dims.csv", [{"path": "u0.wav", "speaker": "a", "arousal": "0.3"}])
    assert manifest.read_manifest(only, set()).label_form == ""
    with pytest.raises(manifest.ManifestError, match="a label or a dimension"):
        manifest.read_manifest(write_csv(tmp_path / "none.csv", [{"path": "u0.wav",
                                                             "speaker": "a"}]), set())


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two corpora: `pod` declares 1-7 in its rows, `lab` has no declaration (0-1 inferred);
    rows with a category, dimensions or both; bad rows of every kind."""
    root = tmp_path_factory.mktemp("dims")
    rows = []
    for i in range(12):
        spk = f"s{i % 4}"
        _wav(root / "pod" / f"p{i}.wav", seed=i)
        row = {"path": f"pod/p{i}.wav", "id": f"p{i}", "speaker": spk, "corpus": "pod",
               "label": ["angry", "sad", "neutral"][i % 3], "arousal": f"{1 + (i % 7)}",
               "valence": f"{7 - (i % 7)}", "dominance": "" if i % 4 == 1 else "4",
               "dimension_scale": "1-7", "split": ["train", "train", "validation",
                                                   "test"][i % 4]}
        if i == 5:
            row["label"] = ""  # dimensions only
        rows.append(row)
    for i in range(4):
        _wav(root / "lab" / f"l{i}.wav", seed=20 + i)
        rows.append({"path": f"lab/l{i}.wav", "id": f"l{i}", "speaker": f"t{i}",
                     "corpus": "lab", "label": "sad", "arousal": f"{0.2 * i + 0.1:.1f}",
                     "split": ["train", "train", "validation", "test"][i]})
    _wav(root / "pod" / "bad.wav", seed=99)
    rows += [
        {"path": "pod/bad.wav", "id": "out", "speaker": "s0", "corpus": "pod", "label": "sad",
         "arousal": "8", "dimension_scale": "1-7", "split": "train"},
        {"path": "pod/bad.wav", "id": "word", "speaker": "s0", "corpus": "pod", "label": "sad",
         "valence": "very", "dimension_scale": "1-7", "split": "train"},
        {"path": "pod/bad.wav", "id": "nothing", "speaker": "s0", "corpus": "pod", "label": "",
         "dimension_scale": "1-7", "split": "train"},
        {"path": "pod/bad.wav", "id": "who", "speaker": "Unknown", "corpus": "pod",
         "label": "sad", "arousal": "3", "dimension_scale": "1-7", "split": "test"},
    ]
    path = write_csv(root / "manifest.csv", rows)
    out = root / "out"
    info = prepare.prepare([path], out, split="column:split", workers=0, progress=False)
    return root, out, info


def test_prepare_records_scales_and_rejects_bad_values(prepared):
    _, out, info = prepared
    dims = info["dimensions"]
    assert dims["names"] == ["arousal", "valence", "dominance"]
    assert dims["corpora"]["pod"]["arousal"] == {"scale": [1.0, 7.0], "source": "manifest"}
    assert dims["corpora"]["lab"]["arousal"] == {"scale": [0.0, 1.0], "source": "inferred"}
    # arousal's corpora disagree -> reports use 0-1; valence is pod's alone -> 1-7
    assert dims["scale"] == {"arousal": None, "valence": [1.0, 7.0], "dominance": [1.0, 7.0]}
    assert info["version"] == prepare.DATASET_VERSION == 2
    rejected = _rejected(out)
    assert rejected["out"][0] == "dimension out of range"
    assert "arousal=8 is outside 1-7" in rejected["out"][1]
    assert rejected["word"][0] == "bad dimension"
    assert rejected["nothing"][0] == "missing label"
    assert "who" not in rejected  # an unknown speaker is fine with a column: split
    train = info["splits"]["train"]
    assert train["labelled"] == train["count"] - 1  # p5 has dimensions only
    assert sum(train["class_counts"]) == train["labelled"]
    assert info["splits"]["test"]["unknown_speaker_rows"] == 1
    assert "pod/unknown" not in info["splits"]["test"]["speakers"]
    assert 0 < train["dims"]["arousal"]["mean"] < 1 and train["dims"]["arousal"]["count"] == 8


def test_batches_carry_normalised_dimensions_and_masks(prepared):
    _, out, info = prepared
    got = _all(out, "train")
    labels = info["labels"]
    p0, p1, p5 = got["p0"], got["p1"], got["p5"]
    np.testing.assert_allclose(p0["dims"], [0.0, 1.0, 0.5], atol=1e-6)  # 1, 7, 4 on 1-7
    np.testing.assert_array_equal(p0["dims_mask"], [1, 1, 1])
    np.testing.assert_array_equal(p1["dims_mask"], [1, 1, 0])  # no dominance: masked
    assert p1["dims"][2] == 0.0
    assert p0["label_mask"] == 1 and labels[int(np.argmax(p0["label"]))] == "angry"
    assert p5["label_mask"] == 0 and p5["class_index"] == -1 and not p5["label"].any()
    np.testing.assert_allclose(p5["dims"][:2], [(6 - 1) / 6, (2 - 1) / 6], atol=1e-6)
    lab = got["l1"]
    np.testing.assert_allclose(lab["dims"], [0.3, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(lab["dims_mask"], [1, 0, 0])
    assert got["p0"]["dims"].dtype == np.float32 and got["p0"]["dims_mask"].dtype == np.float32
    # the TFDS reader sees the same fields
    ex = next(shards.read_split(out, "train", len(labels)).as_numpy_iterator())
    assert {"dims", "dims_mask", "label_mask"} <= set(ex)


def test_dimension_scale_option_overrides_and_rejects(prepared, tmp_path):
    root, _, _ = prepared
    out = tmp_path / "o"
    info = prepare.prepare([root / "manifest.csv"], out, split="column:split", workers=0,
                           progress=False, dimension_scale="pod:1-9, lab:arousal=0-0.5")
    assert info["dimensions"]["corpora"]["pod"]["arousal"]["source"] == "declared"
    rejected = _rejected(out)
    assert "out" not in rejected  # 8 fits 1-9
    assert rejected["l3"][0] == "dimension out of range"  # 0.7 > 0.5


def test_unknown_speakers_in_a_split_that_deals_speakers(prepared, tmp_path):
    root, _, _ = prepared
    kw = dict(split="speaker:50/50", workers=0, progress=False)
    prepare.prepare([root / "manifest.csv"], tmp_path / "a", **kw)
    assert _rejected(tmp_path / "a")["who"][0] == "unknown speaker"
    info = prepare.prepare([root / "manifest.csv"], tmp_path / "b", unknown_speakers="utterance",
                           **kw)
    assert "who" not in _rejected(tmp_path / "b")
    assert any("pod/unknown:who" in s["speakers"] for s in info["splits"].values())
    with pytest.raises(ValueError, match="unknown_speakers"):
        prepare.prepare([root / "manifest.csv"], tmp_path / "c", unknown_speakers="guess", **kw)


def test_old_shards_without_masks_stay_readable(tmp_path):
    """Records of a data set prepared before label_mask/dims existed: label_mask reads 1."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    feats = shards.features_spec(2, label_mask=False)
    ser = tfds.core.example_serializer.ExampleSerializer(feats.get_serialized_info())
    path = tmp_path / shards.shard_name("train", 0, 1)
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(3):
            ex = {k: "" for k in shards.TEXT_KEYS}
            ex.update(id=f"old{i}", attrs="{}", audio=np.full(1600, i, np.int16), length=1600,
                      label=np.eye(2, dtype=np.float32)[i % 2], class_index=i % 2, domain=0)
            w.write(ser.get_tf_example(feats.encode_example(ex)).SerializeToString())
    got = _all(tmp_path, "train")
    assert set(got) == {"old0", "old1", "old2"}
    assert all(v["label_mask"] == 1 and "dims" not in v for v in got.values())
    assert len(list(shards.read_split(tmp_path, "train", 2))) == 3


# ----------------------------------------------------------------------------- MSP-Podcast


def _podcast_tree(root: Path) -> None:
    rows = [("MSP-PODCAST_0001_0001.wav", "A", "6.2", "2.0", "5.5", "127", "Male", "Train"),
            ("MSP-PODCAST_0001_0002.wav", "N", "4.0", "4.0", "4.0", "127", "Male", "Train"),
            ("MSP-PODCAST_0002_0001.wav", "X", "3.0", "3.5", "3.0", "Unknown", "Unknown",
             "Development"),
            ("MSP-PODCAST_0003_0001.wav", "C", "3.8", "2.6", "4.2", "45", "Female", "Test1"),
            ("MSP-PODCAST_0004_0001.wav", "O", "2.0", "5.0", "3.0", "46", "Female", "Test2")]
    (root / "Labels").mkdir(parents=True)
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender",
                    "Split_Set"])
        w.writerows(rows)
    for i, r in enumerate(rows[:-1]):  # the last one has no audio
        _wav(root / "Audios" / r[0], seed=i)


def test_msp_podcast_adapter(tmp_path):
    root = tmp_path / "MSP-Podcast"
    _podcast_tree(root)
    out = tmp_path / "m.csv"
    assert adapters.write_manifest("msp_podcast", root, out) == 5
    with open(out, newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    a = rows["MSP-PODCAST_0001_0001"]
    assert (a["label"], a["arousal"], a["valence"], a["dominance"], a["dimension_scale"],
            a["split"], a["speaker"], a["gender"]) == ("angry", "6.2", "2.0", "5.5", "1-7",
                                                       "train", "127", "male")
    x = rows["MSP-PODCAST_0002_0001"]
    assert (x["label"], x["original_label"], x["speaker"], x["gender"], x["split"]) == (
        "", "X", "unknown", "", "validation")
    assert rows["MSP-PODCAST_0003_0001"]["msp_split"] == "Test1"
    assert rows["MSP-PODCAST_0004_0001"]["split"] == "test"
    adapters.write_manifest("msp_podcast", root, tmp_path / "k.csv", keep_other=True)
    with open(tmp_path / "k.csv", newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} >= {"other", "no_agreement"}
    info = prepare.prepare([out], tmp_path / "data", split="column:split", workers=0,
                           progress=False)
    assert info["labels"] == ["angry", "contempt", "neutral"]
    assert info["dimensions"]["scale"]["arousal"] == [1.0, 7.0]
    assert info["splits"]["validation"]["labelled"] == 0  # X: dimensions only
    assert _rejected(tmp_path / "data")["MSP-PODCAST_0004_0001"][0] == "missing file"


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_dimensions_follow_the_synthesis(tmp_path):
    path = synthetic.generate_corpus(tmp_path, num_speakers=2, utterances_per_speaker=6,
                                     seed=3, mean_seconds=1.2, min_seconds=1.0,
                                     max_seconds=1.5, mixed_fraction=0.0)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    a = np.array([float(r["arousal"]) for r in rows])
    assert np.all((a >= 1) & (a <= 7)) and {r["dimension_scale"] for r in rows} == {"1-7"}
    top = [max(json.loads(r["distribution"]).items(), key=lambda kv: kv[1])[0] for r in rows]
    by = {e: np.mean([x for x, t in zip(a, top, strict=True) if t == e]) for e in set(top)}
    assert by["angry"] > by["neutral"] > by["sad"]
    rms = [np.sqrt(np.mean(sf.read(tmp_path / r["path"])[0] ** 2)) for r in rows]
    assert stats.spearmanr(a, rms).statistic > 0.5  # arousal is heard as loudness
    for e, p in synthetic.EMOTION_PROFILES.items():
        d = synthetic.voice_dimensions(p)
        assert np.all((d > 0.1) & (d < 0.9)), e


# ----------------------------------------------------------------------------- class imbalance


def test_class_weights_are_n_over_k_nk():
    counts = np.array([50.0, 30.0, 15.0, 5.0])
    w = balance.class_weights(counts)
    np.testing.assert_allclose(w, counts.sum() / (4 * counts))
    np.testing.assert_allclose(w * counts, counts.sum() / 4)  # every class weighs N / K
    w0 = balance.class_weights([10, 0, 30])
    np.testing.assert_allclose(w0, [40 / 20, 0, 40 / 60])
    info = {"splits": {"train": {"count": 10, "prior": [0.7, 0.3]}}}
    np.testing.assert_allclose(balance.class_counts(info), [7, 3])
    info["splits"]["train"]["class_counts"] = [6, 4]
    np.testing.assert_allclose(balance.class_counts(info), [6, 4])


def test_balanced_plan_class_frequencies_and_fixed_batches():
    rng = np.random.default_rng(0)
    n = 400
    classes = rng.choice(4, size=n, p=[0.7, 0.2, 0.08, 0.02])
    classes[:20] = -1  # rows without a category keep their share
    lengths = rng.integers(500, 4000, size=n)
    layout = buckets.Layout(np.array([1500, 3000, 4000]), np.array([8, 8, 8]), 1)
    bkt = buckets.bucket_of(lengths, layout)
    ids = np.arange(n)
    plain = buckets.train_plan(ids, lengths, lengths, bkt, layout, 0, 0)
    counts = np.zeros(5)
    for epoch in range(30):
        plan = buckets.train_plan(ids, lengths, lengths, bkt, layout, 0, epoch, classes=classes)
        assert plan.bucket.size == plain.bucket.size  # same batches per epoch
        drawn = plan.slots[plan.slots >= 0]
        assert drawn.size == n
        np.testing.assert_array_equal(np.bincount(bkt[drawn], minlength=3),
                                      np.bincount(bkt, minlength=3))
        counts += np.bincount(classes[drawn] + 1, minlength=5)
    share = counts / counts.sum()
    assert abs(share[0] - 20 / n) < 0.01  # unlabelled: natural share
    np.testing.assert_allclose(share[1:], (1 - 20 / n) / 4, atol=0.02)
    expected = balance.expected_shares(classes, bkt, 3)
    np.testing.assert_allclose([expected[k] for k in range(4)], (1 - 20 / n) / 4, atol=1e-6)


def test_balanced_sampling_resumes_exactly(tmp_path):
    rng = np.random.default_rng(1)
    exs = [{"id": f"u{i:03d}", "audio": rng.integers(-999, 999, size=int(rng.integers(50, 300)),
                                                     dtype=np.int16),
            "label": np.eye(3, dtype=np.float32)[c], "speaker": "s"}
           for i, c in enumerate(rng.choice(3, size=40, p=[0.75, 0.2, 0.05]))]
    shards.write_split(tmp_path, "train", exs, 3, target_shard_bytes=2000)
    cfg = pipeline.PipelineConfig(global_batch=4, sample_rate=100, pad_multiple=10,
                                  num_buckets=2, class_balanced=True)
    it = pipeline.train_iterator(tmp_path, "train", cfg, process_index=0, process_count=1)
    first = [next(it) for _ in range(7)]
    state = it.state()
    assert state["class_balanced"] is True
    rest = [next(it) for _ in range(2 * it.steps_per_epoch)]
    it.close()
    resumed = pipeline.train_iterator(tmp_path, "train", cfg, state=json.loads(
        json.dumps(state)), process_index=0, process_count=1)
    again = [next(resumed) for _ in range(len(rest))]
    resumed.close()
    for a, b in zip(rest, again, strict=True):
        np.testing.assert_array_equal(a["meta"]["index"], b["meta"]["index"])
        np.testing.assert_array_equal(a["audio"], b["audio"])
    seen = np.concatenate([b["class_index"][b["valid"] > 0] for b in first + rest])
    assert np.bincount(seen, minlength=3)[2] > 0.15 * seen.size  # the 5% class is oversampled
    plain = pipeline.epoch_steps(tmp_path, "train", pipeline.PipelineConfig(
        global_batch=4, sample_rate=100, pad_multiple=10, num_buckets=2), 1)
    assert plain == it.steps_per_epoch
