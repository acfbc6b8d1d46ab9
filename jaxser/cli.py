"""The `jaxser` command line: a thin entry point over importable functions."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (auto-detected on TPU pods and Slurm)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU/Slurm)")
    g.add_argument("--coordinator", help="coordinator address host:port (explicit start)")
    g.add_argument("--num-processes", type=int, help="number of processes (explicit start)")
    g.add_argument("--process-id", type=int, help="this process' index (explicit start)")


def _init_distributed(args) -> None:
    if args.coordinator or args.num_processes:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        import jax

        jax.distributed.initialize()


def cmd_generate(args) -> None:
    from jaxser.data import synthetic

    path = synthetic.generate_corpus(
        args.out, num_speakers=args.speakers, utterances_per_speaker=args.utterances,
        seed=args.seed, mean_seconds=args.mean_seconds, min_seconds=args.min_seconds,
        max_seconds=args.max_seconds, label_format=args.label_format, progress=True)
    print(path)


def cmd_manifest(args) -> None:
    from jaxser.data import adapters

    options = {} if args.merge_excited else {"merge_excited": False}
    n = adapters.write_manifest(args.corpus, args.root, args.out, **options)
    print(f"wrote {n} rows to {args.out}")


def cmd_prepare(args) -> None:
    from jaxser.data import prepare

    prepare.prepare(
        args.manifest, args.out, taxonomy=args.taxonomy, map_file=args.map, split=args.split,
        seed=args.seed, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
        neutral_smoothing=args.neutral_smoothing,
        allow_speaker_overlap=args.allow_speaker_overlap, workers=args.workers)


def cmd_train(args, overrides: list[str]) -> None:
    from jaxser import config as config_lib

    cfg = config_lib.load_config(args.config, overrides)  # Fails before any work on typos.
    _init_distributed(args)
    from jaxser.train import loop

    summary = loop.train(cfg)
    print(json.dumps(summary))


def cmd_evaluate(args) -> None:
    from jaxser import evaluate

    report = evaluate.evaluate_workdir(args.workdir, args.split, args.checkpoint, args.data,
                                       plots=not args.no_plots)
    print(evaluate.format_report(report))


def cmd_predict(args) -> None:
    from jaxser.predict import Predictor

    predictor = Predictor.load(args.workdir, args.checkpoint)
    for row in predictor.predict_files(args.files, batch_size=args.batch_size,
                                       window=args.window, hop=args.hop,
                                       max_seconds=args.max_seconds):
        print(json.dumps(row))


def cmd_export(args) -> None:
    from jaxser import export

    print(export.export_model(args.workdir, args.out, args.format, args.checkpoint))


def cmd_demo(args) -> None:
    from jaxser import demo

    demo.run_demo(args.workdir, fast=args.fast)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxser", description="Speech emotion recognition in JAX/Flax: prepare corpora, "
        "train, evaluate and predict.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the built-in synthetic corpus + manifest")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--speakers", type=int, default=12, help="number of speakers")
    p.add_argument("--utterances", type=int, default=20, help="utterances per speaker")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--mean-seconds", type=float, default=2.5, help="mean duration")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest duration")
    p.add_argument("--max-seconds", type=float, default=4.0, help="longest duration")
    p.add_argument("--label-format", default="distribution",
                   choices=("distribution", "columns", "label"), help="manifest label layout")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("manifest", help="write a manifest from a corpus' own layout")
    p.add_argument("--corpus", required=True, help="ravdess, cremad, emodb, tess, savee, "
                   "iemocap, msp_improv, esd or em2ldl")
    p.add_argument("--root", required=True, help="the corpus' root folder")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--no-merge-excited", dest="merge_excited", action="store_false",
                   help="IEMOCAP: keep 'exc' instead of merging it into 'hap'")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("prepare", help="manifests -> shards + dataset.json + rejected.csv")
    p.add_argument("--manifest", action="append", required=True,
                   help="a CSV or JSONL manifest (repeat for several corpora)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--taxonomy", help="em2ldl32 | basic | iemocap4 | a JSON/YAML file; "
                   "default: the corpus' own labels")
    p.add_argument("--map", help="a harmonisation map file (source label -> distribution)")
    p.add_argument("--split", default="speaker:80/10/10",
                   help="speaker:70/10/20[:balance=gender+age] | kfold:K:I | "
                   "logo:COLUMN=VALUE | loco:CORPUS | column:NAME")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--min-seconds", type=float, default=0.1, help="reject shorter audio")
    p.add_argument("--max-seconds", type=float, default=60.0, help="reject longer audio")
    p.add_argument("--neutral-smoothing", type=float, default=0.0,
                   help="mix this fraction of neutral into every target")
    p.add_argument("--allow-speaker-overlap", action="store_true",
                   help="accept speakers in several splits (recorded and warned about)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or resume) from a config file",
                       epilog="Override any config field with --config.a.b=value, "
                       "e.g. --config.optim.lr=1e-4 --config.workdir=runs/x")
    p.add_argument("--config", required=True, help="configs/X.py[:variant]")
    p.add_argument("--folds", type=int, default=0,
                   help="run K speaker-independent folds and summarise them "
                   "(see python -m jaxser.folds --help for the fold options)")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a trained workdir on a split")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--checkpoint", default="best", help="best | latest | STEP")
    p.add_argument("--data", help="another prepared dataset (cross-corpus evaluation)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="emotion distribution of audio files (JSON lines)")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("files", nargs="+", help="audio files (any format, rate, length)")
    p.add_argument("--checkpoint", default="best", help="best | latest | STEP")
    p.add_argument("--window", type=float, default=0.0,
                   help="seconds per window for emotion over time (0: whole file)")
    p.add_argument("--hop", type=float, default=0.0, help="seconds between windows")
    p.add_argument("--batch-size", type=int, default=8, help="files per batch")
    p.add_argument("--max-seconds", type=float, default=3600.0,
                   help="reject longer files (longer than one encoder pass is chunked)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="TF SavedModel, StableHLO or HF encoder of a workdir")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="savedmodel",
                   choices=("savedmodel", "stablehlo", "encoder"),
                   help="savedmodel (TensorFlow via jax2tf) | stablehlo (jax.export) | "
                   "encoder (Hugging Face folder)")
    p.add_argument("--checkpoint", default="best", help="best | latest | STEP")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="generate -> prepare -> train -> evaluate -> predict")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written")
    p.add_argument("--fast", action="store_true", help="a tiny run for tests (seconds)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `jaxser` command. Run as a program (argv None) it first re-executes itself with
    huge-page malloc (jaxser.hugepages); called with an argv list (tests) it does not."""
    if argv is None:
        from jaxser import hugepages

        hugepages.reexec(["-m", "jaxser.cli", *sys.argv[1:]])
        argv = sys.argv[1:]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train" and args.folds:
        from jaxser import folds

        return folds.main(argv[argv.index("train") + 1:])
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from absl import logging as absl_logging

    from jaxser.errors import JaxserError
    from jaxser.train.writers import setup_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info/warnings are noise here.
    setup_logging()
    try:
        if args.command == "train":
            args.func(args, rest)
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, JaxserError) as e:
        print(f"jaxser {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
