"""Scaled dot-product attention that picks its implementation by backend.

Implementations (all [batch, length, heads, head_dim] in and out, the same numbers within
float rounding):

- 'cudnn': the fused kernel of `jax.nn.dot_product_attention` (GPU, half precision);
- 'einsum': plain softmax attention with heads before time; materialises the whole
  [B, H, Tq, Tk] score tensor and keeps it (and the weights) for the backward pass;
- 'blockwise': a flash-style attention for CPU. A `lax.scan` runs over the B * H
  (batch, head) pairs, two per step, and inside a step the queries go in static chunks of
  about 4 MiB of scores, so each chunk's scores, weights and their gradients stay in the
  CPU caches. The backward pass is written by hand (`jax.custom_vjp`): it keeps only the
  output and the softmax statistics of each query and recomputes the weights chunk by
  chunk. On XLA:CPU the einsum path is memory-bound (the softmax and its gradient stream
  hundreds of MB per layer at 30 s); this one is about 1.7x faster for Whisper's 1500
  frames and somewhat faster for short inputs (see docs/benchmarks.md);
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`.

'auto' picks 'cudnn' on GPU, 'blockwise' on CPU and 'einsum' elsewhere (TPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "einsum", "blockwise", "xla", "cudnn")

# Scores per query chunk of the blockwise path (floats): 1 M floats = 4 MiB, so the
# scores, weights and gradients of one chunk stay in the L3 cache of current CPUs
# (measured: 1 MiB chunks were 5-10% slower, fewer larger ones no faster).
_CHUNK_SCORES = 1 << 20
_MIN_CHUNK = 64


def _einsum_attention(q, k, v, mask, scale):
    # q: [B, Tq, H, D] -> heads before time for the batched dots.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


# ----------------------------------------------------------------------------- blockwise


def _query_chunks(tq: int, tk: int, heads: int) -> list[tuple[int, int]]:
    """Static [start, end) query ranges of about `_CHUNK_SCORES` scores (over `heads`)."""
    size = min(tq, max(_MIN_CHUNK, _CHUNK_SCORES // max(tk * heads, 1)))
    n = math.ceil(tq / size)
    size = math.ceil(tq / n)  # equal chunks (the last one may be shorter)
    return [(s, min(s + size, tq)) for s in range(0, tq, size)]


def _dot(a, b, contract):
    """Batched (leading axis) a . b over the given (a_axis, b_axis) pair, float32 result."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)


def _masked_scores(q, k, mask):
    # q [g, c, D] (pre-scaled), k [g, Tk, D], mask [g, Tk] bool or None -> float32 [g, c, Tk]
    s = _dot(q, k, (2, 2))
    if mask is not None:
        s = jnp.where(mask[:, None, :], s, jnp.finfo(jnp.float32).min)
    return s


def _head_forward(q, k, v, mask):
    """g (batch, head) pairs: q [g, Tq, D], k/v [g, Tk, D], mask [g, Tk] -> (out, stats).

    stats: float32 [g, Tq, 2], each query's score maximum and the inverse of its softmax
    denominator (kept apart rather than as one log-sum-exp, which would lose the
    denominator of a query whose keys are all masked).
    """
    outs, stats = [], []
    for start, end in _query_chunks(q.shape[1], k.shape[1], q.shape[0]):
        s = _masked_scores(q[:, start:end], k, mask)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        inv = 1.0 / total
        outs.append((_dot(p.astype(v.dtype), v, (2, 1)) * inv).astype(q.dtype))
        stats.append(jnp.concatenate([m, inv], axis=-1))
    return jnp.concatenate(outs, 1), jnp.concatenate(stats, 1)


def _head_backward(q, k, v, mask, out, stats, d_out):
    """Gradients (dq, dk, dv) of g (batch, head) pairs, recomputing the weights."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                    keepdims=True)  # [g, Tq, 1]
    dqs, dk, dv = [], None, None
    for start, end in _query_chunks(q.shape[1], k.shape[1], q.shape[0]):
        qc, doc = q[:, start:end], d_out[:, start:end]
        m, inv = stats[:, start:end, :1], stats[:, start:end, 1:]
        p = jnp.exp(_masked_scores(qc, k, mask) - m) * inv  # [g, c, Tk] float32 weights
        dv_c = _dot(p.astype(doc.dtype), doc, (1, 1))  # [g, Tk, D]
        dp = _dot(doc, v, (2, 2))  # [g, c, Tk]
        ds = p * (dp - delta[:, start:end])
        if mask is not None:  # masked scores are constants: no gradient reaches q or k
            ds = jnp.where(mask[:, None, :], ds, 0.0)
        ds = ds.astype(q.dtype)
        dqs.append(_dot(ds, k, (2, 1)).astype(q.dtype))
        dk_c = _dot(ds, qc, (1, 1))  # [g, Tk, D]
        dk = dk_c if dk is None else dk + dk_c
        dv = dv_c if dv is None else dv + dv_c
    return jnp.concatenate(dqs, 1), dk.astype(k.dtype), dv.astype(v.dtype)


_HEADS_PER_STEP = 2


def _scan_heads(fn, *arrays):
    """Applies `fn` to groups of (batch, head) pairs of [N, ...] arrays (None passes as None).

    Each scan step handles `_HEADS_PER_STEP` pairs at once (batched ops are big enough for
    XLA:CPU to split them over threads), in query chunks whose scores fit the cache.
    """
    present = [i for i, a in enumerate(arrays) if a is not None]
    n = arrays[present[0]].shape[0]
    g = math.gcd(n, _HEADS_PER_STEP)
    grouped = tuple(arrays[i].reshape(n // g, g, *arrays[i].shape[1:]) for i in present)

    def body(_, xs):
        full = [None] * len(arrays)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return None, fn(*full)

    out = jax.lax.scan(body, None, grouped)[1]
    return jax.tree.map(lambda o: o.reshape(n, *o.shape[2:]), out)


@jax.custom_vjp
def _blockwise(q, k, v, mask):
    # q [N, Tq, D] (pre-scaled), k/v [N, Tk, D], mask [N, Tk] bool or None -> [N, Tq, D]
    return _scan_heads(_head_forward, q, k, v, mask)[0]


def _blockwise_fwd(q, k, v, mask):
    out, stats = _scan_heads(_head_forward, q, k, v, mask)
    return out, (q, k, v, mask, out, stats)


def _blockwise_bwd(residuals, d_out):
    q, k, v, mask, out, stats = residuals
    dq, dk, dv = _scan_heads(_head_backward, q, k, v, mask, out, stats, d_out)
    d_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dq, dk, dv, d_mask


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _blockwise_attention(q, k, v, key_mask, scale):
    batch, tq, heads, dim = q.shape
    tk = k.shape[1]

    def heads_first(x):  # [B, T, H, D] -> [B * H, T, D]
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, x.shape[1], dim)

    mask = None
    if key_mask is not None:
        mask = jnp.broadcast_to(key_mask.astype(bool)[:, None, :], (batch, heads, tk))
        mask = mask.reshape(batch * heads, tk)
    out = _blockwise(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                     heads_first(v), mask)
    return out.reshape(batch, heads, tq, dim).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- dispatch


def default_implementation() -> str:
    """'cudnn' on GPU, 'blockwise' on CPU, 'einsum' elsewhere."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    return "blockwise" if backend == "cpu" else "einsum"


def dot_product_attention(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        key_mask: jax.Array | None = None,
        implementation: str = "auto",
) -> jax.Array:
    """Attention over [batch, length, heads, head_dim] inputs.

    Args:
        q, k, v: [B, T, H, D] queries, keys and values (queries may have another length).
        key_mask: [B, Tk] booleans, True for valid keys (padded keys get no weight).
        implementation: 'auto' (by backend), 'einsum', 'blockwise', 'xla' or 'cudnn'.
    Returns:
        [B, Tq, H, D] attention output.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in "
                         f"{IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = default_implementation()
        if implementation == "blockwise" and q.shape[1] * k.shape[1] < _MIN_CHUNK * _MIN_CHUNK:
            implementation = "einsum"  # tiny (e.g. one pooling query): nothing to gain
    scale = q.shape[-1] ** -0.5
    if implementation == "blockwise":
        return _blockwise_attention(q, k, v, key_mask, scale)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    if implementation == "einsum":
        return _einsum_attention(q, k, v, mask, scale)
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        implementation = "xla"  # cuDNN's fused kernel takes half precision only.
    return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation=implementation)
