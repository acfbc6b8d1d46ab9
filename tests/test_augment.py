"""Property tests of the on-device waveform augmentation and SpecAugment (1 device, tiny)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxser.audio import augment as aug

SR = 16000
N = 16000
LENGTHS = np.array([16000, 12000, 9001, 5000], np.int32)
B = len(LENGTHS)


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Noise-plus-tone audio [B, N] with zero padding past LENGTHS."""
    rng = np.random.default_rng(seed)
    t = np.arange(N) / SR
    x = 0.3 * np.sin(2 * np.pi * 220 * t)[None] + 0.1 * rng.standard_normal((B, N))
    x = np.where(np.arange(N)[None] < LENGTHS[:, None], x, 0.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(LENGTHS)


def _sines(freq: float, lengths=LENGTHS) -> tuple[jax.Array, jax.Array]:
    t = np.arange(N) / SR
    x = np.sin(2 * np.pi * freq * t)[None].repeat(len(lengths), 0)
    x = np.where(np.arange(N)[None] < lengths[:, None], x, 0.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(lengths)


def _assert_padding_zero(audio, lengths):
    audio, lengths = np.asarray(audio), np.asarray(lengths)
    for row, length in zip(audio, lengths, strict=True):
        assert np.all(row[length:] == 0.0)


def _rms(x):
    return np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))


def _peak_freq(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


ALL_ON = aug.WaveformAugmentConfig(polarity_p=1.0, gain_p=1.0, reverse_p=1.0, noise_p=1.0,
                                   speed_p=1.0, eq_p=1.0, echo_p=1.0)
ALL_OFF = aug.WaveformAugmentConfig(polarity_p=0.0, gain_p=0.0, reverse_p=0.0, noise_p=0.0,
                                    speed_p=0.0, eq_p=0.0, echo_p=0.0)


def test_polarity_flips_sign_where_applied():
    x, lengths = _batch()
    apply = jnp.array([True, False, True, False])
    y = aug.polarity(x, lengths, apply)
    np.testing.assert_array_equal(np.asarray(y)[[0, 2]], -np.asarray(x)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(y)[[1, 3]], np.asarray(x)[[1, 3]])
    _assert_padding_zero(y, lengths)


def test_gain_scales_rms():
    x, lengths = _batch()
    db = jnp.array([-6.0, 0.0, 3.0, 6.0])
    y = aug.gain(x, lengths, db)
    for i in range(B):
        ratio = _rms(y[i, :LENGTHS[i]]) / _rms(x[i, :LENGTHS[i]])
        assert ratio == pytest.approx(10 ** (float(db[i]) / 20), rel=1e-5)
    _assert_padding_zero(y, lengths)


def test_reverse_only_valid_part():
    x, lengths = _batch()
    y = np.asarray(aug.reverse(x, lengths, jnp.array([True, True, False, True])))
    xn = np.asarray(x)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(y[i, :LENGTHS[i]], xn[i, :LENGTHS[i]][::-1])
    np.testing.assert_array_equal(y[2], xn[2])
    _assert_padding_zero(y, lengths)


@pytest.mark.parametrize("color", [0, 1, 2])
def test_noise_hits_snr(color):
    x, lengths = _batch()
    snr = jnp.array([5.0, 12.0, 20.0, 30.0])
    y = aug.add_noise(jax.random.key(1), x, lengths, snr, jnp.full((B,), color))
    for i in range(B):
        valid = slice(0, LENGTHS[i])
        sig, noise = np.asarray(x[i, valid]), np.asarray(y[i, valid] - x[i, valid])
        measured = 10 * np.log10(np.mean(sig.astype(np.float64) ** 2) / np.mean(noise ** 2))
        assert measured == pytest.approx(float(snr[i]), abs=0.5)
    _assert_padding_zero(y, lengths)


def test_noise_colours_differ_in_spectrum():
    x = jnp.ones((3, N), jnp.float32) * 0.1
    lengths = jnp.full((3,), N, jnp.int32)
    y = aug.add_noise(jax.random.key(0), x, lengths, jnp.zeros(3), jnp.arange(3)) - x
    spec = np.abs(np.fft.rfft(np.asarray(y), axis=-1)) ** 2
    low = spec[:, 1:200].mean(-1) / spec[:, -2000:].mean(-1)  # low / high band power
    assert low[0] < low[1] < low[2]


@pytest.mark.parametrize("method", ["linear", "sinc"])
def test_speed_changes_duration_and_frequency(method):
    lengths = np.array([16000, 12000, 9000, 8000], np.int32)
    x, lens = _sines(500.0, lengths)
    factor = jnp.array([0.9, 1.1, 1.0, 1.25])
    y, new_len = aug.change_speed(x, lens, factor, method=method)
    expected = np.clip(np.round(lengths / np.asarray(factor)), 0, N).astype(int)
    np.testing.assert_array_equal(np.asarray(new_len), expected)
    for i in range(B):
        seg = np.asarray(y[i, :expected[i]])
        assert _peak_freq(seg) == pytest.approx(500.0 * float(factor[i]), rel=0.02)
    np.testing.assert_allclose(np.asarray(y[2]), np.asarray(x[2]), atol=1e-5)
    _assert_padding_zero(y, new_len)


def test_speed_slowdown_clips_to_buffer():
    x, lens = _sines(300.0, np.array([N, N, 100, 0], np.int32))
    y, new_len = aug.change_speed(x, lens, jnp.array([0.9, 1.1, 0.5, 0.9]))
    np.testing.assert_array_equal(np.asarray(new_len), [N, round(N / 1.1), 200, 0])
    _assert_padding_zero(y, new_len)


@pytest.mark.parametrize("length", [N, N - 300, 15000, 8000])
def test_suite_slowdown_keeps_the_clip_whole(length):
    """A slowed clip is never cut at its buffer's end (issue 19: up to 10% of the tail of a
    clip filling its bucket was dropped). Reference: numpy linear interpolation at the
    factor max(0.9, length / N), which ends on the clip's last sample."""
    cfg = dataclasses.replace(ALL_OFF, speed_p=1.0, speed_range=(0.9, 0.9))
    rng = np.random.default_rng(2)
    x = np.zeros((1, N), np.float32)
    x[0, :length] = rng.standard_normal(length)
    x[0, length - 400:length] += 5.0  # a marker in the clip's last 400 samples
    y, new_len = aug.augment_waveform(jax.random.key(0), jnp.asarray(x),
                                      jnp.asarray([length], jnp.int32), cfg)
    y, new_len = np.asarray(y[0], np.float64), int(new_len[0])
    factor = max(0.9, length / N)
    assert new_len == min(round(length / 0.9), N)
    # positions as the device computes them, in float32
    t = np.arange(new_len).astype(np.float32) * np.float32(factor)
    expected = np.interp(t.astype(np.float64), np.arange(length), x[0, :length])
    np.testing.assert_allclose(y[:new_len], expected, atol=1e-4)
    assert (new_len - 1) * factor >= length - 1 - factor  # the output reaches the last sample
    assert y[new_len - 300:new_len].mean() > 4.0  # the marker survived
    assert np.all(y[new_len:] == 0.0)


def _eq(x, lengths, freq, gain_db, q=1.0, kind=0):
    shape = (x.shape[0], 1)
    return aug.equalize(x, lengths, jnp.full(shape, freq), jnp.full(shape, gain_db),
                        jnp.full(shape, q), jnp.full(shape, kind, jnp.int32), SR)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_eq_identity_at_zero_gain(kind):
    x, lengths = _batch()
    y = _eq(x, lengths, 1000.0, 0.0, kind=kind)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)
    _assert_padding_zero(y, lengths)


def _rbj_shelf(kind: str, f0: float, gain_db: float, q: float, sr: int = SR):
    """(b, a) of the RBJ Audio-EQ-Cookbook low / high shelf, transcribed for this test."""
    amp = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * f0 / sr
    cos, alpha = np.cos(w0), np.sin(w0) / (2 * q)
    s = 2 * np.sqrt(amp) * alpha
    if kind == "low":
        b = [amp * ((amp + 1) - (amp - 1) * cos + s), 2 * amp * ((amp - 1) - (amp + 1) * cos),
             amp * ((amp + 1) - (amp - 1) * cos - s)]
        a = [(amp + 1) + (amp - 1) * cos + s, -2 * ((amp - 1) + (amp + 1) * cos),
             (amp + 1) + (amp - 1) * cos - s]
    else:
        b = [amp * ((amp + 1) + (amp - 1) * cos + s), -2 * amp * ((amp - 1) + (amp + 1) * cos),
             amp * ((amp + 1) + (amp - 1) * cos - s)]
        a = [(amp + 1) - (amp - 1) * cos + s, 2 * ((amp - 1) - (amp + 1) * cos),
             (amp + 1) - (amp - 1) * cos - s]
    return np.asarray(b), np.asarray(a)


@pytest.mark.parametrize("gain_db", [9.0, -7.0])
def test_eq_shelves_match_scipy_and_boost_their_own_side(gain_db):
    """Low shelf (kind 1) and high shelf (kind 2) with a nonzero gain against scipy.signal:
    the reference coefficients have the shelf gain at DC (low) or Nyquist (high) and 0 dB at
    the other end (freqz); jaxser's response equals freqz at the rfft bins and its output
    equals lfilter; sines well below / above f0 move by the gain only on their shelf's side.
    Swapping the two shelves fails every part."""
    from scipy.signal import freqz, lfilter

    f0, q = 1000.0, 0.707
    x, lengths = _batch(1)
    for kind, side in ((1, "low"), (2, "high")):
        b, a = _rbj_shelf(side, f0, gain_db, q)
        _, h = freqz(b, a, worN=[0.0, np.pi])
        gain_at = 20 * np.log10(np.abs(h))  # [DC, Nyquist]
        shelf, flat = (0, 1) if side == "low" else (1, 0)
        assert gain_at[shelf] == pytest.approx(gain_db, abs=1e-9)
        assert gain_at[flat] == pytest.approx(0.0, abs=1e-9)
        fft_size, bins = 4096, 2049
        ours = np.asarray(aug.biquad_response(
                jnp.asarray(f0), jnp.asarray(gain_db), jnp.asarray(q), jnp.asarray(kind), SR,
                bins, fft_size))
        _, ref = freqz(b, a, worN=2 * np.pi * np.arange(bins) / fft_size)
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
        y = np.asarray(_eq(x, lengths, f0, gain_db, q=q, kind=kind))
        for i in range(B):
            expected = lfilter(b, a, np.asarray(x[i, :LENGTHS[i]], np.float64))
            np.testing.assert_allclose(y[i, :LENGTHS[i]], expected, atol=3e-4)
        _assert_padding_zero(y, lengths)
        for freq, on_shelf in ((100.0, side == "low"), (7000.0, side == "high")):
            tone, lens = _sines(freq)
            out = _eq(tone, lens, f0, gain_db, q=q, kind=kind)
            mid = slice(2000, 14000)
            moved = 20 * np.log10(_rms(out[0, mid]) / _rms(tone[0, mid]))
            assert moved == pytest.approx(gain_db if on_shelf else 0.0, abs=0.35), (side, freq)


@pytest.mark.parametrize("gain_db", [6.0, -6.0])
def test_eq_peaking_boosts_centre(gain_db):
    x, lengths = _sines(1000.0)
    y = _eq(x, lengths, 1000.0, gain_db, q=2.0)
    for i in range(B):
        mid = slice(1000, LENGTHS[i] - 1000)  # away from the edges' transients
        ratio_db = 20 * np.log10(_rms(y[i, mid]) / _rms(x[i, mid]))
        assert ratio_db == pytest.approx(gain_db, abs=0.3)
    far, _ = _sines(6000.0)
    y_far = _eq(far, lengths, 1000.0, gain_db, q=2.0)
    assert abs(20 * np.log10(_rms(y_far[0, 1000:-1000]) / _rms(far[0, 1000:-1000]))) < 0.5
    _assert_padding_zero(y, lengths)


def test_eq_matches_iir_filter():
    """The frequency-domain EQ equals scipy's causal IIR (lfilter) on the valid part."""
    from scipy.signal import lfilter

    x, lengths = _batch()
    f0, g, q = 800.0, 5.0, 1.5
    y = np.asarray(_eq(x, lengths, f0, g, q=q))
    a_ = 10 ** (g / 40)
    w0 = 2 * np.pi * f0 / SR
    alpha = np.sin(w0) / (2 * q)
    b = [1 + alpha * a_, -2 * np.cos(w0), 1 - alpha * a_]
    a = [1 + alpha / a_, -2 * np.cos(w0), 1 - alpha / a_]
    for i in range(B):
        ref = lfilter(b, a, np.asarray(x[i, :LENGTHS[i]], np.float64))
        np.testing.assert_allclose(y[i, :LENGTHS[i]], ref, atol=2e-4)


def test_echo_adds_delayed_copy():
    x, lengths = _batch()
    delay = jnp.array([800, 100, 0, 6000])
    decay = jnp.array([0.5, 0.1, 0.3, 0.25])
    y = np.asarray(aug.echo(x, lengths, delay, decay))
    xn = np.asarray(x)
    for i in range(B):
        length, d = LENGTHS[i], int(delay[i])
        ref = xn[i, :length].copy()
        if d < length:  # a delay past the valid part adds nothing
            ref[d:] += float(decay[i]) * xn[i, :length - d]
        np.testing.assert_allclose(y[i, :length], ref, atol=1e-6)
    _assert_padding_zero(y, lengths)


def test_suite_padding_and_lengths():
    x, lengths = _batch()
    y, new_len = aug.augment_waveform(jax.random.key(3), x, lengths, ALL_ON)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.asarray(new_len) <= N)
    assert np.all(np.asarray(new_len) > 0)
    assert np.all(np.isfinite(np.asarray(y)))
    _assert_padding_zero(y, new_len)


def test_suite_probability_zero_is_identity():
    x, lengths = _batch()
    y, new_len = aug.augment_waveform(jax.random.key(3), x, lengths, ALL_OFF)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(new_len), LENGTHS)


def test_suite_same_key_same_output_different_keys_differ():
    x, lengths = _batch()
    cfg = aug.WaveformAugmentConfig()
    run = jax.jit(aug.augment_waveform, static_argnums=3)
    a = run(jax.random.key(5), x, lengths, ALL_ON)
    b = run(jax.random.key(5), x, lengths, ALL_ON)
    c = run(jax.random.key(6), x, lengths, ALL_ON)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
    # default probabilities: over many keys each example is sometimes changed, sometimes not
    changed = [np.any(np.asarray(run(jax.random.key(k), x, lengths, cfg)[0]) != np.asarray(x),
                      axis=1) for k in range(8)]
    assert 0 < np.mean(changed) < 1


def test_suite_jit_compiles_once():
    x, lengths = _batch()
    traces = []

    @jax.jit
    def step(key, audio, lens):
        traces.append(1)
        return aug.augment_waveform(key, audio, lens, ALL_ON)

    for k in range(3):
        out, _ = step(jax.random.fold_in(jax.random.key(0), k), x, lengths)
    out.block_until_ready()
    assert len(traces) == 1


def test_suite_per_example_randomness():
    x = jnp.tile(_batch()[0][:1], (B, 1))  # identical examples
    lengths = jnp.full((B,), N, jnp.int32)
    y, _ = aug.augment_waveform(jax.random.key(0), x, lengths, ALL_ON)
    y = np.asarray(y)
    assert not np.allclose(y[0], y[1])


def test_config_validation():
    with pytest.raises(ValueError, match="gain_p"):
        aug.WaveformAugmentConfig(gain_p=1.5)
    with pytest.raises(ValueError, match="noise_colors"):
        aug.WaveformAugmentConfig(noise_colors=("blue",))
    with pytest.raises(ValueError, match="speed_range"):
        aug.WaveformAugmentConfig(speed_range=(1.2, 0.8))
    cfg = dataclasses.replace(aug.WaveformAugmentConfig(), speed_method="sinc")
    y, new_len = aug.augment_waveform(jax.random.key(0), *_batch(), cfg)
    _assert_padding_zero(y, new_len)


# ----------------------------------------------------------------------------- SpecAugment


def _features(seed=0):
    rng = np.random.default_rng(seed)
    t, f = 100, 40
    frames = np.array([100, 80, 37, 5])
    feats = rng.standard_normal((len(frames), t, f)).astype(np.float32) + 3.0
    mask = np.arange(t)[None] < frames[:, None]
    feats = np.where(mask[..., None], feats, -7.0).astype(np.float32)  # odd padding value
    return jnp.asarray(feats), jnp.asarray(mask), frames


def test_spec_augment_masks_only_valid_frames_and_respects_widths():
    feats, mask, frames = _features()
    for seed in range(10):
        out = np.asarray(aug.spec_augment(jax.random.key(seed), feats, mask,
                                          num_time_masks=2, time_mask_width=20,
                                          num_freq_masks=2, freq_mask_width=10,
                                          mask_value=1e6))
        hit = out == 1e6
        for i, n_valid in enumerate(frames):
            assert not hit[i, n_valid:].any()
            np.testing.assert_array_equal(out[i, n_valid:], np.asarray(feats)[i, n_valid:])
            fully_masked_frames = hit[i, :n_valid].all(axis=1).sum()
            fully_masked_bins = hit[i, :n_valid].all(axis=0).sum()
            assert fully_masked_frames <= 2 * 20
            if fully_masked_frames < n_valid:
                assert fully_masked_bins <= 2 * 10
            # every hit cell belongs to a masked frame or a masked bin
            rows, cols = hit[i, :n_valid].all(1), hit[i, :n_valid].all(0)
            assert np.all(hit[i, :n_valid] == (rows[:, None] | cols[None, :]))


def test_spec_augment_default_fill_is_valid_mean_and_deterministic():
    feats, mask, frames = _features()
    k = jax.random.key(1)
    out = np.asarray(aug.spec_augment(k, feats, mask, time_mask_width=30, freq_mask_width=15))
    again = np.asarray(aug.spec_augment(k, feats, mask, time_mask_width=30, freq_mask_width=15))
    np.testing.assert_array_equal(out, again)
    for i, n_valid in enumerate(frames):
        mean = np.asarray(feats)[i, :n_valid].mean()
        changed = out[i] != np.asarray(feats)[i]
        np.testing.assert_allclose(out[i][changed], mean, rtol=1e-5)
    zero = aug.spec_augment(k, feats, mask, time_mask_width=0, freq_mask_width=0)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(feats))
