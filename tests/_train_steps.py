"""What the train-step tests share (tests/test_train_step.py, tests/test_freeze.py): the
labels, a random padded batch, and one step's gradients at given parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxser.train import step as step_lib
from jaxser.train.state import TrainState

LABELS = ["neutral", "happy", "sad", "angry"]


def train_batch(n=8, samples=8000, seed=0) -> dict:
    """A host batch of `n` random utterances of `samples // 2` to `samples` samples (zero
    padding), soft labels over LABELS, domain 0, every row valid."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(samples // 2, samples, n).astype(np.int32)
    audio = rng.normal(0, 0.1, (n, samples)).astype(np.float32)
    audio[np.arange(samples)[None, :] >= lengths[:, None]] = 0
    label = rng.dirichlet(np.ones(len(LABELS)), n).astype(np.float32)
    return {"audio": audio, "length": lengths, "label": label,
            "class_index": label.argmax(-1).astype(np.int32),
            "domain": np.zeros(n, np.int32), "valid": np.ones(n, np.float32)}


def capture_gradients():
    """An optimizer that keeps the step's gradients as its state and changes nothing."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_gradients(cfg, exp, params, batch) -> tuple[dict, dict]:
    """(gradients, metrics) of one jitted train step of `exp` (built from `cfg`) at
    `params` on `batch`, on the host."""
    tx = capture_gradients()
    train_step = jax.jit(step_lib.make_train_step(cfg, exp.model, tx, exp.schedule,
                                                  exp.total_steps))
    with exp.mesh_context():
        state = TrainState(step=jnp.zeros([], jnp.int32), params=params,
                           opt_state=tx.init(params))
        state, metrics = train_step(state, exp.device_batch(batch), jax.random.key(1))
    return jax.device_get(state.opt_state), jax.device_get(metrics)
