"""Shared layers: the exact GELU's values, gradient and backward-pass memory."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxser.models.layers import ACTIVATIONS, gelu


def test_gelu_matches_jax_and_torch_values_and_gradients():
    x = np.linspace(-9, 9, 2001, dtype=np.float32)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(),
                               rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(gelu))(jnp.asarray(x))
    t = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(t).sum().backward()
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)
    bf16 = jax.grad(lambda v: jnp.sum(gelu(v)))(jnp.asarray(x, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), grad, atol=2e-2)
    assert ACTIVATIONS["gelu"] is gelu


def _ffn_backward_temp_bytes(act) -> int:
    x = jnp.ones((300, 64))
    ws = [(jnp.full((64, 256), 0.01), jnp.full((256, 64), 0.01)) for _ in range(4)]

    def loss(ws, x):
        for w1, w2 in ws:
            x = x + act(jax.nn.standardize(x) @ w1) @ w2
        return jnp.sum(x ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gelu_backward_keeps_less_than_autodiff_of_the_formula():
    ours = _ffn_backward_temp_bytes(gelu)
    autodiff = _ffn_backward_temp_bytes(lambda v: jax.nn.gelu(v, approximate=False))
    assert ours < 0.75 * autodiff, (ours, autodiff)


def _flax_and_ours(x, dtype=jnp.float32):
    import flax.linen as nn

    from jaxser.models.layers import LayerNorm

    ref = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype)
    ours = LayerNorm(epsilon=1e-5, dtype=dtype)
    params = ref.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
    return ref, ours, params


def test_layer_norm_matches_flax_and_torch_values_and_gradients():
    x = 3 + 2 * jax.random.normal(jax.random.key(2), (2, 7, 48))
    ref, ours, params = _flax_and_ours(x)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    p = params["params"]
    t = torch.nn.LayerNorm(48)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.array(p["scale"])))
        t.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    np.testing.assert_allclose(ours.apply(params, x), t(torch.from_numpy(np.array(x))).detach(),
                               atol=1e-5)
    w = jax.random.normal(jax.random.key(3), x.shape)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)) * w)

    g_ours = jax.grad(loss, argnums=(1, 2))(ours, params, x)
    g_ref = jax.grad(loss, argnums=(1, 2))(ref, params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 g_ours, g_ref)
    bf16 = ours.clone(dtype=jnp.bfloat16)
    g_bf16 = jax.grad(loss, argnums=2)(bf16, params, x.astype(jnp.bfloat16))
    assert g_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_bf16, np.float32), g_ref[1], atol=0.1)


def test_layer_norm_backward_keeps_one_array_per_norm():
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    x = jnp.ones((300, 64))
    ref, ours, params = _flax_and_ours(x)
    counts = []
    for module in (ours, ref):
        def loss(params, x, module=module):
            return jnp.sum(module.apply(params, x) @ jnp.full((64, 64), 0.1))

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss, params, x)
        counts.append(sum(line.startswith("f32[300,64]") for line in out.getvalue().splitlines()))
    assert counts == [1, 3], counts  # ours: the normalised input only
