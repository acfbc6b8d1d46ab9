"""Whisper's log-mel spectrogram, computed on the accelerator inside the jitted step.

Matches `transformers.WhisperFeatureExtractor` (STFT with centre reflect padding and a periodic
Hann window, power spectrum, Slaney mel filters, last frame dropped, log10 of a 1e-10 floor,
per-example clamp to max - 8, then (x + 4) / 4) within about 1e-5 on the same audio.

Two modes:
- ``lengths=None``: every row is one utterance filling the whole row. With audio padded to 30 s
  by :func:`pad_or_trim` this is exactly the feature extractor's default (30 s) output.
- ``lengths`` given (variable-length batches): each row is reflect-padded at ITS OWN end, the
  per-example max is taken over its valid frames only, so each utterance's valid frames equal
  the extractor's output on that utterance alone. Padded frames are set to the clamp floor
  ``(max - 8 + 4) / 4``, the value digital silence gets in Whisper's own 30 s padding, and are
  False in the returned frame mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxser.constants import SAMPLE_RATE

WHISPER_SAMPLES = 30 * SAMPLE_RATE  # 30 s: the input length of original Whisper.


@functools.lru_cache(maxsize=8)
def mel_filters(num_mel_bins: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """Slaney mel filter bank [n_fft // 2 + 1, num_mel_bins], exactly the feature extractor's."""
    from transformers.audio_utils import mel_filter_bank  # heavy import, only at trace time

    return mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=num_mel_bins,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=sample_rate,
            norm="slaney",
            mel_scale="slaney",
    ).astype(np.float32)


def _hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window / transformers window_function)."""
    n = np.arange(n_fft)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


def _reflect_indices(positions: jax.Array, lengths: jax.Array, samples: int) -> jax.Array:
    """Sample index for each padded position, reflecting at 0 and at each row's last sample.

    positions: [P] signed positions relative to the signal start; lengths: [batch] or [].
    Returns [batch, P] (or [P]) indices clipped to [0, samples - 1]; positions past the reflected
    range only feed padded frames, whose values are masked later.
    """
    last = jnp.asarray(lengths)[..., None] - 1
    idx = jnp.abs(positions)
    idx = jnp.where(idx > last, 2 * last - idx, idx)
    return jnp.clip(idx, 0, samples - 1)


def _frames(audio: jax.Array, lengths: jax.Array | None, n_fft: int, hop: int) -> jax.Array:
    """Centre-padded STFT frames [batch, samples // hop, n_fft] without a big gather.

    The padded signal is cut into hop-sized blocks; frame t is blocks t..t+k-1 joined and cut
    to n_fft samples (k = ceil(n_fft / hop)).
    """
    batch, samples = audio.shape
    num_frames = samples // hop
    k = math.ceil(n_fft / hop)
    padded_len = (num_frames + k - 1) * hop
    positions = jnp.arange(padded_len) - n_fft // 2
    if lengths is None:
        padded = jnp.take(audio, _reflect_indices(positions, jnp.asarray(samples), samples),
                          axis=1)
    else:
        idx = _reflect_indices(positions, lengths, samples)  # [batch, P]
        padded = jnp.take_along_axis(audio, idx, axis=1)
    blocks = padded.reshape(batch, num_frames + k - 1, hop)
    frames = jnp.concatenate([blocks[:, i:i + num_frames] for i in range(k)], axis=-1)
    return frames[..., :n_fft]  # [batch, frames, n_fft]


def log_mel_spectrogram(
        audio: jax.Array,
        lengths: jax.Array | None = None,
        *,
        num_mel_bins: int = 80,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = 400,
        hop_length: int = 160,
) -> tuple[jax.Array, jax.Array]:
    """Whisper log-mel features of a batch of waveforms.

    Args:
        audio: [batch, samples] float waveforms at `sample_rate`.
        lengths: optional [batch] int valid sample counts (padding after them is ignored).
        num_mel_bins: 80 (Whisper up to large-v2) or 128 (large-v3).
        sample_rate, n_fft, hop_length: the feature extractor's STFT settings.
    Returns:
        features [batch, samples // hop_length, num_mel_bins] float32 (time-major) and
        frame_mask [batch, samples // hop_length] bool (True = valid; all True if no lengths).
    """
    if audio.ndim != 2:
        raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
    audio = audio.astype(jnp.float32)
    num_frames = audio.shape[1] // hop_length
    if lengths is not None:
        lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, audio.shape[1])
    frames = _frames(audio, lengths, n_fft, hop_length) * _hann_window(n_fft)
    spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2  # [batch, frames, n_fft // 2 + 1]
    filters = jnp.asarray(mel_filters(num_mel_bins, sample_rate, n_fft))
    mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))  # [batch, frames, num_mel]
    if lengths is None:
        frame_mask = jnp.ones(log_spec.shape[:2], bool)
    else:
        frame_mask = jnp.arange(num_frames)[None, :] < (lengths // hop_length)[:, None]
    masked = jnp.where(frame_mask[..., None], log_spec, -jnp.inf)
    max_val = jnp.max(masked, axis=(1, 2), keepdims=True)  # [batch, 1, 1]
    max_val = jnp.where(jnp.isfinite(max_val), max_val, -10.0)  # rows with no valid frame
    floor = max_val - 8.0
    log_spec = jnp.where(frame_mask[..., None], jnp.maximum(log_spec, floor), floor)
    features = (log_spec + 4.0) / 4.0
    return features, frame_mask


def pad_or_trim(audio: jax.Array, length: int = WHISPER_SAMPLES) -> jax.Array:
    """Zero-pads or cuts the last axis to `length` samples (30 s for original Whisper)."""
    samples = audio.shape[-1]
    if samples >= length:
        return audio[..., :length]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, length - samples)]
    return jnp.pad(audio, pad)
