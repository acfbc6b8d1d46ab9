"""optax optimizers from the config: schedules, freezing by path, per-group rates.

Parameters fall into groups by their path (`encoder/conv1/kernel`, `head/dense/kernel`):
`frozen` (matches an `optim.freeze` pattern), `head` (everything outside the encoder,
trained at `lr * head_lr_scale`), `centers` (center-loss centers at `center_lr`) and
`encoder`.

Frozen means no backward pass: the train step cuts frozen parameters with `stop_gradient`
before the loss (`frozen_mask`, `stop_frozen`), so their gradients are exactly zero and
autodiff drops every backward computation that only led to them (a frozen encoder leaves
the heads' backward; a frozen conv stem cuts the backward below it). Gradient norms and
clipping therefore see the trainable parameters only. With `optim.unfreeze_after` > 0 the
step switches to full gradients at that step, and the frozen group's Adam starts then,
with fresh moments (`_start_at`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_schedule(optim: Mapping, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Warmup then constant, cosine or linear decay, or a per-epoch factor."""
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    decay_steps = max(total_steps - warmup, 1)
    kind = optim["schedule"]
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "epoch_decay":
        main = optax.exponential_decay(lr, max(steps_per_epoch, 1), float(optim["epoch_decay"]),
                                       staircase=True)
    else:
        raise ValueError(f"unknown optim.schedule {kind!r}: constant|cosine|linear|epoch_decay")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def path_str(path) -> str:
    """A pytree key path as `a/b/c`."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params, freeze_patterns) -> dict:
    """The optimizer group of every parameter, from its path."""

    def label(path, _):
        name = path_str(path)
        if name.startswith("centers"):
            return "centers"
        model_path = name.removeprefix("model/")
        if any(fnmatch.fnmatch(model_path, p) for p in freeze_patterns):
            return "frozen"
        return "encoder" if model_path.startswith("encoder/") else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(params, freeze_patterns):
    """A pytree of bools like `params`, True where an `optim.freeze` pattern matches; None
    when nothing is frozen."""
    if not freeze_patterns:
        return None
    mask = jax.tree.map(lambda label: label == "frozen", param_labels(params, freeze_patterns))
    return mask if any(jax.tree.leaves(mask)) else None


def stop_frozen(params, mask):
    """`params` with `stop_gradient` on the frozen leaves (mask from `frozen_mask`): their
    gradients are exact zeros and no backward pass runs for them alone."""
    if mask is None:
        return params
    return jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
                        params, mask)


def _adam(optim: Mapping, lr) -> optax.GradientTransformation:
    if optim["name"] == "adamw":
        return optax.adamw(lr, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                           weight_decay=optim["weight_decay"])
    if optim["name"] == "adam":
        return optax.adam(lr, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"])
    raise ValueError(f"unknown optim.name {optim['name']!r}: adamw|adam")


class StartAtState(NamedTuple):
    count: jax.Array  # updates seen (the global step)
    inner: optax.OptState  # the wrapped transform's state, untouched before the start


def _start_at(step: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` from update `step` on; zero updates before, with `inner`'s state untouched, so
    parameters that unfreeze start with fresh Adam moments and bias correction (while
    frozen their gradients are zeros, not information)."""

    def init(params):
        return StartAtState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        def run():
            return inner.update(updates, state.inner, params)

        def wait():
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        updates, inner_state = jax.lax.cond(state.count >= step, run, wait)
        return updates, StartAtState(count=optax.safe_increment(state.count), inner=inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: Mapping, total_steps: int, steps_per_epoch: int, params):
    """(optax transform, learning-rate schedule) for the params tree."""
    schedule = make_schedule(optim, total_steps, steps_per_epoch)
    scale = float(optim["head_lr_scale"])
    unfreeze = int(optim["unfreeze_after"])
    groups = {
        "encoder": _adam(optim, schedule),
        "head": _adam(optim, lambda s: schedule(s) * scale),
        "centers": optax.sgd(float(optim["center_lr"])),
        # The inner Adam counts from the unfreeze step: its schedule is shifted to match.
        "frozen": (_start_at(unfreeze, _adam(optim, lambda s: schedule(s + unfreeze)))
                   if unfreeze > 0 else optax.set_to_zero()),
    }
    tx = optax.multi_transform(groups, param_labels(params, tuple(optim["freeze"])))
    chain = [tx]
    if float(optim["clip_norm"]) > 0:
        chain.insert(0, optax.clip_by_global_norm(float(optim["clip_norm"])))
    return optax.chain(*chain), schedule
