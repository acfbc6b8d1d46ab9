"""Dimensional emotion end to end: metrics (CCC / Pearson / MAE) against numpy and scipy, the
1 - CCC and class-weighted CE losses against torch, the train step's weights and gradient
accumulation with masks, the MSP-Podcast recipe on a fake corpus in the release layout
(manifest -> prepare -> train -> evaluate -> predict), and a dimensional model beating its
prior on held-out speakers of the synthetic corpus."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import soundfile as sf
import torch
from scipy import stats

from jaxser import cli, evaluate
from jaxser import config as config_lib
from jaxser.data import prepare, synthetic
from jaxser.models import heads, ser_model
from jaxser.train import loop, losses
from jaxser.train import metrics as M
from jaxser.train import step as step_lib
from jaxser.train.experiment import Experiment
from jaxser.train.state import TrainState

SR = 16000


# ----------------------------------------------------------------------------- metrics


def _ccc_numpy(p: np.ndarray, y: np.ndarray) -> float:
    return 2 * np.cov(p, y, bias=True)[0, 1] / (p.var() + y.var() + (p.mean() - y.mean()) ** 2)


def _dim_data(n=53, d=3, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 7, (n, d))
    pred = 0.6 * true + rng.normal(0, 1, (n, d)) + 1.0
    mask = rng.random((n, d)) < 0.8
    return pred, true, mask


def test_dimension_metrics_match_numpy_and_scipy():
    pred, true, mask = _dim_data()
    got = M.dimension_metrics(pred, true, mask)
    for d in range(3):
        m = mask[:, d]
        assert got["ccc"][d] == pytest.approx(_ccc_numpy(pred[m, d], true[m, d]), rel=1e-10)
        assert got["pearson"][d] == pytest.approx(stats.pearsonr(pred[m, d], true[m, d])[0],
                                                  rel=1e-10)
        assert got["mae"][d] == pytest.approx(np.mean(np.abs(pred[m, d] - true[m, d])))
        assert got["count"][d] == m.sum()
    # the accumulator, in batches of 7, with groups, gives the same overall and per group
    names = ["arousal", "valence", "dominance"]
    groups = np.random.default_rng(1).choice(["f", "m"], len(pred))
    acc = M.MetricAccumulator(["a", "b"], ["gender"], dim_names=names)
    probs = np.full((len(pred), 2), 0.5)
    for s in range(0, len(pred), 7):
        r = slice(s, s + 7)
        acc.update(probs[r], np.eye(2)[np.arange(len(pred))[r] % 2], np.ones(len(pred[r])),
                   {"gender": groups[r]}, pred[r], true[r], mask[r])
    result = acc.result()
    for d, name in enumerate(names):
        assert result["overall"][f"ccc_{name}"] == pytest.approx(got["ccc"][d], rel=1e-9)
        assert result["overall"][f"pearson_{name}"] == pytest.approx(got["pearson"][d], rel=1e-9)
        assert result["overall"][f"mae_{name}"] == pytest.approx(got["mae"][d], rel=1e-9)
        g = groups == "f"
        sub = M.dimension_metrics(pred[g], true[g], mask[g])
        assert result["groups"]["gender"]["f"][f"ccc_{name}"] == pytest.approx(sub["ccc"][d])
    assert result["overall"]["ccc_mean"] == pytest.approx(got["ccc"].mean())
    # the prior (a constant) scores CCC 0 and Pearson 0, not NaN
    prior = M.dimension_metrics(np.full_like(true, 4.0), true)
    assert np.all(prior["ccc"] == 0) and np.all(prior["pearson"] == 0)
    assert M.metric_direction("mae_arousal") == "min"
    assert M.metric_direction("macro_f1_ccc") == M.metric_direction("pearson_mean") == "max"


def test_rows_without_a_category_leave_the_categorical_metrics():
    rng = np.random.default_rng(2)
    n, k = 20, 3
    probs = rng.dirichlet(np.ones(k), n)
    targets = np.eye(k)[rng.integers(0, k, n)]
    label_mask = rng.random(n) < 0.7
    dims_pred, dims_true, _ = _dim_data(n, 1)
    acc = M.MetricAccumulator(["a", "b", "c"], dim_names=["arousal"])
    acc.update(probs, np.where(label_mask[:, None], targets, 0.0), np.ones(n),
               dims_pred=dims_pred, dims_true=dims_true, label_mask=label_mask)
    ref = M.MetricAccumulator(["a", "b", "c"])
    ref.update(probs[label_mask], targets[label_mask], np.ones(label_mask.sum()))
    got, want = acc.result()["overall"], ref.result()["overall"]
    for name in ("kl", "cosine", "accuracy", "ua", "macro_f1"):
        assert got[name] == pytest.approx(want[name]), name
    assert got["count"] == n and got["labelled_count"] == label_mask.sum()
    assert got["count_arousal"] == n  # the dimensions keep every row
    assert got["macro_f1_ccc"] == pytest.approx((got["macro_f1"] + got["ccc_mean"]) / 2)


# ----------------------------------------------------------------------------- losses vs torch


def _torch_ccc_loss(pred, target, mask, dim_weights):
    """1 - CCC per dimension over its masked rows (population moments), weighted mean."""
    p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(target, dtype=torch.float64)
    m = torch.tensor(mask, dtype=torch.float64)
    w = torch.tensor(dim_weights, dtype=torch.float64)
    total = 0
    for d in range(p.shape[1]):
        keep = m[:, d] > 0
        pd, yd = p[keep, d], y[keep, d]
        cov = ((pd - pd.mean()) * (yd - yd.mean())).mean()
        ccc = 2 * cov / (pd.var(unbiased=False) + yd.var(unbiased=False)
                         + (pd.mean() - yd.mean()) ** 2)
        total = total + w[d] / w.sum() * (1 - ccc)
    total.backward()
    return float(total.detach()), p.grad.numpy()


def test_ccc_loss_value_and_gradient_match_torch():
    pred, true, mask = _dim_data(n=17)
    pred, true = pred / 7, (true - 1) / 6
    dim_w = np.array([1.0, 2.0, 0.5])
    want, want_grad = _torch_ccc_loss(pred, true, mask, dim_w)
    fn = lambda p: losses.dims_ccc_loss(p, jnp.asarray(true, jnp.float32),  # noqa: E731
                                        jnp.asarray(mask, jnp.float32),
                                        jnp.asarray(dim_w, jnp.float32))
    value, grad = jax.value_and_grad(fn)(jnp.asarray(pred, jnp.float32))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-4, atol=1e-6)
    assert not np.any(np.asarray(grad)[~mask])  # a missing value gets no gradient
    # all-missing dimension: contributes 0, no NaN
    empty = np.zeros_like(mask)
    v = losses.dims_ccc_loss(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(empty, float),
                             jnp.ones(3))
    assert float(v) == 0.0


def test_mse_loss_and_its_accumulation_shares():
    pred, true, mask = _dim_data(n=12)
    w = jnp.asarray(mask, jnp.float32)
    dim_w = jnp.asarray([1.0, 1.0, 2.0])
    full = losses.dims_mse_loss(jnp.asarray(pred), jnp.asarray(true), w, dim_w)
    err = np.where(mask, (pred - true) ** 2, 0).sum(0) / mask.sum(0)
    np.testing.assert_allclose(float(full), float(np.sum(err * [0.25, 0.25, 0.5])), rtol=1e-5)
    totals = w.sum(0)
    parts = sum(losses.dims_mse_loss(jnp.asarray(pred[s]), jnp.asarray(true[s]), w[s], dim_w,
                                     totals) for s in (slice(0, 5), slice(5, 12)))
    np.testing.assert_allclose(float(parts), float(full), rtol=1e-5)


def test_class_weighted_cross_entropy_matches_torch():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(9, 4)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    w_k = np.array([0.5, 2.0, 1.0, 4.0], np.float32)
    t_logits = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(t_logits, torch.tensor(y), weight=torch.tensor(w_k))
    want.backward()

    def fn(lg):
        return losses.class_weighted_cross_entropy(jax.nn.log_softmax(lg), jnp.eye(4)[y],
                                                   jnp.ones(9), jnp.asarray(w_k))

    value, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
    np.testing.assert_allclose(float(value), float(want.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), t_logits.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_head_with_layer_norm():
    x = jnp.ones((2, 8))
    head = heads.DimensionalHead(3, hidden_dim=16, norm=True, dropout_rate=0.5)
    params = head.init(jax.random.key(0), x)["params"]
    assert set(params["mlp"]) == {"hidden", "hidden_norm", "out"}
    assert head.apply({"params": params}, x).shape == (2, 3)
    plain = heads.EmotionHead(4, hidden_dim=16).init(jax.random.key(0), x)["params"]
    assert "hidden_norm" not in plain["mlp"]  # existing models keep their parameters


# ----------------------------------------------------------------------------- train step

LABELS = ["neutral", "happy", "sad", "angry"]
DIMS = ["arousal", "valence"]


def _step_config(accum: int, **loss):
    cfg = config_lib.load_config("configs/demo.py:smoke", ["--config.optim.warmup_steps=0"])
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.model.dims_head = True
    cfg.loss.kl = 0.0
    for k, v in loss.items():
        cfg.loss[k] = v
    cfg.optim.grad_accum = accum
    return cfg


def _dims_batch(n=16, valid=13, seed=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4000, 8000, n).astype(np.int32)
    audio = rng.normal(0, 0.1, (n, 8000)).astype(np.float32)
    audio[np.arange(8000)[None, :] >= lengths[:, None]] = 0
    label = np.eye(len(LABELS), dtype=np.float32)[rng.integers(0, len(LABELS), n)]
    label_mask = (rng.random(n) < 0.7).astype(np.float32)
    label[label_mask == 0] = 0
    return {"audio": audio, "length": lengths, "label": label, "label_mask": label_mask,
            "class_index": np.where(label_mask > 0, label.argmax(-1), -1).astype(np.int32),
            "domain": np.zeros(n, np.int32), "valid": (np.arange(n) < valid).astype(np.float32),
            "dims": rng.random((n, len(DIMS))).astype(np.float32),
            "dims_mask": (rng.random((n, len(DIMS))) < 0.75).astype(np.float32)}


def _step(cfg, params, batch, class_weights):
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10, dims=DIMS,
                     class_weights=class_weights)
    tx = optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = jax.jit(step_lib.make_train_step(cfg, exp.model, tx, exp.schedule, exp.total_steps,
                                            class_weights, [1.0, 3.0]))
    with exp.mesh_context():
        state = TrainState(step=jnp.zeros([], jnp.int32), params=params,
                           opt_state=tx.init(params))
        state, metrics = step(state, exp.device_batch(batch), jax.random.key(1))
    return exp, jax.device_get(metrics), jax.device_get(state.opt_state)


def test_train_step_weights_masks_and_accumulation():
    """weighted_ce + mse are exact under accumulation with padding, rows without a category
    and missing dimension values; ccc is the row-weighted mean of the micro-batches' CCC."""
    class_weights = np.array([0.5, 1.5, 1.0, 2.0], np.float32)
    cfg1 = _step_config(1, weighted_ce=1.0, mse=1.0)
    exp = Experiment(cfg1, LABELS, ["synth"], steps_per_epoch=10, dims=DIMS,
                     class_weights=class_weights)
    with exp.mesh_context():
        state, _ = exp.init_state(jax.random.key(0))
    params, batch = jax.device_get(state.params), _dims_batch()

    # the reference, written out
    inputs, mask = ser_model.features(exp.model.family, exp.model.encoder_cfg,
                                      batch["audio"], batch["length"])
    out = exp.model.apply({"params": params["model"]}, inputs, mask)
    lp = np.asarray(jax.nn.log_softmax(out["logits"]), np.float64)
    rows = batch["valid"] * batch["label_mask"]
    omega = batch["label"] @ class_weights
    ce = np.sum(rows * omega * -np.sum(batch["label"] * lp, -1)) / np.sum(rows * omega)
    dw = batch["valid"][:, None] * batch["dims_mask"]
    se = dw * (np.asarray(out["dims"]) - batch["dims"]) ** 2
    mse = np.sum(np.sum(se, 0) / np.sum(dw, 0) * [0.25, 0.75])

    _, base, grads1 = _step(cfg1, params, batch, class_weights)
    np.testing.assert_allclose(base["weighted_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(base["mse"], mse, rtol=1e-5)
    for accum in (2,):
        _, got, grads = _step(_step_config(accum, weighted_ce=1.0, mse=1.0), params, batch,
                              class_weights)
        for name in ("weighted_ce", "mse", "loss"):
            np.testing.assert_allclose(got[name], base[name], rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

    # ccc: accum 1 is the batch CCC; accum 2 the per-dimension row-weighted mean of halves
    dims_pred = np.asarray(out["dims"])
    _, one, _ = _step(_step_config(1, ccc=1.0), params, batch, None)
    want = losses.dims_ccc_loss(dims_pred, batch["dims"], dw, jnp.asarray([1.0, 3.0]))
    np.testing.assert_allclose(one["ccc"], float(want), rtol=1e-5)
    _, two, _ = _step(_step_config(2, ccc=1.0), params, batch, None)
    halves = (slice(0, 8), slice(8, 16))
    per = [1 - np.asarray(losses.masked_concordance(dims_pred[h], batch["dims"][h], dw[h]))
           for h in halves]
    n = [dw[h].sum(0) for h in halves]
    mean = sum(p * c for p, c in zip(per, n, strict=True)) / (n[0] + n[1])
    np.testing.assert_allclose(two["ccc"], float(np.sum(mean * [0.25, 0.75])), rtol=1e-5)


def test_step_refuses_what_it_cannot_train():
    cfg = _step_config(1, ccc=1.0)
    cfg.model.dims_head = False
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10, dims=DIMS)
    with pytest.raises(ValueError, match="model.dims_head"):
        step_lib.make_train_step(cfg, exp.model, optax.sgd(0.1), exp.schedule, 10)
    cfg = _step_config(1, weighted_ce=1.0)
    exp = Experiment(cfg, LABELS, ["synth"], steps_per_epoch=10, dims=DIMS)
    with pytest.raises(ValueError, match="class weights"):
        step_lib.make_train_step(cfg, exp.model, optax.sgd(0.1), exp.schedule, 10)
    with pytest.raises(ValueError, match="no emotion dimensions"):
        ser_model.build_model(cfg.model, 4, 1, num_dims=0)


def test_resume_of_a_checkpoint_older_than_the_dimension_fields():
    from jaxser.train import resume

    cfg = config_lib.load_config("configs/demo.py:smoke")
    saved = json.loads(config_lib.config_to_json(cfg))
    for key in ("dims_head", "dims_hidden", "head_norm", "head_dropout", "dims_activation"):
        del saved["model"][key]  # a config saved before these fields existed
    resume.check_compatible(saved, cfg)  # absent = the default it had then
    cfg.model.dims_head = True
    with pytest.raises(resume.ResumeMismatch, match="model.dims_head"):
        resume.check_compatible(saved, cfg)


# ----------------------------------------------------------------------------- MSP-Podcast


def _podcast_corpus(root: Path) -> dict[str, str]:
    """A fake MSP-Podcast release: synthetic audio per row, labels_consensus.csv with bad
    rows. Returns {FileName: why it must be rejected} for the bad ones."""
    speakers = synthetic.make_speakers(8, ["synth_en"], seed=4)
    codes = "ASHNAUFNDCHSXN"
    split_of = {0: "Train", 1: "Train", 2: "Train", 3: "Train", 4: "Development",
                5: "Development", 6: "Test1", 7: "Test2"}
    rows, bad = [], {}
    rng = np.random.default_rng(0)
    (root / "Audios").mkdir(parents=True)
    for s, spk in enumerate(speakers):
        for u in range(4):
            name = f"MSP-PODCAST_{s:04d}_{u:04d}.wav"
            code = codes[(s * 4 + u) % len(codes)]
            weights = np.zeros(len(synthetic.EMOTIONS))
            weights[(s + u) % len(weights)] = 1.0
            audio = synthetic.synthesize_utterance(
                np.random.default_rng([s, u]), weights, spk,
                synthetic.language_profile("synth_en"), 1.0)
            sf.write(root / "Audios" / name, audio, SR, subtype="PCM_16")
            act, val, dom = (f"{x:.1f}" for x in rng.uniform(1.5, 6.5, 3))
            speaker = "Unknown" if (s, u) == (5, 0) else str(100 + s)
            rows.append([name, code, act, val, dom, speaker, spk.gender.capitalize(),
                         split_of[s]])
    rows[1][2], bad[rows[1][0]] = "9.5", "dimension out of range"
    rows[2][3], bad[rows[2][0]] = "n/a", "bad dimension"
    rows.append(["MSP-PODCAST_9999_0000.wav", "H", "4", "4", "4", "1", "Male", "Train"])
    bad["MSP-PODCAST_9999_0000.wav"] = "missing file"
    (root / "Labels").mkdir()
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender",
                    "Split_Set"])
        w.writerows(rows)
    return bad


@pytest.mark.slow
def test_msp_podcast_recipe_end_to_end(tmp_path, capsys):
    root = tmp_path / "MSP-PODCAST"
    bad = _podcast_corpus(root)
    manifest, data, work = tmp_path / "msp.csv", tmp_path / "data", tmp_path / "run"
    assert cli.main(["manifest", "--corpus", "msp_podcast", "--root", str(root),
                     "--out", str(manifest)]) == 0
    assert cli.main(["prepare", "--manifest", str(manifest), "--out", str(data), "--split",
                     "column:split", "--workers", "0"]) == 0
    info = json.loads((data / "dataset.json").read_text())
    with open(data / "rejected.csv", newline="") as f:
        rejected = {r["id"] + ".wav": r["reason"] for r in csv.DictReader(f)}
    assert rejected == bad
    assert info["dimensions"]["scale"] == {d: [1.0, 7.0] for d in ("arousal", "valence",
                                                                    "dominance")}
    assert info["splits"]["validation"]["unknown_speaker_rows"] == 1
    assert sum(s["count"] - s["labelled"] for s in info["splits"].values()) > 0  # X rows
    cfg = config_lib.load_config("configs/msp_podcast.py:smoke", [
        f"--config.workdir={work}", f"--config.data.dir={data}", "--config.train.max_steps=2",
        "--config.train.eval_every=2"])
    assert loop.train(cfg)["step"] == 2
    for split in ("validation", "test"):
        report = evaluate.evaluate_workdir(work, split)
        m = report["metrics"]
        for key in ("macro_f1", "ua", "ccc_arousal", "pearson_valence", "mae_dominance",
                    "ccc_mean", "macro_f1_ccc"):
            assert math.isfinite(m[key]), (split, key)
        assert report["prior"]["ccc_mean"] == pytest.approx(0.0, abs=1e-9)
        assert report["prior"]["pearson_mean"] == 0.0
        assert 0 < report["prior"]["mae_arousal"] < 6  # the training mean, on the 1-7 scale
        assert "msp_split" in report["groups"] and "ccc_mean" in next(
            iter(report["groups"]["msp_split"].values()))
        assert Path(report["plots"]["dims_scatter"]).is_file()
        text = evaluate.format_report(report)
        assert "ccc_valence" in text and "1-7" in text
    assert set(report["groups"]["msp_split"]) == {"Test1", "Test2"}
    wav = next((root / "Audios").iterdir())
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", str(work), str(wav), "--window", "0.5"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row["dimensions"]) == {"arousal", "valence", "dominance"}
    assert all("dimensions" in w for w in row["timeline"]) and len(row["timeline"]) == 2


def test_msp_podcast_config_is_the_baseline():
    c = config_lib.load_config("configs/msp_podcast.py")
    assert (c.model.encoder, c.model.size, c.model.pooling) == ("wavlm", "wavlm-large",
                                                                "attentive_stats")
    assert (c.model.head_hidden, c.model.head_norm, c.model.head_dropout) == (1024, True, 0.5)
    assert (c.loss.weighted_ce, c.loss.ccc, c.optim.lr, c.optim.name) == (1.0, 1.0, 1e-5, "adamw")
    assert (c.data.global_batch, c.optim.grad_accum, c.train.epochs, c.data.max_seconds) == (
        32, 4, 20, 12.0)
    assert c.optim.freeze == ("encoder/feature_extractor/*",)
    assert config_lib.load_config("configs/msp_podcast.py:categorical").train.best_metric == \
        "macro_f1"
    dim = config_lib.load_config("configs/msp_podcast.py:dimensional")
    assert (dim.train.best_metric, dim.loss.weighted_ce) == ("ccc_mean", 0.0)


# ----------------------------------------------------------------------------- synthetic corpus

# What the synthesis makes learnable: the dimensions are deterministic functions of each
# utterance's own voice settings (loudness, rate, F0, tilt, tremor, formant shift, jitter,
# shimmer, final pitch movement; `synthetic.voice_dimensions`), all audible and none tied to
# the speaker, so a model can in principle reach CCC near 1 on unseen speakers; the prior
# (training mean) scores exactly 0. The tiny smoke encoder trained for 200 steps (about a
# minute on 2 CPU cores) reaches a mean CCC of 0.70 on the 4 held-out speakers (48
# utterances; arousal 0.72, valence 0.61, dominance 0.77); the threshold 0.35 is half of
# that, and over 4 standard deviations above what an unrelated predictor scores on 48
# utterances (the CCC is at most |Pearson r|, whose spread is ~1/sqrt(47) = 0.15 per
# dimension, ~0.08 for the mean of three).
HELD_OUT_MEAN_CCC = 0.35


@pytest.mark.slow
def test_synthetic_dimensional_model_beats_its_prior_on_held_out_speakers(tmp_path):
    manifest = synthetic.generate_corpus(tmp_path / "corpus", num_speakers=10,
                                         utterances_per_speaker=12, seed=2, mean_seconds=1.2,
                                         min_seconds=0.8, max_seconds=1.6)
    prepare.prepare([manifest], tmp_path / "data", split="speaker:50/10/40", workers=0,
                    progress=False)
    cfg = config_lib.load_config("configs/demo.py:smoke", [
        f"--config.workdir={tmp_path / 'run'}", f"--config.data.dir={tmp_path / 'data'}",
        "--config.train.max_steps=200", "--config.train.eval_every=200",
        "--config.model.dims_head=True", "--config.loss.ccc=1.0",
        "--config.train.best_metric=ccc_mean", "--config.optim.warmup_steps=5",
        "--config.train.log_every=50"])
    loop.train(cfg)
    report = evaluate.evaluate_workdir(tmp_path / "run", "test", plots=False)
    m, prior = report["metrics"], report["prior"]
    assert m["count"] == 48
    assert m["ccc_mean"] > HELD_OUT_MEAN_CCC, m
    for d in ("arousal", "valence", "dominance"):
        assert m[f"ccc_{d}"] > 0.1 and prior[f"ccc_{d}"] == pytest.approx(0.0, abs=1e-9), d
        assert m[f"mae_{d}"] < prior[f"mae_{d}"], d
