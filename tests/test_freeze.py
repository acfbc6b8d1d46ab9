"""Frozen means no backward (issue 20): frozen parameters get exactly zero gradient, the
frozen step does less work (XLA's FLOP count), grad_norm sees trainable parameters only,
and unfreezing at a step starts a fresh Adam for them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _train_steps import LABELS, step_gradients, train_batch

from jaxser import config as config_lib
from jaxser.models import ser_model
from jaxser.train import optimizer
from jaxser.train.experiment import Experiment

ENCODER, STEM = ("encoder/*",), ("encoder/conv*",)


def _config(freeze=(), unfreeze=0, d_model=None):
    cfg = config_lib.load_config("configs/demo.py:smoke", [
        "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
        "--config.optim.weight_decay=0.0", "--config.optim.clip_norm=0.0",
        "--config.mesh.data=1", "--config.model.attention=einsum",
        "--config.train.compilation_cache=''"])
    cfg.optim.freeze = tuple(freeze)
    cfg.optim.unfreeze_after = unfreeze
    if d_model:
        cfg.model.encoder_overrides.d_model = d_model
        cfg.model.encoder_overrides.encoder_ffn_dim = 4 * d_model
    return cfg


def _batch(seed=0):
    return train_batch(samples=16000, seed=seed)


@pytest.fixture(scope="module")
def params():
    exp = Experiment(_config(), LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, _ = exp.init_state(jax.random.key(0))
    return jax.device_get(state.params)


def _gradients(cfg, params):
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    return step_gradients(cfg, exp, params, _batch())


@pytest.mark.parametrize("freeze", [ENCODER, STEM])
def test_frozen_parameters_get_exactly_zero_gradient(freeze, params):
    """(c) stop_gradient before the loss: frozen leaves' gradients are exact zeros, the
    others' are the unfrozen step's, and grad_norm is over the trainable ones only."""
    full, full_metrics = _gradients(_config(), params)
    grads, metrics = _gradients(_config(freeze), params)
    mask = optimizer.frozen_mask(params, freeze)
    n_frozen = 0
    for (path, g), f, frozen in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(full), jax.tree.leaves(mask), strict=True):
        name = jax.tree_util.keystr(path)
        if frozen:
            n_frozen += 1
            assert not np.any(g), name
            assert np.any(f), name  # the unfrozen step does have a gradient there
        elif "encoder" not in name or freeze == STEM:
            # Same gradient as the full step (where nothing below is needed).
            np.testing.assert_allclose(g, f, rtol=2e-4, atol=1e-6, err_msg=name)
    assert n_frozen >= (2 if freeze == STEM else 10)
    trainable = [g for g, frozen in zip(jax.tree.leaves(grads), jax.tree.leaves(mask),
                                        strict=True) if not frozen]
    want = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in trainable))
    np.testing.assert_allclose(metrics["grad_norm"], want, rtol=1e-5)
    assert metrics["grad_norm"] < full_metrics["grad_norm"]
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-6)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def _step_flops(cfg) -> tuple[float, float]:
    """FLOPs of the compiled train step, and of the forward pass alone (features + model)."""
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    batch = _batch()
    with exp.mesh_context():
        abstract, shardings = exp.abstract_state(jax.random.key(0))
        step = exp.train_step(shardings).lower(abstract, exp.device_batch(batch),
                                               jax.random.key(1)).compile()

    def forward(params, audio, length):
        inputs, mask = ser_model.features(exp.model.family, exp.model.encoder_cfg, audio, length)
        return exp.model.apply({"params": params["model"]}, inputs, mask)["logits"]

    fwd = jax.jit(forward).lower(abstract.params, batch["audio"], batch["length"]).compile()
    return _flops(step), _flops(fwd)


def test_a_frozen_encoder_leaves_only_the_heads_backward():
    """(c) the frozen step is cheaper, by XLA's FLOP count of the compiled step (einsum
    attention, no remat: every op counted). With the encoder frozen the step costs its
    forward pass and nothing of the encoder's backward (under 0.45x of the full step); a
    frozen conv stem cuts the backward below it."""
    d_model = 256  # the model, not the log-mel front end, dominates the count
    full, forward = _step_flops(_config(d_model=d_model))
    stem, _ = _step_flops(_config(STEM, d_model=d_model))
    encoder, _ = _step_flops(_config(ENCODER, d_model=d_model))
    assert forward <= encoder <= 1.01 * forward, (encoder, forward)
    assert encoder < 0.45 * full, (encoder, full)
    assert encoder < stem < full, (encoder, stem, full)


def test_unfreezing_at_a_step_starts_a_fresh_adam():
    """unfreeze_after=2: encoder parameters stay bit-identical for steps 0 and 1, then
    train; their first update is a fresh Adam's (|update| = lr where the gradient is
    non-zero: moments and bias correction start at the unfreeze step) at the global step's
    learning rate."""
    cfg = _config(ENCODER, unfreeze=2)
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    lr = float(cfg.optim.lr)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        step = exp.train_step(shardings)
        history = [jax.device_get(state.params)]
        for i in range(3):
            state, _ = step(state, exp.device_batch(_batch(seed=i)), jax.random.key(1))
            history.append(jax.device_get(state.params))
    enc = [h["model"]["encoder"] for h in history]
    head = [h["model"]["head"] for h in history]
    for a, b in zip(jax.tree.leaves(enc[0]), jax.tree.leaves(enc[2]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(head[0]),
                                                         jax.tree.leaves(head[1]), strict=True))
    deltas = np.concatenate([np.ravel(np.abs(b.astype(np.float64) - a))
                             for a, b in zip(jax.tree.leaves(enc[2]), jax.tree.leaves(enc[3]),
                                             strict=True)])
    moved = deltas[deltas > 0]  # (positions past the inputs' length get no gradient)
    assert moved.size > 1000
    np.testing.assert_allclose(np.median(moved), lr, rtol=1e-3)
    assert np.mean(moved > 0.5 * lr) > 0.9 and deltas.max() <= lr * (1 + 1e-3)
