"""Frozen-encoder probing: heads on cached features against the frozen encoder in the loop.

The protocol of SUPERB / EmoBox: a frozen upstream, a linear head on the masked mean of its
last hidden state, k folds. Two ways to run it, on the same prepared folds with the same
config, one after the other in this process:

- cached: `jaxser train --folds K` with `data.features`: every fold first runs
  `jaxser.train.extract` into one feature folder (the encoder runs once over the corpus,
  the later folds only add their view), then trains the head on the cached features;
  extraction included in the time.
- in the loop: the same command without `data.features`: the frozen encoder runs forward
  at every step of every epoch of every fold (`optim.freeze`: no backward through it).

Both include what a user waits for: compiling, per-epoch validation, checkpoints, the test
report of every fold. Then the extraction's own throughput (audio seconds per second, a
second extraction into a fresh folder with the programs compiled) against the encoder's
forward measured alone (the same jitted function, the same batches already on the device,
no input pipeline, no host copies, no writes). Printed: both times and their ratio, both
throughputs and their ratio; the last line is one JSON object.

Issue 23 asks, at full size: cached >= 10x faster than in the loop, extraction >= 0.9x the
forward alone.

    .venv/bin/python bench/probe.py                    # ~1,500 clips of 3-4 s, whisper-base,
                                                       # 4 folds x 20 epochs (a GPU run)
    .venv/bin/python bench/probe.py --smoke            # a tiny encoder, seconds on CPU
    .venv/bin/python bench/probe.py --throughput-only  # the extraction's share alone

whisper-base here is the architecture with random weights (no checkpoint is downloaded):
the cost is the same as the pretrained model's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from jaxser import config as config_lib  # noqa: E402
from jaxser import folds  # noqa: E402
from jaxser.configs.common import tiny_encoder  # noqa: E402
from jaxser.constants import SAMPLE_RATE  # noqa: E402
from jaxser.data import pipeline, shards, synthetic  # noqa: E402
from jaxser.models import ser_model  # noqa: E402
from jaxser.train import extract, probe  # noqa: E402
from jaxser.train.experiment import Experiment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = f"{REPO / 'configs' / 'superb_probe.py'}:pooled"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="runs/bench_probe", help="corpus, folds and runs")
    p.add_argument("--clips", type=int, default=1500, help="utterances in the corpus")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=4.0)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--model", default="whisper-base", help="a whisper preset (random weights)")
    p.add_argument("--batch", type=int, default=32, help="utterances per global batch")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes of the forward alone and of the extraction (best kept)")
    p.add_argument("--throughput-only", action="store_true",
                   help="only the extraction against the forward alone (no fold runs)")
    p.add_argument("--smoke", action="store_true",
                   help="48 clips, a tiny encoder, 2 folds x 2 epochs (seconds on CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clips, args.folds, args.epochs, args.batch = 48, 2, 2, 8
        args.min_seconds, args.max_seconds = 1.0, 1.5
    return args


def prepare_folds(args, work: Path) -> Path:
    """The synthetic corpus and its K speaker folds (written once, reused)."""
    speakers = max(2 * args.folds, 8)
    manifest = work / "corpus" / "manifest.csv"
    if not manifest.is_file():
        synthetic.generate_corpus(work / "corpus", num_speakers=speakers,
                                  utterances_per_speaker=-(-args.clips // speakers), seed=0,
                                  mean_seconds=(args.min_seconds + args.max_seconds) / 2,
                                  min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    with contextlib.redirect_stdout(io.StringIO()):
        folds.prepare_folds([manifest], work / "data", args.folds, workers=4)
    return work / "data"


def overrides(args, work: Path, name: str, features: bool) -> list[str]:
    """The one config of both runs (the feature folder set or not)."""
    out = [f"--config.workdir={work / name}", f"--config.data.dir={work / 'data' / 'fold0'}",
           f"--config.data.features={work / 'features' if features else ''}",
           "--config.model.encoder=whisper", "--config.model.pretrained=",
           "--config.model.layer_weighted_sum=False", f"--config.data.global_batch={args.batch}",
           f"--config.data.eval_batch={args.batch}", f"--config.train.epochs={args.epochs}",
           "--config.train.log_every=100", f"--config.train.compilation_cache={work / 'xla'}"]
    if args.smoke:
        out.append("--config.model.size=")
        out += [f"--config.model.encoder_overrides.{k}={v}"
                for k, v in tiny_encoder("whisper").items()]
    else:
        out.append(f"--config.model.size={args.model}")
    return out


def run_folds(args, work: Path, name: str, features: bool) -> tuple[float, dict]:
    """(seconds, summary) of `jaxser train --folds K` with or without cached features."""
    shutil.rmtree(work / name, ignore_errors=True)
    if features:
        shutil.rmtree(work / "features", ignore_errors=True)
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = folds.run_folds(CONFIG, overrides(args, work, name, features), args.folds,
                                  work / "data")
    return time.time() - start, summary


def forward_alone(args, work: Path) -> dict:
    """Audio seconds per second of the jitted encoder forward over the whole corpus (the
    extraction's batches, already on the device), after a warm-up pass."""
    cfg = config_lib.load_config(CONFIG, overrides(args, work, "forward", False))
    data_dir = work / "data" / "fold0"
    info = shards.load_dataset_info(data_dir)
    exp = Experiment(cfg, info["labels"], info.get("corpora", []), steps_per_epoch=1)
    params = probe.encoder_params(exp.model, exp.sample, int(cfg.seed), exp.mesh, exp.rules)
    encoder = ser_model.ENCODER_FAMILIES[exp.model.family][1](exp.enc_cfg)
    family, enc_cfg = exp.model.family, exp.enc_cfg

    @jax.jit
    def forward(params, batch):
        inputs, mask = ser_model.features(family, enc_cfg, batch["audio"], batch["length"])
        return encoder.apply({"params": params}, inputs, mask, deterministic=True)

    pipe_cfg = dataclasses.replace(exp.pipe_cfg, eval_max_seconds=extract.max_seconds(
        cfg, extract.ExtractOptions.from_config(cfg)))
    per_host = args.batch // jax.process_count()
    batches, seconds = [], 0.0
    with exp.mesh_context():
        for split in info["splits"]:
            for b in pipeline.eval_batches(data_dir, split, per_host, pipe_cfg):
                seconds += float(np.sum(b["length"] * b["valid"])) / SAMPLE_RATE
                batches.append(exp.device_batch({"audio": b["audio"], "length": b["length"]}))
        jax.block_until_ready([forward(params, b) for b in batches])  # compile, warm up
        times = []
        for _ in range(args.repeats):
            start = time.time()
            jax.block_until_ready([forward(params, b) for b in batches])
            times.append(time.time() - start)
    best = min(times)
    return {"audio_seconds": seconds, "seconds": best, "audio_seconds_per_s": seconds / best,
            "batches": len(batches)}


def extraction_alone(args, work: Path) -> dict:
    """The fastest of `repeats` extractions of the corpus into a fresh folder, after one
    that compiles the programs (as the forward alone: best of `repeats` after a warm-up)."""
    out = work / "features_throughput"
    cfg = config_lib.load_config(CONFIG, overrides(args, work, "extract", True))
    runs = []
    for _ in range(1 + args.repeats):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(extract.extract(cfg, out))
    return max(runs[1:], key=lambda r: r["audio_seconds_per_s"])


def speedup(args, work: Path) -> dict:
    """Both fold runs, one after the other; prints their times and ratio."""
    cached_s, cached = run_folds(args, work, "cached", True)
    loop_s, in_loop = run_folds(args, work, "in_loop", False)
    ratio = loop_s / cached_s
    print(f"{args.folds} folds x {args.epochs} epochs, linear head on the last layer of "
          f"{'a tiny encoder' if args.smoke else args.model} (frozen), {args.clips} clips:")
    print(f"  cached features (extraction included): {cached_s:8.1f} s   "
          f"UA {cached['metrics']['ua']['mean']:.4f}")
    print(f"  frozen encoder in the loop:           {loop_s:8.1f} s   "
          f"UA {in_loop['metrics']['ua']['mean']:.4f}")
    print(f"  speed-up: {ratio:.1f}x (issue 23 asks >= 10x)")
    return {"folds": args.folds, "epochs": args.epochs, "cached_seconds": cached_s,
            "in_loop_seconds": loop_s, "speedup": ratio,
            "ua_cached": cached["metrics"]["ua"]["mean"],
            "ua_in_loop": in_loop["metrics"]["ua"]["mean"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir) / ("smoke" if args.smoke else args.model)
    work.mkdir(parents=True, exist_ok=True)
    prepare_folds(args, work)
    result = {"bench": "probe", "smoke": args.smoke, "model": args.model, "clips": args.clips,
              "batch": args.batch}
    if not args.throughput_only:
        result.update(speedup(args, work))
    ext = extraction_alone(args, work)
    fwd = forward_alone(args, work)
    share = ext["audio_seconds_per_s"] / fwd["audio_seconds_per_s"]
    print(f"extraction: {ext['audio_seconds_per_s']:.1f} audio s/s "
          f"({ext['audio_seconds']:.0f} s of audio in {ext['encode_seconds']:.2f} s); "
          f"forward alone: {fwd['audio_seconds_per_s']:.1f} audio s/s; "
          f"ratio {share:.2f} (issue 23 asks >= 0.9)")
    result.update(extraction_audio_s_per_s=ext["audio_seconds_per_s"],
                  forward_audio_s_per_s=fwd["audio_seconds_per_s"],
                  extraction_vs_forward=share, repeats=args.repeats,
                  machine=common.machine(with_torch=False))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
