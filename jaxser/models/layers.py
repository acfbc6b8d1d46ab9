"""What the encoders share: dtype names, transformers' activation names, a sharding-safe
DenseGeneral, the layer stack (with remat that works on XLA:CPU too), a GELU and a
LayerNorm whose backward passes keep less memory than autodiff of their formulas, and
`Modules`, the one way every encoder builds its layers."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, transformers' "gelu": x * Phi(x), Phi the standard normal CDF.

    Same values as `jax.nn.gelu(x, approximate=False)`; the backward pass keeps only x and
    recomputes the derivative. Autodiff of the formula keeps x plus the erfc and exp terms,
    and XLA:CPU merges a recomputation written the same way with the forward pass's (CSE)
    and so keeps those alive anyway: 4.25 [tokens, ffn] arrays per layer against 2 here
    (docs/benchmarks.md), hence `erf`, not `erfc`, below. Reverse mode only (no `jax.jvp`).
    """
    return 0.5 * x * jax.lax.erfc(-x * _SQRT_HALF)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)
    return (g * (cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# Activation names as in transformers' ACT2FN ("gelu" is the exact erf GELU).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
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


def run_layers(parent: nn.Module, make_layer: Callable[..., nn.Module], n: int, x: jax.Array,
               *args: Any, remat: bool, dropout: bool) -> list[jax.Array]:
    """Apply `parent`'s submodules `layers_0 .. layers_{n-1}` in turn; return [x, out_0, ...].

    `make_layer(**kw)` builds one layer (kw: its `name`, or `parent=None` for a template);
    each is called as `layer(x, *args)`. With `remat`, the layers run as one `lax.scan` over
    their stacked parameters, each step under `jax.checkpoint`, so the backward pass keeps
    only the layer inputs and recomputes the rest. An unrolled `jax.checkpoint` is not
    enough: XLA:CPU drops its optimisation barrier and CSEs the recomputation away (same
    memory as without); inside a loop there is nothing to merge, on every backend. The
    parameter tree is the same either way, so checkpoints and HF conversion don't change.
    `dropout`: draw a 'dropout' key per layer (training mode).
    """
    if not remat or parent.is_initializing():
        hidden = [x]
        for i in range(n):
            x = make_layer(name=f"layers_{i}")(x, *args)
            hidden.append(x)
        return hidden
    params = nn.meta.unbox(parent.variables["params"])
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *(params[f"layers_{i}"] for i in range(n)))
    keys = jax.random.split(parent.make_rng("dropout"), n) if dropout else None
    template = make_layer(parent=None)

    @jax.checkpoint
    def step(h: jax.Array, layer: tuple[Any, jax.Array | None]) -> tuple[jax.Array, jax.Array]:
        p, key = layer
        y = template.apply({"params": p}, h, *args,
                           rngs=None if key is None else {"dropout": key})
        return y, y

    last, ys = jax.lax.scan(step, x, (stacked, keys))
    return [x, *(ys[i] for i in range(n - 1)), last]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    normed = centred * rstd
    y = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y, (normed.astype(x.dtype), rstd, scale)


def _layer_norm_bwd(eps, residuals, dy):
    del eps
    normed, rstd, scale = residuals
    dtype = normed.dtype
    normed, dy = normed.astype(jnp.float32), dy.astype(jnp.float32)
    sum_axes = tuple(range(dy.ndim - 1))
    d_bias, d_scale = jnp.sum(dy, axis=sum_axes), jnp.sum(dy * normed, axis=sum_axes)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    return dx.astype(dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """torch's LayerNorm over the last axis: two-pass variance, float32 statistics.

    Its backward pass keeps the normalised input (in the input's dtype) and 1/std per
    token; autodiff of flax's LayerNorm keeps three [tokens, features] arrays (the centred
    input, its square and the normalised input: docs/benchmarks.md). Parameters `scale` and
    `bias` as flax's, with logical axis `axis`; none with `affine=False` (torch's
    `elementwise_affine=False`).
    """

    epsilon: float = 1e-5
    axis: str = "embed"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        if not self.affine:
            scale, bias = jnp.ones(features, jnp.float32), jnp.zeros(features, jnp.float32)
            return _layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), (self.axis,)),
                           features, self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros_init(), (self.axis,)),
                          features, self.param_dtype)
        return _layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


class Modules:
    """Factories for an encoder's layers: compute and parameter dtype, kernel init and
    logical axis names in one place. Every jaxser encoder builds its dense layers, layer
    norms and convolutions through one of these (`mk = Modules.of(cfg)` inside a module's
    `__call__`), so a new encoder family gets the same dtypes, sharding names and init.

    `Modules.of(config)` reads `config.dtype`, `config.param_dtype`,
    `config.layer_norm_eps` and (if present) `config.init_std`, the normal init of dense
    kernels (0.02, HF's `initializer_range`, otherwise).
    """

    def __init__(self, dtype: str = "float32", param_dtype: str = "float32", *,
                 init_std: float = 0.02, layer_norm_eps: float = 1e-5):
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.init_std = init_std
        self.layer_norm_eps = layer_norm_eps

    @classmethod
    def of(cls, config: Any) -> Modules:
        """The factories of an encoder config (see the class docstring for the fields)."""
        return cls(config.dtype, config.param_dtype, init_std=getattr(config, "init_std", 0.02),
                   layer_norm_eps=config.layer_norm_eps)

    def dense(self, features: int | tuple[int, ...], kernel_axes: tuple[str | None, ...],
              name: str, *, use_bias: bool = True) -> DenseGeneral:
        """A projection to `features` whose kernel has logical `kernel_axes` (input axes,
        then output axes); the bias takes the output axes' names."""
        features = (features,) if isinstance(features, int) else tuple(features)
        return DenseGeneral(
                features, kernel_axes=tuple(kernel_axes),
                bias_axes=tuple(kernel_axes[-len(features):]), use_bias=use_bias,
                init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                name=name)

    def layer_norm(self, name: str, axis: str = "embed", eps: float | None = None, *,
                   affine: bool = True) -> LayerNorm:
        """torch's LayerNorm (float32 statistics), params named by logical `axis` (none
        with `affine=False`); `eps` defaults to the config's `layer_norm_eps`."""
        return LayerNorm(self.layer_norm_eps if eps is None else eps, axis, self.dtype,
                         self.param_dtype, affine, name=name)

    def conv(self, features: int, kernel: int, name: str, *,
             kernel_axes: tuple[str | None, ...], stride: int = 1,
             padding: str | tuple[tuple[int, int], ...] = "VALID", use_bias: bool = True,
             groups: int = 1, kernel_init: Callable | None = None) -> nn.Conv:
        """A convolution over time in NWC layout (kernel [kernel, in / groups, features]
        with logical `kernel_axes`, bias named by the last one); `kernel_init` defaults to
        the dense init (normal, `init_std`)."""
        init = kernel_init if kernel_init is not None else nn.initializers.normal(self.init_std)
        return nn.Conv(
                features, kernel_size=(kernel,), strides=(stride,), padding=padding,
                feature_group_count=groups, use_bias=use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_init=partitioned(init, tuple(kernel_axes)),
                bias_init=partitioned(nn.initializers.zeros_init(), (kernel_axes[-1],)))
