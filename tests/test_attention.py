"""dot_product_attention: the blockwise (flash-style) CPU path against the einsum reference."""

from __future__ import annotations

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
