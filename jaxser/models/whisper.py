"""Flax port of the Whisper audio encoder (transformers' PyTorch `WhisperEncoder`).

Layout choices for speed: time-major NWC features `[batch, frames, num_mel]` (NWC convolution
is the fast one on CPU), q/k/v projected straight to `[batch, length, heads, head_dim]` by
`DenseGeneral`, attention through `jaxser.models.attention` (einsum on CPU, cuDNN on GPU).

Two input modes:
- 30 s mode (`variable_length=False`): exactly `2 * max_source_positions` frames, numerically
  the HF model (with `mask_attention=False`, padding is attended to, as in original Whisper).
- variable length (`variable_length=True`): any number of frames up to
  `2 * max_source_positions`; positional embeddings are cut to the output length. With
  `mask_attention=True` padded frames are zeroed before each convolution and masked as
  attention keys, so an utterance inside a padded batch gives the same valid hidden states as
  the utterance alone.

Parameter tree (names follow HF so conversion, in `jaxser.models.convert`, is mechanical;
freeze the stem with `conv1/**`, `conv2/**` and, as HF does, `embed_positions`):
    conv1/{kernel,bias}  conv2/{kernel,bias}  embed_positions
    layers_{i}/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel[,bias]}
    layers_{i}/{self_attn_layer_norm,final_layer_norm}/{scale,bias}
    layers_{i}/{fc1,fc2}/{kernel,bias}  layer_norm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxser.models.attention import IMPLEMENTATIONS, dot_product_attention
from jaxser.models.layers import ACTIVATIONS as _ACTIVATIONS
from jaxser.models.layers import DTYPES as _DTYPES
from jaxser.models.layers import Modules, gelu, partitioned, run_layers
from jaxser.models.outputs import EncoderOutput

log = logging.getLogger(__name__)

_ATTENTION = IMPLEMENTATIONS

# Fields shared with transformers' WhisperConfig (encoder side), in from_hf/to_hf.
_HF_FIELDS = (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions", "activation_function", "dropout", "attention_dropout",
        "activation_dropout", "init_std",
)

# Real encoder sizes (HF field names), for benchmarks and random initialisation.
WHISPER_SIZES: dict[str, dict[str, Any]] = {
        "whisper-tiny": dict(num_mel_bins=80, d_model=384, encoder_layers=4,
                             encoder_attention_heads=6, encoder_ffn_dim=1536),
        "whisper-base": dict(num_mel_bins=80, d_model=512, encoder_layers=6,
                             encoder_attention_heads=8, encoder_ffn_dim=2048),
        "whisper-small": dict(num_mel_bins=80, d_model=768, encoder_layers=12,
                              encoder_attention_heads=12, encoder_ffn_dim=3072),
        "whisper-medium": dict(num_mel_bins=80, d_model=1024, encoder_layers=24,
                               encoder_attention_heads=16, encoder_ffn_dim=4096),
        "whisper-large-v3": dict(num_mel_bins=128, d_model=1280, encoder_layers=32,
                                 encoder_attention_heads=20, encoder_ffn_dim=5120),
}


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Whisper encoder hyper-parameters (HF names) plus jaxser's compute options."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    dropout: float = 0.0  # after attention and after the MLP (HF `dropout`)
    attention_dropout: float = 0.0  # kept for round trips; NOT applied (0 in all releases)
    activation_dropout: float = 0.0  # inside the MLP
    init_std: float = 0.02  # normal init of kernels for random initialisation
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default, used by HF Whisper
    # jaxser options
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass
    attention: str = "auto"  # "auto" | "einsum" | "blockwise" | "xla" | "cudnn"
    variable_length: bool = False  # accept fewer than 2 * max_source_positions frames
    mask_attention: bool = False  # mask padded frames (False: attend to padding, as HF)

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by "
                             f"encoder_attention_heads {self.encoder_attention_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} not in {sorted(_DTYPES)}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"attention {self.attention!r} not in {_ATTENTION}")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r} not in "
                             f"{sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides: Any) -> WhisperConfig:
        """Builds a config from a HF `config.json` dict (or transformers config object);
        `overrides` set any field (e.g. dtype, variable_length)."""
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown WhisperConfig fields: {bad}")
        values = {k: hf_config[k] for k in _HF_FIELDS if hf_config.get(k) is not None}
        return cls(**{**values, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A HF `WhisperConfig` dict; the (unused) decoder mirrors the encoder's sizes."""
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        out.update(
                model_type="whisper",
                decoder_layers=self.encoder_layers,
                decoder_attention_heads=self.encoder_attention_heads,
                decoder_ffn_dim=self.encoder_ffn_dim,
        )
        return out


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal position table [length, channels] (HF `sinusoids`)."""
    if channels % 2:
        raise ValueError(f"channels must be even for sinusoids, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _sinusoid_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.asarray(sinusoids(*shape), dtype)


def _conv(mk: Modules, cfg: WhisperConfig, in_axis: str, stride: int, name: str) -> nn.Module:
    """Kernel-3, padding-1 conv over time (NWC), as Whisper's stem."""
    return mk.conv(cfg.d_model, 3, name, stride=stride, padding=((1, 1),),
                   kernel_axes=("conv_kernel", in_axis, "embed"))


class WhisperAttention(nn.Module):
    """Self-attention; k_proj has no bias (as in Whisper)."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        heads = (cfg.encoder_attention_heads, cfg.head_dim)
        qkv_axes = ("embed", "heads", "kv")
        q = mk.dense(heads, qkv_axes, "q_proj")(x)  # [B, T, H, D]
        k = mk.dense(heads, qkv_axes, "k_proj", use_bias=False)(x)
        v = mk.dense(heads, qkv_axes, "v_proj")(x)
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv"))
                   for t in (q, k, v))
        out = dot_product_attention(q, k, v, key_mask, cfg.attention)  # [B, T, H, D]
        return mk.dense(cfg.d_model, ("heads", "kv", "embed"), "out_proj")(out)  # [B, T, E]


class WhisperEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + fc2(act(fc1(ln(x))))."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        h = mk.layer_norm("self_attn_layer_norm")(x)
        h = WhisperAttention(cfg, name="self_attn")(h, key_mask)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = mk.layer_norm("final_layer_norm")(x)
        h = mk.dense(cfg.encoder_ffn_dim, ("embed", "mlp"), "fc1")(h)
        h = _ACTIVATIONS[cfg.activation_function](h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B, T, F]
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        h = mk.dense(cfg.d_model, ("mlp", "embed"), "fc2")(h)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: conv stem, positions, pre-LN layers, final layer norm."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, features: jax.Array, frame_mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> EncoderOutput:
        """Encodes log-mel features.

        Args:
            features: [batch, frames, num_mel] log-mel features (time-major).
            frame_mask: optional [batch, frames] bool, True on valid frames.
            deterministic: False applies dropout (needs a 'dropout' rng).
        Returns:
            EncoderOutput: hidden_states (embeddings, then each layer; the last one layer-normed)
            each [batch, ceil(frames / 2), d_model], and mask [batch, ceil(frames / 2)]
            (output frame t is valid iff input frame 2t is, HF's length formula).
        """
        cfg = self.config
        mk = Modules.of(cfg)
        batch, frames, num_mel = features.shape
        out_len = (frames + 1) // 2
        if num_mel != cfg.num_mel_bins:
            raise ValueError(f"features have {num_mel} mel bins, config has {cfg.num_mel_bins}")
        if not cfg.variable_length and frames != 2 * cfg.max_source_positions:
            raise ValueError(f"Whisper expects {2 * cfg.max_source_positions} frames, got "
                             f"{frames}; pad the input or set variable_length=True")
        if out_len > cfg.max_source_positions:
            raise ValueError(f"{frames} frames exceed the maximum "
                             f"{2 * cfg.max_source_positions}")
        if frame_mask is None:
            frame_mask = jnp.ones((batch, frames), bool)
        frame_mask = frame_mask.astype(bool)
        valid = frame_mask[..., None]  # [B, frames, 1]
        x = nn.with_logical_constraint(features.astype(mk.dtype), ("batch", "length", "num_mel"))
        if cfg.mask_attention:
            x = jnp.where(valid, x, 0)
        x = gelu(_conv(mk, cfg, "num_mel", 1, "conv1")(x))
        if cfg.mask_attention:
            x = jnp.where(valid, x, 0)
        x = gelu(_conv(mk, cfg, "channels", 2, "conv2")(x))  # [B, T, E]
        mask = frame_mask[:, ::2]  # [B, T]
        positions = self.param(
                "embed_positions", partitioned(_sinusoid_init, ("length", "embed")),
                (cfg.max_source_positions, cfg.d_model), mk.param_dtype)
        x = x + positions[:out_len].astype(mk.dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        key_mask = mask if cfg.mask_attention else None
        hidden = run_layers(self, functools.partial(WhisperEncoderLayer, cfg),
                            cfg.encoder_layers, x, key_mask, deterministic, remat=cfg.remat,
                            dropout=not deterministic and cfg.dropout + cfg.activation_dropout > 0)
        hidden[-1] = mk.layer_norm("layer_norm")(hidden[-1])
        return EncoderOutput(hidden_states=tuple(hidden), mask=mask)


def param_shapes(config: WhisperConfig) -> dict[str, Any]:
    """The (unboxed) parameter tree of `WhisperEncoder(config)` as ShapeDtypeStructs."""
    features = jax.ShapeDtypeStruct((1, 2 * config.max_source_positions, config.num_mel_bins),
                                    jnp.float32)
    variables = jax.eval_shape(lambda x: WhisperEncoder(config).init(jax.random.key(0), x),
                               features)
    return nn.meta.unbox(variables)["params"]
