"""Built-in synthetic emotional-speech corpus, for the demo, the tests and the benchmarks.

Real SER corpora cannot be downloaded here, so jaxser makes its own: speech-like audio
from a source-filter model. A glottal pulse train follows an F0 contour (declination,
pitch accents, a final rise or fall, tremor, jitter and shimmer), passes a spectral-tilt
filter and a bank of formant resonators that cross-fade from vowel to vowel; band-limited
noise gives fricatives and stop bursts, aspiration and breath intakes; syllables and
pauses give the rhythm, and each corpus adds its own noise floor and channel band.

Each emotion moves F0 level and range, speaking rate, pauses, energy, spectral tilt,
voice quality (open quotient, jitter, shimmer, breathiness) and formants
(`EMOTION_PROFILES`). A mixed-emotion utterance blends those settings with Dirichlet
weights, and its label distribution is exactly those weights; within it, each word leans
towards one of the mixed emotions, their shares of words following the weights, so the
voice wavers between them as mixed feelings do while its time-average stays the blend
(which also lets a frame-averaging model read the proportions). Speakers differ in gender,
age class, base F0, formant scale, rate and loudness; corpora differ in language
(vowel and consonant inventory, syllable rate, rhythm, lexical tone) and recording
channel. Everything is deterministic by seed: the same seed gives byte-identical wav
files and manifest.

Every utterance also gets emotion dimensions that follow from how it was synthesised
(`voice_dimensions`): arousal from its loudness, speaking rate and F0 level, valence from
its formant shift (smiling), voice-quality perturbation (jitter, shimmer) and final pitch
movement, dominance from its loudness, pressed voice (spectral tilt) and tremor. They are
functions of the utterance's own voice settings (its emotion blend and its random
variation, not the speaker's), so they can be heard and are learnable across speakers;
they are written on MSP-Podcast's 1-7 scale.

`generate_corpus` writes 16-bit wav files and a manifest in the format `jaxser prepare`
reads, so the synthetic corpus takes exactly the path a real one would.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal, special
from scipy.ndimage import uniform_filter1d

from jaxser.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "surprised")
GENDERS = ("female", "male")
AGES = ("young", "adult", "senior")
LABEL_FORMATS = ("distribution", "columns", "label")
# Columns every manifest row has; the label columns follow (see `label_columns`), then, with
# dimensions, DIMENSION_COLUMNS.
MANIFEST_COLUMNS = ("path", "id", "speaker", "corpus", "language", "gender", "age")
DIMENSIONS = ("arousal", "valence", "dominance")
DIMENSION_COLUMNS = (*DIMENSIONS, "dimension_scale")
# The scale the dimensions are written on (MSP-Podcast's); `voice_dimensions` gives 0-1.
DIMENSION_SCALE = (1.0, 7.0)

# Decimals of the label probabilities written to the manifest.
LABEL_DECIMALS = 4
# RMS of a neutral, average-loudness vowel before the speaker's and emotion's gain.
_REFERENCE_LEVEL = 0.07
# Spread of the log-duration of utterances (lognormal), like real acted corpora.
_DURATION_SIGMA = 0.4


# --------------------------------------------------------------------------------------
# Voice settings per emotion
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceParams:
    """Emotion-dependent voice settings; a mixed emotion averages them with its weights."""

    f0_st: float  # mean F0 shift from the speaker's base F0, semitones
    range_st: float  # pitch-accent height, semitones
    final_st: float  # utterance-final pitch movement, semitones (+ rise, - fall)
    tremor_st: float  # 5-8 Hz F0 tremor depth, semitones
    rate: float  # speaking-rate factor (syllables per second relative to neutral)
    pause: float  # pause-length factor
    energy_db: float  # loudness relative to neutral, dB
    tilt: float  # spectral tilt: -1 steep (soft, dark) .. +1 flat (pressed, bright)
    open_quotient: float  # glottal open quotient: ~0.4 pressed .. ~0.75 breathy
    jitter: float  # period-to-period F0 perturbation, fraction
    shimmer: float  # period-to-period amplitude perturbation, fraction
    breath: float  # aspiration noise level relative to voicing
    formant_shift: float  # formant frequency factor (smiling / tense raise formants)


# One clearly distinct profile per emotion; the order of the table follows EMOTIONS.
#   angry: loud, flat tilt (pressed), fast, high F0, falling;  sad: quiet, steep tilt,
#   slow with long pauses, low flat F0, breathy;  happy: wide F0 range, bright, a bit
#   fast;  fearful: highest F0, tremor, jitter, breathy, fast, quiet-ish;  surprised:
#   widest range and a strong final rise;  neutral: the reference.
EMOTION_PROFILES: dict[str, VoiceParams] = {
    # fields: f0_st range_st final_st tremor_st rate pause energy_db tilt open_quotient jitter
    #         shimmer breath formant_shift
    "neutral": VoiceParams(0.0, 2.5, -2.0, 0.10, 1.00, 1.00, 0.0, 0.00, 0.60, 0.008, 0.04, 0.06,
                           1.00),
    "happy": VoiceParams(3.5, 6.5, 1.5, 0.15, 1.12, 0.85, 4.5, 0.40, 0.52, 0.010, 0.05, 0.05,
                         1.06),
    "sad": VoiceParams(-3.0, 1.0, -3.0, 0.30, 0.68, 1.80, -10.0, -0.85, 0.75, 0.015, 0.08, 0.15,
                       0.97),
    "angry": VoiceParams(4.0, 4.0, -4.5, 0.10, 1.25, 0.70, 10.0, 0.90, 0.40, 0.020, 0.06, 0.03,
                         1.03),
    "fearful": VoiceParams(6.5, 2.0, 0.5, 1.50, 1.40, 1.30, -4.0, -0.40, 0.68, 0.035, 0.12, 0.22,
                           1.02),
    "surprised": VoiceParams(5.0, 9.0, 6.5, 0.15, 0.88, 1.00, 2.0, 0.30, 0.55, 0.010, 0.05, 0.15,
                             1.04),
}
_PROFILE_TABLE = np.array([astuple(EMOTION_PROFILES[e]) for e in EMOTIONS])  # [emotions, fields]


_FIELDS = {name: i for i, name in enumerate(VoiceParams.__dataclass_fields__)}
# Utterance-to-utterance variation within one emotion, kept small so that emotion cues stay
# strong next to speaker differences: per field an additive spread (shifts, dB, tilt) or a
# log-scale spread (factors, levels); one standard-normal draw per field and utterance.
_SPREAD_ADD = np.array([0.3, 0, 0.5, 0, 0, 0, 0.5, 0.05, 0.015, 0, 0, 0, 0])
_SPREAD_LOG = np.array([0, 0.09, 0, 0.12, 0.03, 0.1, 0, 0, 0, 0.12, 0.12, 0.12, 0.006])
# How far each word of a mixed utterance leans from the blend towards one of the mixture's
# emotions (0: the plain blend throughout; 1: word by word switching).
WORD_LEAN = 0.8


def blend_voice(weights: np.ndarray) -> VoiceParams:
    """The voice settings of an emotion mixture: the weighted average of the profiles."""
    w = _check_weights(weights)
    return VoiceParams(*(float(v) for v in w @ _PROFILE_TABLE))


def voice_dimensions(voice: VoiceParams) -> np.ndarray:
    """(arousal, valence, dominance) in (0.1, 0.9) of an utterance with these voice settings.

    Each is 0.5 + 0.4 tanh(z) of a linear score of the settings (neutral's scores are ~0):
      arousal    z = 0.05 energy_db + (rate - 1) + 0.046 f0_st
      valence    z = 10 (formant_shift - 1) - 30 (jitter - 0.009) - 8 (shimmer - 0.045)
                     + 0.05 final_st
      dominance  z = 0.04 energy_db + 0.5 tilt - 0.6 tremor_st
    For the pure profiles (arousal, valence, dominance): neutral (0.50, 0.49, 0.48), happy
    (0.69, 0.72, 0.61), sad (0.20, 0.21, 0.19), angry (0.79, 0.36, 0.76), fearful
    (0.68, 0.17, 0.16), surprised (0.58, 0.73, 0.56).
    """
    v = voice
    z = np.array([
        0.05 * v.energy_db + (v.rate - 1.0) + 0.3 / 6.5 * v.f0_st,
        10.0 * (v.formant_shift - 1.0) - 30.0 * (v.jitter - 0.009) - 8.0 * (v.shimmer - 0.045)
        + 0.05 * v.final_st,
        0.04 * v.energy_db + 0.5 * v.tilt - 0.6 * v.tremor_st,
    ])
    return 0.5 + 0.4 * np.tanh(z)


def _word_voices(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """Voice settings [emotions, fields] of a word leaning towards each emotion.

    Row e is the blend moved WORD_LEAN of the way towards emotion e's profile, with the
    utterance's own random variation (the same draw for every row).
    """
    blend = weights @ _PROFILE_TABLE  # [fields]
    rows = (1.0 - WORD_LEAN) * blend + WORD_LEAN * _PROFILE_TABLE  # [emotions, fields]
    z = rng.standard_normal(len(_FIELDS))
    rows = (rows + _SPREAD_ADD * z) * np.exp(_SPREAD_LOG * z)
    rows[:, _FIELDS["tilt"]] = np.clip(rows[:, _FIELDS["tilt"]], -1.0, 1.0)
    rows[:, _FIELDS["open_quotient"]] = np.clip(rows[:, _FIELDS["open_quotient"]], 0.3, 0.85)
    return rows


def _next_emotion(rng: np.random.Generator, weights: np.ndarray, counts: np.ndarray) -> int:
    """The emotion of the next word: the one furthest behind its share, with some chance.

    The counts then track the weights closely at every length, so the share of words
    leaning to each emotion is about its weight even in short utterances.
    """
    score = weights * (counts.sum() + 1) - counts + rng.uniform(0.0, 0.5, weights.size)
    score[weights <= 0] = -np.inf
    return int(np.argmax(score))


# --------------------------------------------------------------------------------------
# Languages (one per corpus) and speakers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Consonant:
    """A consonant class: `kind` is 'fricative', 'stop' or 'nasal'."""

    kind: str
    low_hz: float  # noise band (fricative, stop burst) or murmur F1 (nasal)
    high_hz: float  # upper band edge, or murmur F2 (nasal)
    gain: float  # amplitude relative to a stressed vowel


@dataclass(frozen=True)
class LanguageProfile:
    """A corpus' language and recording set-up: inventory, rhythm and channel."""

    corpus: str
    language: str
    vowels: tuple[tuple[float, float, float], ...]  # (F1, F2, F3) Hz of an adult male
    consonants: tuple[Consonant, ...]
    syllable_rate: float  # syllables per second, neutral speech
    rhythm_cv: float  # spread of syllable durations (log scale)
    stress_prob: float  # fraction of stressed syllables
    stress_ratio: float  # stressed / unstressed syllable duration
    onset_prob: float  # probability of a syllable onset consonant
    coda_prob: float  # probability of a syllable coda consonant
    tone_st: float  # lexical-tone F0 movement, semitones (0: not tonal)
    noise_db: float  # recording noise floor, dBFS
    band_hz: tuple[float, float]  # recording channel pass band


_FRIC = lambda lo, hi, g: Consonant("fricative", lo, hi, g)
_STOP = lambda lo, hi, g: Consonant("stop", lo, hi, g)
_NASAL = lambda f1, f2: Consonant("nasal", f1, f2, 0.35)

_LANGUAGES: dict[str, LanguageProfile] = {
    "synth_en": LanguageProfile(
        corpus="synth_en", language="en",
        vowels=((270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410),
                (730, 1090, 2440), (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240),
                (640, 1190, 2390), (500, 1500, 2500)),
        consonants=(_FRIC(4200, 7600, 0.30), _FRIC(2200, 4500, 0.30), _FRIC(1500, 7000, 0.12),
                    _FRIC(600, 4000, 0.10), _STOP(300, 1500, 0.45), _STOP(2500, 6000, 0.45),
                    _STOP(1200, 3000, 0.45), _NASAL(250, 1100), _NASAL(250, 1700)),
        syllable_rate=4.6, rhythm_cv=0.25, stress_prob=0.35, stress_ratio=1.5,
        onset_prob=0.8, coda_prob=0.45, tone_st=0.0, noise_db=-62.0, band_hz=(70.0, 7600.0)),
    "synth_de": LanguageProfile(
        corpus="synth_de", language="de",
        vowels=((280, 2250, 2900), (280, 1650, 2100), (380, 2100, 2600), (380, 1500, 2200),
                (550, 1800, 2500), (750, 1300, 2500), (400, 750, 2400), (300, 700, 2300),
                (480, 1450, 2400)),
        consonants=(_FRIC(4000, 7600, 0.30), _FRIC(2000, 4200, 0.30), _FRIC(1000, 3000, 0.25),
                    _FRIC(1500, 7000, 0.12), _STOP(300, 1500, 0.5), _STOP(2500, 6000, 0.5),
                    _STOP(1200, 3000, 0.5), _NASAL(250, 1100), _NASAL(250, 1600)),
        syllable_rate=4.2, rhythm_cv=0.28, stress_prob=0.4, stress_ratio=1.6,
        onset_prob=0.85, coda_prob=0.6, tone_st=0.0, noise_db=-55.0, band_hz=(100.0, 7000.0)),
    "synth_es": LanguageProfile(
        corpus="synth_es", language="es",
        vowels=((290, 2300, 3000), (450, 1900, 2600), (700, 1300, 2500), (450, 900, 2500),
                (320, 800, 2400)),
        consonants=(_FRIC(4000, 7600, 0.30), _FRIC(1200, 3500, 0.15), _STOP(300, 1500, 0.4),
                    _STOP(2500, 6000, 0.4), _STOP(1200, 3000, 0.4), _NASAL(250, 1100),
                    _NASAL(250, 1700)),
        syllable_rate=5.6, rhythm_cv=0.12, stress_prob=0.3, stress_ratio=1.15,
        onset_prob=0.9, coda_prob=0.25, tone_st=0.0, noise_db=-58.0, band_hz=(80.0, 7400.0)),
    "synth_zh": LanguageProfile(
        corpus="synth_zh", language="zh",
        vowels=((290, 2300, 3000), (290, 1700, 2200), (750, 1300, 2500), (500, 1400, 2500),
                (320, 800, 2400), (450, 850, 2500)),
        consonants=(_FRIC(4000, 7600, 0.28), _FRIC(2000, 4200, 0.28), _FRIC(800, 3000, 0.15),
                    _STOP(300, 1500, 0.4), _STOP(2500, 6000, 0.4), _STOP(1200, 3000, 0.4),
                    _NASAL(250, 1100), _NASAL(250, 1700)),
        syllable_rate=4.8, rhythm_cv=0.15, stress_prob=0.25, stress_ratio=1.2,
        onset_prob=0.9, coda_prob=0.3, tone_st=3.0, noise_db=-60.0, band_hz=(60.0, 7800.0)),
}
BUILTIN_CORPORA = tuple(_LANGUAGES)


def language_profile(corpus: str) -> LanguageProfile:
    """The language of a corpus: a built-in one by name, else one derived from the name.

    Any corpus name works, so tests and benchmarks can ask for many corpora; an unknown
    name gets a random but fixed (name-seeded) inventory, rhythm and channel.
    """
    if not corpus or not isinstance(corpus, str):
        raise ValueError(f"corpus name must be a non-empty string, got {corpus!r}")
    if corpus in _LANGUAGES:
        return _LANGUAGES[corpus]
    rng = np.random.default_rng(zlib.crc32(corpus.encode()))
    pool_v = sorted({v for lang in _LANGUAGES.values() for v in lang.vowels})
    pool_c = sorted({c for lang in _LANGUAGES.values() for c in lang.consonants},
                    key=astuple)
    vowels = [pool_v[i] for i in sorted(rng.choice(len(pool_v), rng.integers(5, 10), False))]
    cons = [pool_c[i] for i in sorted(rng.choice(len(pool_c), rng.integers(5, 9), False))]
    language = corpus.removeprefix("synth_") or corpus
    return LanguageProfile(
        corpus=corpus, language=language, vowels=tuple(vowels), consonants=tuple(cons),
        syllable_rate=float(rng.uniform(4.0, 5.8)), rhythm_cv=float(rng.uniform(0.12, 0.28)),
        stress_prob=float(rng.uniform(0.25, 0.4)), stress_ratio=float(rng.uniform(1.1, 1.6)),
        onset_prob=float(rng.uniform(0.75, 0.95)), coda_prob=float(rng.uniform(0.2, 0.6)),
        tone_st=float(rng.choice([0.0, 0.0, 2.5])), noise_db=float(rng.uniform(-64, -54)),
        band_hz=(float(rng.uniform(60, 110)), float(rng.uniform(6800, 7800))))


@dataclass(frozen=True)
class SpeakerProfile:
    """One synthetic speaker: identity attributes and voice."""

    speaker: str
    corpus: str
    gender: str  # one of GENDERS
    age: str  # one of AGES
    base_f0: float  # Hz, neutral speech
    formant_scale: float  # vocal-tract length factor (adult male ~1.0)
    rate_scale: float  # personal speaking-rate factor
    energy_db: float  # personal loudness offset, dB
    range_scale: float  # personal pitch-range factor
    breathiness: float  # added to the emotion's aspiration level
    jitter: float  # added to the emotion's jitter


def make_speakers(num_speakers: int, corpora: Sequence[str] = ("synth_en", "synth_de"),
                  seed: int = 0) -> list[SpeakerProfile]:
    """Speakers `spk00`, `spk01`, ... split round-robin across the corpora.

    Within a corpus genders alternate and age classes cycle, so every corpus with at
    least two speakers has both genders.
    """
    if num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
    corpora = _check_corpora(corpora)
    rng = np.random.default_rng([seed, 0x5EED])
    width = max(2, len(str(num_speakers - 1)))
    gender_start = int(rng.integers(2))
    age_order = rng.permutation(len(AGES))
    speakers = []
    for i in range(num_speakers):
        corpus, j = corpora[i % len(corpora)], i // len(corpora)
        gender = GENDERS[(j + gender_start) % 2]
        age = AGES[int(age_order[(j // 2 + i) % len(AGES)])]
        female = gender == "female"
        f0_st = rng.normal(0.0, 0.8) + {"young": 0.8, "adult": 0.0,
                                        "senior": -1.0 if female else 0.8}[age]
        base_f0 = (205.0 if female else 115.0) * 2.0 ** (np.clip(f0_st, -2.5, 2.5) / 12.0)
        scale = ((1.16 if female else 1.0) + rng.normal(0.0, 0.02)
                 + (0.03 if age == "young" else 0.0))
        speakers.append(SpeakerProfile(
            speaker=f"spk{i:0{width}d}", corpus=corpus, gender=gender, age=age,
            base_f0=float(base_f0), formant_scale=float(scale),
            rate_scale=float(rng.lognormal(0.0, 0.03) * (0.95 if age == "senior" else 1.0)),
            energy_db=float(rng.normal(0.0, 0.6)),
            range_scale=float(rng.uniform(0.9, 1.1)),
            breathiness=float(0.02 * female + (0.03 if age == "senior" else 0.0)
                              + rng.uniform(0.0, 0.02)),
            jitter=float(0.002 + (0.006 if age == "senior" else 0.0)
                         + rng.uniform(0.0, 0.003)),
        ))
    return speakers


# --------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------


@dataclass
class _Timeline:
    """Where each sound is, in samples, for one utterance."""

    bank: np.ndarray  # [n] int: formant-bank entry (vowel or nasal), -1 where none
    voice_amp: np.ndarray  # [n] voicing amplitude before smoothing
    noise_amp: np.ndarray  # [consonants, n] consonant noise amplitude
    word: np.ndarray  # [n] int: index of the word a sample belongs to, -1 before the first
    word_emotion: list[int]  # emotion each word leans towards
    syllables: list[tuple[float, float, bool, int]]  # (start_s, end_s, stressed, word)
    pauses: list[tuple[int, int]]  # (start, end) samples of phrase pauses
    speech_end_s: float  # end of the last syllable


def synthesize_utterance(rng: np.random.Generator, weights: np.ndarray,
                         speaker: SpeakerProfile, language: LanguageProfile,
                         seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One utterance whose emotion mixture is `weights` (over EMOTIONS).

    The voice follows the blend of the emotions' profiles; in a mixture each word leans
    towards one of its emotions, chosen so that their shares of words follow the weights
    (the time-average stays the blend). Returns float32 mono audio of
    `round(seconds * sample_rate)` samples in [-1, 1]. All randomness comes from `rng`.
    """
    return _synthesize(rng, weights, speaker, language, seconds, sample_rate)[0]


def _synthesize(rng: np.random.Generator, weights: np.ndarray, speaker: SpeakerProfile,
                language: LanguageProfile, seconds: float, sample_rate: int
                ) -> tuple[np.ndarray, VoiceParams]:
    """(`synthesize_utterance`'s audio, the utterance's voice settings: its emotion blend
    with its own random variation)."""
    w = _check_weights(weights)
    sr = sample_rate
    if sr < 8000:
        raise ValueError(f"sample_rate must be >= 8000, got {sample_rate}")
    n = int(round(seconds * sr))
    if n < int(0.2 * sr):
        raise ValueError(f"seconds must be >= 0.2, got {seconds}")
    voices = _word_voices(rng, w)  # [emotions, fields]
    timeline = _make_timeline(rng, w, voices, speaker, language, n, sr)
    # Per-sample voice settings, smoothed across word boundaries.
    word_voice = voices[np.array(timeline.word_emotion)]  # [words, fields]
    track = uniform_filter1d(word_voice.T[:, np.maximum(timeline.word, 0)], size=int(0.06 * sr),
                             axis=1, mode="nearest")  # [fields, n]
    col = lambda name: track[_FIELDS[name]]
    global_voice = VoiceParams(*(w @ voices))

    f0 = _f0_contour(rng, track, word_voice, global_voice, speaker, language, timeline, sr)
    flow, source = _glottal_source(rng, f0, col("open_quotient"), col("jitter") + speaker.jitter,
                                   col("shimmer"), sr)

    # Glottal source plus aspiration (following the glottal cycle), then the tilt, then the
    # formant bank cross-faded along the timeline (coarticulation).
    breath = col("breath") + speaker.breathiness
    aspiration = _unit_rms(signal.sosfilt(_band_sos(500.0, 7000.0, sr), rng.standard_normal(n)))
    source = _unit_rms(source) + breath * (0.3 + 1.4 * flow) * aspiration
    source = _tilt(source, col("tilt"), sr)
    banks = _formant_banks(language, speaker.formant_scale * global_voice.formant_shift, sr)
    labels = _fill_labels(timeline.bank)
    used = np.unique(labels)
    mix = uniform_filter1d((labels[None, :] == used[:, None]).astype(np.float64),
                           size=max(1, int(0.03 * sr)), axis=1, mode="nearest")  # [used, n]
    voiced = np.zeros(n)
    for k, b in enumerate(used):
        voiced += mix[k] * signal.sosfilt(banks[b], source)
    voice_env = uniform_filter1d(timeline.voice_amp, size=max(1, int(0.02 * sr)),
                                 mode="nearest")
    out = _unit_rms(voiced) * voice_env

    # Unvoiced consonants: band-limited noise under their (sharp) envelopes.
    white = rng.standard_normal(n)
    for c, cons in enumerate(language.consonants):
        if cons.kind != "nasal" and timeline.noise_amp[c].any():
            env = uniform_filter1d(timeline.noise_amp[c], size=max(1, int(0.004 * sr)),
                                   mode="nearest")
            out += env * _unit_rms(signal.sosfilt(_band_sos(cons.low_hz, cons.high_hz, sr),
                                                  white))

    # Level of the emotion and speaker; breath intakes fill long pauses.
    out *= _REFERENCE_LEVEL * 10.0 ** ((col("energy_db") + speaker.energy_db) / 20.0)
    out += _breath_intakes(rng, timeline.pauses, breath, n, sr)

    # Recording: noise floor and channel band of the corpus, then a soft limiter.
    floor = _unit_rms(signal.lfilter([1.0], [1.0, -0.9], rng.standard_normal(n)))
    out += floor * 10.0 ** (language.noise_db / 20.0)
    out = signal.sosfilt(_band_sos(*language.band_hz, sr), out)
    return np.tanh(out).astype(np.float32), global_voice


def _make_timeline(rng: np.random.Generator, weights: np.ndarray, voices: np.ndarray,
                   speaker: SpeakerProfile, language: LanguageProfile, n: int,
                   sr: int) -> _Timeline:
    """Words of 1-3 syllables (onset consonant, vowel, coda) and phrase pauses.

    Each word takes the rate and pause length of the emotion it leans towards.
    """
    total = n / sr
    lead = min(rng.uniform(0.06, 0.2), 0.12 * total)
    trail = min(rng.uniform(0.08, 0.25), 0.12 * total)
    speech = total - lead - trail
    cons, num_v = language.consonants, len(language.vowels)
    unstressed = 1.0 / (language.syllable_rate * speaker.rate_scale
                        * (language.stress_prob * language.stress_ratio
                           + 1.0 - language.stress_prob))
    # A word: (emotion, items); item: (kind, duration_s, index, amplitude), kind V/C/P.
    words: list[tuple[int, list[tuple[str, float, int, float]]]] = []
    counts = np.zeros(len(EMOTIONS))
    t = t_before = 0.0
    phrase_left = int(rng.integers(4, 11))
    while t < speech:
        emotion = _next_emotion(rng, weights, counts)
        counts[emotion] += 1
        voice = voices[emotion]
        items = []
        for _ in range(int(rng.integers(1, 4))):
            stressed = rng.random() < language.stress_prob
            dur = unstressed / voice[_FIELDS["rate"]]
            dur *= (language.stress_ratio if stressed else 1.0) * rng.lognormal(
                -0.5 * language.rhythm_cv ** 2, language.rhythm_cv)
            vowel = dur
            onset = coda = None
            if rng.random() < language.onset_prob:
                onset = ("C", dur * rng.uniform(0.25, 0.4), int(rng.integers(len(cons))), 1.0)
                vowel -= onset[1]
            if rng.random() < language.coda_prob:
                coda = ("C", dur * rng.uniform(0.15, 0.25), int(rng.integers(len(cons))), 1.0)
                vowel -= coda[1]
            nucleus = ("V", vowel, int(rng.integers(num_v)), 1.0 if stressed else 0.7)
            items += [item for item in (onset, nucleus, coda) if item]
            phrase_left -= 1
        if phrase_left <= 0:
            items.append(("P", rng.uniform(0.12, 0.3) * voice[_FIELDS["pause"]], -1, 0.0))
            phrase_left = int(rng.integers(4, 11))
        words.append((emotion, items))
        t_before, t = t, t + sum(item[1] for item in items)
    # End after the word that brings the length closer to `speech`, then stretch to fit.
    if len(words) > 1 and abs(math.log(speech / t_before)) < abs(math.log(speech / t)):
        words.pop()
    words[-1] = (words[-1][0], [item for item in words[-1][1] if item[0] != "P"])
    stretch = speech / sum(item[1] for _, items in words for item in items)

    bank = np.full(n, -1, dtype=np.int64)
    word = np.full(n, -1, dtype=np.int64)
    voice_amp = np.zeros(n)
    noise_amp = np.zeros((len(cons), n))
    syllables: list[tuple[float, float, bool, int]] = []
    pauses: list[tuple[int, int]] = []
    pos = lead
    for w_idx, (_, items) in enumerate(words):
        word[int(round(pos * sr)):] = w_idx
        for kind, dur, idx, amp in items:
            a, b = int(round(pos * sr)), int(round((pos + dur * stretch) * sr))
            pos += dur * stretch
            if kind == "V":
                bank[a:b], voice_amp[a:b] = idx, amp
                syllables.append((a / sr, b / sr, amp == 1.0, w_idx))
            elif kind == "P":
                pauses.append((a, b))
            elif cons[idx].kind == "nasal":
                bank[a:b], voice_amp[a:b] = num_v + idx, cons[idx].gain
            elif cons[idx].kind == "fricative":
                noise_amp[idx, a:b] = cons[idx].gain
            else:  # stop: closure (silence), then a decaying burst
                burst = a + int(0.6 * (b - a))
                noise_amp[idx, burst:b] = cons[idx].gain * np.exp(
                    -np.arange(b - burst) / max(1.0, 0.008 * sr))
    return _Timeline(bank, voice_amp, noise_amp, word, [e for e, _ in words], syllables,
                     pauses, speech_end_s=lead + speech)


def _f0_contour(rng: np.random.Generator, track: np.ndarray, word_voice: np.ndarray,
                global_voice: VoiceParams, speaker: SpeakerProfile, language: LanguageProfile,
                timeline: _Timeline, sr: int) -> np.ndarray:
    """Per-sample F0 in Hz: level, declination, accents, tones, final movement, tremor, drift.

    `track` [fields, n] gives the local F0 level and tremor depth, `word_voice`
    [words, fields] the accent height of each word's syllables; the final rise or fall
    belongs to the whole utterance.
    """
    n = track.shape[1]
    hop = int(0.005 * sr)
    frames = np.arange(0, n + hop, hop).clip(max=n - 1)  # [frames] sample index
    t = frames / sr
    total = n / sr
    st = track[_FIELDS["f0_st"], frames] + 2.0 * (0.5 - t / total)  # level + declination
    for start, end, stressed, w_idx in timeline.syllables:
        accent = word_voice[w_idx, _FIELDS["range_st"]] * speaker.range_scale
        centre, width = 0.5 * (start + end), max(0.35 * (end - start), 0.02)
        height = accent * (rng.uniform(0.6, 1.0) if stressed else rng.uniform(0.0, 0.3))
        st += height * np.exp(-0.5 * ((t - centre) / width) ** 2)
        if language.tone_st:
            inside = (t >= start) & (t < end)
            level, slope = rng.uniform(-0.5, 0.5), rng.choice([-1.0, 0.0, 1.0])
            st[inside] += language.tone_st * (level + slope * ((t[inside] - start)
                                                              / (end - start) - 0.5))
    final_start = timeline.speech_end_s - 0.4
    st += global_voice.final_st * np.clip((t - final_start) / 0.4, 0.0, 1.0) ** 2
    st += track[_FIELDS["tremor_st"], frames] * np.sin(
        2 * np.pi * rng.uniform(5.0, 8.0) * t + rng.uniform(0, 2 * np.pi))
    drift = uniform_filter1d(rng.standard_normal(t.shape), size=40, mode="nearest")
    st += 0.4 * drift / max(float(drift.std()), 1e-9)
    f0 = np.clip(speaker.base_f0 * 2.0 ** (st / 12.0), 50.0, min(700.0, 0.1 * sr))
    return np.interp(np.arange(n), frames, f0)


def _glottal_source(rng: np.random.Generator, f0: np.ndarray, open_quotient: np.ndarray,
                    jitter: np.ndarray, shimmer: np.ndarray,
                    sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Rosenberg glottal flow and its derivative along `f0`, with jitter and shimmer.

    All inputs are per sample [n]; jitter and shimmer are drawn once per glottal period.
    Returns (flow in [0, ~1.5], flow derivative), both [n].
    """
    periods = int(np.sum(f0) / sr * 1.5) + 8
    z_f0, z_amp = rng.standard_normal(periods), rng.standard_normal(periods)
    first = np.floor(np.cumsum(f0) / sr).astype(np.int64)  # period of each sample, no jitter
    f0 = f0 * np.clip(1.0 + jitter * z_f0[first], 0.7, 1.3)
    phase = np.cumsum(f0) / sr
    k = np.floor(phase).astype(np.int64)
    frac = phase - k
    oq = open_quotient
    rise, fall = 0.6 * oq, 0.4 * oq
    flow = np.where(frac < rise, 0.5 * (1.0 - np.cos(np.pi * frac / rise)),
                    np.where(frac < oq, np.cos(0.5 * np.pi * (frac - rise) / fall), 0.0))
    flow *= np.clip(1.0 + shimmer * z_amp[k], 0.5, 1.5)
    return flow, np.diff(flow, prepend=0.0)


_TILT_GRID = np.linspace(-1.0, 1.0, 5)


def _tilt_filter(tilt: float, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """First-order tilt filter (b, a): a low-pass below 0, a pre-emphasis above 0.

    Unity gain at 500 Hz, so the tilt moves the highs and leaves the voice's body alone.
    About -7 dB (tilt -0.85) to +5 dB (tilt +0.9) at 2 kHz relative to 500 Hz.
    """
    pole = 0.85 * max(-tilt, 0.0)
    zero = 0.7 * max(tilt, 0.0)
    pole, zero = pole ** (SAMPLE_RATE / sr), zero ** (SAMPLE_RATE / sr)
    b, a = np.array([1.0, -zero]), np.array([1.0, -pole])
    z = np.exp(-2j * np.pi * 500.0 / sr)
    gain = abs((b[0] + b[1] * z) / (a[0] + a[1] * z))
    return b / gain, a


def _tilt(x: np.ndarray, tilt: np.ndarray, sr: int) -> np.ndarray:
    """Spectral tilt per sample (-1 steep .. +1 flat), interpolated between grid filters.

    `x` is filtered at the grid tilts around the range of `tilt`, and each sample takes the
    linear interpolation between its two neighbouring grid filters.
    """
    pos = np.interp(tilt, _TILT_GRID, np.arange(_TILT_GRID.size))  # [n] grid coordinate
    lo = np.minimum(np.floor(pos).astype(np.int64), _TILT_GRID.size - 2)
    frac = pos - lo
    out = np.zeros_like(x)
    for g in range(int(lo.min()), int(lo.max()) + 2):
        weight = np.where(lo == g, 1.0 - frac, 0.0) + np.where(lo == g - 1, frac, 0.0)
        out += weight * signal.lfilter(*_tilt_filter(float(_TILT_GRID[g]), sr), x)
    return out


def _formant_banks(language: LanguageProfile, scale: float, sr: int) -> list[np.ndarray]:
    """Cascade formant filters (sos) for each vowel, then each nasal murmur."""
    targets = [tuple(v) for v in language.vowels]
    targets += [(c.low_hz, c.high_hz, 2300.0) for c in language.consonants]  # nasal slots
    return [_resonator_sos(tuple(f * scale for f in (*ft, 3400.0, 4400.0, 5600.0)), sr)
            for ft in targets]


def _resonator_sos(formants: tuple[float, ...], sr: int) -> np.ndarray:
    """Klatt resonators (unity DC gain) in cascade, one sos row per formant below Nyquist."""
    rows = []
    for i, f in enumerate(formants):
        if f >= 0.45 * sr:
            continue
        bw = (80.0 + 0.05 * f, 110.0, 160.0, 250.0, 300.0, 400.0)[min(i, 5)]
        r = math.exp(-math.pi * bw / sr)
        a1, a2 = -2.0 * r * math.cos(2.0 * math.pi * f / sr), r * r
        rows.append([1.0 + a1 + a2, 0.0, 0.0, 1.0, a1, a2])
    return np.array(rows)


@lru_cache(maxsize=256)
def _band_sos(low: float, high: float, sr: int) -> np.ndarray:
    """Second-order Butterworth band-pass, clamped to the sample rate."""
    nyq = 0.5 * sr
    high = min(high, 0.95 * nyq)
    low = min(low, 0.5 * high)
    return signal.butter(2, [low / nyq, high / nyq], btype="band", output="sos")


def _breath_intakes(rng: np.random.Generator, pauses: list[tuple[int, int]],
                    breath: np.ndarray, n: int, sr: int) -> np.ndarray:
    """Soft inhalation noise in pauses longer than 0.2 s, louder for breathy voices.

    `breath` [n] is the aspiration level per sample.
    """
    out = np.zeros(n)
    for a, b in pauses:
        if b - a < int(0.2 * sr):
            continue
        m = b - a
        noise = _unit_rms(signal.sosfilt(_band_sos(400.0, 2500.0, sr), rng.standard_normal(m)))
        out[a:b] = noise * np.hanning(m) * _REFERENCE_LEVEL * 0.8 * breath[a:b]
    return out


def _fill_labels(bank: np.ndarray) -> np.ndarray:
    """Carry each formant-bank label forward (and the first one back) over gaps."""
    idx = np.where(bank >= 0, np.arange(bank.size), 0)
    np.maximum.accumulate(idx, out=idx)
    filled = bank[idx]
    valid = np.flatnonzero(bank >= 0)
    first = bank[valid[0]] if valid.size else 0
    filled[filled < 0] = first
    return filled


def _unit_rms(x: np.ndarray) -> np.ndarray:
    """Scale to unit RMS (a silent input stays silent)."""
    rms = float(np.sqrt(np.mean(x * x)))
    return x / rms if rms > 0 else x


def _check_weights(weights: np.ndarray) -> np.ndarray:
    """Validate an emotion mixture: len(EMOTIONS) non-negative numbers summing to 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(EMOTIONS),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {len(EMOTIONS)} non-negative numbers (one per "
                         f"emotion in {EMOTIONS}), got {weights!r}")
    if abs(w.sum() - 1.0) > 1e-3:
        raise ValueError(f"weights must sum to 1, got sum {w.sum():.6f}")
    return w / w.sum()


def _check_corpora(corpora: Sequence[str]) -> list[str]:
    """Corpora as a non-empty list of distinct names."""
    if isinstance(corpora, str):
        corpora = [corpora]
    corpora = list(corpora)
    if not corpora or len(set(corpora)) != len(corpora):
        raise ValueError(f"corpora must be non-empty distinct names, got {corpora!r}")
    for c in corpora:
        language_profile(c)
    return corpora


# --------------------------------------------------------------------------------------
# Labels and durations
# --------------------------------------------------------------------------------------


def round_distribution(weights: np.ndarray, decimals: int = LABEL_DECIMALS) -> np.ndarray:
    """Round probabilities to `decimals` places keeping the sum at 1 (the largest absorbs it)."""
    w = np.round(np.asarray(weights, dtype=np.float64), decimals)
    top = int(np.argmax(w))
    w[top] = round(1.0 - (w.sum() - w[top]), decimals)
    return w


def sample_mixture(rng: np.random.Generator, concentration: float = 1.0,
                   num_emotions: tuple[int, int] = (2, 3)) -> np.ndarray:
    """Dirichlet(concentration) weights over 2-3 randomly chosen emotions."""
    k = int(rng.integers(num_emotions[0], num_emotions[1] + 1))
    chosen = rng.choice(len(EMOTIONS), size=k, replace=False)
    w = np.zeros(len(EMOTIONS))
    w[chosen] = rng.dirichlet(np.full(k, concentration))
    return round_distribution(w)


def _lognormal_mu(mean: float, low: float, high: float, sigma: float) -> float:
    """The mu whose lognormal(mu, sigma) truncated to [low, high] has the given mean."""
    def truncated_mean(mu: float) -> float:
        a, b = (math.log(low) - mu) / sigma, (math.log(high) - mu) / sigma
        mass = special.ndtr(b) - special.ndtr(a)
        if mass <= 1e-12:
            return low if b <= 0 else high
        return math.exp(mu + 0.5 * sigma ** 2) * (
            special.ndtr(b - sigma) - special.ndtr(a - sigma)) / mass

    lo, hi = math.log(low) - 4 * sigma, math.log(high) + 4 * sigma
    for _ in range(80):  # bisection: the truncated mean grows with mu
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if truncated_mean(mid) < mean else (lo, mid)
    return 0.5 * (lo + hi)


def sample_durations(rng: np.random.Generator, size: int, mean_seconds: float = 2.5,
                     min_seconds: float = 1.0, max_seconds: float = 4.0,
                     sigma: float = _DURATION_SIGMA) -> np.ndarray:
    """Utterance durations: a lognormal truncated to [min, max] whose mean is `mean_seconds`.

    Right-skewed like real acted corpora, with no pile-up at the bounds.
    """
    if not 0 < min_seconds <= mean_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= mean_seconds <= max_seconds, got "
                         f"{min_seconds}, {mean_seconds}, {max_seconds}")
    if min_seconds == max_seconds:
        return np.full(size, float(min_seconds))
    mu = _lognormal_mu(mean_seconds, min_seconds, max_seconds, sigma)
    a = special.ndtr((math.log(min_seconds) - mu) / sigma)
    b = special.ndtr((math.log(max_seconds) - mu) / sigma)
    u = rng.uniform(a, b, size)
    return np.clip(np.exp(mu + sigma * special.ndtri(u)), min_seconds, max_seconds)


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtterancePlan:
    """Everything that decides one utterance of the corpus, before any audio is made."""

    id: str
    speaker: SpeakerProfile
    weights: tuple[float, ...]  # emotion distribution over EMOTIONS (sums to 1)
    num_samples: int
    seed: tuple[int, ...]  # entropy of the utterance's own generator

    @property
    def path(self) -> str:
        """Wav path relative to the manifest."""
        return f"wav/{self.id}.wav"

    def seconds(self, sample_rate: int = SAMPLE_RATE) -> float:
        """Duration in seconds."""
        return self.num_samples / sample_rate


def plan_corpus(*, num_speakers: int = 12, utterances_per_speaker: int = 20,
                corpora: Sequence[str] = ("synth_en", "synth_de"), seed: int = 0,
                mean_seconds: float = 2.5, min_seconds: float = 1.0, max_seconds: float = 4.0,
                mixed_fraction: float = 0.6, concentration: float = 1.0,
                sample_rate: int = SAMPLE_RATE) -> list[UtterancePlan]:
    """Speakers, emotion labels, durations and seeds of every utterance (no audio).

    Per speaker, `round(mixed_fraction * n)` utterances are mixtures and the pure ones
    cycle through a shuffled EMOTIONS, so every speaker covers every emotion.
    """
    if utterances_per_speaker < 1:
        raise ValueError(f"utterances_per_speaker must be >= 1, got {utterances_per_speaker}")
    if not 0.0 <= mixed_fraction <= 1.0:
        raise ValueError(f"mixed_fraction must be in [0, 1], got {mixed_fraction}")
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    speakers = make_speakers(num_speakers, corpora, seed)
    plans = []
    for s, speaker in enumerate(speakers):
        rng = np.random.default_rng([seed, 0x9A17, s])
        n = utterances_per_speaker
        mixed = np.zeros(n, dtype=bool)
        mixed[rng.permutation(n)[: int(round(mixed_fraction * n))]] = True
        pure_order = rng.permutation(len(EMOTIONS))
        durations = sample_durations(rng, n, mean_seconds, min_seconds, max_seconds)
        pure_count = 0
        for u in range(n):
            if mixed[u]:
                weights = sample_mixture(rng, concentration)
            else:
                weights = np.eye(len(EMOTIONS))[pure_order[pure_count % len(EMOTIONS)]]
                pure_count += 1
            plans.append(UtterancePlan(
                id=f"{speaker.speaker}_{u:04d}", speaker=speaker,
                weights=tuple(float(x) for x in weights),
                num_samples=int(round(durations[u] * sample_rate)), seed=(seed, s, u)))
    return plans


def label_columns(label_format: str) -> tuple[str, ...]:
    """Manifest columns holding the label for a label format."""
    if label_format == "distribution":
        return ("distribution",)
    if label_format == "columns":
        return EMOTIONS
    if label_format == "label":
        return ("label",)
    raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")


def _label_cells(weights: Sequence[float], label_format: str) -> list[str]:
    """The manifest cells of one label."""
    if label_format == "distribution":
        return [json.dumps({e: round(float(p), LABEL_DECIMALS) for e, p in
                            zip(EMOTIONS, weights, strict=True)})]
    if label_format == "columns":
        return [f"{p:.{LABEL_DECIMALS}f}" for p in weights]
    return [EMOTIONS[int(np.argmax(weights))]]


def generate_corpus(out_dir: str | Path, *, num_speakers: int = 12,
                    utterances_per_speaker: int = 20,
                    corpora: Sequence[str] = ("synth_en", "synth_de"), seed: int = 0,
                    mean_seconds: float = 2.5, min_seconds: float = 1.0,
                    max_seconds: float = 4.0, mixed_fraction: float = 0.6,
                    concentration: float = 1.0, label_format: str = "distribution",
                    sample_rate: int = SAMPLE_RATE, progress: bool = False,
                    dimensions: bool = True) -> Path:
    """Write a synthetic corpus: `out_dir/wav/*.wav` (16-bit PCM) and `out_dir/manifest.csv`.

    The manifest has MANIFEST_COLUMNS then the label in `label_format`: `distribution`
    (a JSON {emotion: probability}), `columns` (one column per emotion, the EM2LDL
    layout) or `label` (the argmax class); with `dimensions`, DIMENSION_COLUMNS: arousal,
    valence, dominance (`voice_dimensions` on the 1-7 scale, two decimals) and
    dimension_scale `1-7`. Returns the manifest path.
    """
    header = (*MANIFEST_COLUMNS, *label_columns(label_format),
              *(DIMENSION_COLUMNS if dimensions else ()))
    lo, hi = DIMENSION_SCALE
    plans = plan_corpus(num_speakers=num_speakers, utterances_per_speaker=utterances_per_speaker,
                        corpora=corpora, seed=seed, mean_seconds=mean_seconds,
                        min_seconds=min_seconds, max_seconds=max_seconds,
                        mixed_fraction=mixed_fraction, concentration=concentration,
                        sample_rate=sample_rate)
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    iterator = plans
    if progress:
        from tqdm import tqdm

        iterator = tqdm(plans, desc="synthetic corpus", unit="utt")
    for plan in iterator:
        speaker = plan.speaker
        language = language_profile(speaker.corpus)
        audio, voice = _synthesize(np.random.default_rng(list(plan.seed)),
                                   np.array(plan.weights), speaker, language,
                                   plan.num_samples / sample_rate, sample_rate)
        sf.write(out_dir / plan.path, audio, sample_rate, subtype="PCM_16")
        dims = []
        if dimensions:
            dims = [f"{lo + (hi - lo) * d:.2f}" for d in voice_dimensions(voice)]
            dims.append(f"{lo:g}-{hi:g}")
        rows.append([plan.path, plan.id, speaker.speaker, speaker.corpus, language.language,
                     speaker.gender, speaker.age, *_label_cells(plan.weights, label_format),
                     *dims])
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return manifest


def long_utterance(seconds: float = 45.0, *, seed: int = 0,
                   speaker: SpeakerProfile | None = None,
                   language: LanguageProfile | None = None,
                   segment_seconds: tuple[float, float] = (4.0, 9.0),
                   mixed_fraction: float = 0.3, concentration: float = 1.0,
                   sample_rate: int = SAMPLE_RATE,
                   ) -> tuple[np.ndarray, list[tuple[float, float, dict[str, float]]]]:
    """A long recording whose emotion changes from segment to segment.

    For emotion-over-time demos. Returns (float32 audio of `round(seconds * sample_rate)`
    samples, [(start_s, end_s, {emotion: probability}), ...]) with segments back to back
    covering the whole file; consecutive segments have different dominant emotions.
    """
    low, high = segment_seconds
    if not 0.5 <= low <= high:
        raise ValueError(f"segment_seconds must satisfy 0.5 <= low <= high, got "
                         f"{segment_seconds}")
    if seconds < low:
        raise ValueError(f"seconds must be >= segment_seconds[0] ({low}), got {seconds}")
    rng = np.random.default_rng([seed, 0x1096])
    if speaker is None:
        speaker = make_speakers(1, [language.corpus if language else "synth_en"], seed)[0]
    language = language or language_profile(speaker.corpus)
    n = int(round(seconds * sample_rate))
    bounds = [0]
    while bounds[-1] < n:
        step = int(round(rng.uniform(low, high) * sample_rate))
        # Never leave a tail shorter than `low`: merge it into the last segment.
        bounds.append(n if n - bounds[-1] - step < low * sample_rate else bounds[-1] + step)
    pieces, segments, previous = [], [], -1
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        while True:
            if rng.random() < mixed_fraction:
                weights = sample_mixture(rng, concentration)
            else:
                weights = np.eye(len(EMOTIONS))[int(rng.integers(len(EMOTIONS)))]
            if int(np.argmax(weights)) != previous:
                break
        previous = int(np.argmax(weights))
        pieces.append(synthesize_utterance(rng, weights, speaker, language,
                                           (b - a) / sample_rate, sample_rate))
        segments.append((a / sample_rate, b / sample_rate,
                         {e: float(p) for e, p in zip(EMOTIONS, weights, strict=True)}))
    return np.concatenate(pieces), segments


__all__ = [
    "AGES", "BUILTIN_CORPORA", "DIMENSIONS", "DIMENSION_COLUMNS", "DIMENSION_SCALE", "EMOTIONS",
    "EMOTION_PROFILES", "GENDERS", "LABEL_FORMATS",
    "MANIFEST_COLUMNS", "Consonant", "LanguageProfile", "SpeakerProfile", "UtterancePlan",
    "VoiceParams", "blend_voice", "generate_corpus", "label_columns", "language_profile",
    "long_utterance", "make_speakers", "plan_corpus", "round_distribution",
    "sample_durations", "sample_mixture", "synthesize_utterance", "voice_dimensions",
]
