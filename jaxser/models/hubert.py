"""Flax HuBERT / wav2vec2 speech encoder that matches transformers' PyTorch models.

One module covers both families and both layouts that Hugging Face ships:

* base models (`feat_extract_norm="group"`, `do_stable_layer_norm=False`): group norm on the
  first conv of the feature extractor only, post-LN transformer layers;
* large models (`feat_extract_norm="layer"`, `do_stable_layer_norm=True`): layer norm after
  every conv, pre-LN ("stable layer norm") transformer layers.

The encoder returns every hidden state (`EncoderOutput.hidden_states`, HF's
`output_hidden_states=True` order) and the valid-frame mask, so pooling and layer-weighting
heads can sit on top. Pretrained weights come from a PyTorch state dict through
`params_from_torch`; `params_to_torch` writes them back under HF's key names.

Padding and batch invariance
----------------------------
In the base models (HuBERT base, wav2vec2 base, `feat_extract_norm="group"`) the first conv
layer is followed by a GroupNorm with one group per channel, i.e. every channel is normalised
by its mean and variance over *all* time steps of the input. In a padded batch those statistics
include the padding, so an utterance's features change with the length of the longest
utterance in its batch. Hugging Face documents that these checkpoints must be fed without an
attention mask and with zero padding, which hides the problem but does not remove it: the
embedding of a short utterance still depends on how much padding it got. jaxser therefore
defaults to `masked_group_norm=True`: the group-norm statistics are computed over the valid
frames of each utterance only, and padded frames are set to zero after every conv layer, so an
utterance gives the same output (within float rounding) alone or inside any padded batch. With
`masked_group_norm=False` the encoder computes exactly what transformers computes (statistics
over the padded input), which is what the parity tests check. The large models
(`feat_extract_norm="layer"`) normalise each frame on its own and are padding-invariant either
way. After the feature extractor, padded frames are zeroed before the convolutional relative
position embedding (as in transformers) and masked out of attention, which keeps the rest of
the network padding-invariant too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from jaxser.models.attention import IMPLEMENTATIONS, dot_product_attention
from jaxser.models.layers import ACTIVATIONS as _ACTIVATIONS
from jaxser.models.layers import DenseGeneral, LayerNorm, partitioned, run_layers
from jaxser.models.outputs import EncoderOutput

_FAMILIES = ("hubert", "wav2vec2")
_HF_PREFIXES = {"hubert": "hubert.", "wav2vec2": "wav2vec2."}
_HF_ARCHITECTURES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}
_ENCODER_KEY_ROOTS = ("feature_extractor.", "feature_projection.", "encoder.")


# HF config fields copied one to one (tuples become lists in `to_hf`).
_HF_FIELDS = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout", "activation_dropout", "attention_dropout",
        "feat_proj_dropout", "layerdrop", "layer_norm_eps", "feat_extract_norm",
        "feat_extract_activation", "conv_dim", "conv_stride", "conv_kernel", "conv_bias",
        "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm",
        "feat_proj_layer_norm",
)
_TUPLE_FIELDS = ("conv_dim", "conv_stride", "conv_kernel")


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """Architecture of a HuBERT / wav2vec2 encoder (HF field names) plus jaxser options.

    The HF fields keep transformers' names and meaning so that `from_hf(config.json)` works.
    jaxser fields: `family` ("hubert" or "wav2vec2": only changes checkpoint key names and
    whether the feature-projection layer norm is optional), `dtype` (compute dtype, e.g.
    "bfloat16"), `param_dtype`, `remat` (rematerialise each transformer layer), `attention`
    (implementation for `dot_product_attention`: "auto", "einsum", "blockwise", "xla",
    "cudnn"), `pos_conv` (the positional convolution: "direct", "fft", or "auto": FFT on CPU,
    where XLA's 128-tap grouped convolution is >10x slower than PyTorch's, direct elsewhere)
    and `masked_group_norm` (see the module docstring: padding-invariant group norm).
    """

    family: str = "hubert"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    # jaxser options.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"
    pos_conv: str = "auto"
    masked_group_norm: bool = True

    def __post_init__(self):
        for name in _TUPLE_FIELDS:  # Lists (from JSON) become tuples so the config is hashable.
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides: Any) -> HubertConfig:
        """Builds a config from a HF `config.json` dict (or a transformers config object).

        Raises ValueError for model types other than hubert/wav2vec2, for HF features this
        encoder does not implement (adapters, batch-norm position conv) and for unknown
        override names.
        """
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        model_type = hf_config.get("model_type")
        if model_type not in _FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not one of {_FAMILIES}")
        if hf_config.get("conv_pos_batch_norm", False):
            raise ValueError("conv_pos_batch_norm=True is not supported")
        if hf_config.get("add_adapter", False):
            raise ValueError("add_adapter=True (wav2vec2 output adapter) is not supported")
        if hf_config.get("adapter_attn_dim") is not None:
            raise ValueError("adapter_attn_dim (MMS attention adapters) is not supported")
        defaults = cls(family=model_type)
        kwargs = {name: hf_config.get(name, getattr(defaults, name)) for name in _HF_FIELDS}
        kwargs["family"] = model_type
        if model_type == "wav2vec2":
            kwargs["feat_proj_layer_norm"] = True  # wav2vec2 always has it.
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown HubertConfig fields in overrides: {unknown}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of the matching HubertModel / Wav2Vec2Model.

        `mask_time_prob` and `mask_feature_prob` are 0: jaxser has no `masked_spec_embed`
        (augmentation lives elsewhere), so the exported model must not expect one.
        """
        out: dict[str, Any] = {
                "model_type": self.family,
                "architectures": [_HF_ARCHITECTURES[self.family]],
        }
        for name in _HF_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if name in _TUPLE_FIELDS else value
        if self.family == "wav2vec2":
            del out["feat_proj_layer_norm"]
        out["num_feat_extract_layers"] = len(self.conv_dim)
        out["mask_time_prob"] = 0.0
        out["mask_feature_prob"] = 0.0
        return out


def _validate(cfg: HubertConfig) -> None:
    """Raises ValueError naming the first inconsistent field of `cfg`."""
    if cfg.family not in _FAMILIES:
        raise ValueError(f"family {cfg.family!r} is not one of {_FAMILIES}")
    if cfg.feat_extract_norm not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm {cfg.feat_extract_norm!r} is not 'group' or 'layer'")
    if not len(cfg.conv_dim) == len(cfg.conv_stride) == len(cfg.conv_kernel) > 0:
        raise ValueError(
                f"conv_dim {cfg.conv_dim}, conv_stride {cfg.conv_stride} and conv_kernel "
                f"{cfg.conv_kernel} must have the same non-zero length")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}")
    if cfg.hidden_size % cfg.num_conv_pos_embedding_groups:
        raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {cfg.num_conv_pos_embedding_groups}")
    for name in ("hidden_act", "feat_extract_activation"):
        if getattr(cfg, name) not in _ACTIVATIONS:
            raise ValueError(f"{name} {getattr(cfg, name)!r} is not one of {sorted(_ACTIVATIONS)}")
    if cfg.family == "wav2vec2" and not cfg.feat_proj_layer_norm:
        raise ValueError("wav2vec2 always has the feature-projection layer norm")
    if cfg.attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention {cfg.attention!r} is not one of {IMPLEMENTATIONS}")
    if cfg.pos_conv not in ("auto", "direct", "fft"):
        raise ValueError(f"pos_conv {cfg.pos_conv!r} is not auto/direct/fft")
    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(cfg, name))
        except TypeError as e:
            raise ValueError(f"{name} {getattr(cfg, name)!r} is not a dtype") from e


def _size(family, hidden, layers, heads, mlp, norm, conv_bias, stable) -> HubertConfig:
    return HubertConfig(
            family=family, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=mlp, feat_extract_norm=norm,
            conv_bias=conv_bias, do_stable_layer_norm=stable)


# The published sizes (facebook/* checkpoints on the Hub), for random init and benchmarks.
HUBERT_SIZES: dict[str, HubertConfig] = {
        "hubert-base": _size("hubert", 768, 12, 12, 3072, "group", False, False),
        "hubert-large": _size("hubert", 1024, 24, 16, 4096, "layer", True, True),
        "hubert-xlarge": _size("hubert", 1280, 48, 16, 5120, "layer", True, True),
        "wav2vec2-base": _size("wav2vec2", 768, 12, 12, 3072, "group", False, False),
        "wav2vec2-large": _size("wav2vec2", 1024, 24, 16, 4096, "group", False, False),
        "wav2vec2-large-lv60": _size("wav2vec2", 1024, 24, 16, 4096, "layer", True, True),
        "wav2vec2-xls-r-300m": _size("wav2vec2", 1024, 24, 16, 4096, "layer", True, True),
}


# ----------------------------------------------------------------------------- lengths, masks


def feature_lengths(config: HubertConfig, lengths):
    """Frames the conv feature extractor makes from `lengths` samples (HF's formula).

    Works on Python ints, NumPy and JAX arrays (jittable). Lengths shorter than the receptive
    field give 0 or negative numbers, as in transformers.
    """
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        lengths = (lengths - kernel) // stride + 1
    return lengths


def frame_mask(config: HubertConfig, sample_lengths: jax.Array, num_frames: int) -> jax.Array:
    """[batch, num_frames] bool, True for the frames inside each utterance.

    Equals HF's `_get_feature_vector_attention_mask` (given the number of valid samples)
    except for utterances shorter than the receptive field (400 samples for the usual conv
    stack): HF's index arithmetic wraps around and marks *every* frame valid there, here no
    frame is valid.
    """
    frames = feature_lengths(config, jnp.asarray(sample_lengths))
    return jnp.arange(num_frames)[None, :] < frames[:, None]


def normalize_waveform(audio: jax.Array, lengths: jax.Array) -> jax.Array:
    """Zero mean, unit variance over each utterance's valid samples; padding set to 0.

    The same as `Wav2Vec2FeatureExtractor(do_normalize=True)` with its 1e-7 epsilon, but
    jittable and on device. audio: [batch, samples]; lengths: [batch] valid samples.
    """
    audio, lengths = jnp.asarray(audio, jnp.float32), jnp.asarray(lengths)
    valid = jnp.arange(audio.shape[1])[None, :] < lengths[:, None]  # [batch, samples]
    count = jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
    mean = jnp.sum(jnp.where(valid, audio, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, (audio - mean) ** 2, 0.0), axis=1, keepdims=True) / count
    return jnp.where(valid, (audio - mean) / jnp.sqrt(var + 1e-7), 0.0)


# ----------------------------------------------------------------------------- layers


def _layer_norm(cfg: HubertConfig, axis: str, eps: float, name: str) -> LayerNorm:
    """A LayerNorm as torch computes it (two-pass variance), params named by `axis`."""
    return LayerNorm(eps, axis, cfg.compute_dtype, jnp.dtype(cfg.param_dtype), name=name)


def _dense(cfg: HubertConfig, features, names, name: str, in_axes: int = 1) -> DenseGeneral:
    """A projection whose kernel has logical `names`: `in_axes` input axes, then features."""
    features = features if isinstance(features, tuple) else (features,)
    return DenseGeneral(features, kernel_axes=names, bias_axes=names[in_axes:],
                        dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                        name=name)


def _weighted_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum_t w[b, t] x[b, t, c] -> [b, 1, c], as a dot: XLA:CPU's YNNPACK fusions of a plain
    reduction over time with its elementwise neighbours made this norm's autodiff backward
    ~3x slower than the direct passes (docs/benchmarks.md); a dot stays a separate op."""
    return jnp.einsum("btc,bt->bc", x, w, precision="highest")[:, None]


@jax.custom_vjp
def _masked_instance_norm(x: jax.Array, w: jax.Array) -> jax.Array:
    """Per-channel normalisation over time (GroupNorm with groups == channels), float32.

    x: [batch, frames, channels] float32; w: [batch, frames] float32, 1 for the frames whose
    statistics count (0 for padding). Every frame is normalised with those statistics.
    """
    return _instance_norm_fwd(x, w)[0]


def _instance_norm_fwd(x, w):
    count = jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None, None]
    mean = _weighted_sum(x, w) / count
    centred = x - mean
    rstd = jax.lax.rsqrt(_weighted_sum(centred * centred, w) / count + 1e-5)
    y = centred * rstd
    return y, (y, rstd, w, count)


def _instance_norm_bwd(residuals, dy):
    # dx = rstd * (dy - w / n * (sum_t dy + y * sum_t dy * y)), sums over every frame (the
    # padded ones too: their outputs also depend on the statistics).
    y, rstd, w, count = residuals
    ones = jnp.ones_like(w)
    sum_dy, sum_dy_y = _weighted_sum(dy, ones), _weighted_sum(dy * y, ones)
    return rstd * (dy - w[:, :, None] * (sum_dy + y * sum_dy_y) / count), None


_masked_instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


class GroupNorm(nn.Module):
    """torch GroupNorm(num_groups=channels, eps=1e-5), optionally over valid frames only."""

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        # x: [batch, frames, channels]; valid: [batch, frames] or None
        cfg = self.config
        channels, pdtype = x.shape[-1], jnp.dtype(cfg.param_dtype)
        scale = self.param("scale", partitioned(nn.initializers.ones, ("channels",)),
                           (channels,), pdtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("channels",)),
                          (channels,), pdtype)
        x = x.astype(jnp.float32)
        w = jnp.ones(x.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
        x = _masked_instance_norm(x, w) * scale + bias
        return x.astype(cfg.compute_dtype)


class ConvLayer(nn.Module):
    """One conv of the feature extractor: conv -> (group | layer | no) norm -> activation."""

    config: HubertConfig
    layer_id: int

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        # x: [batch, time, in_channels] -> [batch, frames, channels]
        cfg, i = self.config, self.layer_id
        channels = cfg.conv_dim[i]
        x = nn.Conv(
                channels, kernel_size=(cfg.conv_kernel[i],), strides=(cfg.conv_stride[i],),
                padding="VALID", use_bias=cfg.conv_bias, dtype=cfg.compute_dtype,
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=partitioned(nn.initializers.he_normal(),
                                         ("conv_kernel", None, "channels")),
                bias_init=partitioned(nn.initializers.zeros, ("channels",)), name="conv")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "channels"))
        if cfg.feat_extract_norm == "layer":
            x = _layer_norm(cfg, "channels", 1e-5, "layer_norm")(x)
        elif i == 0:
            x = GroupNorm(cfg, name="layer_norm")(x, valid)
        # Padded frames are left as they are: a valid frame's receptive field never reaches
        # them (see `feature_lengths`), and zeroing them costs a pass over the largest arrays.
        return _ACTIVATIONS[cfg.feat_extract_activation](x)


class FeatureExtractor(nn.Module):
    """The strided conv stack from raw audio to frames (NWC layout)."""

    config: HubertConfig

    @nn.compact
    def __call__(self, audio: jax.Array, lengths: jax.Array | None) -> jax.Array:
        # audio: [batch, samples]; lengths: [batch] valid samples, or None when the group-norm
        # statistics should span the whole input (HF behaviour) -> [batch, frames, conv_dim]
        cfg = self.config
        x = audio.astype(cfg.compute_dtype)[:, :, None]
        for i, (kernel, stride) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride, strict=True)):
            valid = None
            if lengths is not None:
                lengths = (lengths - kernel) // stride + 1
                num_frames = (x.shape[1] - kernel) // stride + 1
                valid = jnp.arange(num_frames)[None, :] < lengths[:, None]
            x = ConvLayer(cfg, i, name=f"conv_layers_{i}")(x, valid)
        return x


class FeatureProjection(nn.Module):
    """(Layer norm) + dense from conv channels to the model width, then dropout."""

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        if cfg.feat_proj_layer_norm:
            x = _layer_norm(cfg, "channels", cfg.layer_norm_eps, "layer_norm")(x)
        x = _dense(cfg, cfg.hidden_size, ("channels", "embed"), "projection")(x)
        x = nn.Dropout(cfg.feat_proj_dropout)(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _grouped_conv_same_fft(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """Grouped cross-correlation over time with `len // 2` zero padding on both sides,
    computed through the FFT (float32).

    x: [batch, frames, channels]; kernel: [k, channels // groups, channels] (WIO, as
    `lax.conv_general_dilated(..., feature_group_count=groups)`) -> [batch, frames + 2 *
    (k // 2) - k + 1, channels]. The same numbers as the direct convolution within float32
    rounding, but XLA:CPU's direct convolution with a 128-tap grouped kernel is more than
    10x slower than this (and than PyTorch's), see docs/benchmarks.md.
    """
    batch, frames, channels = x.shape
    k = kernel.shape[0]
    per_group = channels // groups
    pad = k // 2
    out_frames = frames + 2 * pad - k + 1
    n = scipy.fft.next_fast_len(frames + k - 1, real=True)  # linear, not circular
    xf = jnp.fft.rfft(x.astype(jnp.float32).reshape(batch, frames, groups, per_group),
                      n=n, axis=1)  # [B, F, G, in]
    # Reversed taps turn the correlation into a convolution.
    wf = jnp.fft.rfft(kernel[::-1].astype(jnp.float32).reshape(k, per_group, groups, per_group),
                      n=n, axis=0)  # [F, in, G, out]
    y = jnp.fft.irfft(jnp.einsum("bfgi,figo->bfgo", xf, wf), n=n, axis=1)
    start = k - 1 - pad
    return y[:, start:start + out_frames].reshape(batch, out_frames, channels)


class WeightNormConv(nn.Module):
    """Grouped 'same' conv over time with torch's weight norm (dim=2), NWC layout.

    `weight_v` [kernel, hidden/groups, hidden] and `weight_g` [kernel] are torch's weight-norm
    parametrisation with dim=2: the kernel is v * g / ||v||, the norm taken per kernel tap
    over both channel axes, so the parameters export back to torch unchanged.
    """

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames + 1 - kernel % 2, embed]
        cfg = self.config
        k, groups = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        dim, pdtype = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        std = 2.0 * math.sqrt(1.0 / (k * dim))  # HF's init of the conv weight.
        v = self.param("weight_v", partitioned(nn.initializers.normal(std),
                       ("conv_kernel", None, "embed")), (k, dim // groups, dim), pdtype)
        g_init = std * math.sqrt(dim * dim // groups)  # ~ ||v||: the kernel starts near v.
        g = self.param("weight_g", partitioned(nn.initializers.constant(g_init),
                       ("conv_kernel",)), (k,), pdtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (dim,), pdtype)
        v32 = v.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(v32 * v32, axis=(1, 2), keepdims=True))  # [k, 1, 1]
        kernel = v32 * (g.astype(jnp.float32)[:, None, None] / norm)
        method = cfg.pos_conv
        if method == "auto":
            method = "fft" if jax.default_backend() == "cpu" else "direct"
        if method == "fft":
            y = _grouped_conv_same_fft(x, kernel, groups).astype(cfg.compute_dtype)
        else:
            y = jax.lax.conv_general_dilated(
                    x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                    window_strides=(1,), padding=[(k // 2, k // 2)],
                    dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
        return y + bias.astype(cfg.compute_dtype)


class PositionalConvEmbedding(nn.Module):
    """The convolutional relative position embedding: weight-norm conv, same-pad, activation."""

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames, embed]
        cfg = self.config
        y = WeightNormConv(cfg, name="conv")(x)
        if cfg.num_conv_pos_embeddings % 2 == 0:  # HF's SamePadLayer: one frame too many.
            y = y[:, :-1]
        return _ACTIVATIONS[cfg.feat_extract_activation](y)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v as DenseGeneral to [heads, head_dim]."""

    config: HubertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        # x: [batch, frames, embed]; mask: [batch, frames] valid keys or None
        cfg = self.config
        heads = (cfg.num_attention_heads, cfg.head_dim)
        q = _dense(cfg, heads, ("embed", "heads", "kv"), "q_proj")(x)
        k = _dense(cfg, heads, ("embed", "heads", "kv"), "k_proj")(x)
        v = _dense(cfg, heads, ("embed", "heads", "kv"), "v_proj")(x)
        if self.deterministic or cfg.attention_dropout == 0.0:
            out = dot_product_attention(q, k, v, mask, cfg.attention)  # [batch, frames, H, D]
        else:
            out = self._dropout_attention(q, k, v, mask)
        return _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "out_proj",
                      in_axes=2)(out)

    def _dropout_attention(self, q, k, v, mask):
        """Einsum attention with dropout on the weights (training only, as in HF)."""
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        weights = nn.Dropout(self.config.attention_dropout)(weights, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class FeedForward(nn.Module):
    """Dense -> activation -> dropout -> dense -> dropout."""

    config: HubertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate_dense")(x)
        x = _ACTIVATIONS[cfg.hidden_act](x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = nn.Dropout(cfg.activation_dropout)(x, deterministic=self.deterministic)
        x = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output_dense")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
    """One transformer layer, post-LN (base) or pre-LN (`do_stable_layer_norm`).

    In training, LayerDrop skips the whole layer with probability `layerdrop`.
    """

    config: HubertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        y = self._layer(x, mask)
        if not self.deterministic and self.config.layerdrop > 0.0:
            skip = jax.random.uniform(self.make_rng("dropout")) < self.config.layerdrop
            y = jnp.where(skip, x, y)
        return y

    def _layer(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        attention = Attention(cfg, self.deterministic, name="attention")
        feed_forward = FeedForward(cfg, self.deterministic, name="feed_forward")
        layer_norm = _layer_norm(cfg, "embed", cfg.layer_norm_eps, "layer_norm")
        final_layer_norm = _layer_norm(cfg, "embed", cfg.layer_norm_eps, "final_layer_norm")
        dropout = nn.Dropout(cfg.hidden_dropout)
        if cfg.do_stable_layer_norm:
            h = dropout(attention(layer_norm(x), mask), deterministic=self.deterministic)
            x = x + h
            x = x + feed_forward(final_layer_norm(x))
        else:
            h = dropout(attention(x, mask), deterministic=self.deterministic)
            x = layer_norm(x + h)
            x = final_layer_norm(x + feed_forward(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TransformerEncoder(nn.Module):
    """Position conv + the layer stack; returns every hidden state in HF's order."""

    config: HubertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 deterministic: bool) -> tuple[jax.Array, ...]:
        # x: [batch, frames, embed]; mask: [batch, frames] or None (no padding)
        cfg = self.config
        if mask is not None:  # HF zeroes padded frames before the position conv.
            x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
        x = x + PositionalConvEmbedding(cfg, name="pos_conv_embed")(x)
        layer_norm = _layer_norm(cfg, "embed", cfg.layer_norm_eps, "layer_norm")
        if not cfg.do_stable_layer_norm:
            x = layer_norm(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        rates = (cfg.hidden_dropout, cfg.activation_dropout, cfg.attention_dropout, cfg.layerdrop)
        hidden_states = run_layers(self, functools.partial(EncoderLayer, cfg, deterministic),
                                   cfg.num_hidden_layers, x, mask, remat=cfg.remat,
                                   dropout=not deterministic and max(rates) > 0.0)
        if cfg.do_stable_layer_norm:
            hidden_states[-1] = layer_norm(hidden_states[-1])
        return tuple(hidden_states)


class HubertEncoder(nn.Module):
    """HuBERT / wav2vec2 encoder: raw 16 kHz audio -> every hidden state + frame mask.

    `__call__(audio [batch, samples], audio_mask [batch, samples] bool | None)` returns
    `EncoderOutput(hidden_states, mask)`: `num_hidden_layers + 1` arrays [batch, frames,
    hidden] in HF's `output_hidden_states` order, the last one equal to HF's
    `last_hidden_state` (for pre-LN models that is the output of the final layer norm, as in
    transformers 4.x; transformers 5 leaves the norm off `hidden_states[-1]` only), and
    `mask` [batch, frames] bool (valid frames). Without `audio_mask` every sample is valid.
    Dropout and LayerDrop run only when `deterministic=False` (rng collection 'dropout').
    Input normalisation (`normalize_waveform`) is the caller's job, as with HF's feature
    extractor.
    """

    config: HubertConfig

    @nn.compact
    def __call__(self, audio: jax.Array, audio_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> EncoderOutput:
        cfg = self.config
        if audio.ndim != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
        lengths = None
        if audio_mask is not None:
            if audio_mask.shape != audio.shape:
                raise ValueError(
                        f"audio_mask shape {audio_mask.shape} != audio shape {audio.shape}")
            lengths = jnp.sum(audio_mask.astype(jnp.int32), axis=-1)
        features = FeatureExtractor(cfg, name="feature_extractor")(
                audio, lengths if cfg.masked_group_norm else None)  # [batch, frames, conv_dim]
        batch, num_frames = features.shape[:2]
        if lengths is None:
            mask = jnp.ones((batch, num_frames), bool)
        else:
            mask = frame_mask(cfg, lengths, num_frames)
        x = FeatureProjection(cfg, name="feature_projection")(features, deterministic)
        hidden_states = TransformerEncoder(cfg, name="encoder")(
                x, None if lengths is None else mask, deterministic)
        return EncoderOutput(hidden_states=hidden_states, mask=mask)


# ----------------------------------------------------------------------------- conversion


def min_samples(config: HubertConfig) -> int:
    """The fewest samples that give one frame (the conv stack's receptive field)."""
    n = 1
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride),
                              strict=True):
        n = (n - 1) * stride + kernel
    return n


def param_shapes(config: HubertConfig) -> dict[str, Any]:
    """The (unboxed) parameter tree of `HubertEncoder(config)` as ShapeDtypeStructs."""
    model = HubertEncoder(config)
    audio = jax.ShapeDtypeStruct((1, min_samples(config)), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), audio)
    return nn.meta.unbox(variables)["params"]


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> HubertModel/Wav2Vec2Model state-dict key."""
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(conv_layers|layers)_(\d+)", p)
        parts.extend(m.groups() if m else [p])
    leaf = path[-1]
    leaf = {
            "kernel": "weight", "scale": "weight",
            "weight_g": "parametrizations.weight.original0",
            "weight_v": "parametrizations.weight.original1",
    }.get(leaf, leaf)
    return ".".join([*parts, leaf])


def _leaf_kind(path: tuple[str, ...]) -> str:
    """How a param is laid out in torch: conv, linear (1 or 2 input axes), g or vector."""
    leaf = path[-1]
    if leaf == "weight_v" or (leaf == "kernel" and path[0] == "feature_extractor"):
        return "conv"
    if leaf == "weight_g":
        return "g"
    if leaf == "kernel":
        return "linear2" if path[-2] == "out_proj" else "linear1"
    return "vector"


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":  # flax [k, in, out] -> torch [out, in, k]
        return tuple(reversed(shape))
    if kind == "g":
        return (1, 1, shape[0])
    if kind.startswith("linear"):
        n_in = int(kind[-1])
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return (math.prod(shape),)


def _from_torch(kind: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":
        return np.transpose(array, (2, 1, 0))
    if kind.startswith("linear"):
        return np.ascontiguousarray(array.T).reshape(shape)
    return array.reshape(shape)


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    if kind.startswith("linear"):
        n_in = int(kind[-1])
        shape = array.shape
        return np.ascontiguousarray(
                array.reshape(math.prod(shape[:n_in]), math.prod(shape[n_in:])).T)
    return array.reshape(_torch_shape(kind, array.shape))


def _canonical_key(key: str) -> str:
    """Strips the model prefix and maps old weight-norm names to the parametrization ones."""
    for prefix in _HF_PREFIXES.values():
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key)
    return re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)


def _weight_norm_from_plain(state: dict[str, np.ndarray]) -> None:
    """Splits a plain `pos_conv_embed.conv.weight` into (g, v) in place (norm over dims 0, 1)."""
    key = "encoder.pos_conv_embed.conv.weight"
    if key in state:
        w = np.asarray(state.pop(key))
        state[key.replace(".weight", ".parametrizations.weight.original1")] = w
        state[key.replace(".weight", ".parametrizations.weight.original0")] = np.sqrt(
                np.sum(w.astype(np.float64) ** 2, axis=(0, 1), keepdims=True)).astype(w.dtype)


def params_from_torch(state_dict: Mapping[str, Any], config: HubertConfig) -> dict[str, Any]:
    """Converts a HubertModel/Wav2Vec2Model (or *ForCTC, *ForSequenceClassification, ...)
    state dict to the `params` collection of `HubertEncoder(config)`.

    Keys may carry the `hubert.` / `wav2vec2.` prefix; keys outside the encoder (lm_head,
    projector, classifier, quantizer, masked_spec_embed, ...) are ignored. Weight norm may be
    spelled `weight_g`/`weight_v`, `parametrizations.weight.original0/1` or be a plain
    `weight`. Missing or unexpected encoder keys and shape mismatches raise one ValueError
    listing all of them. Returns a nested dict of NumPy arrays in `config.param_dtype`
    (use as `model.apply({"params": params}, ...)`).
    """
    state = {}
    for key, value in state_dict.items():
        key = _canonical_key(key)
        if key.startswith(_ENCODER_KEY_ROOTS):
            state[key] = np.asarray(value)
    _weight_norm_from_plain(state)
    dtype = jnp.dtype(config.param_dtype)
    flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf
            in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}
    params: dict[str, Any] = {}
    missing, mismatched, used = [], [], set()
    for path, leaf in flat.items():
        key, kind = _torch_key(path), _leaf_kind(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        expected = _torch_shape(kind, leaf.shape)
        if tuple(state[key].shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)}, expected {expected}")
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _from_torch(kind, state[key], leaf.shape).astype(dtype)
    unexpected = sorted(set(state) - used)
    if missing or unexpected or mismatched:
        raise ValueError(
                "state dict does not match HubertEncoder "
                f"({config.family}, feat_extract_norm={config.feat_extract_norm}, "
                f"layers={config.num_hidden_layers}):\n"
                f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
                f"  shape mismatches: {mismatched}")
    return params


def params_to_torch(params: Mapping[str, Any], config: HubertConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: HubertModel/Wav2Vec2Model state-dict keys (no
    model prefix, weight norm as `parametrizations.weight.original0/1`) to NumPy arrays, so
    that `model.load_state_dict({k: torch.from_numpy(v)}, strict=True)` works for a model
    built from `config.to_hf()`. Accepts the `params` collection (boxed or not); entries
    that are not encoder parameters of `config` are left out, missing ones raise ValueError.
    """
    params = nn.meta.unbox(params)
    if "params" in params and "encoder" not in params:
        params = params["params"]
    flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf
            in jax.tree_util.tree_flatten_with_path(params)[0]}
    out, missing = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        path = tuple(str(getattr(k, "key", k)) for k in path)
        if path not in flat:
            missing.append("/".join(path))
            continue
        array = np.asarray(jax.device_get(flat[path]))
        if array.shape != leaf.shape:
            raise ValueError(f"param {'/'.join(path)} has shape {array.shape}, "
                             f"config says {leaf.shape}")
        out[_torch_key(path)] = _to_torch(_leaf_kind(path), array)
    if missing:
        raise ValueError(f"params lack these HubertEncoder parameters: {missing}")
    return out
