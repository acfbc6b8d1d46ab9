"""The `jaxser` command line: a thin entry point over importable functions.

The subcommands import their modules inside the `cmd_*` functions, not at the top, so
`jaxser --help` and a typo answer in a fraction of a second instead of after loading
JAX and TensorFlow. Those imports all point down (cli is the top layer), never around a
cycle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jaxser import distributed, hugepages
from jaxser.errors import JaxserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

# Subcommands that take --config.a.b=value overrides.
_WITH_OVERRIDES = ("train", "extract", "sweep")
# Options of `jaxser train --folds K` (dest names); refused without --folds.
# Of those, the ones each fold's `prepare.prepare` takes (`map` is its `map_file`).
_PREPARE_OPTIONS = ("taxonomy", "map", "neutral_smoothing", "seed", "min_seconds",
                    "max_seconds", "dimension_scale", "unknown_speakers", "workers")
_FOLD_OPTIONS = ("manifest", "data_root", "split_format", "split", *_PREPARE_OPTIONS)
# Options `jaxser prepare` and the fold driver's prepare share (the same help).
_DIMENSION_SCALE_HELP = ("scales of arousal/valence/dominance: [CORPUS:][DIMENSION=]LO-HI,... "
                         "e.g. 1-7 or iemocap:1-5 (default: the manifest's dimension_scale "
                         "column, else inferred)")
_UNKNOWN_SPEAKERS = ("auto", "reject", "utterance")
_UNKNOWN_SPEAKERS_HELP = ("rows whose speaker is 'unknown': auto keeps them with a column: "
                          "split and rejects them from splits that deal speakers; utterance "
                          "makes each its own speaker")


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
    if args.keep_other:
        options["keep_other"] = True
    n = adapters.write_manifest(args.corpus, args.root, args.out, **options)
    print(f"wrote {n} rows to {args.out}")


def cmd_prepare(args) -> None:
    from jaxser.data import prepare

    prepare.prepare(
        args.manifest, args.out, taxonomy=args.taxonomy, map_file=args.map, split=args.split,
        seed=args.seed, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
        neutral_smoothing=args.neutral_smoothing,
        allow_speaker_overlap=args.allow_speaker_overlap,
        dimension_scale=args.dimension_scale, unknown_speakers=args.unknown_speakers,
        workers=args.workers)


def cmd_train(args, overrides: list[str]) -> None:
    from jaxser import config as config_lib

    cfg = config_lib.load_config(args.config, overrides)  # Fails before any work on typos.
    given = [f"--{name.replace('_', '-')}" for name in _FOLD_OPTIONS
             if getattr(args, name) is not None]
    if given and not args.folds:
        raise ValueError(f"{', '.join(given)}: fold options, they need --folds K")
    distributed.initialize(args)
    if args.folds:
        _train_folds(args, overrides)
        return
    from jaxser.train import loop

    summary = loop.train(cfg)
    print(json.dumps(summary))


def _fold_arguments(args) -> dict:
    """The keyword arguments of `folds.run_folds` from the fold options that were given."""
    prepare_options = {"map_file" if name == "map" else name: getattr(args, name)
                       for name in _PREPARE_OPTIONS if getattr(args, name) is not None}
    options = {key: getattr(args, key) for key in ("split_format", "split")
               if getattr(args, key) is not None}
    return dict(manifests=args.manifest, **options, **prepare_options)


def _train_folds(args, overrides: list[str]) -> None:
    from jaxser import folds

    folds.run_folds(args.config, overrides, args.folds, args.data_root,
                    **_fold_arguments(args))


def cmd_extract(args, overrides: list[str]) -> None:
    from jaxser import config as config_lib

    cfg = config_lib.load_config(args.config, overrides)  # Fails before any work on typos.
    distributed.initialize(args)
    from jaxser.train import extract

    for data_dir in args.data or [None]:
        summary = extract.extract(cfg, args.out, data_dir, args.split)
        print(json.dumps(summary))


def cmd_sweep(args, overrides: list[str]) -> None:
    from jaxser import config as config_lib

    config_lib.load_config(args.config, overrides)  # Fails before any work on typos.
    distributed.initialize(args)
    from jaxser import folds

    folds.layer_sweep(args.config, overrides, args.folds, args.data_root, layers=args.layers,
                      weighted=args.weighted, **_fold_arguments(args))


def cmd_evaluate(args) -> None:
    from jaxser import evaluate

    report = evaluate.evaluate_workdir(args.workdir, args.split, args.checkpoint, args.data,
                                       plots=not args.no_plots)
    print(evaluate.format_report(report))


def cmd_predict(args) -> None:
    from jaxser.predict import Predictor

    if args.workdir:
        predictor = Predictor.load(args.workdir, args.checkpoint)
    else:  # A released checkpoint with its own classifier (emotion2vec+), no training.
        from jaxser import config as config_lib

        cfg = config_lib.load_config(args.config) if args.config else None
        predictor = Predictor.from_pretrained(args.pretrained, cfg)
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


def _add_fold_options(p: argparse.ArgumentParser) -> None:
    """The options of `jaxser train --folds K` (jaxser.folds.run_folds); None: not given."""
    g = p.add_argument_group("k-fold cross-validation (with --folds K)")
    g.add_argument("--manifest", action="append", help="prepare the folds from this manifest "
                   "(repeat for several); without it DATA_ROOT/fold{i} must exist")
    g.add_argument("--data-root", help="folder of the fold datasets (default: the config's "
                   "data.dir, or its parent when it ends in fold{i})")
    g.add_argument("--split-format", help="split of fold i with {folds}, {fold} (0-based), "
                   "{fold1} (1-based); default kfold:{folds}:{fold}; e.g. "
                   "'kfold:{folds}:{fold}:balance=gender' or 'logo:session=Ses0{fold1}'")
    g.add_argument("--taxonomy", help="prepare: em2ldl32 | basic | basic8 | iemocap4 | a file")
    g.add_argument("--map", help="prepare: a harmonisation map file")
    g.add_argument("--neutral-smoothing", type=float, help="prepare: neutral mix (default 0)")
    g.add_argument("--seed", type=int, help="prepare: split seed, the same every fold "
                   "(default 0; the training seed is --config.seed)")
    g.add_argument("--min-seconds", type=float, help="prepare: reject shorter audio "
                   "(default 0.1)")
    g.add_argument("--max-seconds", type=float, help="prepare: reject longer audio (default 60)")
    g.add_argument("--dimension-scale", help="prepare: " + _DIMENSION_SCALE_HELP)
    g.add_argument("--unknown-speakers", choices=_UNKNOWN_SPEAKERS,
                   help="prepare: " + _UNKNOWN_SPEAKERS_HELP)
    g.add_argument("--workers", type=int, help="prepare: decoding processes (default 2)")
    g.add_argument("--split", help="split each fold is evaluated on (default test)")


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
                   "iemocap, msp_improv, msp_podcast, esd or em2ldl")
    p.add_argument("--root", required=True, help="the corpus' root folder")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--no-merge-excited", dest="merge_excited", action="store_false",
                   help="IEMOCAP: keep 'exc' instead of merging it into 'hap'")
    p.add_argument("--keep-other", action="store_true",
                   help="MSP-Podcast: write O/X as labels other/no_agreement instead of rows "
                   "without a category (dimensions only)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("prepare", help="manifests -> shards + dataset.json + rejected.csv")
    p.add_argument("--manifest", action="append", required=True,
                   help="a CSV or JSONL manifest (repeat for several corpora)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--taxonomy", help="em2ldl32 | basic | basic8 | iemocap4 | a JSON/YAML file; "
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
    p.add_argument("--dimension-scale", help=_DIMENSION_SCALE_HELP)
    p.add_argument("--unknown-speakers", default="auto", choices=_UNKNOWN_SPEAKERS,
                   help=_UNKNOWN_SPEAKERS_HELP)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or resume) from a config file",
                       epilog="Override any config field with --config.a.b=value, "
                       "e.g. --config.optim.lr=1e-4 --config.workdir=runs/x")
    p.add_argument("--config", required=True, help="configs/X.py[:variant]")
    p.add_argument("--folds", type=int, default=0,
                   help="run K speaker-independent folds in WORKDIR/fold{i} and summarise "
                   "them in WORKDIR/folds_summary.json (options below)")
    _add_fold_options(p)
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("extract", help="run a frozen encoder once over a prepared dataset and "
                       "cache its features (then train heads with --config.data.features)",
                       epilog="Override any config field with --config.a.b=value, e.g. "
                       "--config.extract.frame_layers=all --config.extract.stats=mean_std")
    p.add_argument("--config", required=True, help="configs/X.py[:variant]: its model is the "
                   "encoder, its extract section what is kept")
    p.add_argument("--out", help="the feature folder (default: the config's data.features)")
    p.add_argument("--data", action="append", help="a prepared dataset (default: data.dir; "
                   "repeat for the folds of one corpus: one extraction serves them all)")
    p.add_argument("--split", action="append", help="only this split (repeat; default all)")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="probe a frozen encoder layer by layer over k folds "
                       "(cached features; a table and a plot per layer)",
                       epilog="Override any config field with --config.a.b=value")
    p.add_argument("--config", required=True, help="configs/X.py[:variant] with data.features")
    p.add_argument("--folds", type=int, required=True, help="folds per layer (see train --folds)")
    p.add_argument("--layers", default="all", help="all | indices such as 0,6,-1")
    p.add_argument("--no-weighted", dest="weighted", action="store_false",
                   help="leave out the learned weighted sum of all layers")
    _add_fold_options(p)
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="metrics of a trained workdir on a split")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--checkpoint", default="best", help="best | latest | STEP")
    p.add_argument("--data", help="another prepared dataset (cross-corpus evaluation)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="emotion distribution (and dimensions) of audio files "
                       "(JSON lines)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="the training workdir")
    model.add_argument("--pretrained", help="a released checkpoint with its own classifier "
                       "(emotion2vec+ folder: config.yaml, model.pt, tokens.txt)")
    model.add_argument("--config", help="a config whose model.pretrained is such a checkpoint "
                       "(its model.dtype, model.attention and mesh are used)")
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
        hugepages.reexec(["-m", "jaxser.cli", *sys.argv[1:]])
        argv = sys.argv[1:]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in _WITH_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from absl import logging as absl_logging

    from jaxser.train.writers import setup_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's info/warnings are noise here.
    setup_logging()
    try:
        if args.command in _WITH_OVERRIDES:
            args.func(args, rest)
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, JaxserError) as e:
        print(f"jaxser {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
