"""dot_product_attention: the blockwise (flash-style) CPU path against the einsum reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxser.models import attention
from jaxser.models.attention import dot_product_attention


def _qkv(batch, tq, tk, heads, dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, tq, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, tk, heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, tk, heads, dim)), dtype)
    w = jnp.asarray(rng.standard_normal((batch, tq, heads, dim)), jnp.float32)
    return q, k, v, w


def _value_and_grads(impl, q, k, v, w, mask):
    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, mask, impl).astype(jnp.float32) * w)

    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, impl))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("shape", [(2, 37, 37, 3, 16), (3, 1, 50, 2, 8), (2, 300, 300, 2, 32),
                                   (1, 90, 130, 4, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_matches_einsum(shape, masked, monkeypatch):
    batch, tq, tk, heads, dim = shape
    # Small chunks so that every path (several query chunks, odd last chunk) is exercised.
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 64 * tk)
    q, k, v, w = _qkv(*shape)
    mask = None
    if masked:  # one full row, one partly padded, and (batch 3) one fully masked row
        lengths = np.array([tk, max(tk // 3, 1), 0][:batch])
        mask = jnp.asarray(np.arange(tk)[None] < lengths[:, None])
    ref_out, ref_grads = _value_and_grads("einsum", q, k, v, w, mask)
    out, grads = _value_and_grads("blockwise", q, k, v, w, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-6, rtol=1e-5)


def test_blockwise_bfloat16_is_close():
    q, k, v, w = _qkv(2, 64, 64, 2, 16, jnp.bfloat16)
    out = dot_product_attention(q, k, v, None, "blockwise")
    ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                v.astype(jnp.float32), None, "einsum")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum(
            dot_product_attention(q, k, v, None, "blockwise").astype(jnp.float32) * w),
            argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 for g in grads)


def test_auto_is_blockwise_on_cpu_and_rejects_unknown_names():
    if jax.default_backend() == "cpu":
        assert attention.default_implementation() == "blockwise"
    q, k, v, _ = _qkv(1, 8, 8, 1, 4)
    with pytest.raises(ValueError, match="flash"):
        dot_product_attention(q, k, v, None, "flash")


def test_blockwise_under_remat_and_a_sharded_mesh():
    assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
    q, k, v, w = _qkv(4, 40, 40, 4, 8)
    mask = jnp.asarray(np.arange(40)[None] < np.array([40, 30, 20, 10])[:, None])
    ref_out, ref_grads = _value_and_grads("einsum", q, k, v, w, mask)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    q, k, v, w = (jax.device_put(x, spec) for x in (q, k, v, w))
    mask = jax.device_put(mask, NamedSharding(mesh, P("data", None)))

    @jax.checkpoint
    def attend(q, k, v):
        return dot_product_attention(q, k, v, mask, "blockwise")

    loss = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        out = jax.jit(attend)(q, k, v)
        grads = loss(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-6, rtol=1e-5)


# ------------------------------------------------ padding as sequence lengths (issue 20)


def _prefix_mask(tk, lengths):
    return jnp.asarray(np.arange(tk)[None] < np.asarray(lengths)[:, None])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,lengths", [((3, 40, 40, 2, 8), (40, 13, 1)),
                                           ((2, 1, 50, 4, 8), (50, 7))])
def test_xla_with_sequence_lengths_equals_the_mask(shape, lengths, dtype, tol):
    """(a) jax.nn's XLA attention given the padding as sequence lengths equals the boolean
    mask formulation on every valid query (values and gradients); padded query rows of
    self-attention are zeros with lengths."""
    batch, tq, tk, heads, dim = shape
    q, k, v, w = _qkv(*shape, dtype=dtype)
    mask = _prefix_mask(tk, lengths)
    q_valid = mask if tq == tk else jnp.ones((batch, tq), bool)
    w = w * q_valid[:, :, None, None]  # the loss reads valid queries only
    scale = dim ** -0.5

    def run(use_lengths):
        def f(q, k, v):
            return attention._jax_nn_attention(q, k, v, mask, scale, "xla",
                                               lengths=use_lengths)

        loss = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w),
                        argnums=(0, 1, 2))
        return jax.jit(f)(q, k, v), jax.jit(loss)(q, k, v)

    (out_len, grads_len), (out_mask, grads_mask) = run(True), run(False)
    valid = np.asarray(q_valid)
    np.testing.assert_allclose(np.asarray(out_len, np.float32)[valid],
                               np.asarray(out_mask, np.float32)[valid], atol=tol, rtol=tol)
    assert not np.asarray(out_len, np.float32)[~valid].any()  # padded queries: zeros
    for g_len, g_mask in zip(grads_len, grads_mask, strict=True):
        np.testing.assert_allclose(np.asarray(g_len, np.float32),
                                   np.asarray(g_mask, np.float32), atol=tol, rtol=tol)
    # And both equal the einsum reference of the public function on valid queries.
    ref = dot_product_attention(q, k, v, mask, "einsum")
    public = dot_product_attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(np.asarray(public, np.float32)[valid],
                               np.asarray(ref, np.float32)[valid], atol=tol, rtol=tol)


def test_sequence_lengths_of_prefix_masks_and_empty_rows():
    mask = _prefix_mask(6, [6, 2, 0])
    assert attention.sequence_lengths(mask).dtype == jnp.int32
    np.testing.assert_array_equal(attention.sequence_lengths(mask), [6, 2, 1])
    q, k, v, _ = _qkv(3, 6, 6, 1, 8)
    assert np.isfinite(np.asarray(dot_product_attention(q, k, v, mask, "xla"))).all()


class _Spy:
    """Stands in for jax.nn.dot_product_attention: records each call's keyword arguments
    and runs the real XLA implementation (the cuDNN kernel needs a GPU)."""

    def __init__(self):
        self.calls = []
        self.real = jax.nn.dot_product_attention

    def __call__(self, q, k, v, bias=None, mask=None, **kw):
        self.calls.append(dict(kw, bias=bias, mask=mask, dtype=q.dtype, tq=q.shape[1]))
        return self.real(q, k, v, bias, mask, **dict(kw, implementation="xla"))


def test_cudnn_branch_gets_sequence_lengths_and_no_mask(monkeypatch):
    """(b) the cuDNN branch passes the padding as query/key sequence lengths, never a mask."""
    spy = _Spy()
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v, w = _qkv(2, 24, 24, 2, 8, jnp.bfloat16)
    mask = _prefix_mask(24, [24, 9])
    out = dot_product_attention(q, k, v, mask, "cudnn")
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(
            q, k, v, mask, "cudnn").astype(jnp.float32) * w))(q)
    assert out.dtype == jnp.bfloat16 and grads.dtype == jnp.bfloat16
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["implementation"] == "cudnn"
        assert call["mask"] is None and call["bias"] is None
        np.testing.assert_array_equal(call["key_value_seq_lengths"], [24, 9])
        np.testing.assert_array_equal(call["query_seq_lengths"], [24, 9])
    # Cross-attention (one pooling query): key lengths only.
    dot_product_attention(q[:, :1], k, v, mask, "cudnn")
    assert spy.calls[-1]["query_seq_lengths"] is None
    np.testing.assert_array_equal(spy.calls[-1]["key_value_seq_lengths"], [24, 9])


def test_auto_on_gpu_runs_a_bf16_whisper_step_through_cudnn_with_lengths(monkeypatch, caplog):
    """'auto' as on a GPU (forced on CPU): a masked bf16 Whisper encoder's forward and
    backward call the cuDNN branch with lengths only, and match the einsum path."""
    from jaxser.models import whisper

    cfg = whisper.WhisperConfig(
            num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2,
            encoder_ffn_dim=64, max_source_positions=32, dtype="bfloat16",
            variable_length=True, mask_attention=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
    mask = _prefix_mask(64, [64, 30])
    model = whisper.WhisperEncoder(cfg)
    params = model.init(jax.random.key(0), x, mask)

    def loss(p, impl):
        out = whisper.WhisperEncoder(dataclasses.replace(cfg, attention=impl)).apply(p, x, mask)
        h = out.hidden_states[-1].astype(jnp.float32)
        return jnp.sum(jnp.where(out.mask[:, :, None], h, 0.0) ** 2)

    ref, ref_grads = jax.value_and_grad(loss)(params, "einsum")
    spy = _Spy()
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(attention, "default_implementation", lambda: "cudnn")
    got, grads = jax.value_and_grad(loss)(params, "auto")
    assert len(spy.calls) == cfg.encoder_layers
    for call in spy.calls:
        assert call["implementation"] == "cudnn" and call["mask"] is None
        assert call["dtype"] == jnp.bfloat16
        np.testing.assert_array_equal(call["key_value_seq_lengths"], [32, 15])
    np.testing.assert_allclose(float(got), float(ref), rtol=2e-2)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=5e-2 * float(np.abs(np.asarray(r, np.float32)).max())
                                   + 1e-6)


def test_cudnn_fallbacks_are_logged_once(monkeypatch, caplog):
    """float32 on the cuDNN path runs XLA attention (with lengths); dropout on the fused
    path is not applied; each logged once."""
    spy = _Spy()
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(attention, "_logged", set())
    q, k, v, _ = _qkv(2, 16, 16, 2, 8)
    mask = _prefix_mask(16, [16, 5])
    with caplog.at_level("INFO", logger=attention.__name__):
        for _ in range(2):
            dot_product_attention(q, k, v, mask, "cudnn")
    assert [c["implementation"] for c in spy.calls] == ["xla", "xla"]
    assert all(c["mask"] is None for c in spy.calls)
    assert sum("float16/bfloat16 only" in r.message for r in caplog.records) == 1

    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    caplog.clear()
    key = jax.random.key(1)
    with caplog.at_level("INFO", logger=attention.__name__):
        plain = dot_product_attention(qb, kb, vb, mask, "cudnn")
        for _ in range(2):
            dropped = dot_product_attention(qb, kb, vb, mask, "cudnn", dropout_rate=0.5,
                                            dropout_rng=key)
    np.testing.assert_array_equal(np.asarray(dropped, np.float32), np.asarray(plain, np.float32))
    assert spy.calls[-1]["implementation"] == "cudnn"
    assert sum("no dropout" in r.message for r in caplog.records) == 1


def test_attention_dropout_off_the_fused_path_runs_einsum():
    q, k, v, _ = _qkv(2, 80, 80, 2, 8)
    mask = _prefix_mask(80, [80, 30])
    key = jax.random.key(3)
    plain = dot_product_attention(q, k, v, mask, "blockwise")
    outs = [dot_product_attention(q, k, v, mask, impl, dropout_rate=0.3, dropout_rng=key)
            for impl in ("blockwise", "xla", "einsum")]
    for out in outs:  # the same einsum-with-dropout numbers whatever was asked for
        np.testing.assert_array_equal(np.asarray(out), np.asarray(outs[-1]))
    assert not np.allclose(np.asarray(outs[0]), np.asarray(plain), atol=1e-3)
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, mask, "einsum", dropout_rate=0.1)


def test_wav2vec2_attention_dropout_goes_through_the_dispatch(monkeypatch):
    """The wav2vec2 family's attention dropout (HF default 0.1) runs through
    dot_product_attention: einsum with dropout on CPU; on the fused path no dropout."""
    from jaxser.models import wav2vec2
    from jaxser.models.wav2vec2_config import Wav2Vec2Config

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, hidden_dropout=0.0, activation_dropout=0.0,
                         attention_dropout=0.5, layerdrop=0.0)
    layer = wav2vec2.Attention(cfg, deterministic=False)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 16)), jnp.float32)
    mask = _prefix_mask(24, [24, 10])
    params = layer.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, mask)
    rngs = {"dropout": jax.random.key(2)}
    dropped = layer.apply(params, x, mask, rngs=rngs)
    plain = wav2vec2.Attention(cfg, deterministic=True).apply(params, x, mask)
    assert not np.allclose(np.asarray(dropped), np.asarray(plain), atol=1e-4)

    spy = _Spy()
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(attention, "default_implementation", lambda: "cudnn")
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    fused = wav2vec2.Attention(bf16, deterministic=False).apply(params, x, mask, rngs=rngs)
    ref = wav2vec2.Attention(bf16, deterministic=True).apply(params, x, mask)
    assert spy.calls and all(c["implementation"] == "cudnn" for c in spy.calls)
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(ref, np.float32))
