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
