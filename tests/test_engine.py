"""Engine proofs (issue 8): the real training loop gives the same loss curve on 1 device
and on 8 devices with data, FSDP and data x tensor meshes, with the large parameters and
their optimizer state really sharded; frozen parameters stay bit-identical until
`optim.unfreeze_after` and train after it."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _worker import load_cfg, train_metrics

from jaxser import config as config_lib
from jaxser.train import loop
from jaxser.train.experiment import Experiment

STEPS = 3
# name: (data, fsdp, tensor), and how the fc1 kernel [embed 32, mlp 64] is split.
MESHES = {
    "one_device": ((1, 1, 1), (1, 1)),
    "data_8": ((8, 1, 1), (1, 1)),
    "fsdp_2x4": ((2, 4, 1), (4, 1)),
    "data_4x_tensor_2": ((4, 1, 2), (1, 2)),
}


def _fc1(params):
    return params["model"]["encoder"]["layers_0"]["fc1"]["kernel"]


def _shard_shapes(state) -> dict:
    """Per-device shapes of the fc1 kernel and of its optimizer moments."""
    kernel = _fc1(state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state)
               if getattr(x, "shape", None) == kernel.shape]
    return {"param": kernel.addressable_shards[0].data.shape,
            "devices": len({s.device for s in kernel.addressable_shards}),
            "moments": sorted({m.addressable_shards[0].data.shape for m in moments})}


@pytest.mark.slow
def test_loss_curve_is_the_same_on_every_mesh(data_dir, tmp_path, monkeypatch):
    assert jax.device_count() == 8
    seen: dict = {}
    real_train_step = Experiment.train_step

    def recording_train_step(self, shardings):  # Records where the trained state lives.
        jitted = real_train_step(self, shardings)

        def step(state, batch, key):
            state, metrics = jitted(state, batch, key)
            seen[self.cfg.workdir] = _shard_shapes(state)
            return state, metrics

        return step

    monkeypatch.setattr(Experiment, "train_step", recording_train_step)
    # Validation is not what this test compares: a stub keeps it to the training steps.
    monkeypatch.setattr(loop, "_validate", lambda *args: {"kl": 0.0})
    curves = {}
    for name, ((data, fsdp, tensor), _) in MESHES.items():
        workdir = tmp_path / name
        loop.train(load_cfg(workdir, data_dir, f"--config.train.max_steps={STEPS}",
                            f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                            f"--config.mesh.tensor={tensor}"))
        curves[name] = [r["loss"] for r in train_metrics(workdir)]
        assert len(curves[name]) == STEPS
    for name, curve in curves.items():
        np.testing.assert_allclose(curve, curves["one_device"], rtol=2e-4, err_msg=name)
    assert len(set(curves["one_device"])) == STEPS  # It trains: the loss moves.
    for name, ((data, fsdp, tensor), (embed_split, mlp_split)) in MESHES.items():
        shapes = seen[str(tmp_path / name)]
        assert shapes["devices"] == data * fsdp * tensor, (name, shapes)
        assert shapes["param"] == (32 // embed_split, 64 // mlp_split), (name, shapes)
        assert shapes["moments"] == [shapes["param"]], (name, shapes)


# --------------------------------------------------------------------------------------
# Freezing


LABELS = ["neutral", "happy", "sad", "angry"]


def _batch(seed: int, n: int = 4, samples: int = 8000) -> dict:
    rng = np.random.default_rng(seed)
    label = rng.dirichlet(np.ones(len(LABELS)), n).astype(np.float32)
    return {"audio": rng.normal(0, 0.1, (n, samples)).astype(np.float32),
            "length": np.full(n, samples, np.int32), "label": label,
            "class_index": label.argmax(-1).astype(np.int32),
            "domain": np.zeros(n, np.int32), "valid": np.ones(n, np.float32)}


def test_frozen_parameters_train_only_after_unfreeze_after():
    cfg = config_lib.load_config("configs/demo.py:smoke", [
        "--config.optim.warmup_steps=0", "--config.mesh.data=1",
        "--config.optim.freeze=('encoder/conv*',)", "--config.optim.unfreeze_after=2"])
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        step = exp.train_step(shardings)
        history = [jax.device_get(state.params)]
        for i in range(3):
            state, _ = step(state, exp.device_batch(_batch(i)), jax.random.key(1))
            history.append(jax.device_get(state.params))
    conv = [h["model"]["encoder"]["conv1"]["kernel"] for h in history]
    fc1 = [_fc1(h) for h in history]
    np.testing.assert_array_equal(conv[0], conv[1])  # Frozen for steps 1 and 2 ...
    np.testing.assert_array_equal(conv[0], conv[2])
    assert not np.array_equal(conv[2], conv[3])  # ... and trained from step 3 on.
    assert all(not np.array_equal(a, b) for a, b in zip(fc1, fc1[1:], strict=False))


def test_log_evaluate_and_save_are_due_at_each_multiple_and_at_the_last_step():
    assert [s for s in range(1, 8) if loop.due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 7) if loop.due(s, 3, 6)] == [3, 6]
    assert all(loop.due(s, 1, 5) for s in range(1, 6))
