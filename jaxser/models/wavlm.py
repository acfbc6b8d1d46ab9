"""WavLM's gated relative position bias (transformers `WavLMAttention`), for the
wav2vec2-family encoder (`jaxser.models.wav2vec2`, `family="wavlm"`).

WavLM = HuBERT's front end and layers plus an additive attention bias:

* `RelativePositionBias` (built once per forward, by the encoder): relative positions
  `key - query` bucketed (`relative_position_buckets`: exact up to `num_buckets // 4`, then
  logarithmic up to `max_bucket_distance`, the sign in the top half of the buckets), each
  bucket a learned per-head value -> [heads, T, T]. transformers keeps the table in layer 0
  (`encoder.layers.0.attention.rel_attn_embed`); here it sits beside the layers
  (`encoder/rel_attn_embed/embedding`) so that all layers have the same parameters (remat
  scans over them); the conversion maps the key.
* `position_gate` (every layer): a gate per head and query from the attention input,
  `gru_rel_pos_linear` (head_dim -> 8, summed to 2) -> sigmoid -> (a, b), gate =
  a * (b * gru_rel_pos_const[h] - 1) + 2; the layer's bias is gate [B, H, T, 1] times the
  shared position bias, added to the attention scores (`dot_product_attention(bias=...)`:
  the blockwise kernel on CPU, jax's XLA attention on GPU).

One difference in training only: LayerDrop may skip any layer here, while transformers never
skips WavLM's layer 0 (where it builds the bias).
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxser.models.layers import Modules, partitioned
from jaxser.models.wav2vec2_config import Wav2Vec2Config

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [length, length]: the bucket of `key - query` for every (query, key) pair.

    transformers' `WavLMAttention._relative_positions_bucket`, in float32 as there: half
    the buckets per sign; distances below a quarter of `num_buckets` get one bucket each,
    longer ones share logarithmically spaced buckets up to `max_distance` (and beyond it
    the last bucket).
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # distance 0: log 0, never used
        large = np.log(distance.astype(np.float32) / np.float32(max_exact))
        large = (large / np.float32(math.log(max_distance / max_exact))
                 * np.float32(half - max_exact))
        large = np.minimum((np.float32(max_exact) + large).astype(np.int64), half - 1)
    buckets += np.where(distance < max_exact, distance, large)
    return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
    """The per-head bias of every relative position: [heads, T, T] float32.

    Param `embedding` [num_buckets, heads] (HF `rel_attn_embed.weight`, an nn.Embedding).
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        cfg = self.config
        table = self.param("embedding", partitioned(nn.initializers.normal(0.02),
                           (None, "heads")), (cfg.num_buckets, cfg.num_attention_heads),
                           Modules.of(cfg).param_dtype)
        buckets = relative_position_buckets(length, cfg.num_buckets, cfg.max_bucket_distance)
        values = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [T, T, H]
        return jnp.transpose(values, (2, 0, 1))


def position_gate(parent: nn.Module, config: Wav2Vec2Config, x: jax.Array) -> jax.Array:
    """[batch, heads, frames] float32: each head's and query's gate on the position bias.

    Creates `gru_rel_pos_linear` (Dense head_dim -> 8) and `gru_rel_pos_const` [heads] in
    `parent` (the attention module), as transformers names them. x: the attention input
    [batch, frames, embed]; each head gates from its own slice of the embedding.
    """
    cfg = config
    batch, frames, _ = x.shape
    heads = cfg.num_attention_heads
    const = parent.param("gru_rel_pos_const", partitioned(nn.initializers.ones, ("heads",)),
                         (heads,), Modules.of(cfg).param_dtype)
    per_head = x.reshape(batch, frames, heads, cfg.head_dim)  # [B, T, H, D]
    proj = Modules.of(cfg).dense(8, ("kv", None), "gru_rel_pos_linear")(per_head)
    proj = proj.astype(jnp.float32).reshape(batch, frames, heads, 2, 4).sum(-1)
    a, b = jnp.split(jax.nn.sigmoid(proj), 2, axis=-1)  # [B, T, H, 1] each
    gate = a[..., 0] * (b[..., 0] * const.astype(jnp.float32) - 1.0) + 2.0  # [B, T, H]
    return jnp.transpose(gate, (0, 2, 1))
