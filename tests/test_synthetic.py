"""Tests of the synthetic emotional-speech corpus: manifest, labels, audio, emotion cues."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jaxser.data import synthetic
from jaxser.data.synthetic import EMOTIONS, MANIFEST_COLUMNS

SR = 16000
TINY = dict(num_speakers=3, utterances_per_speaker=4, corpora=("synth_en", "synth_de"),
            mean_seconds=1.3, min_seconds=1.0, max_seconds=1.8, mixed_fraction=0.5)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus (3 speakers x 4 utterances, ~1.3 s each) in the distribution format."""
    return synthetic.generate_corpus(tmp_path_factory.mktemp("corpus"), seed=7, **TINY)


def _f0(audio: np.ndarray, sr: int = SR) -> float:
    """Median F0 (Hz) of the loud, periodic frames, by a small YIN (de Cheveigne & Kawahara)."""
    lo, hi, width, hop = sr // 600, sr // 60, 400, 256
    frames = np.lib.stride_tricks.sliding_window_view(audio.astype(np.float64),
                                                      width + hi)[::hop]
    energy = np.sum(frames[:, :width] ** 2, axis=1)
    frames = frames[energy > 0.3 * energy.max()]  # [frames, width + hi]
    size = 2 * (width + hi)
    # Cross-correlation of the first `width` samples with the frame at lags 0..hi.
    cross = np.fft.irfft(np.conj(np.fft.rfft(frames[:, :width], size, axis=1))
                         * np.fft.rfft(frames, size, axis=1), size, axis=1)[:, :hi + 1]
    power = np.cumsum(np.pad(frames**2, ((0, 0), (1, 0))), axis=1)
    lags = np.arange(hi + 1)
    shifted = power[:, lags + width] - power[:, lags]  # energy of frame[lag:lag + width]
    diff = shifted[:, :1] + shifted - 2.0 * cross  # [frames, lag] YIN difference
    cmnd = diff[:, 1:] * lags[1:] / np.maximum(np.cumsum(diff[:, 1:], axis=1), 1e-12)
    estimates = []
    for row in cmnd:
        below = np.flatnonzero(row[lo - 1:] < 0.15)
        if below.size:  # the first dip under the threshold, else the deepest clear one
            i = lo - 1 + below[0]
        elif row[lo - 1:].min() < 0.35:
            i = lo - 1 + int(np.argmin(row[lo - 1:]))
        else:
            continue
        while i + 1 < row.size and row[i + 1] < row[i]:  # descend to the dip
            i += 1
        estimates.append(sr / (i + 1))
    assert estimates, "no voiced frames found"
    return float(np.median(estimates))


def _rms_db(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2))))


def test_manifest_columns_and_distributions(corpus: Path) -> None:
    rows = _read_manifest(corpus)
    assert len(rows) == 12
    assert tuple(rows[0]) == (*MANIFEST_COLUMNS, "distribution",
                              *synthetic.DIMENSION_COLUMNS)
    for row in rows:
        assert not Path(row["path"]).is_absolute() and (corpus.parent / row["path"]).is_file()
        assert row["path"] == f"wav/{row['id']}.wav"
        assert row["gender"] in ("female", "male") and row["age"] in synthetic.AGES
        assert row["language"] == synthetic.language_profile(row["corpus"]).language
        dist = json.loads(row["distribution"])
        assert list(dist) == list(EMOTIONS)
        values = np.array(list(dist.values()))
        assert np.all(values >= 0) and abs(values.sum() - 1.0) < 1e-6
        assert np.allclose(values, np.round(values, synthetic.LABEL_DECIMALS))
    assert len({row["id"] for row in rows}) == len(rows)
    # Each speaker has one gender, age and corpus; speakers cover both corpora.
    by_speaker: dict[str, set] = {}
    for row in rows:
        by_speaker.setdefault(row["speaker"], set()).add((row["gender"], row["age"],
                                                          row["corpus"]))
    assert len(by_speaker) == 3 and all(len(v) == 1 for v in by_speaker.values())
    assert {row["corpus"] for row in rows} == {"synth_en", "synth_de"}


def test_pure_and_mixed_labels(corpus: Path) -> None:
    rows = _read_manifest(corpus)
    dists = np.array([[json.loads(r["distribution"])[e] for e in EMOTIONS] for r in rows])
    support = (dists > 0).sum(axis=1)
    pure = dists.max(axis=1) == 1.0
    # mixed_fraction=0.5 of 4 per speaker: 2 one-hot and 2 mixtures over 2-3 emotions.
    assert pure.sum() == 6
    assert np.all(support[pure] == 1)
    assert np.all((support[~pure] >= 2) & (support[~pure] <= 3))


@pytest.mark.parametrize("label_format", ["columns", "label"])
def test_other_label_formats(tmp_path: Path, corpus: Path, label_format: str) -> None:
    manifest = synthetic.generate_corpus(tmp_path, seed=7, label_format=label_format, **TINY)
    rows, reference = _read_manifest(manifest), _read_manifest(corpus)
    assert tuple(rows[0]) == (*MANIFEST_COLUMNS, *synthetic.label_columns(label_format),
                              *synthetic.DIMENSION_COLUMNS)
    for row, ref in zip(rows, reference, strict=True):
        dist = json.loads(ref["distribution"])
        if label_format == "columns":
            probs = np.array([float(row[e]) for e in EMOTIONS])
            assert abs(probs.sum() - 1.0) < 1e-6
            assert np.allclose(probs, [dist[e] for e in EMOTIONS])
        else:
            assert row["label"] == max(EMOTIONS, key=lambda e: dist[e])
    # The label format changes only the manifest, never the audio.
    first = rows[0]["path"]
    assert (tmp_path / first).read_bytes() == (corpus.parent / first).read_bytes()


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_format"):
        synthetic.generate_corpus(tmp_path, label_format="votes")
    with pytest.raises(ValueError, match="mixed_fraction"):
        synthetic.generate_corpus(tmp_path, mixed_fraction=1.5)
    with pytest.raises(ValueError, match="mean_seconds"):
        synthetic.generate_corpus(tmp_path, mean_seconds=9.0)
    with pytest.raises(ValueError, match="weights"):
        speaker = synthetic.make_speakers(1)[0]
        synthetic.synthesize_utterance(np.random.default_rng(0), np.ones(3) / 3, speaker,
                                       synthetic.language_profile("synth_en"), 1.0)


def test_reproducible_by_seed(tmp_path: Path, corpus: Path) -> None:
    again = synthetic.generate_corpus(tmp_path / "same", seed=7, **TINY)
    assert again.read_bytes() == corpus.read_bytes()
    for row in _read_manifest(corpus):
        assert (again.parent / row["path"]).read_bytes() == \
            (corpus.parent / row["path"]).read_bytes()
    other = synthetic.generate_corpus(tmp_path / "other", seed=8, **TINY)
    assert other.read_bytes() != corpus.read_bytes()
    first = _read_manifest(corpus)[0]["path"]
    assert (other.parent / first).read_bytes() != (corpus.parent / first).read_bytes()


def test_audio_is_valid_and_matches_planned_durations(corpus: Path) -> None:
    plans = {p.id: p for p in synthetic.plan_corpus(seed=7, **TINY)}
    for row in _read_manifest(corpus):
        info = sf.info(corpus.parent / row["path"])
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        audio, _ = sf.read(corpus.parent / row["path"], dtype="float32")
        plan = plans[row["id"]]
        assert audio.shape == (plan.num_samples,)
        assert TINY["min_seconds"] <= plan.seconds(SR) <= TINY["max_seconds"]
        assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1.0
        assert _rms_db(audio) > -50.0, "silent file"
        dist = json.loads(row["distribution"])
        assert np.allclose(plan.weights, [dist[e] for e in EMOTIONS])


def test_durations_follow_requested_mean_and_bounds() -> None:
    d = synthetic.sample_durations(np.random.default_rng(0), 4000, 3.6, 1.0, 12.0)
    assert d.min() >= 1.0 and d.max() <= 12.0
    assert abs(d.mean() - 3.6) < 0.1
    assert np.median(d) < d.mean()  # right-skewed, like real corpora


def _pure(emotion: str, speaker: synthetic.SpeakerProfile, seed: int,
          seconds: float = 2.0) -> np.ndarray:
    weights = np.eye(len(EMOTIONS))[EMOTIONS.index(emotion)]
    return synthetic.synthesize_utterance(np.random.default_rng(seed), weights, speaker,
                                          synthetic.language_profile(speaker.corpus), seconds)


def test_emotion_cues_are_measurable() -> None:
    speaker = synthetic.make_speakers(2, seed=3)[0]
    for seed in (0, 1):
        audio = {e: _pure(e, speaker, seed) for e in ("angry", "happy", "sad", "neutral")}
        f0 = {e: _f0(a) for e, a in audio.items()}
        rms = {e: _rms_db(a) for e, a in audio.items()}
        assert f0["angry"] > 1.15 * f0["sad"] and f0["happy"] > 1.1 * f0["sad"], f0
        assert rms["angry"] > rms["neutral"] + 4 > rms["sad"] + 8, rms
        assert len(audio["sad"]) == len(audio["angry"]) == 2 * SR


def test_speakers_differ() -> None:
    speakers = synthetic.make_speakers(4, seed=0)
    female = next(s for s in speakers if s.gender == "female")
    male = next(s for s in speakers if s.gender == "male")
    assert female.base_f0 > 1.4 * male.base_f0
    assert female.formant_scale > male.formant_scale
    assert _f0(_pure("neutral", female, 0)) > 1.3 * _f0(_pure("neutral", male, 0))
    assert len({s.speaker for s in speakers}) == 4
    assert synthetic.make_speakers(4, seed=0) == speakers


def test_mixture_is_blend_of_profiles() -> None:
    w = np.array([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    blend = synthetic.blend_voice(w)
    happy, sad = synthetic.EMOTION_PROFILES["happy"], synthetic.EMOTION_PROFILES["sad"]
    assert blend.energy_db == pytest.approx(0.5 * (happy.energy_db + sad.energy_db))
    speaker = synthetic.make_speakers(1, seed=0)[0]
    mixed = synthetic.synthesize_utterance(np.random.default_rng(0), w, speaker,
                                           synthetic.language_profile(speaker.corpus), 2.0)
    assert _rms_db(_pure("sad", speaker, 0)) < _rms_db(mixed) < _rms_db(_pure("happy", speaker, 0))


def test_unknown_corpus_names_get_a_fixed_language() -> None:
    lang = synthetic.language_profile("my_corpus")
    assert lang == synthetic.language_profile("my_corpus")
    assert lang.vowels and lang.consonants and lang.language == "my_corpus"
    assert synthetic.language_profile("synth_zh").tone_st > 0


def test_long_utterance_segments_cover_the_file() -> None:
    audio, segments = synthetic.long_utterance(20.0, seed=1, segment_seconds=(3.0, 6.0))
    assert audio.dtype == np.float32 and audio.shape == (20 * SR,)
    assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1.0
    assert segments[0][0] == 0.0 and segments[-1][1] == pytest.approx(20.0)
    for (_, end, _), (start, _, _) in zip(segments[:-1], segments[1:], strict=True):
        assert start == end
    for (start, end, dist), nxt in zip(segments, [*segments[1:], None], strict=True):
        assert end - start >= 3.0 - 1e-9
        assert list(dist) == list(EMOTIONS) and abs(sum(dist.values()) - 1.0) < 1e-6
        if nxt is not None:
            assert max(dist, key=dist.get) != max(nxt[2], key=nxt[2].get)
