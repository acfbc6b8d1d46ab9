"""The jitted train step: same loss on 1 and 8 devices, sharded parameters, freezing."""

import jax
import numpy as np
import pytest

from jaxser import config as config_lib
from jaxser.train.experiment import Experiment

LABELS = ["neutral", "happy", "sad", "angry"]


def _config(**mesh):
    cfg = config_lib.load_config("configs/demo.py:smoke", ["--config.optim.warmup_steps=0"])
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return cfg


def _batch(n=8, samples=8000, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(samples // 2, samples, n).astype(np.int32)
    audio = rng.normal(0, 0.1, (n, samples)).astype(np.float32)
    audio[np.arange(samples)[None, :] >= lengths[:, None]] = 0
    label = rng.dirichlet(np.ones(len(LABELS)), n).astype(np.float32)
    return {"audio": audio, "length": lengths, "label": label,
            "class_index": label.argmax(-1).astype(np.int32),
            "domain": np.zeros(n, np.int32), "valid": np.ones(n, np.float32)}


def _losses(cfg, steps=2):
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        step = exp.train_step(shardings)
        out = []
        for i in range(steps):
            state, metrics = step(state, exp.device_batch(_batch(seed=i)), jax.random.key(1))
            out.append(float(metrics["loss"]))
    return out, state, exp


def test_same_loss_on_1_and_8_devices():
    assert len(jax.devices()) == 8
    one, _, _ = _losses(_config(data=1, fsdp=1, tensor=1))
    eight, _, _ = _losses(_config(data=-1))
    fsdp, _, _ = _losses(_config(data=2, fsdp=4, tensor=1))
    np.testing.assert_allclose(one, eight, rtol=2e-4)
    np.testing.assert_allclose(one, fsdp, rtol=2e-4)
    assert one[1] != one[0]


def test_fsdp_shards_large_parameters():
    cfg = _config(data=2, fsdp=4, tensor=1)
    _, state, _ = _losses(cfg, steps=1)
    fc1 = state.params["model"]["encoder"]["layers_0"]["fc1"]["kernel"]
    shard = fc1.addressable_shards[0].data.shape
    assert shard[0] * 4 == fc1.shape[0], (fc1.sharding, shard)


def test_frozen_parameters_stay_bit_identical():
    cfg = _config(data=1, fsdp=1, tensor=1)
    cfg.optim.freeze = ("encoder/conv*",)
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        before = jax.device_get(state.params)
        state, _ = exp.train_step(shardings)(state, exp.device_batch(_batch()), jax.random.key(1))
        after = jax.device_get(state.params)
    enc_b, enc_a = before["model"]["encoder"], after["model"]["encoder"]
    np.testing.assert_array_equal(enc_b["conv1"]["kernel"], enc_a["conv1"]["kernel"])
    fc1_b, fc1_a = enc_b["layers_0"]["fc1"]["kernel"], enc_a["layers_0"]["fc1"]["kernel"]
    assert not np.array_equal(fc1_b, fc1_a)


@pytest.mark.parametrize("accum", [2])
def test_gradient_accumulation_matches_full_batch(accum):
    base, _, _ = _losses(_config(data=1, fsdp=1, tensor=1), steps=1)
    cfg = _config(data=1, fsdp=1, tensor=1)
    cfg.optim.grad_accum = accum
    acc, _, _ = _losses(cfg, steps=1)
    np.testing.assert_allclose(base, acc, rtol=1e-4)


def test_augmentation_suite_in_step_compiles_once_on_8_devices():
    cfg = _config(data=-1)
    cfg.augment.waveform = True
    cfg.augment.specaugment = True
    cfg.augment.mixup = "energy"
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        step = exp.train_step(shardings)
        for i in range(3):
            state, metrics = step(state, exp.device_batch(_batch(seed=i)), jax.random.key(1))
            assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_hubert_multi_loss_step_with_centers():
    """The multi-loss objective (KL + focal + center + SupCon) on a tiny HuBERT with frame
    attention pooling: centers get their own optimizer group and move."""
    cfg = _config(data=-1)
    cfg.model.encoder = "hubert"
    cfg.model.size = "hubert-base"
    cfg.model.encoder_overrides = config_lib.ConfigDict(dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2))
    cfg.model.pooling = "frame_attention"
    cfg.model.attention_heads = 4
    cfg.loss.focal, cfg.loss.center, cfg.loss.supcon = 1.0, 0.01, 0.1
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        centers = np.asarray(state.params["centers"])
        state, metrics = exp.train_step(shardings)(state, exp.device_batch(_batch()),
                                                   jax.random.key(1))
    assert {"kl", "focal", "center", "supcon"} <= set(metrics)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(centers, np.asarray(state.params["centers"]))
