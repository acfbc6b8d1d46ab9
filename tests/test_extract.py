"""Frozen-encoder probing on cached features (`jaxser extract`, `data.features`): a head
trained on cached pooled features ends where the same head trained with the frozen encoder
in the loop ends; a feature folder refuses other encoders, options and corpora; an
interrupted extraction resumes; a config that needs audio fails at start naming the field;
the fold datasets of a corpus share one extraction; the heads serve audio again with their
encoder re-attached."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _worker import free_port, subprocess_env

from jaxser import cli, folds, report
from jaxser import config as config_lib
from jaxser.config import ConfigError
from jaxser.data import features as features_lib
from jaxser.data import pipeline, prepare, synthetic
from jaxser.predict import Predictor
from jaxser.train import extract, loop
from jaxser.train.experiment import load_for_inference

DEMO = "configs/demo.py:smoke"
SUPERB = "configs/superb_probe.py:smoke"
# A frozen tiny encoder, no augmentation, a constant rate, one device, synchronous saves.
FROZEN = ("--config.optim.freeze=('encoder/*',)", "--config.model.layer_weighted_sum=True",
          "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
          "--config.optim.clip_norm=0.0", "--config.data.global_batch=4",
          "--config.data.eval_batch=8", "--config.mesh.data=1",
          "--config.train.async_checkpoints=False", "--config.train.log_every=1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT/fold0, ROOT/fold1 (one corpus, two speaker folds), ROOT/other (another corpus)."""
    root = tmp_path_factory.mktemp("extract")
    manifest = synthetic.generate_corpus(root / "corpus", num_speakers=4,
                                         utterances_per_speaker=4, seed=1, mean_seconds=1.0,
                                         min_seconds=0.6, max_seconds=1.4)
    for i in range(2):
        prepare.prepare([manifest], root / f"fold{i}", split=f"kfold:2:{i}", workers=0,
                        progress=False)
    other = synthetic.generate_corpus(root / "corpus2", num_speakers=4,
                                      utterances_per_speaker=2, seed=2, mean_seconds=1.0,
                                      min_seconds=0.6, max_seconds=1.4)
    prepare.prepare([other], root / "other", split="speaker:50/25/25", workers=0,
                    progress=False)
    return root


def _cfg(root, spec=DEMO, *extra):
    return config_lib.load_config(spec, [
        f"--config.data.dir={root / 'fold0'}",
        f"--config.train.compilation_cache={root / 'xla'}", *extra])


@pytest.fixture(scope="module")
def trained(root):
    """The same heads (categories and dimensions) trained twice: with the frozen encoder in
    the loop, and on features."""
    steps = ("--config.train.max_steps=5", "--config.train.eval_every=5",
             "--config.model.dims_head=True", "--config.loss.ccc=0.5")
    audio = _cfg(root, DEMO, *FROZEN, *steps, f"--config.workdir={root / 'audio'}")
    feats = _cfg(root, DEMO, *FROZEN, *steps, f"--config.workdir={root / 'feats'}",
                 f"--config.data.features={root / 'features'}")
    summaries = {"audio": loop.train(audio), "extract": extract.extract(feats),
                 "feats": loop.train(feats)}
    return summaries


def _params(workdir, audio=False):
    exp, params, _, _ = load_for_inference(workdir, "latest", audio=audio)
    return exp, jax.tree.map(np.asarray, jax.device_get(params["model"]))


def test_head_on_features_equals_head_with_frozen_encoder(root, trained):
    assert trained["extract"]["extracted"] == 16 and trained["feats"]["step"] == 5
    _, audio = _params(root / "audio")
    _, feats = _params(root / "feats")
    assert "encoder" not in feats and set(feats) == set(audio) - {"encoder"}
    assert any("dim" in name for name in feats), sorted(feats)  # the dimensional head
    for name in feats:  # layer_sum and heads
        for a, b in zip(jax.tree.leaves(audio[name]), jax.tree.leaves(feats[name]),
                        strict=True):
            np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-5)
    # The same validation metric at the same best step.
    assert trained["feats"]["best"]["step"] == trained["audio"]["best"]["step"]
    assert trained["feats"]["best"]["value"] == pytest.approx(trained["audio"]["best"]["value"],
                                                              abs=1e-5)


def test_encoder_reattached_for_predict_and_export(root, trained):
    exp, reattached = _params(root / "feats", audio=True)
    _, audio = _params(root / "audio")
    assert set(reattached) == {"encoder", "probe"}
    for a, b in zip(jax.tree.leaves(audio["encoder"]), jax.tree.leaves(reattached["encoder"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # The same random initialisation, bit for bit.
    waves = [np.asarray(w, np.float32) for w in
             np.random.default_rng(0).normal(0, 0.1, (2, 12000))]
    p_audio = Predictor.load(root / "audio", "latest").probabilities(waves)
    p_feats = Predictor.load(root / "feats", "latest").probabilities(waves)
    for key in ("probs", "dims"):
        assert p_feats[key].shape == p_audio[key].shape == (2, 6 if key == "probs" else 3)
        np.testing.assert_allclose(p_feats[key], p_audio[key], atol=1e-5)


def test_reader_batches_follow_the_audio_pipeline(root, trained):
    cfg = pipeline.PipelineConfig(global_batch=4, num_buckets=2, seed=3)
    spec = features_lib.FeatureSpec(layers=(0, 1))
    audio = pipeline.train_iterator(root / "fold0", "train", cfg, process_index=0,
                                    process_count=1)
    feats = features_lib.train_iterator(root / "features", root / "fold0", "train", cfg, spec,
                                        process_index=0, process_count=1)
    assert audio.steps_per_epoch == feats.steps_per_epoch
    for _ in range(audio.steps_per_epoch + 1):
        a, f = next(audio), next(feats)
        np.testing.assert_array_equal(a["meta"]["id"], f["meta"]["id"])
        np.testing.assert_allclose(a["label"], f["label"])
        np.testing.assert_array_equal(a["valid"], f["valid"])
        assert f["features"].shape == (4, 2, 1, 32) and f["frame_mask"].all()
    state = feats.state()
    resumed = features_lib.train_iterator(root / "features", root / "fold0", "train", cfg,
                                          spec, state=state, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(feats)["meta"]["id"], next(resumed)["meta"]["id"])
    for it in (audio, feats, resumed):
        it.close()


def test_second_call_does_nothing_and_folds_share_one_extraction(root, trained):
    cfg = _cfg(root, DEMO, f"--config.data.features={root / 'features'}")
    again = extract.extract(cfg)
    assert again["up_to_date"] and again["extracted"] == 0 and again["seconds"] < 5
    fold1 = extract.extract(cfg, data_dir=root / "fold1")
    assert (fold1["extracted"], fold1["reused"]) == (0, 16)  # Same records, split otherwise.
    store = features_lib.FeatureStore.open(root / "features")
    assert len(store.views()) == 2 and len(store.chunk_names()) == 1


def test_other_encoder_options_or_corpus_refused(root, trained):
    folder = f"--config.data.features={root / 'features'}"
    for extra in (("--config.model.encoder_overrides.d_model=16",),  # another encoder
                  ("--config.seed=1",),  # another random initialisation
                  ("--config.extract.stats=mean_std",),  # other options
                  ("--config.extract.frame_layers=all",)):
        with pytest.raises(features_lib.FeatureMismatch, match="refusing to mix"):
            extract.extract(_cfg(root, DEMO, folder, *extra))
    with pytest.raises(features_lib.FeatureMismatch, match="corpus"):
        extract.extract(_cfg(root, DEMO, folder), data_dir=root / "other")
    # Training on them with a config that names another encoder fails at start.
    with pytest.raises(features_lib.FeatureMismatch, match="d_model"):
        loop.train(_cfg(root, DEMO, *FROZEN, folder, f"--config.workdir={root / 'x'}",
                        "--config.model.encoder_overrides.d_model=16"))
    assert not (root / "x" / "checkpoints").exists()


def test_interrupted_extraction_resumes(root, trained, monkeypatch):
    out = root / "interrupted"
    cfg = _cfg(root, DEMO, f"--config.data.features={out}", "--config.extract.chunk=3",
               "--config.extract.stats=mean_std", "--config.extract.frame_layers=last")
    real, calls = features_lib.FeatureStore.write_chunk, []

    def failing(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(features_lib.FeatureStore, "write_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(cfg)
    monkeypatch.setattr(features_lib.FeatureStore, "write_chunk", real)
    (out / "chunk-000009-p0.mean.npy").write_bytes(b"a partial chunk")  # left uncommitted
    done = extract.extract(cfg)
    assert (done["extracted"], done["reused"]) == (16 - 6, 6)
    assert not (out / "chunk-000009-p0.mean.npy").exists()
    # The same features as one uninterrupted extraction (std and frames included).
    whole = root / "whole"
    extract.extract(_cfg(root, DEMO, f"--config.data.features={whole}",
                         "--config.extract.stats=mean_std", "--config.extract.frame_layers=last"))
    spec = features_lib.FeatureSpec(layers=(1,), stats="mean_std")
    for split in ("train", "test"):
        a = features_lib.SplitTable(features_lib.FeatureStore.open(out),
                                    features_lib.FeatureStore.open(out).find_view(None), split)
        b = features_lib.SplitTable(features_lib.FeatureStore.open(whole),
                                    features_lib.FeatureStore.open(whole).find_view(None), split)
        np.testing.assert_allclose(a.pooled(spec), b.pooled(spec), atol=1e-5)
        rows = np.arange(len(a))
        frames = features_lib.FeatureSpec(layers=(1,), frames=True)
        np.testing.assert_allclose(a.frames(rows, frames, 80).astype(np.float32),
                                   b.frames(rows, frames, 80).astype(np.float32), atol=2e-3)
        np.testing.assert_array_equal(a.meta["id"], b.meta["id"])


@pytest.mark.parametrize("override,field", [
    ("--config.augment.waveform=True", "augment.waveform"),
    ("--config.augment.mixup=energy", "augment.mixup"),
    ("--config.augment.specaugment=True", "augment.specaugment"),
    ("--config.data.max_seconds=1.0", "data.max_seconds"),
    ("--config.optim.unfreeze_after=3", "optim.unfreeze_after"),
    ("--config.optim.freeze=('encoder/conv*',)", "optim.freeze"),
])
def test_audio_only_options_refused_at_start(root, trained, override, field):
    cfg = _cfg(root, DEMO, *FROZEN, f"--config.data.features={root / 'features'}",
               f"--config.workdir={root / 'refused'}", override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        loop.train(cfg)
    assert not (root / "refused" / "checkpoints").exists()


@pytest.mark.slow
def test_superb_smoke_frames_train_predict_and_sweep(root, trained, capsys):
    """The SUPERB downstream on frame features of every layer, through the command line;
    then a layer sweep over two folds writes its table and plot."""
    work = root / "superb"
    ov = [f"--config.data.dir={root / 'fold0'}", f"--config.workdir={work}",
          f"--config.data.features={root / 'frames'}", "--config.mesh.data=1",
          f"--config.train.compilation_cache={root / 'xla'}", "--config.train.max_steps=2",
          "--config.train.async_checkpoints=False"]
    assert cli.main(["extract", "--config", SUPERB, *ov]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["extracted"] == 16
    assert cli.main(["train", "--config", SUPERB, *ov]) == 0
    rows = Predictor.load(work, "latest").predict_waveforms(
        [np.random.default_rng(1).normal(0, 0.1, 9000).astype(np.float32)])
    assert len(rows[0]["frame_probs"]) > 1 and abs(sum(rows[0]["distribution"].values()) -
                                                   1) < 1e-4
    out = folds.layer_sweep(SUPERB, [*ov[1:], f"--config.workdir={root / 'sweep'}",
                                     "--config.train.max_steps=1"], 2, root,
                            layers="1", weighted=False)
    assert [r["layer"] for r in out["rows"]] == [1]
    for name in (folds.SWEEP_JSON, folds.SWEEP_TABLE, folds.SWEEP_PLOT):
        assert (root / "sweep" / name).is_file()
    assert "| 1 |" in (root / "sweep" / folds.SWEEP_TABLE).read_text()


def test_superb_probe_variants_load():
    for variant in ("", "layer", "pooled", "smoke"):
        cfg = config_lib.load_config("configs/superb_probe.py" + (f":{variant}" if variant
                                                                  else ""))
        assert cfg.data.features and cfg.optim.freeze == ("encoder/*",)
        assert (cfg.optim.name, cfg.optim.lr, cfg.data.global_batch) == ("adam", 1e-4, 32) \
            or variant == "smoke"
    full = config_lib.load_config("configs/superb_probe.py")
    assert (full.model.pooling, full.model.head_hidden, full.model.layer_weighted_sum,
            full.extract.frame_layers) == ("frame_logits", 256, True, "all")
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load_config("configs/superb_probe.py:nope")


def test_sweep_table_and_plot(tmp_path):
    rows = [{"layer": i, "workdir": "", "count": 8,
             "metrics": {m: {"mean": 0.1 * i, "std": 0.01, "values": [0.1 * i] * 2}
                         for m in ("ua", "wa", "macro_f1")}} for i in range(3)]
    rows.append({"layer": "weighted", "workdir": "", "count": 8, "metrics": rows[1]["metrics"]})
    summary = {"config": "c", "folds": 2, "features": "f", "split": "test", "rows": rows}
    table = folds.format_sweep_table(summary)
    assert "| 2 | 0.2000 +- 0.0100" in table and "| weighted |" in table
    report.save(folds.plot_sweep(summary), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_extract_without_data_refused(tmp_path):
    cfg = config_lib.load_config(DEMO, [f"--config.data.dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="jaxser prepare"):
        extract.extract(cfg, tmp_path / "f")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_extract_what_one_extracts(root, trained):
    """`jaxser extract` over two processes (an explicit coordinator, 2 CPU devices each, one
    shared folder): every record once, each host's chunks apart, the same features as the
    one-process extraction of the `trained` fixture, and heads train on them."""
    out, port, env = root / "two_hosts", free_port(), subprocess_env(devices=2)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxser.cli", "extract", "--config", DEMO, "--out", str(out),
         f"--config.data.dir={root / 'fold0'}", "--config.data.eval_batch=8",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
         str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {rank} exited {p.returncode}:\n{err[-3000:]}"
    summaries = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert [s["extracted"] for s in summaries] == [16, 16]  # (counted over both hosts)
    two, one = features_lib.FeatureStore.open(out), features_lib.FeatureStore.open(
        root / "features")
    assert {n.rsplit("-", 1)[1] for n in two.chunk_names()} == {"p0", "p1"}
    assert sum(c.keys.size for c in two.chunks()) == 16  # no record written twice
    assert sorted(two.key_table()) == sorted(one.key_table())
    spec = features_lib.FeatureSpec(layers=tuple(range(one.num_layers)))
    for split in ("train", "validation", "test"):
        a = features_lib.SplitTable(two, two.find_view(None), split)
        b = features_lib.SplitTable(one, one.find_view(None), split)
        np.testing.assert_array_equal(a.meta["id"], b.meta["id"])
        np.testing.assert_allclose(a.pooled(spec), b.pooled(spec), atol=1e-5)
        for key in b.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    summary = loop.train(_cfg(root, DEMO, *FROZEN, f"--config.data.features={out}",
                              f"--config.workdir={root / 'two_hosts_run'}",
                              "--config.train.max_steps=2"))
    assert summary["step"] == 2
