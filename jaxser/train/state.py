"""Train state and its sharded creation.

Parameters are never whole on one device: the state's shape comes from `jax.eval_shape`,
its shardings from the layers' logical axis names and the config's rules, and a jitted
init creates it directly in those shardings (the flax lm1b recipe).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxser.train import losses, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"model": flax params, "centers": [K, D] when the center loss is on}
    opt_state: Any


def init_fn(model: nn.Module, tx: optax.GradientTransformation, sample_inputs, sample_mask,
            num_centers: int = 0):
    """key -> TrainState with logically partitioned (boxed) parameters."""

    def init(key):
        k_model, k_centers = jax.random.split(key)
        variables = model.init({"params": k_model, "dropout": k_model}, sample_inputs,
                               sample_mask, deterministic=True)
        params = {"model": variables["params"]}
        if num_centers:
            embed = jax.eval_shape(lambda: model.apply(
                nn.meta.unbox(variables), sample_inputs, sample_mask))["embedding"]
            params["centers"] = nn.with_logical_partitioning(
                lambda: losses.init_centers(k_centers, num_centers, embed.shape[-1]),
                ("classes", "embed"))()
        return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                          opt_state=tx.init(params))

    return init


def abstract_state(init, key: jax.Array, mesh: Mesh, rules):
    """(ShapeDtypeStructs carrying their shardings, shardings) of the state."""
    boxed = jax.eval_shape(init, key)
    shardings = nn.meta.unbox(sharding.logical_shardings(boxed, mesh, rules))
    shapes = nn.meta.unbox(boxed)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    return abstract, shardings


def create_state(init, key: jax.Array, mesh: Mesh, rules):
    """(state, shardings): the state built directly in its shardings."""
    _, shardings = abstract_state(init, key, mesh, rules)
    with mesh, nn.logical_axis_rules(sharding.rules_tuple(rules)):
        state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)
    return state, shardings
