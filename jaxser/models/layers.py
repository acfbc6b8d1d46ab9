"""What the encoders share: dtype names, transformers' activation names, a sharding-safe
DenseGeneral."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Activation names as in transformers' ACT2FN ("gelu" is the exact erf GELU).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def partitioned(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names (for sharding rules)."""
    return nn.with_logical_partitioning(init, axes)


class DenseGeneral(nn.Module):
    """y = x . kernel + bias over the last len(kernel_axes) - len(features) input axes.

    Flax's own DenseGeneral builds multi-axis kernels flat and reshapes them, which breaks the
    logical sharding constraint of a [embed, heads, head_dim] kernel under a mesh; this one
    creates the kernel in its final shape.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.kernel_axes) - len(self.features)
        kernel = self.param(
                "kernel", partitioned(nn.initializers.normal(self.init_std), self.kernel_axes),
                x.shape[-n_in:] + self.features, self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.bias_axes),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
