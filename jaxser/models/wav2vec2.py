"""Flax wav2vec2-family speech encoder (HuBERT, wav2vec2, WavLM, data2vec-audio) that
matches transformers' PyTorch models.

`Wav2Vec2Encoder(config)` = the front end of `jaxser.models.frontend` (conv feature
extractor, feature projection) + `TransformerEncoder` (convolutional positional embedding,
post-LN or pre-LN layer stack; WavLM's gated relative position bias from
`jaxser.models.wavlm`). It returns every hidden state (`EncoderOutput.hidden_states`,
HF's `output_hidden_states=True` order) and the valid-frame mask, so pooling and
layer-weighting heads can sit on top. Architecture in `jaxser.models.wav2vec2_config`;
pretrained weights through `jaxser.models.convert` (`params_from_torch`,
`params_to_torch`). Padding invariance: see `jaxser.models.frontend`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser.models import wavlm
from jaxser.models.attention import dot_product_attention
from jaxser.models.frontend import (
    FeatureExtractor,
    FeatureProjection,
    PositionalConvEmbedding,
    PositionalConvStack,
)
from jaxser.models.layers import ACTIVATIONS, Modules, run_layers
from jaxser.models.outputs import EncoderOutput
from jaxser.models.wav2vec2_config import Wav2Vec2Config, frame_mask, min_samples

log = logging.getLogger(__name__)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v as DenseGeneral to [heads, head_dim]; with a
    `position_bias` (WavLM), that bias gated per head and query (`wavlm.position_gate`)."""

    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 position_bias: jax.Array | None = None) -> jax.Array:
        # x: [batch, frames, embed]; mask: [batch, frames] valid keys or None;
        # position_bias: [heads, frames, frames] float32 or None
        cfg = self.config
        mk = Modules.of(cfg)
        heads = (cfg.num_attention_heads, cfg.head_dim)
        q = mk.dense(heads, ("embed", "heads", "kv"), "q_proj")(x)  # [batch, frames, H, D]
        k = mk.dense(heads, ("embed", "heads", "kv"), "k_proj")(x)
        v = mk.dense(heads, ("embed", "heads", "kv"), "v_proj")(x)
        # Dropout on the weights in training (as HF); the fused cuDNN path runs without it
        # (logged once), the others run the einsum implementation (attention.py).
        rate = 0.0 if self.deterministic else cfg.attention_dropout
        bias = None
        if position_bias is not None:  # [B, H, T, 1] * [H, T, T] -> [B, H, T, T]
            gate = wavlm.position_gate(self, cfg, x)
            bias = (gate[..., None] * position_bias[None]).astype(mk.dtype)
        out = dot_product_attention(q, k, v, mask, cfg.attention, dropout_rate=rate,
                                    dropout_rng=self.make_rng("dropout") if rate else None,
                                    bias=bias)
        return mk.dense(cfg.hidden_size, ("heads", "kv", "embed"), "out_proj")(out)


class FeedForward(nn.Module):
    """Dense -> activation -> dropout -> dense -> dropout."""

    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        x = mk.dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate_dense")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = nn.Dropout(cfg.activation_dropout)(x, deterministic=self.deterministic)
        x = mk.dense(cfg.hidden_size, ("mlp", "embed"), "output_dense")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
    """One transformer layer, post-LN (base) or pre-LN (`do_stable_layer_norm`).

    In training, LayerDrop skips the whole layer with probability `layerdrop`.
    """

    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 position_bias: jax.Array | None = None) -> jax.Array:
        y = self._layer(x, mask, position_bias)
        if not self.deterministic and self.config.layerdrop > 0.0:
            skip = jax.random.uniform(self.make_rng("dropout")) < self.config.layerdrop
            y = jnp.where(skip, x, y)
        return y

    def _layer(self, x: jax.Array, mask: jax.Array | None,
               position_bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        mk = Modules.of(cfg)
        attention = Attention(cfg, self.deterministic, name="attention")
        feed_forward = FeedForward(cfg, self.deterministic, name="feed_forward")
        layer_norm = mk.layer_norm("layer_norm")
        final_layer_norm = mk.layer_norm("final_layer_norm")
        dropout = nn.Dropout(cfg.hidden_dropout)
        if cfg.do_stable_layer_norm:
            h = dropout(attention(layer_norm(x), mask, position_bias),
                        deterministic=self.deterministic)
            x = x + h
            x = x + feed_forward(final_layer_norm(x))
        else:
            h = dropout(attention(x, mask, position_bias), deterministic=self.deterministic)
            x = layer_norm(x + h)
            x = final_layer_norm(x + feed_forward(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TransformerEncoder(nn.Module):
    """Position conv + the layer stack; returns every hidden state in HF's order.

    The positional convolution is `PositionalConvStack` for data2vec-audio,
    `PositionalConvEmbedding` otherwise; WavLM's relative position bias (`rel_attn_embed`)
    is computed once here and gated in every layer.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 deterministic: bool) -> tuple[jax.Array, ...]:
        # x: [batch, frames, embed]; mask: [batch, frames] or None (no padding)
        cfg = self.config
        if mask is not None:  # HF zeroes padded frames before the position conv.
            x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
        if cfg.family == "data2vec_audio":
            x = x + PositionalConvStack(cfg, name="pos_conv_embed")(x, mask)
        else:
            x = x + PositionalConvEmbedding(cfg, name="pos_conv_embed")(x)
        layer_norm = Modules.of(cfg).layer_norm("layer_norm")
        if not cfg.do_stable_layer_norm:
            x = layer_norm(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        position_bias = None
        if cfg.family == "wavlm":  # [heads, frames, frames]
            position_bias = wavlm.RelativePositionBias(cfg, name="rel_attn_embed")(x.shape[1])
        rates = (cfg.hidden_dropout, cfg.activation_dropout, cfg.attention_dropout, cfg.layerdrop)
        hidden_states = run_layers(self, functools.partial(EncoderLayer, cfg, deterministic),
                                   cfg.num_hidden_layers, x, mask, position_bias,
                                   remat=cfg.remat,
                                   dropout=not deterministic and max(rates) > 0.0)
        if cfg.do_stable_layer_norm:
            hidden_states[-1] = layer_norm(hidden_states[-1])
        return tuple(hidden_states)


class Wav2Vec2Encoder(nn.Module):
    """wav2vec2-family encoder: raw 16 kHz audio -> every hidden state + frame mask.

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

    config: Wav2Vec2Config

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


def param_shapes(config: Wav2Vec2Config) -> dict[str, Any]:
    """The (unboxed) parameter tree of `Wav2Vec2Encoder(config)` as ShapeDtypeStructs."""
    model = Wav2Vec2Encoder(config)
    audio = jax.ShapeDtypeStruct((1, min_samples(config)), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), audio)
    return nn.meta.unbox(variables)["params"]

