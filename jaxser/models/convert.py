"""torch <-> Flax parameter conversion of every encoder family, with one key and shape check.

A jaxser encoder's Flax parameter tree mirrors its transformers module tree (the same
names), so one rule maps every parameter to its state-dict key and array layout:

* key: path segments `layers_3` / `conv_layers_3` become `layers.3` / `conv_layers.3`;
  leaves `kernel`, `scale` and `embedding` become `weight`; weight norm's `weight_g` /
  `weight_v` become `parametrizations.weight.original0` / `original1`;
* layout (`TorchLeaf.kind`): a convolution kernel (its module's name starts with `conv`, or
  a weight norm's `weight_v`) is Flax [k, in, out] against torch [out, in, k]; any other
  `kernel` is a Linear (Flax [in..., out...] against torch [out, in], with q/k/v kept as
  [embed, heads, head_dim] and `out_proj` as [heads, head_dim, embed]); tables
  (`embedding`) keep their shape; everything else is flattened, or gets torch's unit axes
  (`weight_g` [1, 1, k], WavLM's `gru_rel_pos_const` [1, heads, 1, 1]).

A `Family` adds what differs: its parameter tree (`param_shapes`), how its encoder's keys
are picked out of a task model's state dict (`encoder_state`: model prefixes, old
spellings, heads and decoders left out) and exceptions to the key rule (`overrides`).
`params_from_torch` lists every missing key, unexpected key and shape mismatch in one
ValueError (`check_state_dict`); `params_to_torch` is its inverse.

Adding a family: write its encoder with the same module names as the torch model, then a
`Family` (see `WHISPER`, `WAV2VEC2`) and either pass it as `family=` or add it to
`family_of`. Reading and writing HF folders: `jaxser.models.pretrained`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxser.models import emotion2vec, wav2vec2, whisper
from jaxser.models.emotion2vec import Emotion2vecConfig
from jaxser.models.wav2vec2_config import Wav2Vec2Config
from jaxser.models.whisper import WhisperConfig

log = logging.getLogger(__name__)

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TorchLeaf:
    """Where one Flax parameter sits in a torch state dict and how it is laid out there.

    kind: "conv" (Flax [k, in, out] <-> torch [out, in, k]), "linear" (Flax
    [in_axes..., out...] <-> torch [prod(out), prod(in)]), "same" (same shape) or "reshape"
    (torch `shape`, flattened when None).
    """

    key: str
    kind: str = "reshape"
    in_axes: int = 1
    shape: tuple[int, ...] | None = None

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The torch shape of a Flax array of `flax_shape`."""
        if self.kind == "conv":
            return tuple(reversed(flax_shape))
        if self.kind == "linear":
            return (math.prod(flax_shape[self.in_axes:]), math.prod(flax_shape[:self.in_axes]))
        if self.kind == "same":
            return tuple(flax_shape)
        return self.shape if self.shape is not None else (math.prod(flax_shape),)

    def from_torch(self, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "conv":
            return np.transpose(array, (2, 1, 0))
        if self.kind == "linear":
            return np.ascontiguousarray(array.T).reshape(flax_shape)
        return array.reshape(flax_shape)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
        if self.kind == "linear":
            n_in = math.prod(array.shape[:self.in_axes])
            return np.ascontiguousarray(array.reshape(n_in, -1).T)
        return array.reshape(self.torch_shape(array.shape))


@dataclasses.dataclass(frozen=True)
class Family:
    """What one encoder family adds to the shared conversion rules (module docstring).

    name: for messages. param_shapes(config): the Flax `params` tree (ShapeDtypeStructs).
    encoder_state(state_dict): the encoder's weights of a (task-model) state dict, keyed as
    the shared rule names them (prefixes stripped, old spellings mapped; keys outside the
    encoder dropped). overrides(config): {Flax path: TorchLeaf} where the rule does not
    apply.
    """

    name: str
    param_shapes: Callable[[Any], dict[str, Any]]
    encoder_state: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
    overrides: Callable[[Any], Mapping[ParamPath, TorchLeaf]] = lambda config: {}


# ----------------------------------------------------------------------------- the shared rule

_LEAF_NAMES = {
        "kernel": "weight", "scale": "weight", "embedding": "weight",
        "weight_g": "parametrizations.weight.original0",
        "weight_v": "parametrizations.weight.original1",
}
# Parameters that torch stores with unit axes: leaf name -> torch shape from the Flax shape.
_UNIT_AXES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
        "weight_g": lambda shape: (1, 1, *shape),
        "gru_rel_pos_const": lambda shape: (1, *shape, 1, 1),
}


def torch_key(path: ParamPath) -> str:
    """Flax param path -> state-dict key by the shared rule (module docstring)."""
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(conv_layers|layers)_(\d+)", p)
        parts.extend(m.groups() if m else [p])
    return ".".join([*parts, _LEAF_NAMES.get(path[-1], path[-1])])


def torch_leaf(path: ParamPath, flax_shape: tuple[int, ...]) -> TorchLeaf:
    """The shared rule for one parameter: its key and layout."""
    key, leaf = torch_key(path), path[-1]
    module = path[-2] if len(path) > 1 else ""
    if leaf == "weight_v" or (leaf == "kernel" and module.startswith("conv")):
        return TorchLeaf(key, "conv")
    if leaf == "kernel":
        return TorchLeaf(key, "linear", in_axes=2 if module == "out_proj" else 1)
    if leaf == "embedding":
        return TorchLeaf(key, "same")
    if leaf in _UNIT_AXES:
        return TorchLeaf(key, "reshape", shape=_UNIT_AXES[leaf](tuple(flax_shape)))
    return TorchLeaf(key)


def _flatten(tree: Mapping[str, Any]) -> dict[ParamPath, Any]:
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def torch_layout(config: Any, family: Family | None = None
                 ) -> dict[ParamPath, tuple[TorchLeaf, tuple[int, ...]]]:
    """{Flax path: (TorchLeaf, Flax shape)} for every parameter of the encoder of `config`."""
    family = family or family_of(config)
    overrides = family.overrides(config)
    out = {}
    for path, leaf in _flatten(family.param_shapes(config)).items():
        shape = tuple(leaf.shape)
        out[path] = (overrides.get(path) or torch_leaf(path, shape), shape)
    return out


def torch_shapes(config: Any, family: Family | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the encoder's torch state dict with its shape."""
    return {leaf.key: leaf.torch_shape(shape)
            for leaf, shape in torch_layout(config, family).values()}


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                     where: str = "checkpoint") -> None:
    """Raises ONE ValueError listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} != expected {expected[k]}"
                        for k in set(state) & set(expected)
                        if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{where} does not fit the encoder config:\n  " + "\n  ".join(problems))


def params_from_torch(state_dict: Mapping[str, Any], config: Any, *,
                      family: Family | None = None, where: str | None = None) -> dict[str, Any]:
    """The Flax `params` of the encoder of `config` from a torch state dict.

    The state dict may be the bare encoder's or a task model's (prefixes and keys outside
    the encoder are handled by the family's `encoder_state`). Missing or unexpected encoder
    keys and shape mismatches raise one ValueError listing all of them. Returns a nested
    dict of NumPy arrays in `config.param_dtype` (use as `model.apply({"params": params},
    ...)`).
    """
    family = family or family_of(config)
    state = family.encoder_state(state_dict)
    layout = torch_layout(config, family)
    check_state_dict(state, {leaf.key: leaf.torch_shape(shape)
                             for leaf, shape in layout.values()},
                     where or f"{family.name} state dict")
    dtype = jnp.dtype(config.param_dtype)
    params: dict[str, Any] = {}
    for path, (leaf, shape) in layout.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        array = leaf.from_torch(np.asarray(state[leaf.key]), shape)
        node[path[-1]] = np.ascontiguousarray(array.astype(dtype))
    return params


def params_to_torch(params: Mapping[str, Any], config: Any, *,
                    family: Family | None = None) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: the bare encoder's state dict (NumPy arrays), so
    that `load_state_dict({k: torch.from_numpy(v)}, strict=True)` works for the torch
    encoder of `config`. Accepts the `params` collection (boxed or not, or the variables
    dict holding it); entries that are not encoder parameters are left out, missing ones
    raise ValueError.
    """
    family = family or family_of(config)
    layout = torch_layout(config, family)
    params = jax.device_get(nn.meta.unbox(params))
    if "params" in params and not any(path[0] == "params" for path in layout):
        params = params["params"]
    flat = _flatten(params)
    out, missing = {}, []
    for path, (leaf, shape) in layout.items():
        if path not in flat:
            missing.append("/".join(path))
            continue
        array = np.asarray(flat[path])
        if array.shape != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {array.shape}, "
                             f"config says {shape}")
        out[leaf.key] = leaf.to_torch(array)
    if missing:
        raise ValueError(f"params lack these {family.name} encoder parameters: {missing}")
    return out


# ----------------------------------------------------------------------------- Whisper

# Prefixes under which the Whisper encoder sits in the task models (first match wins); keys
# outside them (decoder, proj_out, projector, classifier, layer_weights) are ignored.
_WHISPER_PREFIXES = ("model.encoder.", "encoder.")


def whisper_encoder_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Whisper encoder's weights with encoder-relative keys (task-model prefixes stripped).

    A checkpoint with no key under the prefixes is a bare WhisperEncoder: all keys are kept.
    """
    for prefix in _WHISPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


WHISPER = Family(
        name="whisper", param_shapes=whisper.param_shapes,
        encoder_state=whisper_encoder_state,
        overrides=lambda config: {("embed_positions",): TorchLeaf("embed_positions.weight",
                                                                  "same")})


# ----------------------------------------------------------------------------- wav2vec2 family

# The base model's attribute in the task models (HubertForCTC.hubert, ...).
_W2V_PREFIXES = ("hubert.", "wav2vec2.", "wavlm.", "data2vec_audio.")
_W2V_ROOTS = ("feature_extractor.", "feature_projection.", "encoder.")


def _weight_norm_from_plain(state: dict[str, np.ndarray]) -> None:
    """Splits a plain `pos_conv_embed.conv.weight` into (g, v) in place (norm over dims 0, 1)."""
    key = "encoder.pos_conv_embed.conv.weight"
    if key in state:
        w = np.asarray(state.pop(key))
        state[key.replace(".weight", ".parametrizations.weight.original1")] = w
        state[key.replace(".weight", ".parametrizations.weight.original0")] = np.sqrt(
                np.sum(w.astype(np.float64) ** 2, axis=(0, 1), keepdims=True)).astype(w.dtype)


def wav2vec2_encoder_state(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The encoder's weights of a HubertModel / Wav2Vec2Model / WavLMModel /
    Data2VecAudioModel (or *ForCTC, *ForSequenceClassification, ...) state dict.

    Keys may carry the model prefix (`hubert.`, `wav2vec2.`, ...); keys outside the encoder
    (lm_head, projector, classifier, quantizer, masked_spec_embed, ...) are dropped. Weight
    norm may be spelled `weight_g`/`weight_v`, `parametrizations.weight.original0/1` or be a
    plain `weight`.
    """
    state = {}
    for key, value in state_dict.items():
        for prefix in _W2V_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key)
        key = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)
        if key.startswith(_W2V_ROOTS):
            state[key] = np.asarray(value)
    _weight_norm_from_plain(state)
    return state


def _wav2vec2_overrides(config: Wav2Vec2Config) -> dict[ParamPath, TorchLeaf]:
    """WavLM's relative-position table sits in transformers' layer 0, in jaxser beside the
    layers (`jaxser.models.wavlm`)."""
    if config.family != "wavlm":
        return {}
    return {("encoder", "rel_attn_embed", "embedding"):
            TorchLeaf("encoder.layers.0.attention.rel_attn_embed.weight", "same")}


WAV2VEC2 = Family(name="wav2vec2-family", param_shapes=wav2vec2.param_shapes,
                  encoder_state=wav2vec2_encoder_state, overrides=_wav2vec2_overrides)


# ----------------------------------------------------------------------------- emotion2vec

# FunASR's / fairseq's key names are mapped in `emotion2vec.encoder_state`; the released files
# are read by `jaxser.models.emotion2vec_checkpoint`.
EMOTION2VEC = Family(name="emotion2vec", param_shapes=emotion2vec.param_shapes,
                     encoder_state=emotion2vec.encoder_state)


def family_of(config: Any) -> Family:
    """The conversion rules of an encoder config."""
    if isinstance(config, WhisperConfig):
        return WHISPER
    if isinstance(config, Wav2Vec2Config):
        return WAV2VEC2
    if isinstance(config, Emotion2vecConfig):
        return EMOTION2VEC
    raise TypeError(f"no torch conversion for {type(config).__name__}")
