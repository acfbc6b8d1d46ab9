"""emotion2vec / emotion2vec+ in Flax: FunASR's `Emotion2vec` (a data2vec 2.0 audio model).

`Emotion2vecEncoder(config)`: raw 16 kHz audio -> every hidden state + the frame mask, as
every jaxser encoder. The architecture (Ma et al. 2023, arXiv 2312.15185; FunASR
`funasr/models/emotion2vec`):

* the wav2vec2 conv feature extractor (`jaxser.models.frontend.FeatureExtractor`, layer-norm
  variant in the released checkpoints), LayerNorm + Linear to the model width;
* data2vec 2.0's convolutional positional encoder: `conv_pos_layers` x (grouped conv,
  LayerNorm without parameters, GELU), added to its input;
* `num_extra_tokens` learned tokens in front of the frames, then the modality-specific
  blocks (`prenet`, FunASR's `context_encoder`, with its LayerNorm first) and the shared
  blocks (`encoder`), post-LN transformer blocks whose attention adds an ALiBi bias
  (-|i - j| * slope per head, times a learned per-head scale; zero for the extra tokens).

`hidden_states` = (the embedding after the prenet's LayerNorm, each prenet block's output,
each shared block's output), the extra tokens cut off: `num_prenet_layers +
num_hidden_layers + 1` arrays [batch, frames, hidden]. The last one is FunASR's
`extract_features(...)["x"]`; emotion2vec+'s 9-class head (`proj`) reads its mean over time
(`jaxser.models.emotion2vec_checkpoint` turns it into the SER model's emotion head).

Padding invariance: FunASR runs one utterance at a time. Here the waveform normalisation
(`input_features`: zero mean, unit variance, eps 1e-5, over the valid samples), the
feature extractor's group norm if any (masked, see `jaxser.models.frontend`), the
positional convolutions (padded frames zeroed before each) and attention (padded keys
masked) see only the valid part of each row, so an utterance gives the same output alone or
in any padded batch (tests/test_emotion2vec.py checks both against FunASR's modules).

Conversion from the released checkpoints: `encoder_state` (FunASR/fairseq keys -> this
tree) for `jaxser.models.convert`; folders and files in `jaxser.models.emotion2vec_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxser.models.attention import dot_product_attention
from jaxser.models.frontend import FeatureExtractor, _grouped_conv_same_fft
from jaxser.models.layers import ACTIVATIONS, Modules, gelu, partitioned, run_layers
from jaxser.models.outputs import EncoderOutput
from jaxser.models.wav2vec2_config import (  # the same conv stack (re-exported)
    feature_lengths,
    min_samples,
    validate_conv_stack,
    validate_runtime,
)

log = logging.getLogger(__name__)

_TUPLE_FIELDS = ("conv_dim", "conv_stride", "conv_kernel")


@dataclasses.dataclass(frozen=True)
class Emotion2vecConfig:
    """Architecture of an emotion2vec encoder plus jaxser options.

    Width and depth: `hidden_size`, `num_attention_heads`, `intermediate_size` (mlp_ratio x
    width), `num_prenet_layers` (FunASR's `modalities.audio.prenet_depth`) and
    `num_hidden_layers` (`depth`, the shared blocks), `layer_norm_eps` (`norm_eps`).
    Front end (wav2vec2 names, read by `jaxser.models.frontend.FeatureExtractor`):
    `conv_dim`, `conv_kernel`, `conv_stride` (`feature_encoder_spec`), `conv_bias`,
    `feat_extract_norm` ("layer": FunASR's extractor_mode "layer_norm"; "group": "default"),
    `feat_extract_activation`. Positional encoder: `conv_pos_layers` (`conv_pos_depth`),
    `conv_pos_kernel` (max(3, conv_pos_width // conv_pos_depth)), `conv_pos_groups`,
    `conv_pos_pre_ln`. `num_extra_tokens`; ALiBi: `alibi` (`use_alibi_encoder`),
    `alibi_scale_per_layer`, `alibi_scale_per_head`, `num_alibi_heads` (0: every head).
    `normalize`: the waveform is normalised (per utterance) before the encoder.
    Dropout as FunASR names it: `hidden_dropout` (encoder_dropout, after attention's output
    projection), `attention_dropout`, `activation_dropout` (inside the MLP),
    `post_mlp_dropout`, `prenet_dropout` (after the prenet's LayerNorm), `input_dropout`
    (dropout_input, before the shared blocks), `layerdrop`, `prenet_layerdrop`.
    jaxser options: `dtype`, `param_dtype`, `remat`, `attention` (an implementation of
    `jaxser.models.attention.dot_product_attention`, each with the ALiBi bias), `pos_conv`
    ("auto": FFT on CPU, "fft", "direct") and `masked_group_norm` (only for
    feat_extract_norm="group").
    """

    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_prenet_layers: int = 4
    num_hidden_layers: int = 8
    layer_norm_eps: float = 1e-5
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "layer"
    feat_extract_activation: str = "gelu"
    conv_pos_layers: int = 5
    conv_pos_kernel: int = 19
    conv_pos_groups: int = 16
    conv_pos_pre_ln: bool = False
    num_extra_tokens: int = 10
    alibi: bool = True
    alibi_scale_per_layer: bool = False
    alibi_scale_per_head: bool = True
    num_alibi_heads: int = 0
    normalize: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    post_mlp_dropout: float = 0.1
    prenet_dropout: float = 0.1
    input_dropout: float = 0.0
    layerdrop: float = 0.05
    prenet_layerdrop: float = 0.0
    # jaxser options.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"
    pos_conv: str = "auto"
    masked_group_norm: bool = True

    def __post_init__(self):
        for name in _TUPLE_FIELDS:  # Lists (from JSON/YAML) become tuples: hashable config.
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def alibi_heads(self) -> int:
        return self.num_alibi_heads or self.num_attention_heads

    @property
    def num_layers(self) -> int:
        """All transformer blocks: prenet + shared."""
        return self.num_prenet_layers + self.num_hidden_layers


def _validate(cfg: Emotion2vecConfig) -> None:
    """Raises ValueError naming the first inconsistent field of `cfg`."""
    validate_conv_stack(cfg)
    for name, divisor in (("num_attention_heads", cfg.num_attention_heads),
                          ("conv_pos_groups", cfg.conv_pos_groups)):
        if divisor < 1 or cfg.hidden_size % divisor:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {name} "
                             f"{divisor}")
    if not 0 <= cfg.num_alibi_heads <= cfg.num_attention_heads:
        raise ValueError(f"num_alibi_heads {cfg.num_alibi_heads} not in [0, "
                         f"{cfg.num_attention_heads}]")
    if cfg.feat_extract_activation not in ACTIVATIONS:
        raise ValueError(f"feat_extract_activation {cfg.feat_extract_activation!r} is not one "
                         f"of {sorted(ACTIVATIONS)}")
    validate_runtime(cfg)


# The released sizes, for random init and benchmarks; a checkpoint's own config wins on import.
# base: emotion2vec_base, emotion2vec_plus_seed / _base (~94M); large: emotion2vec_plus_large
# (~300M, data2vec 2.0 large: 8 prenet + 16 shared blocks at 1024).
EMOTION2VEC_SIZES: dict[str, Emotion2vecConfig] = {
        "base": Emotion2vecConfig(),
        "large": Emotion2vecConfig(hidden_size=1024, num_attention_heads=16,
                                   intermediate_size=4096, num_prenet_layers=8,
                                   num_hidden_layers=16),
}


# ----------------------------------------------------------------------------- lengths, input


def input_features(config: Emotion2vecConfig, audio: jax.Array,
                   lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encoder input, sample mask) from waveforms [batch, samples] and valid `lengths`.

    With `config.normalize` (the released models) each row becomes FunASR's
    `F.layer_norm(wav, wav.shape)`: zero mean, unit (biased) variance, eps 1e-5, over its
    valid samples only; padding is set to zero either way.
    """
    audio, lengths = jnp.asarray(audio, jnp.float32), jnp.asarray(lengths)
    valid = jnp.arange(audio.shape[1])[None, :] < lengths[:, None]  # [batch, samples]
    if not config.normalize:
        return jnp.where(valid, audio, 0.0), valid
    count = jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
    mean = jnp.sum(jnp.where(valid, audio, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, (audio - mean) ** 2, 0.0), axis=1, keepdims=True) / count
    return jnp.where(valid, (audio - mean) * jax.lax.rsqrt(var + 1e-5), 0.0), valid


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al.; fairseq's `get_slopes`, any head count)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return np.asarray(power_of_2(heads), np.float32)
    closest = 2 ** math.floor(math.log2(heads))
    extra = alibi_slopes(2 * closest)[0::2][:heads - closest]
    return np.concatenate([np.asarray(power_of_2(closest), np.float32), extra])


def alibi_bias(config: Emotion2vecConfig, num_frames: int) -> jax.Array:
    """[alibi_heads, E + T, E + T] float32: -|i - j| * slope between frames, 0 for the
    `num_extra_tokens` (E) tokens in front (FunASR pads the bias with zeros for them)."""
    pos = jnp.arange(num_frames, dtype=jnp.float32)
    distance = -jnp.abs(pos[None, :] - pos[:, None])  # [T, T]
    bias = jnp.asarray(alibi_slopes(config.alibi_heads))[:, None, None] * distance
    e = config.num_extra_tokens
    return jnp.pad(bias, ((0, 0), (e, 0), (e, 0)))


# ----------------------------------------------------------------------------- layers


def _plain_layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis without scale and bias (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _scaled_bias(bias: jax.Array, scale: jax.Array, heads: int) -> jax.Array:
    """bias [Ha, S, S] times the clamped learned scale ([Ha] or [1]), zero-padded to
    `heads` heads (FunASR adds the bias to the first Ha heads only)."""
    bias = bias * jnp.maximum(scale.astype(jnp.float32), 0.0)[:, None, None]
    return jnp.pad(bias, ((0, heads - bias.shape[0]), (0, 0), (0, 0)))


class Attention(nn.Module):
    """FunASR's AltAttention: one qkv projection [embed, 3, heads, head_dim], the ALiBi
    bias, the output projection, dropout."""

    config: Emotion2vecConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None) -> jax.Array:
        # x: [batch, S, embed]; mask: [batch, S] valid keys; bias: [heads, S, S] or None
        cfg = self.config
        mk = Modules.of(cfg)
        qkv = mk.dense((3, cfg.num_attention_heads, cfg.head_dim),
                       ("embed", None, "heads", "kv"), "qkv")(x)  # [batch, S, 3, H, D]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        rate = 0.0 if self.deterministic else cfg.attention_dropout
        out = dot_product_attention(q, k, v, mask, cfg.attention, dropout_rate=rate,
                                    dropout_rng=self.make_rng("dropout") if rate else None,
                                    bias=None if bias is None else bias[None])
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = mk.dense(cfg.hidden_size, ("heads", "kv", "embed"), "out_proj")(out)
        return nn.Dropout(cfg.hidden_dropout)(out, deterministic=self.deterministic)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's Mlp, both at activation_dropout)."""

    config: Emotion2vecConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        dropout = nn.Dropout(cfg.activation_dropout)
        x = gelu(mk.dense(cfg.intermediate_size, ("embed", "mlp"), "fc1")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = dropout(x, deterministic=self.deterministic)
        x = mk.dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(x)
        return dropout(x, deterministic=self.deterministic)


class Block(nn.Module):
    """FunASR's AltBlock, post-LN: x = norm1(x + attn(x)); x = norm2(x + mlp(x)).

    With `per_layer_scale` the block owns its ALiBi scale (`alibi_scale` [heads or 1]) and
    gets the unscaled bias; otherwise the bias comes scaled. LayerDrop (`layerdrop`) skips
    the block in training.
    """

    config: Emotion2vecConfig
    layerdrop: float = 0.0
    per_layer_scale: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        if bias is not None and self.per_layer_scale:
            scale = self.param("alibi_scale", partitioned(nn.initializers.ones, (None,)),
                               (cfg.alibi_heads if cfg.alibi_scale_per_head else 1,),
                               mk.param_dtype)
            bias = _scaled_bias(bias, scale, cfg.num_attention_heads)
        y = x + Attention(cfg, self.deterministic, name="attention")(x, mask, bias)
        y = mk.layer_norm("norm1")(y)
        h = nn.Dropout(cfg.post_mlp_dropout)(Mlp(cfg, self.deterministic, name="mlp")(y),
                                              deterministic=self.deterministic)
        y = mk.layer_norm("norm2")(y + h)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        if not self.deterministic and self.layerdrop > 0.0:
            skip = jax.random.uniform(self.make_rng("dropout")) < self.layerdrop
            y = jnp.where(skip, x, y)
        return y


class FeatureProjection(nn.Module):
    """LayerNorm (eps 1e-5) + dense from the conv channels to the model width."""

    config: Emotion2vecConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mk = Modules.of(self.config)
        x = mk.layer_norm("layer_norm", "channels", eps=1e-5)(x)
        x = mk.dense(self.config.hidden_size, ("channels", "embed"), "projection")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class GroupedConv(nn.Module):
    """Grouped 'same' conv over time, NWC: kernel [k, embed / groups, embed], bias [embed].

    torch's Conv1d(padding=k // 2) plus fairseq's SamePad (drops the last frame for an even
    k), so the output has as many frames as the input. `method` "direct" or "fft" (the
    frontend's FFT convolution: XLA:CPU's grouped convolutions are slow).
    """

    config: Emotion2vecConfig
    method: str = "direct"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [batch, frames, embed] -> [batch, frames, embed]
        cfg = self.config
        mk = Modules.of(cfg)
        k, dim, groups = cfg.conv_pos_kernel, cfg.hidden_size, cfg.conv_pos_groups
        bound = 1.0 / math.sqrt(k * dim // groups)  # torch's Conv1d init: U(-b, b)

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", partitioned(init, ("conv_kernel", None, "embed")),
                            (k, dim // groups, dim), mk.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (dim,),
                          mk.param_dtype)
        frames = x.shape[1]
        if self.method == "fft":
            y = _grouped_conv_same_fft(x, kernel, groups)[:, :frames].astype(mk.dtype)
        else:
            y = jax.lax.conv_general_dilated(
                    x.astype(mk.dtype), kernel.astype(mk.dtype), window_strides=(1,),
                    padding=[(k // 2, k - 1 - k // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
                    feature_group_count=groups)
        return y + bias.astype(mk.dtype)


class PositionalEncoder(nn.Module):
    """data2vec 2.0's convolutional positional encoder; returns what is added to x.

    An optional LayerNorm (`conv_pos_pre_ln`), then `conv_pos_layers` x (grouped conv ->
    LayerNorm without parameters -> GELU). Padded frames are set to zero before every conv,
    so the valid frames see exactly the zero padding a lone utterance gets.
    """

    config: Emotion2vecConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        # x: [batch, frames, embed]; mask: [batch, frames] -> [batch, frames, embed]
        cfg = self.config
        if cfg.conv_pos_pre_ln:
            x = Modules.of(cfg).layer_norm("layer_norm", eps=1e-5)(x)
        method = cfg.pos_conv
        if method == "auto":
            method = "fft" if jax.default_backend() == "cpu" else "direct"
        for i in range(cfg.conv_pos_layers):
            x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
            x = GroupedConv(cfg, method, name=f"conv_layers_{i}")(x)
            x = gelu(_plain_layer_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BlockStack(nn.Module):
    """A stack of `Block`s (`layers_i`), optionally with a LayerNorm first (the prenet's
    `layer_norm`) and dropout; returns [input, output of each block]."""

    config: Emotion2vecConfig
    num_layers: int
    layerdrop: float
    dropout: float
    norm_first: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None,
                 deterministic: bool) -> list[jax.Array]:
        cfg = self.config
        if self.norm_first:
            x = Modules.of(cfg).layer_norm("layer_norm")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if not self.num_layers:  # data2vec 2.0's own audio models have no prenet blocks
            return [x]
        rates = (cfg.hidden_dropout, cfg.activation_dropout, cfg.attention_dropout,
                 cfg.post_mlp_dropout, self.layerdrop)
        make = functools.partial(Block, cfg, self.layerdrop, cfg.alibi_scale_per_layer,
                                 deterministic)
        return run_layers(self, make, self.num_layers, x, mask, bias, remat=cfg.remat,
                          dropout=not deterministic and max(rates) > 0.0)


class Emotion2vecEncoder(nn.Module):
    """emotion2vec encoder: raw 16 kHz audio -> every hidden state + frame mask.

    `__call__(audio [batch, samples], audio_mask [batch, samples] bool | None)` returns
    `EncoderOutput(hidden_states, mask)` (module docstring for the order). The input is the
    output of `input_features` (normalised waveform). Dropout and LayerDrop only with
    `deterministic=False` (rng collection 'dropout').
    """

    config: Emotion2vecConfig

    @nn.compact
    def __call__(self, audio: jax.Array, audio_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> EncoderOutput:
        cfg = self.config
        mk = Modules.of(cfg)
        if audio.ndim != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}")
        if audio_mask is None:
            lengths = jnp.full(audio.shape[:1], audio.shape[1], jnp.int32)
        else:
            if audio_mask.shape != audio.shape:
                raise ValueError(
                        f"audio_mask shape {audio_mask.shape} != audio shape {audio.shape}")
            lengths = jnp.sum(audio_mask.astype(jnp.int32), axis=-1)
        masked_norm = audio_mask is not None and cfg.masked_group_norm
        features = FeatureExtractor(cfg, name="feature_extractor")(
                audio, lengths if masked_norm else None)  # [batch, frames, conv_dim]
        batch, frames = features.shape[:2]
        mask = jnp.arange(frames)[None, :] < feature_lengths(cfg, lengths)[:, None]
        x = FeatureProjection(cfg, name="feature_projection")(features)
        x = x + PositionalEncoder(cfg, name="pos_conv")(x, mask)
        e = cfg.num_extra_tokens
        if e:
            tokens = self.param("extra_tokens", partitioned(nn.initializers.normal(1.0),
                                (None, "embed")), (e, cfg.hidden_size), mk.param_dtype)
            x = jnp.concatenate(
                    [jnp.broadcast_to(tokens.astype(x.dtype), (batch, e, cfg.hidden_size)), x],
                    axis=1)
        keys = jnp.concatenate([jnp.ones((batch, e), bool), mask], axis=1)  # [batch, E + T]
        bias = None
        if cfg.alibi:
            bias = alibi_bias(cfg, frames)  # [alibi_heads, E + T, E + T]
            if not cfg.alibi_scale_per_layer:
                scale = self.param("alibi_scale", partitioned(nn.initializers.ones, (None,)),
                                   (cfg.alibi_heads if cfg.alibi_scale_per_head else 1,),
                                   mk.param_dtype)
                bias = _scaled_bias(bias, scale, cfg.num_attention_heads)
        prenet = BlockStack(cfg, cfg.num_prenet_layers, cfg.prenet_layerdrop,
                            cfg.prenet_dropout, True, name="prenet")(
                                    x, keys, bias, deterministic)
        shared = BlockStack(cfg, cfg.num_hidden_layers, cfg.layerdrop, cfg.input_dropout,
                            False, name="encoder")(prenet[-1], keys, bias, deterministic)
        hidden = [h[:, e:] for h in (*prenet, *shared[1:])]
        return EncoderOutput(hidden_states=tuple(hidden), mask=mask)


def param_shapes(config: Emotion2vecConfig) -> dict[str, Any]:
    """The (unboxed) parameter tree of `Emotion2vecEncoder(config)` as ShapeDtypeStructs."""
    model = Emotion2vecEncoder(config)
    audio = jax.ShapeDtypeStruct((1, min_samples(config)), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), audio)
    return nn.meta.unbox(variables)["params"]


# ----------------------------------------------------------------------------- conversion

_AUDIO = "modality_encoders.AUDIO."
_BLOCK_PARTS = (("attn.qkv.", "attention.qkv."), ("attn.proj.", "attention.out_proj."))
# Keys of the released checkpoints that are not the encoder: data2vec's pre-training decoder
# and EMA teacher, emotion2vec+'s classifier (read by emotion2vec_checkpoint).
_DROPPED = (_AUDIO + "decoder.", "_ema.", "ema.", "proj.")


def _block_key(rest: str) -> str:
    for old, new in _BLOCK_PARTS:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _audio_key(rest: str) -> str | None:
    """FunASR key under modality_encoders.AUDIO. -> this tree's key (None: not mapped)."""
    m = re.fullmatch(r"local_encoder\.conv_layers\.(\d+)\.(0|2|2\.1)\.(weight|bias)", rest)
    if m:
        i, part, leaf = m.groups()
        module = "conv" if part == "0" else "layer_norm"
        return f"feature_extractor.conv_layers.{i}.{module}.{leaf}"
    m = re.fullmatch(r"project_features\.(1|2)\.(weight|bias)", rest)
    if m:
        module = "layer_norm" if m.group(1) == "1" else "projection"
        return f"feature_projection.{module}.{m.group(2)}"
    m = re.fullmatch(r"relative_positional_encoder\.(?:1\.)?(\d+)\.0\.(weight|bias)", rest)
    if m:
        return f"pos_conv.conv_layers.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.fullmatch(r"relative_positional_encoder\.0\.(weight|bias)", rest)
    if m:
        return f"pos_conv.layer_norm.{m.group(1)}"
    m = re.fullmatch(r"context_encoder\.blocks\.(\d+)\.(.+)", rest)
    if m:
        return f"prenet.layers.{m.group(1)}.{_block_key(m.group(2))}"
    if rest.startswith("context_encoder.norm."):
        return "prenet.layer_norm." + rest[len("context_encoder.norm."):]
    if rest == "extra_tokens":
        return rest
    return None


def encoder_state(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The encoder's weights of an emotion2vec / emotion2vec+ state dict (FunASR's
    `Emotion2vec`, fairseq's `Data2VecMultiModel`), keyed as `jaxser.models.convert`'s rule
    names this tree's parameters.

    A `module.` prefix is stripped; the pre-training decoder, EMA teacher and the
    emotion2vec+ head (`proj.*`) are dropped; the ALiBi scale [layers or 1, 1, heads or 1,
    1, 1] becomes one vector per block (per-layer scales) or one shared vector. Keys this
    mapping does not know are kept as they are, so the shape check reports them.
    """
    state: dict[str, np.ndarray] = {}
    raw = {k[len("module."):] if k.startswith("module.") else k: v
           for k, v in state_dict.items()}
    prenet = {int(m.group(1)) for k in raw
              if (m := re.match(re.escape(_AUDIO) + r"context_encoder\.blocks\.(\d+)\.", k))}
    for key, value in raw.items():
        if key.startswith(_DROPPED):
            continue
        array = np.asarray(value)
        if key == _AUDIO + "alibi_scale":
            scales = array.reshape(array.shape[0] if array.ndim == 5 else 1, -1)
            if scales.shape[0] == 1:
                state["alibi_scale"] = scales[0]
            for i, row in enumerate(scales if scales.shape[0] > 1 else ()):
                where = (f"prenet.layers.{i}" if i < len(prenet)
                         else f"encoder.layers.{i - len(prenet)}")
                state[f"{where}.alibi_scale"] = row
            continue
        new = None
        if key.startswith(_AUDIO):
            new = _audio_key(key[len(_AUDIO):])
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            new = f"encoder.layers.{m.group(1)}.{_block_key(m.group(2))}"
        if new in ("extra_tokens",):
            array = array.reshape(-1)
        state[new or key] = array
    return state
