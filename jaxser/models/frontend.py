"""The wav2vec2-family front end: raw 16 kHz audio to frames at the model width.

Shared by every encoder of the family (HuBERT, wav2vec2, and the ones built on them):
`normalize_waveform` (the feature extractor's input normalisation, on device), the strided
conv stack (`FeatureExtractor`, group-norm or layer-norm variant), the projection to the
model width (`FeatureProjection`) and the convolutional relative position embeddings
(`PositionalConvEmbedding`, one weight-norm grouped conv; `PositionalConvStack`,
data2vec-audio's stack of grouped convs with affine-free layer norms, which emotion2vec's
positional encoder also is). Each module reads only the
config fields it needs (listed in its docstring), so an encoder with its own config class
can reuse it as long as the names match.

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
frames of each utterance only (a valid frame's receptive field never reaches the padding), so
an utterance gives the same output (within float rounding) alone or inside any padded batch. With
`masked_group_norm=False` the encoder computes exactly what transformers computes (statistics
over the padded input), which is what the parity tests check. The large models
(`feat_extract_norm="layer"`) normalise each frame on its own and are padding-invariant either
way. After the feature extractor, padded frames are zeroed before the convolutional relative
position embedding (as in transformers) and masked out of attention, which keeps the rest of
the network padding-invariant too. data2vec-audio's positional stack would let padding
into the valid frames from its second convolution on (transformers zeroes the padded
frames only before the first): with `masked_pos_conv=True` (the default) they are zeroed
before every convolution, which makes it padding-invariant; False computes what
transformers computes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import scipy.fft

from jaxser.models.layers import ACTIVATIONS, Modules, partitioned
from jaxser.models.wav2vec2_config import Wav2Vec2Config

log = logging.getLogger(__name__)


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
    """torch GroupNorm(num_groups=channels, eps=1e-5), optionally over valid frames only.

    Reads `dtype`, `param_dtype` of the config."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        # x: [batch, frames, channels]; valid: [batch, frames] or None
        mk = Modules.of(self.config)
        channels = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("channels",)),
                           (channels,), mk.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("channels",)),
                          (channels,), mk.param_dtype)
        x = x.astype(jnp.float32)
        w = jnp.ones(x.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
        x = _masked_instance_norm(x, w) * scale + bias
        return x.astype(mk.dtype)


class ConvLayer(nn.Module):
    """One conv of the feature extractor: conv -> (group | layer | no) norm -> activation.

    Reads `conv_dim`, `conv_kernel`, `conv_stride`, `conv_bias`, `feat_extract_norm`
    ("group": group norm after the first conv only; "layer": layer norm after every conv),
    `feat_extract_activation`, `dtype`, `param_dtype`, `layer_norm_eps`.
    """

    config: Wav2Vec2Config
    layer_id: int

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
        # x: [batch, time, in_channels] -> [batch, frames, channels]
        cfg, i = self.config, self.layer_id
        mk = Modules.of(cfg)
        x = mk.conv(cfg.conv_dim[i], cfg.conv_kernel[i], "conv", stride=cfg.conv_stride[i],
                    use_bias=cfg.conv_bias, kernel_axes=("conv_kernel", None, "channels"),
                    kernel_init=nn.initializers.he_normal())(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "channels"))
        if cfg.feat_extract_norm == "layer":
            x = mk.layer_norm("layer_norm", "channels", eps=1e-5)(x)
        elif i == 0:
            x = GroupNorm(cfg, name="layer_norm")(x, valid)
        # Padded frames are left as they are: a valid frame's receptive field never reaches
        # them (see `feature_lengths`), and zeroing them costs a pass over the largest arrays.
        return ACTIVATIONS[cfg.feat_extract_activation](x)


class FeatureExtractor(nn.Module):
    """The strided conv stack from raw audio to frames (NWC layout); see `ConvLayer`."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, audio: jax.Array, lengths: jax.Array | None) -> jax.Array:
        # audio: [batch, samples]; lengths: [batch] valid samples, or None when the group-norm
        # statistics should span the whole input (HF behaviour) -> [batch, frames, conv_dim]
        cfg = self.config
        x = audio.astype(Modules.of(cfg).dtype)[:, :, None]
        for i, (kernel, stride) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride, strict=True)):
            valid = None
            if lengths is not None:
                lengths = (lengths - kernel) // stride + 1
                num_frames = (x.shape[1] - kernel) // stride + 1
                valid = jnp.arange(num_frames)[None, :] < lengths[:, None]
            x = ConvLayer(cfg, i, name=f"conv_layers_{i}")(x, valid)
        return x


class FeatureProjection(nn.Module):
    """(Layer norm) + dense from conv channels to the model width, then dropout.

    Reads `feat_proj_layer_norm`, `hidden_size`, `feat_proj_dropout`, `dtype`,
    `param_dtype`, `layer_norm_eps`.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        # x: [batch, frames, conv_dim[-1]] -> [batch, frames, hidden]
        cfg = self.config
        mk = Modules.of(cfg)
        if cfg.feat_proj_layer_norm:
            x = mk.layer_norm("layer_norm", "channels")(x)
        x = mk.dense(cfg.hidden_size, ("channels", "embed"), "projection")(x)
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


def _grouped_conv_same(x: jax.Array, kernel: jax.Array, groups: int, method: str,
                       dtype: Any) -> jax.Array:
    """Grouped conv over time, `k // 2` zero padding on both sides ([B, T, C] -> [B, T + 1
    - k % 2, C]); `method` "fft" (float32, see `_grouped_conv_same_fft`), "direct" or
    "auto" (FFT on CPU)."""
    if method == "auto":
        method = "fft" if jax.default_backend() == "cpu" else "direct"
    if method == "fft":
        return _grouped_conv_same_fft(x, kernel, groups).astype(dtype)
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), window_strides=(1,),
            padding=[(k // 2, k // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=groups)


class WeightNormConv(nn.Module):
    """Grouped 'same' conv over time with torch's weight norm (dim=2), NWC layout.

    `weight_v` [kernel, hidden/groups, hidden] and `weight_g` [kernel] are torch's weight-norm
    parametrisation with dim=2: the kernel is v * g / ||v||, the norm taken per kernel tap
    over both channel axes, so the parameters export back to torch unchanged. Reads
    `num_conv_pos_embeddings` (the kernel size), `num_conv_pos_embedding_groups`,
    `hidden_size`, `pos_conv` ("auto", "fft", "direct"), `dtype`, `param_dtype`.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames + 1 - kernel % 2, embed]
        cfg = self.config
        mk = Modules.of(cfg)
        k, groups = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        dim, pdtype = cfg.hidden_size, mk.param_dtype
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
        y = _grouped_conv_same(x, kernel, groups, cfg.pos_conv, mk.dtype)
        return y + bias.astype(mk.dtype)


class PositionalConvEmbedding(nn.Module):
    """The convolutional relative position embedding: weight-norm conv, same-pad, activation
    (`feat_extract_activation`); see `WeightNormConv` for the fields it reads."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames, embed]
        cfg = self.config
        y = WeightNormConv(cfg, name="conv")(x)
        if cfg.num_conv_pos_embeddings % 2 == 0:  # HF's SamePadLayer: one frame too many.
            y = y[:, :-1]
        return ACTIVATIONS[cfg.feat_extract_activation](y)


class PositionalConvStack(nn.Module):
    """data2vec-audio's positional embedding: `num_conv_pos_embeddings` layers of grouped
    'same' conv (width `conv_pos_kernel_size`, `num_conv_pos_embedding_groups` groups, with
    bias), same-pad, affine-free layer norm, activation (`feat_extract_activation`).

    Params `layers_{j}/conv/{kernel, bias}` (HF `layers.{j}.conv`). Also reads
    `hidden_size`, `pos_conv`, `masked_pos_conv` (module docstring), `dtype`, `param_dtype`.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        # x: [batch, frames, embed] (padded frames zeroed); mask: [batch, frames] or None
        cfg = self.config
        for j in range(cfg.num_conv_pos_embeddings):
            if j and mask is not None and cfg.masked_pos_conv:
                x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
            x = _PositionalConvLayer(cfg, name=f"layers_{j}")(x)
        return x


class _PositionalConvLayer(nn.Module):
    """One layer of `PositionalConvStack`."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames, embed]
        cfg = self.config
        mk = Modules.of(cfg)
        k, groups = cfg.conv_pos_kernel_size, cfg.num_conv_pos_embedding_groups
        kernel, bias = _ConvParams(k, cfg.hidden_size // groups, cfg.hidden_size,
                                   mk.param_dtype, name="conv")()
        y = _grouped_conv_same(x, kernel, groups, cfg.pos_conv, mk.dtype) + bias.astype(mk.dtype)
        if k % 2 == 0:  # HF's SamePadLayer: one frame too many.
            y = y[:, :-1]
        y = mk.layer_norm("layer_norm", affine=False, eps=1e-5)(y)
        return ACTIVATIONS[cfg.feat_extract_activation](y)


class _ConvParams(nn.Module):
    """A conv's parameters, for convolutions computed by hand: kernel [k, in, out] (He
    init, as torch's Conv1d in transformers) and bias [out] (zeros)."""

    kernel_size: int
    in_features: int
    features: int
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", partitioned(nn.initializers.he_normal(),
                            ("conv_kernel", None, "embed")),
                            (self.kernel_size, self.in_features, self.features), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)),
                          (self.features,), self.param_dtype)
        return kernel, bias
