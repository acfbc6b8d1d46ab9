"""`jaxser predict` and the notebook API: emotion distributions for audio files or arrays.

`Predictor.load(workdir)` restores a trained model once; `predictor(arrays_or_paths)`
returns one dict per input with the distribution by label name and the top class, and
with `window`/`hop` the distribution over time for long audio. Inputs are batched padded
to the longest, and padding is masked, so a file gives the same result alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxser.data import audio as audio_io
from jaxser.evaluate import load_for_inference

SAMPLE_RATE = 16000
PAD_MULTIPLE = 320  # Whisper: hop 160 x conv stride 2.
MIN_SECONDS = 0.05  # Shorter files get an error instead of a guess.


class Predictor:
    """A trained model ready for inference on waveforms."""

    def __init__(self, exp, params, step: int):
        self.exp, self.params, self.step = exp, params, step
        self.labels = exp.labels

    @classmethod
    def load(cls, workdir: str | Path, checkpoint: str = "best") -> Predictor:
        exp, params, step, _ = load_for_inference(workdir, checkpoint)
        return cls(exp, params, step)

    def _probs(self, waves: list[np.ndarray]) -> np.ndarray:
        """[len(waves), K] class probabilities; batches padded to the longest."""
        dp = self.exp.dp
        n = max(len(w) for w in waves)
        n = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
        rows = -(-len(waves) // dp) * dp
        batch = {"audio": np.zeros((rows, n), np.float32),
                 "length": np.full((rows,), PAD_MULTIPLE, np.int32)}
        for i, w in enumerate(waves):
            batch["audio"][i, :len(w)] = w
            batch["length"][i] = len(w)
        with self.exp.mesh_context():
            out = self.exp.eval_step()(self.params, self.exp.device_batch(batch))
        return np.asarray(jax.device_get(out["probs"]))[:len(waves)]

    def _row(self, probs: np.ndarray) -> dict:
        return {"distribution": {l: round(float(p), 6) for l, p in zip(self.labels, probs)},
                "top": self.labels[int(np.argmax(probs))]}

    def predict_waveforms(self, waves: Sequence[np.ndarray], batch_size: int = 8,
                          window: float = 0.0, hop: float = 0.0) -> list[dict]:
        """One dict per 16 kHz mono waveform; `timeline` rows when window > 0."""
        results = []
        for start in range(0, len(waves), batch_size):
            chunk = [np.asarray(w, np.float32) for w in waves[start:start + batch_size]]
            results.extend(self._row(p) for p in self._probs(chunk))
        if window > 0:
            for result, wave in zip(results, waves):
                result["timeline"] = self.timeline(wave, window, hop or window, batch_size)
        return results

    def timeline(self, wave: np.ndarray, window: float, hop: float,
                 batch_size: int = 8) -> list[dict]:
        """The distribution over time: one row per window with start/end seconds."""
        size, step = int(window * SAMPLE_RATE), max(int(hop * SAMPLE_RATE), 1)
        starts = list(range(0, max(len(wave) - size, 0) + 1, step))
        if starts[-1] + size < len(wave):
            starts.append(len(wave) - size if len(wave) > size else 0)
        pieces = [np.asarray(wave[s:s + size], np.float32) for s in starts]
        rows = []
        for i in range(0, len(pieces), batch_size):
            for s, p in zip(starts[i:i + batch_size], self._probs(pieces[i:i + batch_size])):
                end = min(s + size, len(wave))
                rows.append({"start": round(s / SAMPLE_RATE, 3),
                             "end": round(end / SAMPLE_RATE, 3), **self._row(p)})
        return rows

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 8,
                      window: float = 0.0, hop: float = 0.0,
                      max_seconds: float = 3600.0) -> list[dict]:
        """One dict per file; a file that cannot be used gets an `error` and the rest go on."""
        results: list[dict | None] = [None] * len(paths)
        good, waves = [], []
        for i, path in enumerate(paths):
            try:
                wave = audio_io.decode_checked(str(path), None, None, MIN_SECONDS,
                                               max_seconds).astype(np.float32) / 32768.0
            except audio_io.AudioError as e:
                results[i] = {"file": str(path), "error": str(e)}
                continue
            good.append(i)
            waves.append(wave)
        for i, result in zip(good, self.predict_waveforms(waves, batch_size, window, hop)):
            results[i] = {"file": str(paths[i]), **result}
        return results

    def __call__(self, inputs, **kwargs) -> list[dict]:
        """Paths or arrays (16 kHz mono), as a list or a single one."""
        single = isinstance(inputs, str | Path | np.ndarray)
        items = [inputs] if single else list(inputs)
        if items and isinstance(items[0], str | Path):
            out = self.predict_files(items, **kwargs)
        else:
            out = self.predict_waveforms(items, **kwargs)
        return out[0] if single else out
