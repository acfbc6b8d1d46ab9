"""The method configs: every variant loads, each smoke variant trains a few steps, evaluates and
writes its report on a tiny synthetic corpus, and the k-fold driver runs and summarises folds."""

import json
import math

import pytest

from jaxser import cli, evaluate, folds
from jaxser import config as config_lib
from jaxser.data import prepare, splits, synthetic
from jaxser.train import loop, optimizer

CONFIGS = {
    "em2ldl_hubert": ["", "smoke", "gender_female", "gender_male", "age_youth", "age_nonyouth",
                      "mbti_in", "mbti_is", "mbti_en", "mbti_es"],
    "whisper_soft_adv": ["", "smoke", "loco=ravdess"],
    "mll_eam_flam": ["", "smoke", "frozen"],
    "msp_podcast": ["", "smoke", "categorical", "dimensional"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny two-corpus synthetic corpus (6 speakers, short clips): manifest path."""
    root = tmp_path_factory.mktemp("configs")
    return synthetic.generate_corpus(root / "corpus", num_speakers=6, utterances_per_speaker=4,
                                     corpora=("synth_en", "synth_de"), seed=1,
                                     mean_seconds=1.0, min_seconds=0.6, max_seconds=1.4)


@pytest.fixture(scope="module")
def data_dirs(corpus):
    """{"own": its own 6 labels, "basic": harmonised onto `basic` with neutral smoothing}."""
    out = {"own": corpus.parent.parent / "data_own", "basic": corpus.parent.parent / "data_basic"}
    prepare.prepare([corpus], out["own"], split="speaker:60/20/20", workers=0, progress=False)
    prepare.prepare([corpus], out["basic"], split="speaker:60/20/20", taxonomy="basic",
                    neutral_smoothing=0.1, workers=0, progress=False)
    return out


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_every_variant_loads(name, variant):
    spec = f"configs/{name}.py" + (f":{variant}" if variant else "")
    cfg = config_lib.load_config(spec)
    assert cfg.workdir and cfg.data.dir
    if variant != "smoke":
        assert cfg.model.pretrained, "full configs start from a pretrained checkpoint"


def test_unknown_variant_is_refused():
    for name in CONFIGS:
        with pytest.raises(ValueError, match="unknown variant"):
            config_lib.load_config(f"configs/{name}.py:nope")


def test_method_fields():
    em = config_lib.load_config("configs/em2ldl_hubert.py")
    assert (em.loss.kl, em.loss.cosine, em.optim.lr, em.data.global_batch) == (1.0, 0.3, 1e-5, 32)
    assert (em.train.epochs, em.train.best_metric, em.model.pooling) == (20, "kl", "mean")
    ws = config_lib.load_config("configs/whisper_soft_adv.py")
    assert ws.model.pooling == "frame_logits" and ws.model.domain_head
    assert (ws.loss.domain, ws.loss.soft_ce, ws.augment.p) == (0.01, 1.0, 0.2)
    assert ws.augment.waveform and ws.augment.specaugment and ws.optim.freeze == ("encoder/conv*",)
    ml = config_lib.load_config("configs/mll_eam_flam.py")
    assert (ml.model.pooling, ml.model.attention_heads, ml.augment.mixup) == (
        "frame_attention", 16, "energy")
    assert all(ml.loss[k] > 0 for k in ("kl", "focal", "center", "supcon"))
    assert (ml.optim.schedule, ml.optim.epoch_decay, ml.optim.center_lr) == (
        "epoch_decay", 0.875, 5e-3)
    assert config_lib.load_config("configs/mll_eam_flam.py:frozen").optim.freeze == ("encoder/*",)


def test_documented_prepare_commands_parse():
    """The split of every EM2LDL evaluation and the LOCO split are valid split specs."""
    import importlib.util

    def module(name):
        spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    em = module("em2ldl_hubert")
    for variant, (split, _) in em.EVALUATIONS.items():
        splits.parse_split_spec(split)
        cmd = em.prepare_command(variant)
        assert f"--split {split}" in cmd and "--taxonomy em2ldl32" in cmd
        data_dir = config_lib.load_config(f"configs/em2ldl_hubert.py:{variant}" if variant
                                          else "configs/em2ldl_hubert.py").data.dir
        assert f"--out {data_dir} " in cmd
    ws = module("whisper_soft_adv")
    assert "--split loco:iemocap" in ws.prepare_command(loco="iemocap")
    splits.parse_split_spec("loco:iemocap")


def _smoke(name, workdir, data_dir, *extra):
    return config_lib.load_config(f"configs/{name}.py:smoke", [
        f"--config.workdir={workdir}", f"--config.data.dir={data_dir}",
        "--config.train.max_steps=2", *extra])


def _train_metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


def _train(cfg) -> int:
    """Trains; returns the last step."""
    return loop.train(cfg)["step"]


def _evaluate(workdir):
    report = evaluate.evaluate_workdir(workdir, "test")
    saved = json.loads((workdir / "eval" / "test.json").read_text())
    assert saved["metrics"]["count"] == report["metrics"]["count"] > 0
    for key in ("kl", "cosine", "accuracy", "ua", "wa", "micro_f1"):
        assert math.isfinite(saved["metrics"][key]), key
    return saved


@pytest.mark.slow
def test_em2ldl_smoke(data_dirs, tmp_path):
    cfg = _smoke("em2ldl_hubert", tmp_path, data_dirs["own"])
    assert _train(cfg) == 2
    rows = _train_metrics(tmp_path)
    assert {"kl", "cosine"} <= set(rows[0]) and "soft_ce" not in rows[0]
    report = _evaluate(tmp_path)
    for key in ("kl", "cosine", "chebyshev", "clark", "canberra", "intersection"):
        assert math.isfinite(report["metrics"][key])
    assert "gender" in report["groups"]  # Per-group metrics.


@pytest.mark.slow
def test_whisper_soft_adv_smoke(data_dirs, tmp_path):
    info = json.loads((data_dirs["basic"] / "dataset.json").read_text())
    assert len(info["corpora"]) == 2  # Two domains for the adversarial head.
    assert info["neutral_smoothing"] == 0.1
    cfg = _smoke("whisper_soft_adv", tmp_path, data_dirs["basic"])
    assert cfg.model.pooling == "frame_logits" and cfg.augment.waveform and cfg.augment.specaugment
    assert _train(cfg) == 2
    rows = _train_metrics(tmp_path)
    assert {"soft_ce", "domain", "domain_accuracy"} <= set(rows[0]) and "kl" not in rows[0]
    assert rows[-1]["grl_lambda"] == pytest.approx(0.01)
    _evaluate(tmp_path)


@pytest.mark.slow
def test_mll_eam_flam_smoke(data_dirs, tmp_path):
    cfg = _smoke("mll_eam_flam", tmp_path, data_dirs["own"])
    assert cfg.model.pooling == "frame_attention" and cfg.augment.mixup == "energy"
    assert _train(cfg) == 2
    rows = _train_metrics(tmp_path)
    assert {"kl", "focal", "center", "supcon"} <= set(rows[0])
    assert rows[-1]["lr"] == pytest.approx(1e-3)  # Both steps are in epoch 0.
    schedule = optimizer.make_schedule(cfg.optim, total_steps=40, steps_per_epoch=2)
    assert float(schedule(2)) == pytest.approx(1e-3 * 0.875)  # x7/8 after one epoch.
    _evaluate(tmp_path)


@pytest.mark.slow
def test_kfold_driver(corpus, tmp_path, capsys):
    summary = folds.run_folds(
        "configs/em2ldl_hubert.py:smoke",
        [f"--config.workdir={tmp_path / 'run'}", "--config.train.max_steps=1"], 2,
        tmp_path / "data", manifests=[corpus], workers=0, progress=False)
    saved = json.loads((tmp_path / "run" / folds.SUMMARY_JSON).read_text())
    assert saved["folds"] == 2 and len(saved["per_fold"]) == 2
    for i, fold in enumerate(saved["per_fold"]):
        assert fold["split"] == f"kfold:2:{i}"
        assert (tmp_path / "run" / f"fold{i}" / "eval" / "test.json").is_file()
    # Folds partition the speakers: every utterance is tested exactly once.
    assert saved["count"] == 24
    for key in ("wa", "ua", "kl"):
        values = [f["metrics"][key] for f in saved["per_fold"]]
        assert saved["metrics"][key]["mean"] == pytest.approx(sum(values) / 2)
        assert saved["metrics"][key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    assert summary["metrics"]["ua"] == saved["metrics"]["ua"]
    out = capsys.readouterr().out
    assert "2 folds of configs/em2ldl_hubert.py:smoke" in out and "ua" in out


def test_fold_helpers(tmp_path):
    assert folds.fold_split(folds.DEFAULT_SPLIT_FORMAT, 5, 2) == "kfold:5:2"
    assert folds.fold_split("logo:session=Ses0{fold1}", 5, 0) == "logo:session=Ses01"
    with pytest.raises(ValueError, match="split_format"):
        folds.fold_split("kfold:{k}:{fold}", 5, 0)
    assert folds.default_data_root("data/x/fold0") == "data/x"
    assert folds.default_data_root("data/x") == "data/x"
    s = folds.summarize([{"ua": 0.5, "kl": 1.0}, {"ua": 0.7, "kl": 3.0}])
    assert s["ua"]["mean"] == pytest.approx(0.6) and s["ua"]["std"] == pytest.approx(0.1)
    assert s["kl"]["values"] == [1.0, 3.0]
    with pytest.raises(FileNotFoundError, match="kfold:3:0"):
        folds.run_folds("configs/em2ldl_hubert.py:smoke", [f"--config.workdir={tmp_path}"], 3,
                        tmp_path / "missing")
    assert cli.main(["train", "--config", "configs/em2ldl_hubert.py:smoke", "--folds", "1"]) == 1
