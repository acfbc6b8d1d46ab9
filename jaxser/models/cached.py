"""Cached encoder features: what `jaxser extract` keeps of an encoder's output, and the
stand-in encoder that feeds those features back to the heads.

Training on cached features (`data.features`) runs the same `SERModel` as audio training,
with `CachedEncoder` in the encoder's place: it has no parameters and returns the cached
hidden states as an `EncoderOutput`, so the layer-weighted sum, the poolings, the heads and
their parameter names are exactly those of audio training (a head trained on features
plugs onto the real encoder unchanged).

Pooled features are frames of length one: the masked mean of each layer over its valid
frames, [L, D] per utterance. The mean over frames is linear, so a layer-weighted sum of
pooled layers is the pooled layer-weighted sum, and `pooling=mean` on one frame is the
identity: a mean-pooling head on cached pooled features computes what it computes on the
encoder's frames, up to float rounding (tests/test_extract.py checks trained parameters).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser.models.outputs import EncoderOutput
from jaxser.models.pooling import masked_mean

log = logging.getLogger(__name__)

FAMILY = "features"  # the `SERModel.family` of a head model over cached features
STATS = ("mean", "mean_std")  # what is pooled per layer: the mean, or mean and std
# Poolings that read the frames themselves (they need frame features; `mean` does not).
FRAME_POOLINGS = ("attentive_stats", "frame_attention", "frame_logits")


@dataclasses.dataclass(frozen=True)
class CachedFeaturesConfig:
    """The shape of the cached features a head reads.

    Attributes:
        num_layers: hidden states fed to the head (the selected cached layers).
        dim: width of a feature vector (the encoder's width, twice it for mean_std).
        frames: frame features [L, T, D] per utterance (else pooled: T = 1).
        dtype: compute dtype of the encoder the features came from (informational: the
            cached features are read as float32).
    """

    num_layers: int
    dim: int
    frames: bool = False
    dtype: Any = "float32"


class CachedEncoder(nn.Module):
    """Stands in for the encoder: `inputs` [B, L, T, D] are the cached hidden states."""

    config: CachedFeaturesConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, mask: jax.Array | None = None, *,
                 deterministic: bool = True) -> EncoderOutput:
        """[B, L, T, D] cached features (any float dtype), mask [B, T] -> EncoderOutput of L
        float32 hidden states [B, T, D]."""
        del deterministic  # No dropout, no parameters.
        cfg = self.config
        if inputs.ndim != 4 or inputs.shape[1] != cfg.num_layers or inputs.shape[3] != cfg.dim:
            raise ValueError(f"cached features must be [batch, {cfg.num_layers}, frames, "
                             f"{cfg.dim}], got {inputs.shape}")
        if mask is None:
            mask = jnp.ones(inputs.shape[:1] + inputs.shape[2:3], bool)
        x = nn.with_logical_constraint(inputs.astype(jnp.float32),
                                       ("batch", "layers", "length", "embed"))
        return EncoderOutput(hidden_states=tuple(x[:, i] for i in range(cfg.num_layers)),
                             mask=mask.astype(bool))


def masked_std(x: jax.Array, mask: jax.Array, mean: jax.Array) -> jax.Array:
    """[B, D] standard deviation of x [B, T, D] over its valid frames (float32; 0 for a
    row without valid frames), given their mean [B, D]."""
    m = mask.astype(bool)[..., None]
    xf = jnp.where(m, x.astype(jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.float32), 1.0)[:, None]
    var = jnp.sum(xf * xf, axis=1) / count - mean * mean
    return jnp.sqrt(jnp.maximum(var, 0.0))


def layer_features(out: EncoderOutput, stats: str = "mean",
                   frame_layers: Sequence[int] = ()) -> dict[str, jax.Array]:
    """What extraction keeps of an encoder output (float32 statistics over valid frames).

    Returns `mean` [B, L, D] (every hidden state, HF order: embeddings first), `std`
    [B, L, D] with stats=mean_std, `frames` [B, T, F, D] float16 of the hidden states
    `frame_layers` (F of them) when any, and `frame_count` [B] int32 (valid frames).
    """
    if stats not in STATS:
        raise ValueError(f"unknown feature stats {stats!r}: {', '.join(STATS)}")
    mask = out.mask.astype(bool)
    hidden = [h.astype(jnp.float32) for h in out.hidden_states]
    means = [masked_mean(h, mask) for h in hidden]
    result = {"mean": jnp.stack(means, axis=1),
              "frame_count": jnp.sum(mask, axis=1, dtype=jnp.int32)}
    if stats == "mean_std":
        result["std"] = jnp.stack([masked_std(h, mask, m) for h, m in zip(hidden, means,
                                                                         strict=True)], axis=1)
    if frame_layers:
        frames = jnp.stack([out.hidden_states[i] for i in frame_layers], axis=2)
        result["frames"] = jnp.where(mask[:, :, None, None], frames, 0).astype(jnp.float16)
    return result


def head_inputs(features: dict[str, jax.Array], layers: Sequence[int], stats: str,
                frames: bool, frame_positions: Sequence[int] = ()) -> tuple[jax.Array,
                                                                            jax.Array]:
    """The head's (inputs [B, L, T, D], mask [B, T]) from `layer_features` output, as the
    feature reader builds them from the cache: layers `layers` of the pooled statistics
    (T = 1; mean_std concatenates mean and std), or of the frames (`frame_positions`: where
    each selected layer sits among the cached frame layers)."""
    if frames:
        x = jnp.take(features["frames"], jnp.asarray(frame_positions), axis=2)  # [B, T, L, D]
        count = features["frame_count"]
        mask = jnp.arange(x.shape[1])[None, :] < count[:, None]
        return jnp.transpose(x, (0, 2, 1, 3)), mask
    idx = jnp.asarray(layers)
    x = jnp.take(features["mean"], idx, axis=1)
    if stats == "mean_std":
        x = jnp.concatenate([x, jnp.take(features["std"], idx, axis=1)], axis=-1)
    return x[:, :, None, :], jnp.ones((x.shape[0], 1), bool)
