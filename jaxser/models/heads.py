"""Output heads: emotion classes, domain (adversarial, via gradient reversal), dimensions.

Heads work on pooled vectors [B, D] and on frames [B, T, D] alike (dense layers act on the
last axis), so the same emotion head can score each frame for emotion over time.
Heads return raw logits / values in float32; callers apply log_softmax for the losses.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

Dtype = Any

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh}
_OUTPUT_ACTIVATIONS = {"none": lambda x: x, "sigmoid": nn.sigmoid, "tanh": jnp.tanh}


def _activation(name: str, table: dict) -> Any:
    """Looks up an activation by name; ValueError naming the choices otherwise."""
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str) -> nn.Dense:
    """Dense layer whose kernel and bias carry logical axis names."""
    return nn.Dense(
            features, dtype=dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
            name=name)


def _activation_axes(x: jax.Array, last: str) -> tuple[str, ...]:
    """Logical axis names of a head activation: [batch, (length,) last]."""
    return ("batch", "length", last) if x.ndim == 3 else ("batch", last)


class _MLP(nn.Module):
    """Optional hidden layer (dense -> [LayerNorm] -> activation -> dropout) then the output
    layer. With `norm` the hidden layer is the MSP-Podcast baseline's: Linear, LayerNorm,
    ReLU, Dropout."""

    features: int
    out_axis: str
    hidden_dim: int | None = None
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """x [..., D] -> [..., features] in float32."""
        act = _activation(self.activation, _ACTIVATIONS)
        x = x.astype(self.dtype)
        in_axis = "embed"
        if self.hidden_dim:
            x = _dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "hidden")(x)
            if self.norm:
                x = nn.LayerNorm(
                    dtype=self.dtype, name="hidden_norm",
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            ("mlp",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("mlp",)))(x)
            x = nn.with_logical_constraint(act(x), _activation_axes(x, "mlp"))
            in_axis = "mlp"
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        out = _dense(self.features, (in_axis, self.out_axis), self.dtype, "out")(x)
        return out.astype(jnp.float32)


def _check_input(head: nn.Module, x: jax.Array) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"{type(head).__name__} input must be [B, D] or [B, T, D], "
                         f"got {x.shape}")


def _head_mlp(head: nn.Module, outputs: int, x: jax.Array, deterministic: bool) -> jax.Array:
    """The `mlp` of a head, from its hidden_dim, activation, dropout_rate, dtype (and norm)."""
    return _MLP(outputs, "classes", head.hidden_dim, head.activation, head.dropout_rate,
                head.dtype, getattr(head, "norm", False), name="mlp")(x, deterministic)


class EmotionHead(nn.Module):
    """Emotion classifier: [B, D] or [B, T, D] -> logits [B, K] or [B, T, K] (float32).

    Attributes:
        num_classes: K, the size of the target taxonomy.
        hidden_dim: width of an optional hidden layer (None or 0: a single linear layer,
            as in EM2LDL).
        activation: 'relu', 'gelu' or 'tanh' for the hidden layer.
        dropout_rate: dropout before the output layer (training only).
        dtype: compute dtype.
        norm: LayerNorm after the hidden layer's dense (before the activation).
    """

    num_classes: int
    hidden_dim: int | None = None
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Logits over the emotion classes (apply log_softmax for the losses)."""
        _check_input(self, x)
        logits = _head_mlp(self, self.num_classes, x, deterministic)
        return nn.with_logical_constraint(logits, _activation_axes(logits, "classes"))


@jax.custom_vjp
def _reverse(x: jax.Array, lam: jax.Array) -> jax.Array:
    return x


def _reverse_fwd(x, lam):
    return x, lam


def _reverse_bwd(lam, g):
    return (-lam.astype(g.dtype) * g, jnp.zeros_like(lam))


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: jax.Array, lam: float | jax.Array) -> jax.Array:
    """Gradient reversal layer (Ganin & Lempitsky 2015).

    Identity in the forward pass; the backward pass multiplies the incoming gradient by
    -lam, so the encoder learns to confuse the domain head while the head learns to
    classify domains. lam is a traced scalar (it can follow a schedule inside jit) and
    receives no gradient.
    """
    return _reverse(x, jnp.asarray(lam, jnp.float32))


def grl_schedule(
        step: int | jax.Array,
        total_steps: int | jax.Array,
        max_lambda: float,
        kind: str = "dann",
) -> jax.Array:
    """Gradient-reversal strength at a training step.

    'dann': max_lambda * (2 / (1 + exp(-10 p)) - 1) with p = step / total_steps clipped to
    [0, 1] (Ganin et al. 2016), rising smoothly from 0 to ~max_lambda.
    'constant': max_lambda at every step.
    Jittable in step and total_steps; returns a float32 scalar.
    """
    if kind == "constant":
        return jnp.asarray(max_lambda, jnp.float32)
    if kind != "dann":
        raise ValueError(f"unknown grl schedule kind {kind!r}; choose 'dann' or 'constant'")
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
    p = jnp.clip(step / total, 0.0, 1.0)
    return (max_lambda * (2.0 / (1.0 + jnp.exp(-10.0 * p)) - 1.0)).astype(jnp.float32)


class DomainHead(nn.Module):
    """Domain classifier behind a gradient reversal layer (domain-adversarial training).

    x -> gradient_reversal(lam) -> dense -> activation -> dropout -> num_domains logits.

    Attributes:
        num_domains: M, e.g. the number of training corpora.
        hidden_dim: width of the hidden layer (None or 0: linear).
        activation: 'relu', 'gelu' or 'tanh'.
        dropout_rate: dropout after the hidden layer (training only).
        dtype: compute dtype.
    """

    num_domains: int
    hidden_dim: int | None = 256
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
            self, x: jax.Array, lam: float | jax.Array = 1.0, deterministic: bool = True,
    ) -> jax.Array:
        """[B, D] or [B, T, D] -> domain logits [B, M] or [B, T, M] (float32)."""
        _check_input(self, x)
        logits = _head_mlp(self, self.num_domains, gradient_reversal(x, lam), deterministic)
        return nn.with_logical_constraint(logits, _activation_axes(logits, "classes"))


class DimensionalHead(nn.Module):
    """Regression of emotion dimensions (arousal, valence, dominance by default).

    The SER model puts it on the pooled embedding beside the emotion head; the targets
    are the data set's dimensions normalised to 0-1 (`jaxser.data.dimensions`).

    Attributes:
        num_outputs: number of dimensions (3: arousal, valence, dominance).
        hidden_dim: width of an optional hidden layer.
        activation: hidden activation.
        output_activation: 'none', 'sigmoid' (targets in [0, 1]) or 'tanh' ([-1, 1]).
        dropout_rate: dropout before the output layer (training only).
        dtype: compute dtype.
        norm: LayerNorm after the hidden layer's dense (before the activation).
    """

    num_outputs: int = 3
    hidden_dim: int | None = None
    activation: str = "relu"
    output_activation: str = "none"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """[B, D] or [B, T, D] -> [B, num_outputs] or [B, T, num_outputs] (float32)."""
        _check_input(self, x)
        out_act = _activation(self.output_activation, _OUTPUT_ACTIVATIONS)
        return out_act(_head_mlp(self, self.num_outputs, x, deterministic))
