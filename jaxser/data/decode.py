"""Audio decoding for `jaxser prepare`: any file soundfile (or librosa) reads -> 16 kHz mono int16.

Decoding runs in worker processes, so `decode` is a top-level function of plain picklable
arguments that never raises: it returns the int16 samples or a rejection reason. Resampling is
soxr's "HQ" quality, exactly what `librosa.resample(..., res_type="soxr_hq")` computes
(including its output length, ceil(n * 16000 / sr)); librosa itself is imported only as the
fallback decoder, to keep worker start-up cheap.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from jaxser.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

# Peak amplitude (full scale 1.0) under which a clip counts as silent: -80 dBFS, ~3 int16 LSB.
SILENCE_PEAK = 1e-4

# Reasons a file is rejected (rejected.csv "reason" column).
UNREADABLE = "unreadable audio"
EMPTY = "empty audio"
SILENT = "silent audio"
NON_FINITE = "non-finite samples"
TOO_SHORT = "too short"
TOO_LONG = "too long"


class AudioError(Exception):
    """A file cannot be used; `reason` is its category, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _read_soundfile(path: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Reads [start, end) seconds with soundfile: float32 [frames, channels], sample rate."""
    with sf.SoundFile(path) as f:
        sr = f.samplerate
        first = 0 if start is None else int(round(start * sr))
        last = f.frames if end is None else min(int(round(end * sr)), f.frames)
        if first >= f.frames or last <= first:
            return np.zeros((0, f.channels), np.float32), sr
        f.seek(first)
        data = f.read(last - first, dtype="float32", always_2d=True)
    return data, sr


def _read_librosa(path: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Fallback decoder (audioread / ffmpeg backends): float32 [frames, channels], rate."""
    import librosa

    offset = start or 0.0
    duration = None if end is None else max(end - offset, 0.0)
    with warnings.catch_warnings():  # "PySoundFile failed", audioread deprecation
        warnings.simplefilter("ignore")
        y, sr = librosa.load(path, sr=None, mono=False, offset=offset, duration=duration)
    y = np.asarray(y, np.float32)
    return (y[:, None] if y.ndim == 1 else y.T), int(sr)


def read_audio(path: str, start: float | None = None,
               end: float | None = None) -> tuple[np.ndarray, int]:
    """Decodes a file (optionally the segment [start, end) seconds): float32 [frames, ch], sr."""
    try:
        return _read_soundfile(path, start, end)
    except Exception as first_error:  # noqa: BLE001 - any decoder failure means "try the next"
        try:
            return _read_librosa(path, start, end)
        except Exception as e:  # noqa: BLE001
            raise AudioError(UNREADABLE, f"{type(first_error).__name__}: {first_error}; "
                             f"librosa: {type(e).__name__}: {e}") from e


def resample(y: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resamples mono float32 [n] with soxr HQ, length ceil(n * target / orig) like librosa."""
    if orig_sr == target_sr:
        return y
    out = soxr.resample(y, orig_sr, target_sr, quality="soxr_hq")
    n = int(math.ceil(len(y) * target_sr / orig_sr))
    if len(out) < n:
        out = np.pad(out, (0, n - len(out)))
    return np.asarray(out[:n], np.float32)


def to_int16(y: np.ndarray) -> np.ndarray:
    """Float samples (full scale 1.0) -> int16, scale 32768 so 16-bit sources pass exactly."""
    return np.clip(np.round(y.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def load_audio(path: str, start: float | None = None, end: float | None = None,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decoded, mixed to mono and resampled: float32 [samples] at `sample_rate`."""
    data, sr = read_audio(path, start, end)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(np.asarray(mono, np.float32), sr, sample_rate)


@dataclass(frozen=True)
class DecodeResult:
    """int16 samples at 16 kHz, or None with the reason and a detail."""

    audio: np.ndarray | None
    reason: str = ""
    detail: str = ""


def _duration_hint(path: str, start: float | None, end: float | None) -> float | None:
    """Seconds the segment will last, from the header alone (None when unknown)."""
    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - the real read will report the problem
        return None
    if not info.samplerate or info.frames <= 0:
        return None
    total = info.frames / info.samplerate
    lo = start or 0.0
    hi = total if end is None else min(end, total)
    return max(hi - lo, 0.0)


def decode_checked(path: str, start: float | None, end: float | None,
                   min_seconds: float, max_seconds: float) -> np.ndarray:
    """16 kHz mono int16 [samples] after every validity check; raises AudioError."""
    hint = _duration_hint(path, start, end)
    if hint is not None and hint > max_seconds:  # do not decode what will be dropped
        raise AudioError(TOO_LONG, f"{hint:.3f} s > max {max_seconds} s")
    data, sr = read_audio(path, start, end)
    if data.size == 0:
        raise AudioError(EMPTY, "no samples" + (" in the segment" if start or end else ""))
    if not np.all(np.isfinite(data)):
        raise AudioError(NON_FINITE, f"{int(np.sum(~np.isfinite(data)))} NaN/inf samples")
    seconds = data.shape[0] / sr
    if seconds < min_seconds:
        raise AudioError(TOO_SHORT, f"{seconds:.3f} s < min {min_seconds} s")
    if seconds > max_seconds:
        raise AudioError(TOO_LONG, f"{seconds:.3f} s > max {max_seconds} s")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    y = resample(np.asarray(mono, np.float32), sr)
    if y.size == 0:
        raise AudioError(EMPTY, "no samples after resampling")
    if float(np.max(np.abs(y))) < SILENCE_PEAK:
        raise AudioError(SILENT, f"peak below {SILENCE_PEAK} of full scale")
    return to_int16(y)


def decode(task: tuple[str, float | None, float | None, float, float]) -> DecodeResult:
    """Worker entry: (path, start, end, min_seconds, max_seconds) -> DecodeResult; never raises."""
    try:
        return DecodeResult(decode_checked(*task))
    except AudioError as e:
        return DecodeResult(None, e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 - a bad file must never abort the whole run
        return DecodeResult(None, UNREADABLE, f"{type(e).__name__}: {e}")


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], executor: ProcessPoolExecutor
                | None, window: int = 16) -> Iterator[Any]:
    """fn over items, in order, with at most `window` in flight (bounded memory).

    executor None runs in this process. Results stream out as they are consumed, so a slow
    consumer (the shard writer) never lets decoded audio pile up.
    """
    if executor is None:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def make_executor(workers: int) -> ProcessPoolExecutor | None:
    """A process pool of `workers` (spawned: safe after TensorFlow/JAX threads), or None for 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
