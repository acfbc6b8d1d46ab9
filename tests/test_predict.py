"""`jaxser predict` and the Predictor API: files of any format/rate/length, batching
invariance, emotion over time, frame-level outputs, chunking of over-long audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from jaxser import cli
from jaxser.data import synthetic
from jaxser.predict import PAD_MULTIPLE, SAMPLE_RATE, Predictor, padded_length

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def predictor(tiny_workdir):
    return Predictor.load(tiny_workdir / "train")


@pytest.fixture(scope="module")
def files(tiny_workdir, tmp_path_factory):
    """Three files: wav 16 kHz mono, flac 44.1 kHz stereo, ogg 8 kHz; 1.3 s to 2.6 s."""
    out = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    speaker = synthetic.make_speakers(1, ["synth_en"], seed=3)[0]
    paths = []
    for name, rate, seconds, channels in (("a.wav", 16000, 2.6, 1), ("b.flac", 44100, 1.3, 2),
                                          ("c.ogg", 8000, 2.0, 1)):
        wave = synthetic.synthesize_utterance(rng, np.eye(6)[len(paths)], speaker,
                                              synthetic.language_profile("synth_en"),
                                              seconds, rate)
        data = np.stack([wave, 0.5 * wave], 1) if channels == 2 else wave
        sf.write(out / name, data, rate)
        paths.append(out / name)
    return paths


def _probs(row: dict) -> np.ndarray:
    return np.asarray(list(row["distribution"].values()))


def test_padded_length():
    assert padded_length(1) == PAD_MULTIPLE
    for n in (1, 319, 320, 321, 16000, 16001, 47999, 480000):
        p = padded_length(n)
        assert p >= n and p % PAD_MULTIPLE == 0 and p <= max(1.25 * n, PAD_MULTIPLE) + 320
    assert padded_length(10 ** 7, max_samples=480000) == 480000
    assert len({padded_length(n) for n in range(16000, 32000, 7)}) <= 5  # Few shapes.


def test_files_any_format_and_rate(predictor, files):
    rows = predictor.predict_files(files)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for row, seconds in zip(rows, (2.6, 1.3, 2.0), strict=True):
        assert row["duration"] == pytest.approx(seconds, abs=0.01)
        assert list(row["distribution"]) == predictor.labels
        assert _probs(row).sum() == pytest.approx(1, abs=1e-4)
        assert row["top"] == max(row["distribution"], key=row["distribution"].get)
        # frame_logits model: one distribution per 20 ms frame.
        assert row["frame_seconds"] == pytest.approx(0.02)
        assert len(row["frame_probs"]) == int(row["duration"] * SAMPLE_RATE) // PAD_MULTIPLE
        assert np.allclose(np.sum(row["frame_probs"], 1), 1, atol=1e-4)


def test_same_result_alone_or_in_batch(predictor, files):
    batch = predictor.predict_files(files, batch_size=3)
    for i, path in enumerate(files):
        alone = predictor.predict_files([path])[0]
        np.testing.assert_allclose(_probs(alone), _probs(batch[i]), atol=1e-5)
        np.testing.assert_allclose(alone["frame_probs"], batch[i]["frame_probs"], atol=1e-5)
    small = predictor.predict_files(files, batch_size=2)  # Other batch compositions.
    for a, b in zip(small, batch, strict=True):
        np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-5)


def test_timeline(predictor, tmp_path):
    wave, segments = synthetic.long_utterance(9.0, seed=2, segment_seconds=(4.0, 5.0))
    path = tmp_path / "long.wav"
    sf.write(path, wave, SAMPLE_RATE)
    row = predictor.predict_files([path], window=2.0, hop=1.5)[0]
    timeline = row["timeline"]
    assert [r["start"] for r in timeline] == [0.0, 1.5, 3.0, 4.5, 6.0, 7.0]  # Last at the end.
    assert all(r["end"] - r["start"] == pytest.approx(2.0) for r in timeline)
    assert timeline[-1]["end"] == pytest.approx(9.0)
    for r in timeline:
        assert _probs(r).sum() == pytest.approx(1, abs=1e-4) and r["top"] in predictor.labels
    # A window equals predicting that stretch of audio on its own.
    piece = predictor(wave[int(1.5 * SAMPLE_RATE):int(3.5 * SAMPLE_RATE)])
    np.testing.assert_allclose(_probs(piece), _probs(timeline[1]), atol=1e-4)
    with pytest.raises(ValueError, match="window"):
        predictor.timeline(wave, window=0.0, hop=1.0)


def test_over_long_audio_is_chunked(tiny_workdir):
    short = Predictor.load(tiny_workdir / "train")
    short.max_samples = 64 * PAD_MULTIPLE  # Pretend the encoder takes 1.28 s per pass.
    wave, _ = synthetic.long_utterance(5.0, seed=4, segment_seconds=(2.0, 3.0))
    row = short.predict_waveforms([wave])[0]
    assert row["chunks"] == 4  # 1.28 + 1.28 + 1.28 + 1.16 s
    pieces = [wave[s:s + short.max_samples] for s in range(0, len(wave), short.max_samples)]
    parts = short.probabilities(pieces)["probs"]
    expected = np.average(parts, axis=0, weights=[len(p) for p in pieces])
    np.testing.assert_allclose(_probs(row), expected, atol=1e-5)
    assert len(row["frame_probs"]) == sum(len(p) // PAD_MULTIPLE for p in pieces)
    with pytest.raises(ValueError, match="longer than the encoder"):
        short.timeline(wave, window=2.0, hop=1.0)


def test_arrays_api(predictor, files):
    wave = synthetic.synthesize_utterance(np.random.default_rng(1), np.eye(6)[2],
                                          synthetic.make_speakers(1)[0],
                                          synthetic.language_profile("synth_en"), 1.5, 16000)
    one = predictor(wave)
    assert isinstance(one, dict) and set(one) >= {"distribution", "top", "duration"}
    two = predictor([wave, wave[:8000]])
    np.testing.assert_allclose(_probs(two[0]), _probs(one), atol=1e-5)
    # Another sample rate is resampled first.
    import librosa

    at_8k = librosa.resample(wave, orig_sr=16000, target_sr=8000)
    assert predictor(at_8k, sample_rate=8000)["duration"] == pytest.approx(1.5, abs=0.01)
    raw = predictor.probabilities([wave])
    assert raw["probs"].shape == (1, len(predictor.labels))
    np.testing.assert_allclose(raw["probs"][0], _probs(one), atol=1e-5)
    by_path = predictor(files[0])
    assert by_path["file"] == str(files[0])
    with pytest.raises(ValueError, match="mono waveform"):
        predictor.predict_waveforms([np.zeros((2, 16000), np.float32)])
    with pytest.raises(ValueError, match="shorter than"):
        predictor.predict_waveforms([np.zeros(100, np.float32)])


def test_cli_predict(tiny_workdir, files, tmp_path, capsys):
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio")
    capsys.readouterr()
    argv = ["predict", "--workdir", str(tiny_workdir / "train"), str(files[0]), str(junk),
            str(files[1]), "--window", "1.0", "--hop", "0.5"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == [str(files[0]), str(junk), str(files[1])]
    assert "error" in rows[1] and "distribution" not in rows[1]
    assert len(rows[0]["timeline"]) == 5 and rows[0]["timeline"][-1]["end"] == 2.6
    assert len(rows[2]["timeline"]) == 2  # 0-1 s, then 0.3-1.3 s ends at the end.
