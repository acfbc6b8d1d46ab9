"""On-device waveform augmentation and SpecAugment, batched and jittable.

Augmenting on the host would starve an accelerator pod, so every transform here is a pure
function of (key, arrays) with static shapes that runs inside the jitted train step. Each
example of a batch gets its own random draws (batched draws from one key), and every
transform respects each example's valid length: samples at or past `lengths[i]` are zero on
output, and the returned lengths describe the new valid parts.

Suite order (fixed): speed -> eq -> echo -> reverse -> gain -> polarity -> noise.
Speed first because it changes the length every later transform respects; noise last so
its SNR is measured against the signal the model will actually hear.

All transforms are computed for the whole batch and selected per example with
`jnp.where` (static shapes, no branches), so the cost does not depend on the probabilities,
except that XLA compiles a transform with probability 0 away entirely.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from jaxser.constants import SAMPLE_RATE

# Noise colour name -> integer code used by `add_noise` (power spectrum ~ 1 / f**code).
NOISE_COLORS = {"white": 0, "pink": 1, "brown": 2}
# Equaliser filter kind name -> integer code used by `equalize`.
EQ_KINDS = {"peaking": 0, "lowshelf": 1, "highshelf": 2}


@dataclasses.dataclass(frozen=True)
class WaveformAugmentConfig:
    """Probabilities and ranges of the waveform suite (defaults follow arXiv 2311.08607)."""

    polarity_p: float = 0.2  # probability of inverting the sign
    gain_p: float = 0.2  # probability of a random gain
    gain_db: tuple[float, float] = (-6.0, 6.0)  # gain range in dB (uniform)
    reverse_p: float = 0.2  # probability of reversing the valid part in time
    noise_p: float = 0.2  # probability of adding noise
    noise_snr_db: tuple[float, float] = (5.0, 30.0)  # SNR range in dB against the valid part
    noise_colors: tuple[str, ...] = ("white", "pink", "brown")  # colours drawn uniformly
    speed_p: float = 0.2  # probability of a speed change (resampling)
    # Speed factor range (>1 is faster/shorter). A slowed clip is never cut at the end of its
    # buffer: where length / factor would exceed it, the factor is raised to length / N.
    speed_range: tuple[float, float] = (0.9, 1.1)
    speed_method: str = "linear"  # interpolation: 'linear' or 'sinc' (windowed sinc)
    eq_p: float = 0.2  # probability of random equalisation
    eq_gain_db: tuple[float, float] = (-6.0, 6.0)  # per-band gain range in dB (uniform)
    eq_bands: int = 2  # number of biquad bands per example
    eq_freq_hz: tuple[float, float] = (60.0, 6000.0)  # band frequency range (log-uniform)
    eq_q: tuple[float, float] = (0.5, 2.0)  # band quality factor range (log-uniform)
    echo_p: float = 0.2  # probability of adding one echo
    echo_delay_ms: tuple[float, float] = (50.0, 500.0)  # echo delay range in ms (uniform)
    echo_decay: tuple[float, float] = (0.1, 0.5)  # echo amplitude factor range (uniform)
    sample_rate: int = SAMPLE_RATE  # audio sample rate in Hz

    def __post_init__(self):
        for name in ("polarity_p", "gain_p", "reverse_p", "noise_p", "speed_p", "eq_p",
                     "echo_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WaveformAugmentConfig.{name}={value} is not in [0, 1]")
        for name in ("gain_db", "noise_snr_db", "speed_range", "eq_gain_db", "eq_freq_hz",
                     "eq_q", "echo_delay_ms", "echo_decay"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"WaveformAugmentConfig.{name}=({lo}, {hi}): low > high")
        for name in ("speed_range", "eq_freq_hz", "eq_q"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"WaveformAugmentConfig.{name} must be positive")
        unknown = [c for c in self.noise_colors if c not in NOISE_COLORS]
        if unknown or not self.noise_colors:
            raise ValueError(f"WaveformAugmentConfig.noise_colors={self.noise_colors}: "
                             f"choose from {sorted(NOISE_COLORS)}")
        if self.speed_method not in ("linear", "sinc"):
            raise ValueError(f"WaveformAugmentConfig.speed_method={self.speed_method!r}: "
                             "use 'linear' or 'sinc'")
        if self.eq_bands < 1:
            raise ValueError(f"WaveformAugmentConfig.eq_bands={self.eq_bands} must be >= 1")
        if self.sample_rate <= 0:
            raise ValueError(f"WaveformAugmentConfig.sample_rate={self.sample_rate} <= 0")


# ----------------------------------------------------------------------------- helpers


def valid_mask(lengths: jax.Array, num_samples: int) -> jax.Array:
    """[B, N] booleans, True for the first `lengths[i]` samples of each row."""
    return jnp.arange(num_samples)[None, :] < lengths[:, None]


def _masked(audio: jax.Array, lengths: jax.Array) -> jax.Array:
    return jnp.where(valid_mask(lengths, audio.shape[-1]), audio, 0.0)


def _select(apply: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """Per-example choice between `new` and `old` ([B] bools broadcast over trailing axes)."""
    apply = apply.reshape(apply.shape + (1,) * (new.ndim - 1))
    return jnp.where(apply, new, old)


def _gather_rows(audio: jax.Array, index: jax.Array) -> jax.Array:
    """audio[b, index[b, t]] for [B, N] audio and [B, M] integer indices (clipped)."""
    index = jnp.clip(index, 0, audio.shape[-1] - 1)
    return jnp.take_along_axis(audio, index, axis=-1)


def _mean_power(audio: jax.Array, lengths: jax.Array) -> jax.Array:
    """[B] mean of squares over each example's valid part (0 for empty examples)."""
    energy = jnp.sum(jnp.square(_masked(audio, lengths)), axis=-1)
    return energy / jnp.maximum(lengths, 1).astype(audio.dtype)


def _check_audio(audio: jax.Array, lengths: jax.Array) -> None:
    if audio.ndim != 2:
        raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
    if lengths.shape != audio.shape[:1]:
        raise ValueError(f"lengths must be [batch]={audio.shape[:1]}, got {lengths.shape}")


# ----------------------------------------------------------------------------- transforms


def polarity(audio: jax.Array, lengths: jax.Array, apply: jax.Array) -> jax.Array:
    """Inverts the sign of the examples where `apply` [B] is True."""
    _check_audio(audio, lengths)
    return _masked(_select(apply, -audio, audio), lengths)


def gain(audio: jax.Array, lengths: jax.Array, db: jax.Array) -> jax.Array:
    """Scales each example by `db` [B] decibels (amplitude factor 10 ** (db / 20))."""
    _check_audio(audio, lengths)
    factor = jnp.power(10.0, db.astype(audio.dtype) / 20.0)
    return _masked(audio * factor[:, None], lengths)


def reverse(audio: jax.Array, lengths: jax.Array, apply: jax.Array) -> jax.Array:
    """Reverses the valid part [0, length) in time where `apply` [B] is True; padding stays."""
    _check_audio(audio, lengths)
    t = jnp.arange(audio.shape[-1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [B, N]
    return _masked(_select(apply, _gather_rows(audio, index), audio), lengths)


def _colored_noise(key: jax.Array, shape: tuple[int, int], color: jax.Array) -> jax.Array:
    """[B, N] zero-mean Gaussian noise with power spectrum ~ 1 / f**color (0, 1 or 2),
    shaped with an rfft by a per-colour weight table built at trace time."""
    white = jax.random.normal(key, shape, jnp.float32)
    bins = shape[-1] // 2 + 1
    k = np.maximum(np.arange(bins), 1.0)
    table = np.stack([k ** (-c / 2.0) for c in range(len(NOISE_COLORS))])  # [colors, bins]
    table[:, 0] = 0.0  # no DC
    weight = jnp.asarray(table, jnp.float32)[jnp.clip(color, 0, len(NOISE_COLORS) - 1)]
    spectrum = jnp.fft.rfft(white, axis=-1)  # [B, bins]
    return jnp.fft.irfft(spectrum * weight, n=shape[-1], axis=-1)


def add_noise(
        key: jax.Array,
        audio: jax.Array,
        lengths: jax.Array,
        snr_db: jax.Array,
        color: jax.Array,
) -> jax.Array:
    """Adds noise at `snr_db` [B] dB over each valid part; `color` [B] 0 white, 1 pink, 2 brown.

    SNR = 10 * log10(P_signal / P_noise), both mean powers over the example's valid samples,
    so it holds exactly for what is returned. Silent examples get no noise.
    """
    _check_audio(audio, lengths)
    noise = _masked(_colored_noise(key, audio.shape, color.astype(jnp.int32)), lengths)
    p_signal = _mean_power(audio, lengths)
    p_noise = _mean_power(noise, lengths)
    target = p_signal / jnp.power(10.0, snr_db.astype(audio.dtype) / 10.0)
    scale = jnp.where(p_noise > 0, jnp.sqrt(target / jnp.maximum(p_noise, 1e-30)), 0.0)
    return _masked(audio + scale[:, None] * noise, lengths)


def speed_lengths(lengths: jax.Array, factor: jax.Array, num_samples: int) -> jax.Array:
    """New valid lengths round(length / factor), clipped to the buffer size."""
    new = jnp.round(lengths.astype(jnp.float32) / factor).astype(lengths.dtype)
    return jnp.clip(new, 0, num_samples)


def change_speed(
        audio: jax.Array,
        lengths: jax.Array,
        factor: jax.Array,
        *,
        method: str = "linear",
        sinc_half_width: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """Plays each example `factor` [B] times faster: y[t] = x(t * factor) (pitch moves too).

    The new length is round(length / factor) clipped to the buffer; samples past it are zero.
    A factor below length / N therefore loses the clip's tail; `augment_waveform` never asks
    for one (it raises the factor to length / N, so a slowed clip always stays whole).
    `method='linear'` interpolates linearly (cheap, some aliasing when speeding up);
    `method='sinc'` uses a Hann-windowed sinc of `sinc_half_width` input samples each side
    with its cut-off lowered to 1 / factor when speeding up (anti-aliased).
    Returns (audio [B, N], lengths [B]).
    """
    _check_audio(audio, lengths)
    n = audio.shape[-1]
    factor = factor.astype(jnp.float32)
    new_lengths = speed_lengths(lengths, factor, n)
    pos = jnp.arange(n, dtype=jnp.float32)[None, :] * factor[:, None]  # [B, N] input time
    last = jnp.maximum(lengths - 1, 0)[:, None]
    if method == "linear":
        i0 = jnp.minimum(jnp.floor(pos).astype(jnp.int32), last)
        i1 = jnp.minimum(i0 + 1, last)
        frac = jnp.clip(pos - i0.astype(jnp.float32), 0.0, 1.0)
        out = _gather_rows(audio, i0) * (1.0 - frac) + _gather_rows(audio, i1) * frac
    elif method == "sinc":
        out = _sinc_resample(audio, lengths, pos, factor, sinc_half_width)
    else:
        raise ValueError(f"change_speed method={method!r}: use 'linear' or 'sinc'")
    return _masked(out, new_lengths), new_lengths


def _sinc_resample(audio, lengths, pos, factor, half_width):
    """Windowed-sinc interpolation of [B, N] audio at fractional positions pos [B, M].

    Tap k reads x[round(pos) + k] with weight c * sinc(c * d) * hann(d / half_width),
    d = pos - round(pos) - k, c = the cut-off. The sines and cosines of d come from those of
    the fractional part by angle addition (4 transcendentals per output sample instead of
    4 per tap), and the taps are a Python loop of [B, M] gathers (no [B, M, taps] array):
    both matter, about 40x on CPU.
    """
    cutoff = jnp.minimum(1.0, 1.0 / factor)[:, None]  # [B, 1]
    base = jnp.round(pos).astype(jnp.int32)  # [B, M]
    frac = pos - base.astype(jnp.float32)  # [B, M] in [-0.5, 0.5]
    sin_c, cos_c = jnp.sin(jnp.pi * cutoff * frac), jnp.cos(jnp.pi * cutoff * frac)
    sin_w, cos_w = jnp.sin(jnp.pi * frac / half_width), jnp.cos(jnp.pi * frac / half_width)
    acc = jnp.zeros_like(pos)
    total = jnp.zeros_like(pos)
    for k in range(-half_width, half_width + 1):
        dist = frac - k
        angle = jnp.pi * cutoff * k
        sin_d = sin_c * jnp.cos(angle) - cos_c * jnp.sin(angle)  # sin(pi * c * dist)
        safe = jnp.where(dist == 0, 1.0, dist)
        sinc = jnp.where(dist == 0, 1.0, sin_d / (jnp.pi * cutoff * safe))
        phase = jnp.pi * k / half_width
        window = 0.5 * (1.0 + cos_w * math.cos(phase) + sin_w * math.sin(phase))
        weight = jnp.where(jnp.abs(dist) < half_width, cutoff * sinc * window, 0.0)
        index = base + k
        inside = (index >= 0) & (index < lengths[:, None])
        acc = acc + jnp.where(inside, _gather_rows(audio, index), 0.0) * weight
        total = total + weight
    return acc / total


def biquad_response(
        freq_hz: jax.Array,
        gain_db: jax.Array,
        q: jax.Array,
        kind: jax.Array,
        sample_rate: int,
        num_bins: int,
        fft_size: int,
) -> jax.Array:
    """Complex response at the rfft bins of RBJ-cookbook biquads (peaking/low/high shelf).

    Inputs broadcast together (e.g. [B, bands]); returns [..., num_bins] complex64. At 0 dB
    gain numerator and denominator coincide, so the response is exactly 1.
    """
    nyquist = sample_rate / 2.0
    f0 = jnp.clip(freq_hz, 1.0, 0.99 * nyquist)
    w0 = 2.0 * jnp.pi * f0 / sample_rate
    a = jnp.power(10.0, gain_db / 40.0)
    alpha = jnp.sin(w0) / (2.0 * q)
    cos = jnp.cos(w0)
    sqa = 2.0 * jnp.sqrt(a) * alpha
    # peaking
    pk_b = (1.0 + alpha * a, -2.0 * cos, 1.0 - alpha * a)
    pk_a = (1.0 + alpha / a, -2.0 * cos, 1.0 - alpha / a)
    # low shelf
    ls_b = (a * ((a + 1) - (a - 1) * cos + sqa), 2 * a * ((a - 1) - (a + 1) * cos),
            a * ((a + 1) - (a - 1) * cos - sqa))
    ls_a = ((a + 1) + (a - 1) * cos + sqa, -2 * ((a - 1) + (a + 1) * cos),
            (a + 1) + (a - 1) * cos - sqa)
    # high shelf
    hs_b = (a * ((a + 1) + (a - 1) * cos + sqa), -2 * a * ((a - 1) + (a + 1) * cos),
            a * ((a + 1) + (a - 1) * cos - sqa))
    hs_a = ((a + 1) - (a - 1) * cos + sqa, 2 * ((a - 1) - (a + 1) * cos),
            (a + 1) - (a - 1) * cos - sqa)

    def pick(pk, ls, hs):
        return [jnp.where(kind == 0, p, jnp.where(kind == 1, lo, h))
                for p, lo, h in zip(pk, ls, hs, strict=True)]

    b = pick(pk_b, ls_b, hs_b)
    den = pick(pk_a, ls_a, hs_a)
    w = 2.0 * np.pi * np.arange(num_bins) / fft_size  # [bins], constants at trace time
    z1 = jnp.asarray(np.exp(-1j * w), jnp.complex64)  # z ** -1
    z2 = jnp.asarray(np.exp(-2j * w), jnp.complex64)

    def poly(c):
        return c[0][..., None] + c[1][..., None] * z1 + c[2][..., None] * z2

    return (poly(b) / poly(den)).astype(jnp.complex64)


def equalize(
        audio: jax.Array,
        lengths: jax.Array,
        freq_hz: jax.Array,
        gain_db: jax.Array,
        q: jax.Array,
        kind: jax.Array,
        sample_rate: int,
        *,
        tail: int = 8192,
) -> jax.Array:
    """Applies `bands` biquad filters per example ([B, bands] parameters, kind 0/1/2 =
    peaking/low shelf/high shelf) by frequency-domain multiplication.

    Choice: instead of a sequential IIR (`lax.scan` over samples: slow on accelerators), the
    valid signal, zero-padded by at least `tail` samples to a 2-3-5-smooth FFT size, is
    multiplied by the filters' complex (magnitude and phase) response at the rfft bins. That
    equals the causal IIR's output (checked against scipy's lfilter) except for the part of
    its impulse response longer than `tail` samples, which wraps around: negligible for audio
    EQ (a 60 Hz, Q=2 peak decays by e^-48 over 8192 samples at 16 kHz); raise `tail` for
    very low, very narrow bands. The output is cut back to the valid length. At 0 dB gain
    the response is exactly 1: the signal is unchanged.
    """
    _check_audio(audio, lengths)
    n = audio.shape[-1]
    fft_size = scipy.fft.next_fast_len(n + tail, real=True)  # 2^a 3^b 5^c: 10x faster than 2N
    x = _masked(audio, lengths).astype(jnp.float32)
    spectrum = jnp.fft.rfft(x, n=fft_size, axis=-1)  # [B, n + 1]
    response = biquad_response(freq_hz.astype(jnp.float32), gain_db.astype(jnp.float32),
                               q.astype(jnp.float32), kind, sample_rate,
                               spectrum.shape[-1], fft_size)  # [B, bands, bins]
    total = response[:, 0]
    for band in range(1, response.shape[1]):  # not jnp.prod: a complex reduce is 40x slower
        total = total * response[:, band]  # on XLA:CPU
    out = jnp.fft.irfft(spectrum * total, n=fft_size, axis=-1)[:, :n]
    return _masked(out.astype(audio.dtype), lengths)


def echo(
        audio: jax.Array,
        lengths: jax.Array,
        delay_samples: jax.Array,
        decay: jax.Array,
) -> jax.Array:
    """y[t] = x[t] + decay * x[t - delay] for t in the valid part ([B] delays and decays)."""
    _check_audio(audio, lengths)
    t = jnp.arange(audio.shape[-1])[None, :]
    source = t - delay_samples[:, None]
    delayed = jnp.where(source >= 0, _gather_rows(audio, source), 0.0)
    return _masked(audio + decay.astype(audio.dtype)[:, None] * delayed, lengths)


# ----------------------------------------------------------------------------- the suite


def _uniform(key, shape, bounds):
    return jax.random.uniform(key, shape, jnp.float32, bounds[0], bounds[1])


def _log_uniform(key, shape, bounds):
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi))


def augment_waveform(
        key: jax.Array,
        audio: jax.Array,
        lengths: jax.Array,
        cfg: WaveformAugmentConfig,
) -> tuple[jax.Array, jax.Array]:
    """The full waveform suite: speed -> eq -> echo -> reverse -> gain -> polarity -> noise.

    Each transform is applied to each example independently with its own probability from
    `cfg`. audio [B, N] float, lengths [B] int. Returns (audio [B, N], lengths [B]) with zero
    padding. Pure and jittable (pass `cfg` as a static argument or close over it).
    """
    _check_audio(audio, lengths)
    b, n = audio.shape
    sr = cfg.sample_rate
    keys = dict(zip(["speed", "eq", "echo", "reverse", "gain", "polarity", "noise"],
                    jax.random.split(key, 7), strict=True))
    audio = _masked(audio, lengths)

    def coin(k, p):
        return jax.random.bernoulli(k, p, (b,))

    # speed
    k_apply, k_value = jax.random.split(keys["speed"])
    apply = coin(k_apply, cfg.speed_p)
    factor = jnp.where(apply, _uniform(k_value, (b,), cfg.speed_range), 1.0)
    # Keep a slowed clip whole: slow it at most until it fills its buffer of n samples (a
    # clip that already fills its bucket is not slowed; speeding up is unaffected).
    factor = jnp.maximum(factor, lengths.astype(jnp.float32) / n)
    fast, fast_len = change_speed(audio, lengths, factor, method=cfg.speed_method)
    audio, lengths = _select(apply, fast, audio), jnp.where(apply, fast_len, lengths)

    # eq
    k_apply, k_f, k_g, k_q, k_kind = jax.random.split(keys["eq"], 5)
    bands = (b, cfg.eq_bands)
    eq = equalize(audio, lengths, _log_uniform(k_f, bands, cfg.eq_freq_hz),
                  _uniform(k_g, bands, cfg.eq_gain_db), _log_uniform(k_q, bands, cfg.eq_q),
                  jax.random.randint(k_kind, bands, 0, len(EQ_KINDS)), sr)
    audio = _select(coin(k_apply, cfg.eq_p), eq, audio)

    # echo
    k_apply, k_d, k_decay = jax.random.split(keys["echo"], 3)
    delay_ms = _uniform(k_d, (b,), cfg.echo_delay_ms)
    delay = jnp.round(delay_ms * sr / 1000.0).astype(jnp.int32)
    echoed = echo(audio, lengths, delay, _uniform(k_decay, (b,), cfg.echo_decay))
    audio = _select(coin(k_apply, cfg.echo_p), echoed, audio)

    audio = reverse(audio, lengths, coin(keys["reverse"], cfg.reverse_p))

    k_apply, k_g = jax.random.split(keys["gain"])
    db = jnp.where(coin(k_apply, cfg.gain_p), _uniform(k_g, (b,), cfg.gain_db), 0.0)
    audio = gain(audio, lengths, db)  # 0 dB is a factor of exactly 1

    audio = polarity(audio, lengths, coin(keys["polarity"], cfg.polarity_p))

    k_apply, k_noise, k_snr, k_color = jax.random.split(keys["noise"], 4)
    colors = jnp.asarray([NOISE_COLORS[c] for c in cfg.noise_colors], jnp.int32)
    color = colors[jax.random.randint(k_color, (b,), 0, len(cfg.noise_colors))]
    noisy = add_noise(k_noise, audio, lengths, _uniform(k_snr, (b,), cfg.noise_snr_db), color)
    audio = _select(coin(k_apply, cfg.noise_p), noisy, audio)
    return audio, lengths


# ----------------------------------------------------------------------------- SpecAugment


def spec_augment(
        key: jax.Array,
        features: jax.Array,
        frame_mask: jax.Array,
        *,
        num_time_masks: int = 2,
        time_mask_width: int = 20,
        num_freq_masks: int = 2,
        freq_mask_width: int = 10,
        mask_value: float | None = None,
) -> jax.Array:
    """SpecAugment time and frequency masking of features [B, T, F] with frame_mask [B, T].

    Each mask's width is uniform in [0, width] (time widths also capped at the example's
    valid frame count); time masks lie inside the valid frames [0, T_i) (frame_mask is a
    prefix mask, T_i = its sum), frequency masks span only the valid frames too, so padding
    frames are never touched. Masked cells get `mask_value`, by default the example's mean
    over its valid features (a neutral value for log-mels, whose zero is not "silence").
    """
    if features.ndim != 3 or frame_mask.shape != features.shape[:2]:
        raise ValueError(f"features must be [B, T, F] and frame_mask [B, T]; got "
                         f"{features.shape} and {frame_mask.shape}")
    b, t, f = features.shape
    valid = frame_mask.astype(bool)
    num_valid = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
    k_tw, k_ts, k_fw, k_fs = jax.random.split(key, 4)

    def spans(k_width, k_start, count, width, limit, axis_size):
        """[B, count] starts and widths with start + width <= limit."""
        widths = jax.random.randint(k_width, (b, count), 0, width + 1)
        widths = jnp.minimum(widths, limit[:, None])
        room = (limit[:, None] - widths + 1).astype(jnp.float32)
        starts = jnp.floor(jax.random.uniform(k_start, (b, count)) * room).astype(jnp.int32)
        starts = jnp.minimum(starts, limit[:, None] - widths)
        pos = jnp.arange(axis_size)[None, None, :]
        inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
        return jnp.any(inside, axis=1)  # [B, axis_size]

    time_hit = spans(k_tw, k_ts, num_time_masks, time_mask_width, num_valid, t)
    freq_hit = spans(k_fw, k_fs, num_freq_masks, freq_mask_width,
                     jnp.full((b,), f, jnp.int32), f)
    hit = (time_hit[:, :, None] | freq_hit[:, None, :]) & valid[:, :, None]  # [B, T, F]
    if mask_value is None:
        total = jnp.sum(jnp.where(valid[:, :, None], features, 0.0), axis=(1, 2))
        fill = total / jnp.maximum(num_valid * f, 1).astype(features.dtype)
        fill = fill[:, None, None].astype(features.dtype)
    else:
        fill = jnp.asarray(mask_value, features.dtype)
    return jnp.where(hit, fill, features)
