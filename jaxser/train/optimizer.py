"""optax optimizers from the config: schedules, freezing by path, per-group rates.

Parameters fall into groups by their path (`encoder/conv1/kernel`, `head/dense/kernel`):
`frozen` (matches an `optim.freeze` pattern), `head` (everything outside the encoder,
trained at `lr * head_lr_scale`), `centers` (center-loss centers at `center_lr`) and
`encoder`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

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


def _adam(optim: Mapping, lr) -> optax.GradientTransformation:
    if optim["name"] == "adamw":
        return optax.adamw(lr, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                           weight_decay=optim["weight_decay"])
    if optim["name"] == "adam":
        return optax.adam(lr, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"])
    raise ValueError(f"unknown optim.name {optim['name']!r}: adamw|adam")


def _gate_until(step: int) -> optax.GradientTransformation:
    """Zeroes updates before `step` (frozen parameters that unfreeze later)."""

    def init(_):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        on = (state.count >= step).astype(jnp.float32)
        updates = jax.tree.map(lambda u: u * on.astype(u.dtype), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

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
        "frozen": (optax.chain(_adam(optim, schedule), _gate_until(unfreeze)) if unfreeze > 0
                   else optax.set_to_zero()),
    }
    tx = optax.multi_transform(groups, param_labels(params, tuple(optim["freeze"])))
    chain = [tx]
    if float(optim["clip_norm"]) > 0:
        chain.insert(0, optax.clip_by_global_norm(float(optim["clip_norm"])))
    return optax.chain(*chain), schedule
