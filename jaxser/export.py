"""Export a trained model for serving outside jaxser.

- `export_savedmodel`: a TensorFlow SavedModel through `jax.experimental.jax2tf` (native
  serialization: the jitted JAX function as StableHLO inside an XlaCallModule op, with
  the weights as TF variables). Signature `serving_default(waveform [batch, samples]
  float32 at 16 kHz, lengths [batch] int32) -> {"probs": [batch, K]}` (+ "frame_probs",
  "frame_mask" for pooling=frame_logits; + "dims" [batch, D] on the 0-1 training scale for a
  model with a dimensional head, their names in the metadata). Any batch size and any
  length the encoder takes in one pass (Whisper: up to 30 s); the waveform is padded inside
  the graph.
- `export_stablehlo`: the same function through `jax.export` alone (no TensorFlow): a
  serialized StableHLO artefact plus the weights, loaded back with `load_stablehlo`.
- `export_encoder`: the encoder as a Hugging Face checkpoint folder (config.json +
  model.safetensors), loadable by transformers and by `jaxser.models.pretrained`.

Every export writes `jaxser_export.json` beside it (labels, sample rate, checkpoint step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxser.constants import SAMPLE_RATE
from jaxser.models import attention, ser_model
from jaxser.train.experiment import load_for_inference

log = logging.getLogger(__name__)

PAD_MULTIPLE = 320  # Samples per encoder output frame (Whisper and the wav2vec2 family).
PLATFORMS = ("cpu", "cuda", "tpu")
METADATA = "jaxser_export.json"
STABLEHLO_FILE = "model.stablehlo"
WEIGHTS_FILE = "weights.npz"


@contextlib.contextmanager
def portable_attention() -> Iterator[None]:
    """While tracing for export, attention 'auto' means 'einsum'.

    An export runs on several platforms, so it must not bake in the tracing machine's
    choice (cuDNN on GPU, the blockwise kernel on CPU, which also needs concrete lengths
    while exports have a symbolic one). Pooling layers use 'auto', hence the override.
    """
    original = attention.default_implementation
    attention.default_implementation = lambda: "einsum"
    try:
        yield
    finally:
        attention.default_implementation = original


def inference_function(exp, portable: bool = True) -> Callable:
    """`(params, waveform [B, N], lengths [B]) -> {"probs", ...}`: the eval step on
    unsharded weights, N a multiple of PAD_MULTIPLE. `portable`: einsum attention in the
    encoder (trace under `portable_attention()` for the rest)."""
    model = exp.model
    if portable and hasattr(exp.enc_cfg, "attention"):
        model = model.clone(encoder_cfg=dataclasses.replace(exp.enc_cfg, attention="einsum"))

    def infer(params, waveform, lengths):
        inputs, mask = ser_model.features(model.family, model.encoder_cfg, waveform, lengths)
        out = model.apply({"params": params}, inputs, mask, deterministic=True)
        result = {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), -1)}
        if "frame_logits" in out:
            result["frame_probs"] = jax.nn.softmax(out["frame_logits"].astype(jnp.float32), -1)
            result["frame_mask"] = out["frame_mask"]
        if "dims" in out:
            result["dims"] = out["dims"].astype(jnp.float32)
        return result

    return infer


def _host_params(params) -> dict:
    """The model's weights as numpy arrays on the host (gathered from any sharding)."""
    return jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(params["model"])))


def _constraints(exp) -> tuple[str, ...]:
    """Shape constraints of the symbolic length `t` (frames of PAD_MULTIPLE samples)."""
    if exp.cfg.model.encoder == "whisper":
        return (f"t <= {int(exp.enc_cfg.max_source_positions)}",)
    return ()


def _write_metadata(out: Path, exp, step: int, workdir, kind: str, **extra) -> None:
    meta = {"format": kind, "labels": list(exp.labels), "sample_rate": SAMPLE_RATE,
            "pad_multiple": PAD_MULTIPLE, "encoder": exp.cfg.model.encoder,
            "pooling": exp.cfg.model.pooling, "checkpoint_step": int(step),
            "workdir": str(workdir),
            "dimensions": list(getattr(exp, "dims", []) or []), **extra}
    (out / METADATA).write_text(json.dumps(meta, indent=2))


def export_savedmodel(workdir: str | Path, out_dir: str | Path, checkpoint: str = "best",
                      platforms: Sequence[str] = PLATFORMS) -> Path:
    """Writes a TensorFlow SavedModel of a trained workdir's model to `out_dir`.

    platforms: where the serialized function may run (lowered for each when exporting).
    Load with `tf.saved_model.load(out_dir)` and call
    `.signatures["serving_default"](waveform=..., lengths=...)`, or `load_savedmodel`.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    exp, params, step, _ = load_for_inference(workdir, checkpoint, audio=True)
    weights = _host_params(params)
    converted = jax2tf.convert(
        inference_function(exp), polymorphic_shapes=[None, "(b, 320*t)", "(b,)"],
        polymorphic_constraints=_constraints(exp), with_gradient=False,
        native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.weights = tf.nest.map_structure(lambda w: tf.Variable(w, trainable=False), weights)
    module.labels = tf.Variable(list(exp.labels), dtype=tf.string, trainable=False)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None], tf.float32, name="waveform"),
        tf.TensorSpec([None], tf.int32, name="lengths")])
    def serve(waveform, lengths):
        pad = tf.math.floormod(-tf.shape(waveform)[1], PAD_MULTIPLE)
        waveform = tf.pad(waveform, [[0, 0], [0, pad]])
        return converted(module.weights, waveform, lengths)

    module.serve = serve
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with portable_attention():  # `serve` is traced here.
        tf.saved_model.save(module, str(out), signatures={"serving_default": serve})
    _write_metadata(out, exp, step, workdir, "tf_saved_model", platforms=list(platforms),
                    signature="serving_default(waveform [B, N] float32, lengths [B] int32)",
                    max_seconds=_max_seconds(exp))
    return out


def _max_seconds(exp) -> float | None:
    if exp.cfg.model.encoder == "whisper":
        return exp.enc_cfg.max_source_positions * PAD_MULTIPLE / SAMPLE_RATE
    return None


class ExportedModel:
    """A loaded export: `model(waveform [B, N] or [N], lengths=None) -> probs [B, K]`."""

    def __init__(self, fn: Callable, meta: dict):
        self._fn, self.meta = fn, meta
        self.labels = list(meta["labels"])

    def outputs(self, waveform, lengths=None) -> dict[str, np.ndarray]:
        """All outputs (probs, and frame_probs/frame_mask for frame-level models)."""
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim == 1:
            waveform = waveform[None]
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be [batch, samples], got {waveform.shape}")
        if lengths is None:
            lengths = np.full((waveform.shape[0],), waveform.shape[1], np.int32)
        return {k: np.asarray(v) for k, v in
                self._fn(waveform, np.asarray(lengths, np.int32)).items()}

    def __call__(self, waveform, lengths=None) -> np.ndarray:
        return self.outputs(waveform, lengths)["probs"]


def _read_metadata(path: Path) -> dict:
    if not (path / METADATA).exists():
        raise FileNotFoundError(f"{path / METADATA} not found: not a jaxser export")
    return json.loads((path / METADATA).read_text())


def load_savedmodel(path: str | Path) -> ExportedModel:
    """A SavedModel written by `export_savedmodel`, as a numpy-in, numpy-out callable."""
    import tensorflow as tf

    path = Path(path)
    meta = _read_metadata(path)
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def call(waveform, lengths):
        out = serve(waveform=tf.constant(waveform), lengths=tf.constant(lengths))
        return {k: v.numpy() for k, v in out.items()}

    return ExportedModel(call, meta)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + "/") if isinstance(value, dict) else {name: value})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def export_stablehlo(workdir: str | Path, out_dir: str | Path, checkpoint: str = "best",
                     platforms: Sequence[str] = PLATFORMS) -> Path:
    """Writes the inference function as serialized StableHLO (`jax.export`, no TensorFlow)
    with symbolic batch and length, the weights as `weights.npz`, and the metadata."""
    from jax import export as jax_export

    exp, params, step, _ = load_for_inference(workdir, checkpoint, audio=True)
    weights = _host_params(params)
    b, t = jax_export.symbolic_shape("b, t", constraints=_constraints(exp))
    specs = (jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), weights),
             jax.ShapeDtypeStruct((b, PAD_MULTIPLE * t), jnp.float32),
             jax.ShapeDtypeStruct((b,), jnp.int32))
    with portable_attention():
        exported = jax_export.export(jax.jit(inference_function(exp)),
                                     platforms=tuple(platforms))(*specs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STABLEHLO_FILE).write_bytes(exported.serialize())
    np.savez(out / WEIGHTS_FILE, **_flatten(weights))
    _write_metadata(out, exp, step, workdir, "jax_export_stablehlo", platforms=list(platforms),
                    max_seconds=_max_seconds(exp))
    return out


def load_stablehlo(path: str | Path) -> ExportedModel:
    """An export of `export_stablehlo` as a callable (needs only jax, not jaxser's model)."""
    from jax import export as jax_export

    path = Path(path)
    meta = _read_metadata(path)
    exported = jax_export.deserialize(bytearray((path / STABLEHLO_FILE).read_bytes()))
    with np.load(path / WEIGHTS_FILE) as npz:
        weights = _unflatten({k: npz[k] for k in npz.files})

    def call(waveform, lengths):
        pad = (-waveform.shape[1]) % PAD_MULTIPLE
        waveform = np.pad(waveform, ((0, 0), (0, pad)))
        return exported.call(weights, waveform, lengths)

    return ExportedModel(call, meta)


def export_encoder(workdir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    """The trained encoder as a Hugging Face checkpoint folder (config.json +
    model.safetensors): fine-tune it elsewhere, or start another jaxser run from it with
    `config.model.pretrained`."""
    from jaxser.models.pretrained import export_pretrained

    exp, params, step, _ = load_for_inference(workdir, checkpoint, audio=True)
    encoder = jax.device_get(nn.meta.unbox(params["model"]["encoder"]))
    out = export_pretrained(exp.cfg.model.encoder, exp.enc_cfg, encoder, out_dir)
    _write_metadata(Path(out), exp, step, workdir, "huggingface_encoder")
    return Path(out)


EXPORTERS = {"savedmodel": export_savedmodel, "stablehlo": export_stablehlo,
             "encoder": export_encoder}


def export_model(workdir: str | Path, out_dir: str | Path, format: str = "savedmodel",
                 checkpoint: str = "best") -> Path:
    """`jaxser export`: one of EXPORTERS by name (savedmodel, stablehlo, encoder)."""
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}: {', '.join(EXPORTERS)}")
    return EXPORTERS[format](workdir, out_dir, checkpoint=checkpoint)
