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

Padding on the jax.nn paths ('cudnn', 'xla'). jaxser's key masks are prefix masks (the
first `length` frames of a row are valid), so they go to `jax.nn.dot_product_attention`
as `key_value_seq_lengths` (the number of valid keys per row), never as a boolean
`mask`: cuDNN turns a mask into a bias that must span [Tq, Tk] and rejects a
[B, 1, 1, Tk] padding mask, while sequence lengths select its fused PADDING mask. For
self-attention (Tq == Tk) the same lengths go in as `query_seq_lengths`, so the kernel
skips padded query rows: their outputs are zeros on these two paths (the einsum and
blockwise paths compute them). jaxser never reads padded frames after attention
(pooling, losses and the positional convolution before the layers are masked). A row
without any valid key is given one valid key (outputs of fully padded rows are garbage on
every path, but finite).

Precision and dropout on 'cudnn' (see the README's table):
- the fused kernel takes float16/bfloat16 only. float32 q/k/v (model.dtype='float32' on
  a GPU, or the float32 pooling module) run jax's XLA attention with the same sequence
  lengths instead, which materialises [B, H, Tq, Tk] float32 scores; logged once. Use
  model.dtype='auto' (bfloat16 on GPU) for the fused kernel;
- jax.nn's fused attention has no dropout: `dropout_rate > 0` on the fused path runs
  without attention dropout, logged once (choose 'einsum' to keep it, at T^2 memory);
- head dims that are not a multiple of 8 or above 256 run the XLA path, logged once.
On the other paths attention dropout runs in the einsum implementation (the blockwise
kernel has none): logged once.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "einsum", "blockwise", "xla", "cudnn")

# Half-precision dtypes cuDNN's fused attention takes, and its head-dim limit (Hopper;
# Ampere: 128, which jax itself checks on the device).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 256

_logged: set[str] = set()


def _log_once(key: str, level: int, message: str, *args) -> None:
    """Logs `message` the first time `key` is seen in this process (at trace time)."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)

# Scores per query chunk of the blockwise path (floats): 1 M floats = 4 MiB, so the
# scores, weights and gradients of one chunk stay in the L3 cache of current CPUs
# (measured: 1 MiB chunks were 5-10% slower, fewer larger ones no faster).
_CHUNK_SCORES = 1 << 20
_MIN_CHUNK = 64


def _einsum_attention(q, k, v, mask, scale, dropout_rate=0.0, dropout_rng=None, bias=None):
    # q: [B, Tq, H, D] -> heads before time for the batched dots.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:  # [B, H, Tq, Tk] additive, added in float32
        scores = scores.astype(jnp.float32) + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    if dropout_rate > 0.0:  # as flax's nn.Dropout on the weights (training only, as in HF)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout_rate, weights.dtype),
                            jnp.zeros((), weights.dtype))
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


def _masked_scores(q, k, mask, bias=None):
    # q [g, c, D] (pre-scaled), k [g, Tk, D], mask [g, Tk] bool or None, bias [g, c, Tk] or
    # None -> float32 [g, c, Tk]
    s = _dot(q, k, (2, 2))
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask[:, None, :], s, jnp.finfo(jnp.float32).min)
    return s


def _head_forward(q, k, v, mask, bias=None):
    """g (batch, head) pairs: q [g, Tq, D], k/v [g, Tk, D], mask [g, Tk], bias [g, Tq, Tk]
    (or None) -> (out, stats).

    stats: float32 [g, Tq, 2], each query's score maximum and the inverse of its softmax
    denominator (kept apart rather than as one log-sum-exp, which would lose the
    denominator of a query whose keys are all masked).
    """
    outs, stats = [], []
    for start, end in _query_chunks(q.shape[1], k.shape[1], q.shape[0]):
        s = _masked_scores(q[:, start:end], k, mask,
                           None if bias is None else bias[:, start:end])
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        inv = 1.0 / total
        outs.append((_dot(p.astype(v.dtype), v, (2, 1)) * inv).astype(q.dtype))
        stats.append(jnp.concatenate([m, inv], axis=-1))
    return jnp.concatenate(outs, 1), jnp.concatenate(stats, 1)


def _head_backward(q, k, v, mask, bias, out, stats, d_out):
    """Gradients (dq, dk, dv, d_bias) of g (batch, head) pairs, recomputing the weights
    (d_bias is None without a bias)."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                    keepdims=True)  # [g, Tq, 1]
    dqs, dk, dv, d_biases = [], None, None, []
    for start, end in _query_chunks(q.shape[1], k.shape[1], q.shape[0]):
        qc, doc = q[:, start:end], d_out[:, start:end]
        m, inv = stats[:, start:end, :1], stats[:, start:end, 1:]
        bc = None if bias is None else bias[:, start:end]
        p = jnp.exp(_masked_scores(qc, k, mask, bc) - m) * inv  # [g, c, Tk] float32 weights
        dv_c = _dot(p.astype(doc.dtype), doc, (1, 1))  # [g, Tk, D]
        dp = _dot(doc, v, (2, 2))  # [g, c, Tk]
        ds = p * (dp - delta[:, start:end])
        if mask is not None:  # masked scores are constants: no gradient reaches q or k
            ds = jnp.where(mask[:, None, :], ds, 0.0)
        if bias is not None:  # the bias is added to the scores: its gradient is ds
            d_biases.append(ds.astype(bias.dtype))
        ds = ds.astype(q.dtype)
        dqs.append(_dot(ds, k, (2, 1)).astype(q.dtype))
        dk_c = _dot(ds, qc, (1, 1))  # [g, Tk, D]
        dk = dk_c if dk is None else dk + dk_c
        dv = dv_c if dv is None else dv + dv_c
    d_bias = jnp.concatenate(d_biases, 1) if d_biases else None
    return jnp.concatenate(dqs, 1), dk.astype(k.dtype), dv.astype(v.dtype), d_bias


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
def _blockwise(q, k, v, mask, bias):
    # q [N, Tq, D] (pre-scaled), k/v [N, Tk, D], mask [N, Tk] bool or None, bias
    # [N, Tq, Tk] or None -> [N, Tq, D]
    return _scan_heads(_head_forward, q, k, v, mask, bias)[0]


def _blockwise_fwd(q, k, v, mask, bias):
    out, stats = _scan_heads(_head_forward, q, k, v, mask, bias)
    return out, (q, k, v, mask, bias, out, stats)


def _blockwise_bwd(residuals, d_out):
    q, k, v, mask, bias, out, stats = residuals
    dq, dk, dv, d_bias = _scan_heads(_head_backward, q, k, v, mask, bias, out, stats, d_out)
    d_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dq, dk, dv, d_mask, d_bias


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _blockwise_attention(q, k, v, key_mask, scale, bias=None):
    batch, tq, heads, dim = q.shape
    tk = k.shape[1]

    def heads_first(x):  # [B, T, H, D] -> [B * H, T, D]
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, x.shape[1], dim)

    mask = None
    if key_mask is not None:
        mask = jnp.broadcast_to(key_mask.astype(bool)[:, None, :], (batch, heads, tk))
        mask = mask.reshape(batch * heads, tk)
    if bias is not None:  # [B, H, Tq, Tk] -> [B * H, Tq, Tk]
        bias = jnp.broadcast_to(bias, (batch, heads, tq, tk)).reshape(batch * heads, tq, tk)
    out = _blockwise(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                     heads_first(v), mask, bias)
    return out.reshape(batch, heads, tq, dim).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- dispatch


def default_implementation() -> str:
    """'cudnn' on GPU, 'blockwise' on CPU, 'einsum' elsewhere."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    return "blockwise" if backend == "cpu" else "einsum"


def sequence_lengths(mask: jax.Array) -> jax.Array:
    """int32 [B]: the valid entries of each row of a [B, T] prefix mask, at least 1.

    A row without valid entries gets one (a fused kernel never sees an empty row; such a
    row's outputs are meaningless on every path, but finite).
    """
    return jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1), 1).astype(jnp.int32)


def resolve_implementation(implementation: str, q: jax.Array, k: jax.Array,
                           dropout: bool = False) -> str:
    """The implementation that runs for these inputs: 'auto' by backend, then the
    fallbacks of the module docstring (each logged once)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in "
                         f"{IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = default_implementation()
        if implementation == "blockwise" and q.shape[1] * k.shape[1] < _MIN_CHUNK * _MIN_CHUNK:
            implementation = "einsum"  # tiny (e.g. one pooling query): nothing to gain
    if implementation == "cudnn":
        head_dim = q.shape[-1]
        if q.dtype not in _CUDNN_DTYPES:
            _log_once(f"cudnn-dtype-{q.dtype}", logging.WARNING,
                      "attention: cuDNN's fused kernel takes float16/bfloat16 only, so %s "
                      "attention runs jax's XLA attention, which materialises [B, H, Tq, Tk] "
                      "%s scores; model.dtype='auto' (bfloat16 on GPU) runs the fused kernel",
                      q.dtype, q.dtype)
            implementation = "xla"
        elif head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
            _log_once(f"cudnn-head-dim-{head_dim}", logging.WARNING,
                      "attention: cuDNN's fused kernel needs a head dim that is a multiple of "
                      "8 and at most %d; head dim %d runs jax's XLA attention",
                      _CUDNN_MAX_HEAD_DIM, head_dim)
            implementation = "xla"
        elif dropout:
            _log_once("cudnn-dropout", logging.WARNING,
                      "attention: the fused cuDNN kernel has no dropout: attention dropout is "
                      "NOT applied (model.attention='einsum' applies it, at [B, H, T, T] "
                      "memory)")
            return "cudnn"
    if dropout and implementation in ("blockwise", "xla"):
        _log_once(f"dropout-{implementation}", logging.INFO,
                  "attention: attention dropout runs in the einsum implementation "
                  "(materialises [B, H, Tq, Tk] weights); %r has no dropout", implementation)
        implementation = "einsum"
    return implementation


def _jax_nn_attention(q, k, v, key_mask, scale, implementation, *, lengths: bool = True,
                      bias=None):
    """`jax.nn.dot_product_attention` with the padding as sequence lengths (or, with
    lengths=False, as a [B, 1, 1, Tk] boolean mask: the XLA implementation only)."""
    if key_mask is None:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                            implementation=implementation)
    if not lengths:
        return jax.nn.dot_product_attention(q, k, v, bias=bias,
                                            mask=key_mask[:, None, None, :].astype(bool),
                                            scale=scale, implementation=implementation)
    kv_lengths = sequence_lengths(key_mask)
    q_lengths = kv_lengths if q.shape[1] == k.shape[1] else None  # self-attention
    return jax.nn.dot_product_attention(
            q, k, v, bias=bias, scale=scale, query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths, implementation=implementation)


def dot_product_attention(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        key_mask: jax.Array | None = None,
        implementation: str = "auto",
        *,
        dropout_rate: float = 0.0,
        dropout_rng: jax.Array | None = None,
        bias: jax.Array | None = None,
) -> jax.Array:
    """Attention over [batch, length, heads, head_dim] inputs.

    Args:
        q, k, v: [B, T, H, D] queries, keys and values (queries may have another length).
        key_mask: [B, Tk] booleans, True for valid keys (padded keys get no weight); a prefix
            mask (valid frames first) on the 'cudnn' and 'xla' paths, which take its lengths.
        implementation: 'auto' (by backend), 'einsum', 'blockwise', 'xla' or 'cudnn'.
        dropout_rate: dropout on the attention weights (training); 0 in evaluation. Not
            applied on the fused cuDNN path (logged once); other paths run 'einsum' with it.
        dropout_rng: the dropout key, required when dropout_rate > 0.
        bias: optional additive score bias, broadcastable to [B, H, Tq, Tk] (e.g. WavLM's
            gated relative position bias: per head and query), differentiable on every
            path. jax's cuDNN path has a bias gradient only at batch 1 (jax issue #30593),
            so a biased call on 'cudnn' runs jax's XLA attention (logged once).
    Returns:
        [B, Tq, H, D] attention output.
    """
    dropout = dropout_rate > 0.0
    implementation = resolve_implementation(implementation, q, k, dropout)
    if bias is not None and implementation == "cudnn":
        _log_once("cudnn-bias", logging.INFO,
                  "attention: a score bias runs jax's XLA attention on GPU (cuDNN's bias "
                  "gradient needs batch 1), which materialises [B, H, Tq, Tk] scores")
        implementation = "einsum" if dropout else "xla"
    scale = q.shape[-1] ** -0.5
    if implementation == "blockwise":
        return _blockwise_attention(q, k, v, key_mask, scale, bias)
    if implementation == "einsum":
        mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
        if dropout and dropout_rng is None:
            raise ValueError("dot_product_attention: dropout_rate > 0 needs a dropout_rng")
        return _einsum_attention(q, k, v, mask, scale, dropout_rate if dropout else 0.0,
                                 dropout_rng, bias)
    return _jax_nn_attention(q, k, v, key_mask, scale, implementation, bias=bias)
