"""Pooling of encoder frames into one vector per utterance, padding-aware.

Every pooling here looks only at the valid frames given by a frame mask, so an utterance
gives the same vector whatever amount of padding its batch added (up to float rounding).

- `masked_mean`: the mean over valid frames (EM2LDL's pooling).
- `AttentiveStatsPooling`: attention-weighted mean and standard deviation (Okabe et al. 2018).
- `FrameAttentionPooling`: the frame-level attention module of the multi-loss paper
  (arXiv 2512.04551): multi-head self-attention over frames with a residual connection and
  layer norm, then multi-head attention pooling with a learned query.
- `LayerWeightedSum`: SUPERB-style learned softmax weights over the encoder's hidden states.
- `frame_logits_mean`: frame logits averaged over valid frames (the generalizable-SER
  inference rule), so the same head also gives emotion over time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser.models.attention import dot_product_attention
from jaxser.models.layers import LayerNorm

log = logging.getLogger(__name__)

Dtype = Any


def _dense_init(axes: tuple[str, ...]):
    """Lecun-normal kernel initializer carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


def _zeros_init(axes: tuple[str, ...]):
    """Zero initializer (biases) carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _check_frames(x: jax.Array, mask: jax.Array) -> None:
    """Raises ValueError unless x is [B, T, D] and mask is [B, T]."""
    if x.ndim != 3:
        raise ValueError(f"frames must be [batch, frames, embed], got shape {x.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match frames shape {x.shape[:2]}")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over its valid frames.

    Padded frames are replaced by zeros before summing, so even inf/NaN padding cannot leak
    in; a row without valid frames gives zeros (not NaN).

    Args:
        x: [B, T, D] frames.
        mask: [B, T] booleans, True for valid frames.
    Returns:
        [B, D] mean over valid frames, accumulated in float32 and cast back to x.dtype.
    """
    _check_frames(x, mask)
    mask = mask.astype(bool)
    xf = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)  # [B, T, D]
    count = jnp.sum(mask, axis=1, dtype=jnp.float32)[:, None]  # [B, 1]
    return (jnp.sum(xf, axis=1) / jnp.maximum(count, 1.0)).astype(x.dtype)


def frame_logits_mean(frame_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Utterance logits as the mean of frame logits over valid frames.

    This is the inference rule of generalizable SER (arXiv 2311.08607): the head runs on
    every frame (giving emotion over time) and the utterance score is the frame average.

    Args:
        frame_logits: [B, T, K] per-frame logits.
        mask: [B, T] booleans, True for valid frames.
    Returns:
        [B, K] averaged logits (zeros for rows without valid frames).
    """
    return masked_mean(frame_logits, mask)


def _masked_softmax_over_frames(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over axis 1 of scores [B, T, ...] restricted to valid frames.

    Padded frames get exactly zero weight; rows without valid frames get all-zero weights.
    """
    expand = (slice(None), slice(None)) + (None,) * (scores.ndim - 2)
    m = mask.astype(bool)[expand]
    scores = jnp.where(m, scores.astype(jnp.float32), -jnp.inf)
    peak = jnp.max(scores, axis=1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    unnorm = jnp.where(m, jnp.exp(scores - peak), 0.0)
    total = jnp.sum(unnorm, axis=1, keepdims=True)
    return unnorm / jnp.where(total > 0, total, 1.0)


class AttentiveStatsPooling(nn.Module):
    """Attentive statistics pooling: attention-weighted mean and std over valid frames.

    e_t = v^T tanh(W x_t + b) scores every frame; softmax over valid frames gives weights
    a_t; the output is [sum_t a_t x_t, sqrt(sum_t a_t x_t^2 - mean^2)] -> [B, 2D].

    Attributes:
        attention_dim: width of the scoring layer.
        eps: floor of the variance before the square root (keeps gradients finite).
        dtype: compute dtype of the scoring layer (statistics are taken in float32).
    """

    attention_dim: int = 128
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, T, D], mask [B, T] -> [B, 2D] (mean then std)."""
        _check_frames(x, mask)
        hidden = nn.Dense(
                self.attention_dim, dtype=self.dtype, kernel_init=_dense_init(("embed", "mlp")),
                bias_init=_zeros_init(("mlp",)), name="attention_hidden")(x)
        hidden = jnp.tanh(hidden)  # [B, T, A]
        scores = nn.Dense(
                1, dtype=self.dtype, kernel_init=_dense_init(("mlp", None)),
                bias_init=_zeros_init((None,)), name="attention_score")(hidden)[..., 0]
        weights = _masked_softmax_over_frames(scores, mask)[..., None]  # [B, T, 1]
        xf = jnp.where(mask.astype(bool)[..., None], x.astype(jnp.float32), 0.0)
        mean = jnp.sum(weights * xf, axis=1)  # [B, D]
        second = jnp.sum(weights * xf * xf, axis=1)
        std = jnp.sqrt(jnp.maximum(second - mean * mean, self.eps))
        has_frames = jnp.any(mask.astype(bool), axis=1, keepdims=True)
        std = jnp.where(has_frames, std, 0.0)
        out = jnp.concatenate([mean, std], axis=-1).astype(x.dtype)
        return nn.with_logical_constraint(out, ("batch", "embed"))


class FrameAttentionPooling(nn.Module):
    """Frame-level attention module of the multi-loss SER paper (arXiv 2512.04551).

    1. Multi-head self-attention over frames (padded frames masked as keys), added to the
       input as a residual and layer-normalised: h = LN(x + MHSA(x)).
    2. Attention pooling with a learned query per head: one query attends over the valid
       frames of h; the heads are concatenated and projected -> [B, D].

    Attributes:
        num_heads: attention heads in both stages (the paper uses 16); D % num_heads == 0.
        dropout_rate: dropout on the attention outputs (training only).
        attention_impl: passed to `dot_product_attention` ('auto' picks by backend).
        dtype: compute dtype.
    """

    num_heads: int = 16
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def _heads(self, features: int, name: str) -> nn.DenseGeneral:
        """Projection embed -> [heads, head_dim]."""
        return nn.DenseGeneral(
                (self.num_heads, features // self.num_heads), dtype=self.dtype,
                kernel_init=_dense_init(("embed", "heads", "kv")),
                bias_init=_zeros_init(("heads", "kv")), name=name)

    def _merge(self, features: int, name: str) -> nn.DenseGeneral:
        """Projection [heads, head_dim] -> embed."""
        return nn.DenseGeneral(
                features, axis=(-2, -1), dtype=self.dtype,
                kernel_init=_dense_init(("heads", "kv", "embed")),
                bias_init=_zeros_init(("embed",)), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """x [B, T, D], mask [B, T] -> [B, D]."""
        _check_frames(x, mask)
        batch, _, features = x.shape
        if features % self.num_heads:
            raise ValueError(
                    f"embed dim {features} is not divisible by num_heads={self.num_heads}")
        mask = mask.astype(bool)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
        # Stage 1: self-attention over frames with residual + layer norm.
        q = self._heads(features, "self_query")(x)  # [B, T, H, Dh]
        k = self._heads(features, "self_key")(x)
        v = self._heads(features, "self_value")(x)
        att = dot_product_attention(q, k, v, mask, self.attention_impl)
        att = self._merge(features, "self_out")(att)  # [B, T, D]
        att = nn.Dropout(self.dropout_rate)(att, deterministic=deterministic)
        h = LayerNorm(1e-6, "embed", self.dtype, name="self_norm")(x + att)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        # Stage 2: attention pooling with a learned query per head.
        query = self.param(
                "pool_query",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", "kv")),
                (self.num_heads, features // self.num_heads))
        query = jnp.broadcast_to(
                query.astype(self.dtype)[None, None],
                (batch, 1, self.num_heads, features // self.num_heads))  # [B, 1, H, Dh]
        pk = self._heads(features, "pool_key")(h)
        pv = self._heads(features, "pool_value")(h)
        pooled = dot_product_attention(query, pk, pv, mask, self.attention_impl)
        pooled = self._merge(features, "pool_out")(pooled)[:, 0]  # [B, D]
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
        # A row without valid frames pools to zeros (its attention weights are meaningless).
        pooled = jnp.where(jnp.any(mask, axis=1, keepdims=True), pooled, 0.0)
        return nn.with_logical_constraint(pooled, ("batch", "embed"))


class LayerWeightedSum(nn.Module):
    """Learned softmax-normalised weighted sum of an encoder's hidden states (SUPERB).

    Attributes:
        normalize: layer-normalise each hidden state (no parameters) before the sum, as
            s3prl's `layer_norm` option does, so layers of different scale mix fairly.
    """

    normalize: bool = False

    @nn.compact
    def __call__(self, hidden_states: Sequence[jax.Array]) -> jax.Array:
        """Tuple of L arrays [B, T, D] -> [B, T, D]."""
        hidden_states = tuple(hidden_states)
        if not hidden_states:
            raise ValueError("hidden_states is empty")
        shapes = {h.shape for h in hidden_states}
        if len(shapes) != 1:
            raise ValueError(f"hidden_states have different shapes: {sorted(shapes)}")
        logits = self.param(
                "layer_weights",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("layers",)),
                (len(hidden_states),))
        weights = jax.nn.softmax(logits.astype(jnp.float32))  # [L]
        stacked = jnp.stack(hidden_states, axis=0)  # [L, B, T, D]
        if self.normalize:
            mean = jnp.mean(stacked, axis=-1, keepdims=True)
            var = jnp.var(stacked, axis=-1, keepdims=True)
            stacked = (stacked - mean) * jax.lax.rsqrt(var + 1e-5)
        out = jnp.einsum("l,l...->...", weights.astype(stacked.dtype), stacked)
        return out.astype(hidden_states[0].dtype)
