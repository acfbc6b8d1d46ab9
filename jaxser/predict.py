"""`jaxser predict` and the notebook API: emotion distributions for audio files or arrays.

`Predictor.load(workdir)` restores a trained model once (`Predictor.from_pretrained(path)`
reads a released checkpoint that brings its own classifier, emotion2vec+, with no training);
`predictor(arrays_or_paths)`
returns one dict per input with the distribution by label name and the top class; with
`window`/`hop` also the distribution over time (one row per window), and for models with
frame-level outputs (pooling=frame_logits) the per-frame distributions. A model with a
dimensional head also gives `dimensions` {arousal, valence, dominance: value} on the scale
of its training data (e.g. 1-7; 0-1 when its corpora had different scales), per file and
per window of the timeline.

Inputs are batched, padded to a small set of lengths (so a new length rarely compiles a
new program) and padding is masked, so a file gives the same result alone or in a batch.
Audio longer than the encoder accepts in one pass (Whisper: 30 s) is cut into consecutive
chunks whose distributions are averaged, weighted by their duration.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxser import config as config_lib
from jaxser.constants import SAMPLE_RATE
from jaxser.data import decode, dimensions
from jaxser.models import emotion2vec_checkpoint
from jaxser.train.experiment import Experiment, load_for_inference

log = logging.getLogger(__name__)

PAD_MULTIPLE = 320  # Whisper: hop 160 x conv stride 2; wav2vec2 family: conv stride 320.
MIN_SECONDS = 0.05  # Shorter inputs get an error instead of a guess.
DECIMALS = 6  # Rounding of the probabilities in the JSON output.


def padded_length(samples: int, max_samples: int | None = None) -> int:
    """The padded batch length for `samples`: a multiple of PAD_MULTIPLE on a coarse ladder.

    Four lengths per octave (at most 25% padding), so a stream of files of different
    lengths compiles few programs; never above `max_samples`.
    """
    units = max(-(-samples // PAD_MULTIPLE), 1)
    step = max(2 ** int(math.log2(units)) // 4, 1)
    units = -(-units // step) * step
    n = units * PAD_MULTIPLE
    return min(n, max_samples) if max_samples else n


def max_pass_samples(exp) -> int | None:
    """The longest input the encoder takes in one pass (None: no limit)."""
    if exp.cfg.model.encoder == "whisper":
        return int(exp.enc_cfg.max_source_positions) * PAD_MULTIPLE
    return None


def frame_hop_samples(exp) -> int:
    """Samples per encoder output frame: Whisper 320 (hop 160, stride 2); the wav2vec2
    family the product of its conv strides (320 for the published models)."""
    strides = getattr(exp.enc_cfg, "conv_stride", None)
    return int(np.prod(strides)) if exp.cfg.model.encoder != "whisper" and strides else 320


def pretrained_experiment(path: str | Path | None = None, cfg=None) -> tuple[Experiment, dict]:
    """(experiment, params) of a released checkpoint with its own classifier, no training.

    Today that is emotion2vec+ (a FunASR folder: config.yaml, model.pt, tokens.txt): its
    encoder, mean pooling over the frames and its 9-class head, as FunASR computes them.
    `cfg`: a jaxser config whose model.dtype, model.attention, model.encoder_overrides and
    mesh are used (default: the base config); its model.pretrained names the checkpoint
    unless `path` is given.
    """
    cfg = copy.deepcopy(cfg) if cfg is not None else config_lib.base_config()
    path = str(path or cfg.model.pretrained)
    if not path or not emotion2vec_checkpoint.is_emotion2vec(path):
        raise ValueError(f"{path or 'no checkpoint given'}: only an emotion2vec(+) checkpoint "
                         "(a FunASR folder with config.yaml and model.pt) predicts without "
                         "training; train other encoders with `jaxser train`")
    checkpoint = emotion2vec_checkpoint.load_emotion2vec(path)
    m = cfg.model  # emotion2vec+'s head: a linear layer on the mean of the last layer.
    m.encoder, m.pretrained, m.size, m.pooling, m.head_hidden = "emotion2vec", path, "", "mean", 0
    m.layer_weighted_sum, m.domain_head, m.dropout = False, False, 0.0
    fields = {**dataclasses.asdict(checkpoint.config), **dict(m.encoder_overrides),
              "attention": m.attention, "remat": bool(m.remat)}
    exp = Experiment(cfg, list(checkpoint.labels), [], encoder_fields=fields, steps_per_epoch=1)
    template = jax.eval_shape(lambda k: exp.model.init({"params": k, "dropout": k},
                                                       *exp.sample), jax.random.key(0))
    return exp, {"model": emotion2vec_checkpoint.ser_params(checkpoint, template["params"])}


def _round(probs: np.ndarray) -> list[float]:
    return [round(float(p), DECIMALS) for p in probs]


class Predictor:
    """A trained model ready for inference on waveforms (16 kHz mono float32)."""

    def __init__(self, exp, params, step: int, dimension_info: dict | None = None):
        self.exp, self.params, self.step = exp, params, step
        self.labels = list(exp.labels)
        self.dims = list(getattr(exp, "dims", []) or [])
        info = {"dimensions": dimension_info or {}}
        self.dim_scales = [dimensions.report_scale(info, d) for d in self.dims]
        self.max_samples = max_pass_samples(exp)
        self.has_frames = exp.cfg.model.pooling == "frame_logits"
        self.frame_seconds = frame_hop_samples(exp) / SAMPLE_RATE

    @classmethod
    def load(cls, workdir: str | Path, checkpoint: str = "best") -> Predictor:
        """Restores `best`, `latest` or a step number of a training workdir."""
        exp, params, step, meta = load_for_inference(workdir, checkpoint, audio=True)
        return cls(exp, params, step, meta.get("dimensions"))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, cfg=None) -> Predictor:
        """A released checkpoint with its own classifier (emotion2vec+), no training; see
        `pretrained_experiment`."""
        exp, params = pretrained_experiment(path, cfg)
        return cls(exp, params, 0)

    # ------------------------------------------------------------------ raw arrays

    def _run(self, waves: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass of a batch: {probs [n, K], dims? [n, D] (0-1), frame_probs?
        [n, T, K], frame_mask?}."""
        dp = self.exp.dp
        n = padded_length(max(len(w) for w in waves), self.max_samples)
        rows = 2 ** math.ceil(math.log2(len(waves)))  # Few batch shapes, too.
        rows = -(-rows // dp) * dp
        batch = {"audio": np.zeros((rows, n), np.float32),
                 "length": np.full((rows,), PAD_MULTIPLE, np.int32)}
        for i, w in enumerate(waves):
            batch["audio"][i, :len(w)] = w
            batch["length"][i] = len(w)
        with self.exp.mesh_context():
            out = self.exp.eval_step()(self.params, self.exp.device_batch(batch))
        out = jax.device_get(out)
        return {k: np.asarray(v)[:len(waves)] for k, v in out.items()}

    def _chunks(self, wave: np.ndarray) -> list[np.ndarray]:
        """The wave cut into pieces the encoder takes in one pass (usually one)."""
        if self.max_samples is None or len(wave) <= self.max_samples:
            return [wave]
        pieces = [wave[s:s + self.max_samples] for s in range(0, len(wave), self.max_samples)]
        if len(pieces) > 1 and len(pieces[-1]) < MIN_SECONDS * SAMPLE_RATE:
            pieces = pieces[:-1]  # A sliver at the end would only add noise.
        return pieces

    def probabilities(self, waves: Sequence[np.ndarray], batch_size: int = 8) -> dict:
        """Class probabilities of 16 kHz waveforms as arrays.

        Returns {"probs": [n, K]}, for models with a dimensional head "dims": [n, D] on the
        reporting scale, and, for frame-level models, "frame_probs": a list of [frames_i, K]
        arrays (valid frames only) and "frame_seconds" (the frame hop).
        """
        waves = [self._check_wave(w, i) for i, w in enumerate(waves)]
        pieces, owner = [], []
        for i, w in enumerate(waves):
            for piece in self._chunks(w):
                pieces.append(piece)
                owner.append(i)
        probs = np.zeros((len(pieces), len(self.labels)), np.float64)
        dims = np.zeros((len(pieces), len(self.dims)), np.float64)
        frames: list[np.ndarray | None] = [None] * len(pieces)
        order = np.argsort([len(p) for p in pieces], kind="stable")  # Similar lengths batch.
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out = self._run([pieces[j] for j in idx])
            probs[idx] = out["probs"]
            if self.dims:
                dims[idx] = out["dims"]
            if "frame_probs" in out:
                for row, j in enumerate(idx):
                    frames[j] = out["frame_probs"][row][out["frame_mask"][row].astype(bool)]
        owner = np.asarray(owner)
        weights = np.asarray([len(p) for p in pieces], np.float64)
        result = {"probs": np.stack([np.average(probs[owner == i], axis=0,
                                                weights=weights[owner == i])
                                     for i in range(len(waves))]) if waves else probs,
                  "chunks": np.bincount(owner, minlength=len(waves))}
        if self.dims:
            mean = np.stack([np.average(dims[owner == i], axis=0, weights=weights[owner == i])
                             for i in range(len(waves))]) if waves else dims
            for j, scale in enumerate(self.dim_scales):
                mean[:, j] = scale.original(mean[:, j])
            result["dims"] = mean
        if self.has_frames:
            result["frame_probs"] = [np.concatenate([frames[j] for j in np.flatnonzero(owner == i)])
                                     for i in range(len(waves))]
            result["frame_seconds"] = self.frame_seconds
        return result

    @staticmethod
    def _check_wave(wave, index: int) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        if wave.ndim != 1:
            raise ValueError(f"input {index}: expected a mono waveform [samples], got shape "
                             f"{wave.shape}")
        if len(wave) < MIN_SECONDS * SAMPLE_RATE:
            raise ValueError(f"input {index}: {len(wave)} samples is shorter than "
                             f"{MIN_SECONDS} s at {SAMPLE_RATE} Hz")
        if not np.all(np.isfinite(wave)):
            raise ValueError(f"input {index}: NaN or inf samples")
        return wave

    # ------------------------------------------------------------------ dict outputs

    def _row(self, probs: np.ndarray, dims: np.ndarray | None = None) -> dict:
        row = {"distribution": dict(zip(self.labels, _round(probs), strict=True)),
               "top": self.labels[int(np.argmax(probs))]}
        if dims is not None and self.dims:
            row["dimensions"] = dict(zip(self.dims, _round(dims), strict=True))
        return row

    def predict_waveforms(self, waves: Sequence[np.ndarray], batch_size: int = 8,
                          window: float = 0.0, hop: float = 0.0,
                          sample_rate: int = SAMPLE_RATE, frames: bool = True) -> list[dict]:
        """One dict per mono waveform (resampled to 16 kHz when `sample_rate` differs).

        Keys: `duration` (s), `distribution` {label: p}, `top`; `dimensions` {name: value}
        for a model with a dimensional head; `chunks` when the wave was longer than one
        encoder pass; `timeline` rows when window > 0; `frame_probs` ([frames][K]) and
        `frame_seconds` for frame-level models when `frames`.
        """
        waves = [self._resampled(w, sample_rate) for w in waves]
        out = self.probabilities(waves, batch_size)
        results = []
        for i, wave in enumerate(waves):
            dims = out["dims"][i] if "dims" in out else None
            row = {"duration": round(len(wave) / SAMPLE_RATE, 3),
                   **self._row(out["probs"][i], dims)}
            if out["chunks"][i] > 1:
                row["chunks"] = int(out["chunks"][i])
            if frames and "frame_probs" in out:
                row["frame_seconds"] = out["frame_seconds"]
                row["frame_probs"] = [_round(p) for p in out["frame_probs"][i]]
            if window > 0:
                row["timeline"] = self.timeline(wave, window, hop or window, batch_size)
            results.append(row)
        return results

    @staticmethod
    def _resampled(wave, sample_rate: int) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        if sample_rate != SAMPLE_RATE and wave.ndim == 1:
            wave = decode.resample(wave, sample_rate, SAMPLE_RATE).astype(np.float32)
        return wave

    def window_starts(self, samples: int, window: float, hop: float) -> list[int]:
        """First samples of the windows covering `samples`; the last one ends at the end."""
        size, step = int(round(window * SAMPLE_RATE)), int(round(hop * SAMPLE_RATE))
        if size < MIN_SECONDS * SAMPLE_RATE or step <= 0:
            raise ValueError(f"window ({window} s) must be >= {MIN_SECONDS} s and hop ({hop} s) "
                             "> 0")
        if self.max_samples is not None and size > self.max_samples:
            raise ValueError(f"window {window} s is longer than the encoder takes in one pass "
                             f"({self.max_samples / SAMPLE_RATE:g} s)")
        starts = list(range(0, max(samples - size, 0) + 1, step))
        if starts[-1] + size < samples:
            starts.append(samples - size)
        return starts

    def timeline(self, wave: np.ndarray, window: float, hop: float,
                 batch_size: int = 8) -> list[dict]:
        """The distribution (and the dimensions) over time: one row per window with
        start/end seconds.

        Windows of `window` seconds every `hop` seconds; a last window ends at the end of
        the wave, so every sample is covered.
        """
        wave = self._check_wave(wave, 0)
        size = int(round(window * SAMPLE_RATE))
        starts = self.window_starts(len(wave), window, hop)
        out = self.probabilities([wave[s:s + size] for s in starts], batch_size)
        dims = out.get("dims", [None] * len(starts))
        return [{"start": round(s / SAMPLE_RATE, 3),
                 "end": round(min(s + size, len(wave)) / SAMPLE_RATE, 3), **self._row(p, d)}
                for s, p, d in zip(starts, out["probs"], dims, strict=True)]

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 8,
                      window: float = 0.0, hop: float = 0.0,
                      max_seconds: float = 3600.0, frames: bool = True) -> list[dict]:
        """One dict per file (any format, rate, channels, length), in order.

        A file that cannot be used gets {"file", "error"} and the others go on.
        """
        results: list[dict | None] = [None] * len(paths)
        good, waves = [], []
        for i, path in enumerate(paths):
            try:
                wave = decode.decode_checked(str(path), None, None, MIN_SECONDS,
                                             max_seconds).astype(np.float32) / 32768.0
            except decode.AudioError as e:
                results[i] = {"file": str(path), "error": str(e)}
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the rest
                results[i] = {"file": str(path), "error": f"{type(e).__name__}: {e}"}
                continue
            good.append(i)
            waves.append(wave)
        outputs = self.predict_waveforms(waves, batch_size, window, hop, frames=frames)
        for i, result in zip(good, outputs, strict=True):
            results[i] = {"file": str(paths[i]), **result}
        return results

    def __call__(self, inputs, **kwargs) -> dict | list[dict]:
        """Paths or arrays (mono; `sample_rate=` if not 16 kHz), as a list or a single one."""
        single = isinstance(inputs, str | Path) or (isinstance(inputs, np.ndarray)
                                                    and inputs.ndim == 1)
        items = [inputs] if single else list(inputs)
        if items and isinstance(items[0], str | Path):
            out = self.predict_files(items, **kwargs)
        else:
            out = self.predict_waveforms(items, **kwargs)
        return out[0] if single else out
