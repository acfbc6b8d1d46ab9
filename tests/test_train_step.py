"""The jitted train step: same loss on 1 and 8 devices, sharded parameters, freezing,
and gradient accumulation equal to a plain full-batch jax.grad with padded rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_steps import LABELS, step_gradients, train_batch

from jaxser import config as config_lib
from jaxser.models import ser_model
from jaxser.train import losses
from jaxser.train.experiment import Experiment


def _config(**mesh):
    cfg = config_lib.load_config("configs/demo.py:smoke", ["--config.optim.warmup_steps=0"])
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return cfg


def _losses(cfg, steps=2):
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        step = exp.train_step(shardings)
        out = []
        for i in range(steps):
            state, metrics = step(state, exp.device_batch(train_batch(seed=i)), jax.random.key(1))
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
        state, _ = exp.train_step(shardings)(state, exp.device_batch(train_batch()),
                                             jax.random.key(1))
        after = jax.device_get(state.params)
    enc_b, enc_a = before["model"]["encoder"], after["model"]["encoder"]
    np.testing.assert_array_equal(enc_b["conv1"]["kernel"], enc_a["conv1"]["kernel"])
    fc1_b, fc1_a = enc_b["layers_0"]["fc1"]["kernel"], enc_a["layers_0"]["fc1"]["kernel"]
    assert not np.array_equal(fc1_b, fc1_a)


# --------------------------------------------------------------------------------------
# Gradient accumulation against a plain full-batch reference (issue 19, defect 1)

ACCUM_CORPORA = ["a", "b", "c"]
ACCUM_VALID = 11  # Of 16 rows: the last 5 are padding, so micro-batches of 2 hold none.
GAMMA, GRL = 2.0, 0.5
ACCUM_WEIGHTS = {"kl": 1.0, "cosine": 0.3, "soft_ce": 0.5, "focal": 0.7, "center": 0.05}


def _accum_config(accum):
    cfg = _config(data=1, fsdp=1, tensor=1)
    for name, weight in ACCUM_WEIGHTS.items():
        cfg.loss[name] = weight
    cfg.loss.focal_gamma = GAMMA
    cfg.loss.domain, cfg.loss.domain_schedule = GRL, "constant"
    cfg.model.domain_head = True
    cfg.model.domain_hidden = 16
    cfg.optim.grad_accum = accum
    return cfg


def _padded_batch(n=16, valid=ACCUM_VALID):
    """Real rows first, then padding rows (valid 0) holding other audio and labels."""
    batch = train_batch(n=n, seed=3)
    batch["valid"] = (np.arange(n) < valid).astype(np.float32)
    batch["domain"] = np.random.default_rng(4).integers(0, len(ACCUM_CORPORA), n).astype(
        np.int32)
    batch["domain"][[1, 6]] = -1  # Unknown domain: out of the domain loss only.
    return batch


def _reference(model, params, batch):
    """({term: value}, gradients of the loss) of the whole batch, every loss written out
    here: sum(w l) / sum(w) over the rows, jax.grad of the weighted sum of the terms."""
    w = jnp.asarray(batch["valid"])
    ids = jnp.asarray(batch["domain"])
    t = jnp.asarray(batch["label"])

    def mean(per_row, weights):
        return jnp.sum(weights * per_row) / jnp.sum(weights)

    def terms_of(p):
        inputs, mask = ser_model.features(model.family, model.encoder_cfg,
                                          jnp.asarray(batch["audio"]),
                                          jnp.asarray(batch["length"]))
        out = model.apply({"params": p["model"]}, inputs, mask, deterministic=True,
                          grl_lambda=GRL)
        lp = jax.nn.log_softmax(out["logits"])
        prob = jnp.exp(lp)
        e, c = out["embedding"], p["centers"]
        cos = jnp.sum(prob * t, -1) / (jnp.linalg.norm(prob, axis=-1)
                                       * jnp.linalg.norm(t, axis=-1))
        dist = jnp.sum((e[:, None, :] - c[None]) ** 2, -1)  # [B, K]
        known = (ids >= 0).astype(jnp.float32)
        dlp = jax.nn.log_softmax(out["domain_logits"])
        picked = jnp.take_along_axis(dlp, jnp.maximum(ids, 0)[:, None], 1)[:, 0]
        hit = (jnp.argmax(out["domain_logits"], -1) == ids).astype(jnp.float32)
        return {
            "kl": mean(jnp.sum(t * (jnp.log(t) - lp), -1), w),
            "cosine": mean(1.0 - cos, w),
            "soft_ce": mean(-jnp.sum(t * lp, -1), w),
            "focal": mean(-jnp.sum(t * (1.0 - prob) ** GAMMA * lp, -1), w),
            "center": mean(0.5 * jnp.sum(t * dist, -1), w),
            "domain": mean(-picked, w * known),
            "domain_accuracy": mean(hit, w * known),
        }

    def loss(p):
        terms = terms_of(p)
        total = sum(ACCUM_WEIGHTS[k] * terms[k] for k in ACCUM_WEIGHTS) + terms["domain"]
        return total, terms

    (total, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return dict(terms, loss=total), grads


@pytest.fixture(scope="module")
def accum_reference():
    exp = Experiment(_accum_config(1), LABELS, ACCUM_CORPORA, steps_per_epoch=10)
    with exp.mesh_context():
        state, _ = exp.init_state(jax.random.key(0))
    params = jax.device_get(state.params)
    return params, _reference(exp.model, params, _padded_batch())


@pytest.mark.parametrize("accum", [1, 2, 4, 8])
def test_gradient_accumulation_matches_full_batch(accum, accum_reference):
    """Every logged term, the loss and every gradient equal a plain full-batch jax.grad,
    with 5 padding rows at the tail (micro-batches with fewer real rows, or none)."""
    params, (want_terms, want_grads) = accum_reference
    cfg = _accum_config(accum)
    exp = Experiment(cfg, LABELS, ACCUM_CORPORA, steps_per_epoch=10)
    grads, metrics = step_gradients(cfg, exp, params, _padded_batch())
    assert set(want_terms) <= set(metrics)
    for name, want in want_terms.items():
        np.testing.assert_allclose(metrics[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
    flat_got, flat_want = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(flat_got) == len(flat_want)
    scale = max(float(np.max(np.abs(g))) for g in flat_want)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), flat_got,
                                 strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    got_norm = np.sqrt(sum(np.sum(np.square(g)) for g in flat_got))
    np.testing.assert_allclose(metrics["grad_norm"], got_norm, rtol=1e-5)


def test_supcon_under_accumulation_is_the_row_weighted_mean_of_its_micro_batches():
    """SupCon cannot be split (its pairs need the whole batch): with accumulation it is the
    documented mean of each micro-batch's SupCon, weighted by the micro-batch's valid rows."""
    cfg = _config(data=1, fsdp=1, tensor=1)
    cfg.loss.kl, cfg.loss.supcon, cfg.optim.grad_accum = 0.0, 1.0, 2
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10)
    with exp.mesh_context():
        state, _ = exp.init_state(jax.random.key(0))
    params, batch = jax.device_get(state.params), _padded_batch()
    _, metrics = step_gradients(cfg, exp, params, batch)
    inputs, mask = ser_model.features(exp.model.family, exp.model.encoder_cfg,
                                      batch["audio"], batch["length"])
    embedding = exp.model.apply({"params": params["model"]}, inputs, mask)["embedding"]
    halves = [slice(0, 8), slice(8, 16)]
    parts = [float(losses.supervised_contrastive_loss(
        embedding[h], batch["label"][h], batch["valid"][h], cfg.loss.supcon_temperature))
        for h in halves]
    rows = [float(batch["valid"][h].sum()) for h in halves]  # 8 and 3
    want = sum(r * p for r, p in zip(rows, parts, strict=True)) / sum(rows)
    np.testing.assert_allclose(float(metrics["supcon"]), want, rtol=1e-5)
    whole = float(losses.supervised_contrastive_loss(embedding, batch["label"], batch["valid"],
                                                     cfg.loss.supcon_temperature))
    assert abs(whole - want) > 1e-3  # Not the full-batch SupCon: what the README says.


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
            state, metrics = step(state, exp.device_batch(train_batch(seed=i)), jax.random.key(1))
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
        state, metrics = exp.train_step(shardings)(state, exp.device_batch(train_batch()),
                                                   jax.random.key(1))
    assert {"kl", "focal", "center", "supcon"} <= set(metrics)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(centers, np.asarray(state.params["centers"]))
