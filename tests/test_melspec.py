"""On-device Whisper log-mel against transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from jaxser.audio.melspec import WHISPER_SAMPLES, log_mel_spectrogram, pad_or_trim

TOL = 1e-3


def _audio(lengths, seed=0):
    """Zero-padded batch of noisy tones of the given lengths (samples)."""
    rng = np.random.default_rng(seed)
    batch = np.zeros((len(lengths), max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / 16000
        batch[i, :n] = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(n)
    return batch


@pytest.mark.parametrize("num_mel", [80, 128])
def test_thirty_second_mode_matches_extractor(num_mel):
    extractor = WhisperFeatureExtractor(feature_size=num_mel)
    audio = _audio([16000, 7300, WHISPER_SAMPLES + 1234])
    rows = [audio[0, :16000], audio[1, :7300], audio[2]]
    ref = extractor(rows, sampling_rate=16000, return_tensors="np")["input_features"]
    padded = jnp.stack([pad_or_trim(jnp.asarray(r)) for r in rows])
    feats, mask = jax.jit(lambda a: log_mel_spectrogram(a, num_mel_bins=num_mel))(padded)
    assert feats.shape == (3, 3000, num_mel) and feats.dtype == jnp.float32
    assert bool(mask.all())
    np.testing.assert_allclose(np.asarray(feats).transpose(0, 2, 1), ref, atol=TOL)


@pytest.mark.parametrize("num_mel", [80, 128])
def test_variable_length_matches_extractor_per_utterance(num_mel):
    extractor = WhisperFeatureExtractor(feature_size=num_mel)
    lengths = np.array([12345, 16000, 4001])
    audio = _audio(list(lengths), seed=1)
    fn = jax.jit(lambda a, n: log_mel_spectrogram(a, n, num_mel_bins=num_mel))
    feats, mask = fn(audio, lengths)
    feats, mask = np.asarray(feats), np.asarray(mask)
    assert feats.shape == (3, 100, num_mel)
    for i, n in enumerate(lengths):
        ref = extractor(audio[i, :n], sampling_rate=16000, padding="longest",
                        return_tensors="np")["input_features"][0]  # [mel, n // 160]
        valid = n // 160
        assert mask[i].sum() == valid and mask[i, :valid].all()
        np.testing.assert_allclose(feats[i, :valid].T, ref, atol=TOL)
        # Padded frames hold the clamp floor ((max - 8) + 4) / 4 = normalised max - 2.
        np.testing.assert_allclose(feats[i, valid:], ref.max() - 2.0, atol=TOL)


def test_full_lengths_equal_no_lengths():
    audio = _audio([8000, 8000], seed=2)
    a, _ = log_mel_spectrogram(jnp.asarray(audio))
    b, mask = log_mel_spectrogram(jnp.asarray(audio), jnp.array([8000, 8000]))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert bool(mask.all())


def test_empty_row_is_finite():
    audio = _audio([3200, 3200])
    feats, mask = log_mel_spectrogram(jnp.asarray(audio), jnp.array([3200, 0]))
    assert np.isfinite(np.asarray(feats)).all()
    assert not bool(mask[1].any())


def test_pad_or_trim():
    x = jnp.ones((2, 10))
    assert pad_or_trim(x, 4).shape == (2, 4)
    y = pad_or_trim(x, 15)
    assert y.shape == (2, 15) and float(y[:, 10:].sum()) == 0.0
    assert pad_or_trim(jnp.ones(5), 8).shape == (8,)


def test_rejects_bad_rank():
    with pytest.raises(ValueError, match="batch, samples"):
        log_mel_spectrogram(jnp.ones(400))
