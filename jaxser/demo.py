"""`jaxser demo`: the whole chain on the built-in synthetic corpus, in one workdir.

generate -> prepare (speaker-independent split) -> train (jaxser/configs/demo.py, the
config `configs/demo.py` names) -> evaluate on held-out speakers beside the prior baseline
-> predict two files. Everything is written under the workdir (default runs/demo of the
current folder); nothing is read from outside the installed package.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from jaxser import config as config_lib
from jaxser.configs import demo as demo_config
from jaxser.data import prepare, synthetic
from jaxser.evaluate import evaluate_workdir, format_report
from jaxser.predict import Predictor
from jaxser.train import loop

log = logging.getLogger(__name__)


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.time()


def run_demo(workdir: str | Path = "runs/demo", fast: bool = False) -> dict:
    """Runs the demo chain; returns the test report. `fast`: a seconds-long smoke run."""
    workdir = Path(workdir)
    t0 = _stage("generate the synthetic corpus")
    corpus = workdir / "corpus"
    manifest = corpus / "manifest.csv"
    if not manifest.exists():
        synthetic.generate_corpus(corpus, num_speakers=6 if fast else 16,
                                  utterances_per_speaker=6 if fast else 24, seed=0,
                                  progress=not fast)
    print(f"manifest: {manifest}")

    _stage("prepare: decode, validate, speaker-independent split, shards")
    data = workdir / "data"
    prepare.prepare([manifest], data, split="speaker:60/20/20", seed=0, workers=2,
                    progress=not fast)

    _stage("train")
    cfg = config_lib.make_config(demo_config.get_config, "smoke" if fast else "", [
        f"--config.workdir={workdir / 'train'}", f"--config.data.dir={data}"])
    summary = loop.train(cfg)
    print(json.dumps(summary))

    _stage("evaluate on held-out speakers (test split)")
    report = evaluate_workdir(cfg.workdir, "test")
    print(format_report(report))

    _stage("predict")
    test_ids = [json.loads(line)["id"] for line in
                (Path(cfg.workdir) / "eval" / "test_predictions.jsonl").read_text().splitlines()]
    wavs = sorted((corpus / "wav").glob("*.wav"))
    files = [w for w in wavs if w.stem in set(test_ids)][:2] or wavs[:2]
    for row in Predictor.load(cfg.workdir)(files):
        print(json.dumps(row))

    model_kl, prior_kl = report["metrics"]["kl"], report["prior"]["kl"]
    gain = 1 - model_kl / prior_kl
    change = f"{gain:.0%} lower" if gain >= 0 else f"{-gain:.0%} higher"
    print(f"\nmodel KL {model_kl:.4f} vs prior KL {prior_kl:.4f}: {change} "
          f"({time.time() - t0:.0f} s in all; workdir {workdir})")
    return report
