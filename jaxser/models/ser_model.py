"""The SER model: front end -> encoder -> pooling -> emotion head (+ dimensional head,
+ domain head).

`build_model(config.model, num_classes, num_domains, num_dims=D)` is the one place that maps the
config's plain fields to modules. The front end (`features`) runs outside the module so
the train step can put SpecAugment between the log-mel and the encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser.accelerator import resolve_dtype
from jaxser.audio.melspec import log_mel_spectrogram
from jaxser.models import (
    cached,
    emotion2vec,
    frontend,
    heads,
    pooling,
    wav2vec2,
    wav2vec2_config,
    whisper,
)

log = logging.getLogger(__name__)

# model.encoder -> (config class, encoder module, size presets): the one table of families.
ENCODER_FAMILIES = {
    "whisper": (whisper.WhisperConfig, whisper.WhisperEncoder, whisper.WHISPER_SIZES),
    "hubert": (wav2vec2_config.Wav2Vec2Config, wav2vec2.Wav2Vec2Encoder,
               wav2vec2_config.WAV2VEC2_SIZES),
    "wav2vec2": (wav2vec2_config.Wav2Vec2Config, wav2vec2.Wav2Vec2Encoder,
                 wav2vec2_config.WAV2VEC2_SIZES),
    "wavlm": (wav2vec2_config.Wav2Vec2Config, wav2vec2.Wav2Vec2Encoder,
              wav2vec2_config.WAV2VEC2_SIZES),
    "data2vec_audio": (wav2vec2_config.Wav2Vec2Config, wav2vec2.Wav2Vec2Encoder,
                       wav2vec2_config.WAV2VEC2_SIZES),
    "emotion2vec": (emotion2vec.Emotion2vecConfig, emotion2vec.Emotion2vecEncoder,
                    emotion2vec.EMOTION2VEC_SIZES),
}

POOLINGS = ("mean", "attentive_stats", "frame_attention", "frame_logits")


def encoder_config(model_cfg: Mapping, base: Any = None):
    """The encoder's config from the preset `size`, the overrides and the compute fields."""
    family = model_cfg["encoder"]
    if family not in ENCODER_FAMILIES:
        raise ValueError(f"unknown model.encoder {family!r}: {', '.join(ENCODER_FAMILIES)}")
    cls, _, sizes = ENCODER_FAMILIES[family]
    fields = {}
    if base is None and model_cfg["size"]:
        if model_cfg["size"] not in sizes:
            raise ValueError(f"unknown model.size {model_cfg['size']!r} for {family}: "
                             f"{', '.join(sizes)}")
        preset = sizes[model_cfg["size"]]
        fields.update(dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else preset)
        if fields.get("family", family) != family:  # the wav2vec2 family shares one table
            raise ValueError(f"model.size {model_cfg['size']!r} is a {fields['family']} "
                             f"preset but model.encoder is {family!r}")
    if family == "whisper":
        # jaxser feeds Whisper variable-length, padded batches: cut positions to the input
        # and mask padding, so a clip gives the same result alone or in a batch.
        fields.update(variable_length=True, mask_attention=True)
    fields.update(dict(model_cfg["encoder_overrides"]))
    # dtype 'auto': bfloat16 compute on GPU/TPU, float32 on CPU (parameters stay float32).
    fields.update(dtype=resolve_dtype(model_cfg["dtype"]), remat=bool(model_cfg["remat"]),
                  attention=model_cfg["attention"])
    if family != "whisper" and hasattr(cls, "family"):
        fields.setdefault("family", family)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {family} encoder fields {unknown}; valid: {sorted(known)}")
    if base is not None:
        return dataclasses.replace(base, **fields)
    return cls(**fields)


def features(family: str, enc_cfg, audio: jax.Array, lengths: jax.Array):
    """Encoder input from waveforms [B, N]: log-mel frames for Whisper, the normalised
    waveform for the wav2vec2 family. Returns (inputs, mask)."""
    n = audio.shape[1]
    if family == "whisper":
        return log_mel_spectrogram(audio, lengths, num_mel_bins=enc_cfg.num_mel_bins)
    if family == "emotion2vec":  # its own normalisation (FunASR's, eps 1e-5, or none)
        return emotion2vec.input_features(enc_cfg, audio, lengths)
    mask = jnp.arange(n)[None, :] < lengths[:, None]
    return frontend.normalize_waveform(audio, lengths), mask


class SERModel(nn.Module):
    """Encoder + pooling + emotion head; optional dimensional and domain-adversarial heads.

    Returns a dict: `logits` [B, K], `frame_logits` [B, T, K] (pooling=frame_logits),
    `frame_mask` [B, T], `embedding` [B, D] (pooled), `dims` [B, num_dims] (emotion
    dimensions on the 0-1 training scale, with `num_dims` > 0), `domain_logits` [B, M].
    The dimensional head sees the pooled embedding after the same dropout as the emotion
    head (with pooling=frame_logits, the masked mean of the frames).
    """

    family: str
    encoder_cfg: Any
    num_classes: int
    num_domains: int = 0
    pooling: str = "mean"
    attention_heads: int = 16
    layer_weighted_sum: bool = False
    head_hidden: int = 0
    dropout: float = 0.0
    domain_head: bool = False
    domain_hidden: int = 256
    head_norm: bool = False  # LayerNorm after the heads' hidden layer
    head_dropout: float = 0.0  # dropout after the heads' hidden layer
    num_dims: int = 0  # emotion dimensions: 0 -> no dimensional head
    dims_hidden: int = 0
    dims_activation: str = "none"

    @nn.compact
    def __call__(self, inputs, mask, *, deterministic: bool = True, grl_lambda=0.0):
        # family `features`: the heads over cached encoder features (`jaxser extract`).
        encoder_cls = (cached.CachedEncoder if self.family == cached.FAMILY
                       else ENCODER_FAMILIES[self.family][1])
        out = encoder_cls(self.encoder_cfg, name="encoder")(
            inputs, mask, deterministic=deterministic)
        if self.layer_weighted_sum:
            frames = pooling.LayerWeightedSum(name="layer_sum")(out.hidden_states)
        else:
            frames = out.hidden_states[-1]
        frames = frames.astype(jnp.float32)  # [batch, frames, embed]
        frame_mask = out.mask
        head = heads.EmotionHead(self.num_classes, hidden_dim=self.head_hidden or None,
                                 dropout_rate=self.head_dropout, norm=self.head_norm,
                                 name="head")
        result = {"frame_mask": frame_mask}
        if self.pooling == "frame_logits":
            frame_logits = head(nn.Dropout(self.dropout)(frames, deterministic=deterministic),
                                deterministic=deterministic)
            result["frame_logits"] = frame_logits
            result["logits"] = pooling.frame_logits_mean(frame_logits, frame_mask)
            embedding = pooling.masked_mean(frames, frame_mask)
            dropped = nn.Dropout(self.dropout)(embedding, deterministic=deterministic)
        else:
            if self.pooling == "mean":
                embedding = pooling.masked_mean(frames, frame_mask)
            elif self.pooling == "attentive_stats":
                embedding = pooling.AttentiveStatsPooling(name="pool")(frames, frame_mask)
            elif self.pooling == "frame_attention":
                embedding = pooling.FrameAttentionPooling(
                    num_heads=self.attention_heads, name="pool")(
                        frames, frame_mask, deterministic=deterministic)
            else:
                raise ValueError(f"unknown model.pooling {self.pooling!r}: {POOLINGS}")
            dropped = nn.Dropout(self.dropout)(embedding, deterministic=deterministic)
            result["logits"] = head(dropped, deterministic=deterministic)
        result["embedding"] = embedding
        if self.num_dims:
            result["dims"] = heads.DimensionalHead(
                self.num_dims, hidden_dim=self.dims_hidden or None,
                output_activation=self.dims_activation, dropout_rate=self.head_dropout,
                norm=self.head_norm, name="dims_head")(dropped, deterministic=deterministic)
        if self.domain_head:
            result["domain_logits"] = heads.DomainHead(
                self.num_domains, hidden_dim=self.domain_hidden, name="domain_head")(
                    embedding, grl_lambda, deterministic=deterministic)
        return result


def build_model(model_cfg: Mapping, num_classes: int, num_domains: int, enc_cfg=None,
                num_dims: int = 0):
    """(SERModel, encoder config) from config.model; enc_cfg overrides (pretrained).

    num_dims: the data set's emotion dimensions; the dimensional head is built when
    `model.dims_head` is set (an error when the data set has none)."""
    enc_cfg = enc_cfg if enc_cfg is not None else encoder_config(model_cfg)
    dims_head = bool(model_cfg.get("dims_head", False))
    if dims_head and not num_dims:
        raise ValueError("model.dims_head is set but the data set has no emotion dimensions "
                         "(arousal/valence/dominance columns in the manifest)")
    if model_cfg["pooling"] not in POOLINGS:
        raise ValueError(f"unknown model.pooling {model_cfg['pooling']!r}: {POOLINGS}")
    model = SERModel(
        family=model_cfg["encoder"], encoder_cfg=enc_cfg, num_classes=num_classes,
        num_domains=max(num_domains, 1), pooling=model_cfg["pooling"],
        attention_heads=model_cfg["attention_heads"],
        layer_weighted_sum=model_cfg["layer_weighted_sum"],
        head_hidden=model_cfg["head_hidden"], dropout=model_cfg["dropout"],
        domain_head=model_cfg["domain_head"], domain_hidden=model_cfg["domain_hidden"],
        head_norm=bool(model_cfg.get("head_norm", False)),
        head_dropout=float(model_cfg.get("head_dropout", 0.0)),
        num_dims=num_dims if dims_head else 0,
        dims_hidden=int(model_cfg.get("dims_hidden", 0)),
        dims_activation=model_cfg.get("dims_activation", "none"))
    return model, enc_cfg
