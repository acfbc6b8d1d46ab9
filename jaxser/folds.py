"""k-fold cross-validation: one prepared folder, one training run and one test report per fold,
then mean and std of every metric over the folds (e.g. WA/UA on speaker-independent folds).

Layout (fold i = 0 .. K-1):

    DATA_ROOT/fold{i}/       a prepared dataset whose test split is fold i (`kfold:K:i`)
    WORKDIR/fold{i}/         the fold's training workdir (checkpoints, eval/test.json)
    WORKDIR/folds_summary.json   per-fold metrics and their mean / std

WORKDIR is the config's `workdir`. The fold folders are either prepared here from manifests
(`manifests=[...]`: `jaxser.data.prepare.prepare` with split `kfold:K:i`, idempotent, so a
second run reuses them) or expected to exist (prepared beforehand with
`jaxser prepare --split kfold:K:i --out DATA_ROOT/fold{i}`). `split_format` changes the split
of each fold, e.g. `logo:session=Ses0{fold1}` for IEMOCAP's leave-one-session-out.

Running again resumes: finished folds only re-run their (cheap) test evaluation, an
interrupted fold resumes from its latest checkpoint.

With `data.features` (heads on a frozen encoder's cached features) every fold first runs
`jaxser.train.extract.extract` into that one folder: the folds hold the same records split
differently, so the encoder runs once over the corpus and each fold only adds its view.

    jaxser train --config configs/mll_eam_flam.py --folds 5 \
        --manifest iemocap.csv --taxonomy iemocap4 [--config.a.b=v ...]

(`jaxser train --help` lists the fold options; `run_folds` is the same from Python.)

The layer sweep (`layer_sweep`, `jaxser sweep`) runs the folds once per encoder layer:

For each hidden state l of the encoder (0 = the embeddings) the config's heads are trained
on that layer's cached features alone (`data.feature_layers=(l,)`) on every fold, then,
unless left out, on the learned weighted sum of all layers. Everything runs on the feature
folder `data.features`, extracted once for all folds and layers
(`jaxser.train.extract`): a layer costs only its heads' training.

Layout (WORKDIR is the config's `workdir`):

    WORKDIR/layer{l}/fold{i}/      one fold's run on layer l (`jaxser.folds`)
    WORKDIR/weighted/fold{i}/      the weighted sum of all layers
    WORKDIR/layer_sweep.json       per layer: UA, WA, macro-F1 mean / std / per fold
    WORKDIR/layer_sweep.md         the table
    WORKDIR/layer_sweep.png        UA, WA and macro-F1 against the layer (std as bars)

    jaxser sweep --config configs/superb_probe.py:layer --folds 5 \
        --manifest iemocap.csv --taxonomy iemocap4 \
        --split-format 'logo:session=Ses0{fold1}'

Running again resumes like the folds do (finished runs are only re-tested).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
from jax.experimental import multihost_utils
from matplotlib.figure import Figure

from jaxser import config as config_lib
from jaxser import evaluate
from jaxser import report as report_lib
from jaxser.data import features as features_lib
from jaxser.data import prepare
from jaxser.train import extract, loop

log = logging.getLogger(__name__)

SUMMARY_JSON = "folds_summary.json"
DEFAULT_SPLIT_FORMAT = "kfold:{folds}:{fold}"
# Metrics shown first in the printed table (the rest follow in report order).
_LEADING = ("wa", "ua", "accuracy", "macro_f1", "micro_f1", "kl", "cosine")


def fold_split(split_format: str, folds: int, fold: int) -> str:
    """The split spec of one fold: `split_format` with {folds}, {fold} (0-based), {fold1}."""
    try:
        return split_format.format(folds=folds, fold=fold, fold1=fold + 1)
    except (KeyError, IndexError) as e:
        raise ValueError(f"split_format {split_format!r} may only use {{folds}}, {{fold}} and "
                         f"{{fold1}}: {e}") from None


def default_data_root(data_dir: str) -> str:
    """The fold root of a config: the parent of a `.../fold{i}` data.dir, else data.dir."""
    path = Path(data_dir)
    return str(path.parent) if re.fullmatch(r"fold\d+", path.name) else str(path)


def _is_main() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_folds(manifests: Sequence[str | Path], data_root: str | Path, folds: int, *,
                  split_format: str = DEFAULT_SPLIT_FORMAT, **prepare_options) -> list[Path]:
    """Prepares DATA_ROOT/fold{i} for every fold (process 0; others wait); returns the dirs.

    prepare_options go to `jaxser.data.prepare.prepare` (taxonomy, map_file, seed,
    neutral_smoothing, workers, ...). The split seed is the same for every fold, so the
    folds partition the speakers.
    """
    dirs = [Path(data_root) / f"fold{i}" for i in range(folds)]
    if _is_main():
        for i, out in enumerate(dirs):
            prepare.prepare(list(manifests), out, split=fold_split(split_format, folds, i),
                            **prepare_options)
    _sync("jaxser.folds.prepare")
    return dirs


def _check_fold_dirs(data_root: Path, folds: int, split_format: str) -> None:
    missing = [i for i in range(folds) if not (data_root / f"fold{i}" / "dataset.json").is_file()]
    if missing:
        i = missing[0]
        raise FileNotFoundError(
            f"no prepared dataset for fold(s) {missing} under {data_root}; pass manifests "
            f"(--manifest) to prepare them, or run e.g. `jaxser prepare --manifest M --out "
            f"{data_root / f'fold{i}'} --split {fold_split(split_format, folds, i)}`")


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "count"}


def summarize(per_fold: Sequence[dict]) -> dict[str, dict]:
    """{metric: {mean, std, min, max, values}} over folds (std: population, ddof=0)."""
    names: list[str] = []
    for fold in per_fold:
        names.extend(n for n in fold if n not in names)
    out = {}
    for name in names:
        values = [fold[name] for fold in per_fold if name in fold]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        out[name] = {"mean": mean, "std": math.sqrt(var), "min": min(values),
                     "max": max(values), "values": values}
    return out


def format_summary(summary: dict) -> str:
    """A table: one metric a row, mean +- std, then the value of every fold."""
    metrics = summary["metrics"]
    order = [m for m in _LEADING if m in metrics] + [m for m in metrics if m not in _LEADING]
    k = summary["folds"]
    rows = [("metric", "mean", "std", *(f"fold{i}" for i in range(k)))]
    for name in order:
        s = metrics[name]
        rows.append((name, f"{s['mean']:.4f}", f"{s['std']:.4f}",
                     *(f"{v:.4f}" for v in s["values"])))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip()
             for r in rows]
    head = (f"{k} folds of {summary['config']} (test split; {summary['count']} utterances in "
            "all)")
    return "\n".join([head, lines[0], "-" * len(lines[0]), *lines[1:]])


def check_fold_options(folds: int, manifests: Sequence[str | Path] | None,
                       prepare_options: Mapping[str, object]) -> None:
    """Raises ValueError for fewer than 2 folds, or prepare options without manifests."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if prepare_options and not manifests:
        raise ValueError(f"{', '.join(sorted(prepare_options))} prepare the folds: they need "
                         "manifests (--manifest)")


def run_folds(config_spec: str, overrides: Sequence[str], folds: int,
              data_root: str | Path | None = None, *,
              manifests: Sequence[str | Path] | None = None,
              split_format: str = DEFAULT_SPLIT_FORMAT, split: str = "test",
              **prepare_options) -> dict:
    """Trains and tests every fold; writes WORKDIR/folds_summary.json, prints and returns it.

    config_spec: `configs/X.py[:variant]`; overrides: `--config.a.b=v` strings (applied to
    every fold, before the fold's own workdir and data.dir). data_root: holds fold{i}
    (None: `default_data_root` of the config's data.dir). manifests: prepare the folds
    from these (else the fold folders must exist). prepare_options: passed to
    `jaxser.data.prepare.prepare` (taxonomy, map_file, seed, ...); they need manifests.
    """
    check_fold_options(folds, manifests, prepare_options)
    base = config_lib.load_config(config_spec, overrides)  # Typos fail before any work.
    if not base.workdir:
        raise ValueError("config.workdir must be set: the folds run in WORKDIR/fold{i}")
    root = Path(base.workdir)
    data_root = Path(data_root or default_data_root(base.data.dir))
    fold_split(split_format, folds, 0)  # A bad format fails before any work.
    if manifests:
        prepare_folds(manifests, data_root, folds, split_format=split_format,
                      **prepare_options)
    else:
        _check_fold_dirs(data_root, folds, split_format)
    per_fold = []
    for i in range(folds):
        cfg = config_lib.load_config(config_spec, [
            *overrides, f"--config.workdir={root / f'fold{i}'}",
            f"--config.data.dir={data_root / f'fold{i}'}"])
        if cfg.data.get("features"):  # One extraction serves every fold (keyed by record).
            extract.extract(cfg)
        trained = loop.train(cfg)
        report = evaluate.evaluate_workdir(cfg.workdir, split)
        per_fold.append({
            "fold": i, "workdir": str(cfg.workdir), "data_dir": str(cfg.data.dir),
            "split": fold_split(split_format, folds, i), "stopped": trained.get("stopped"),
            "checkpoint_step": report.get("checkpoint_step"),
            "count": int(report["metrics"].get("count", 0)),
            "metrics": _scalars(report["metrics"]),
            "prior": _scalars(report.get("prior") or {})})
    summary = {
        "config": config_spec, "overrides": list(overrides), "folds": folds,
        "data_root": str(data_root), "workdir": str(root), "split": split,
        "split_format": split_format, "count": sum(f["count"] for f in per_fold),
        "metrics": summarize([f["metrics"] for f in per_fold]),
        "prior": summarize([f["prior"] for f in per_fold if f["prior"]]),
        "per_fold": per_fold,
    }
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        (root / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
        print(f"summary: {root / SUMMARY_JSON}")
    return summary


# The layer sweep: the folds once per encoder layer, on one extraction.

SWEEP_JSON = "layer_sweep.json"
SWEEP_TABLE = "layer_sweep.md"
SWEEP_PLOT = "layer_sweep.png"
SWEEP_METRICS = (("ua", "UA"), ("wa", "WA"), ("macro_f1", "macro-F1"))


def _sweep_row(name: str, summary: dict) -> dict:
    metrics = summary["metrics"]
    return {"layer": name, "workdir": summary["workdir"], "count": summary["count"],
            "metrics": {m: {k: metrics[m][k] for k in ("mean", "std", "values")}
                        for m, _ in SWEEP_METRICS if m in metrics}}


def format_sweep_table(sweep: dict) -> str:
    """A markdown table: one row per layer (then the weighted sum), mean +- std over folds."""
    head = "| layer | " + " | ".join(label for _, label in SWEEP_METRICS) + " |"
    lines = [f"{sweep['folds']} folds of {sweep['config']} on the cached features of "
             f"{sweep['features']} ({sweep['split']} split, mean +- std over folds)", "",
             head, "|" + "---|" * (len(SWEEP_METRICS) + 1)]
    for row in sweep["rows"]:
        cells = []
        for m, _ in SWEEP_METRICS:
            s = row["metrics"].get(m)
            cells.append(f"{s['mean']:.4f} +- {s['std']:.4f}" if s else "-")
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(sweep: dict) -> Figure:
    """UA, WA and macro-F1 (mean over folds, std as error bars) against the layer; the
    weighted sum of all layers as dashed lines."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    layers = [r for r in sweep["rows"] if isinstance(r["layer"], int)]
    weighted = [r for r in sweep["rows"] if r["layer"] == "weighted"]
    x = [r["layer"] for r in layers]
    for (m, label), color in zip(SWEEP_METRICS, ("C0", "C1", "C2"), strict=True):
        if not layers or m not in layers[0]["metrics"]:
            continue
        ax.errorbar(x, [r["metrics"][m]["mean"] for r in layers],
                    yerr=[r["metrics"][m]["std"] for r in layers], marker="o", capsize=3,
                    color=color, label=label)
        if weighted and m in weighted[0]["metrics"]:
            ax.axhline(weighted[0]["metrics"][m]["mean"], color=color, linestyle="--",
                       linewidth=1, label=f"{label}, weighted sum")
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel("score")
    ax.set_xticks(x)
    ax.set_title(f"{sweep['config']}: {sweep['folds']} folds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def layer_sweep(config_spec: str, overrides: Sequence[str], folds: int,
                data_root: str | Path | None = None, *, layers: str = "all",
                weighted: bool = True, manifests: Sequence[str | Path] | None = None,
                split_format: str = DEFAULT_SPLIT_FORMAT, split: str = "test",
                **prepare_options) -> dict:
    """Runs the folds on each layer (`layers`: "all" or "0,3,-1") and, with `weighted`, on
    the weighted sum of all layers; writes WORKDIR/layer_sweep.{json,md,png}, prints the
    table and returns the summary. Fold options as `jaxser.folds.run_folds`."""
    check_fold_options(folds, manifests, prepare_options)
    base = config_lib.load_config(config_spec, overrides)  # Typos fail before any work.
    if not base.data.get("features"):
        raise ValueError("a layer sweep trains heads on cached features: set data.features "
                         "to a feature folder (`jaxser extract` writes it)")
    if not base.workdir:
        raise ValueError("config.workdir must be set: the sweep runs in WORKDIR/layer{l}")
    root = Path(base.workdir)
    data_root = Path(data_root or default_data_root(base.data.dir))
    if manifests:
        prepare_folds(manifests, data_root, folds, split_format=split_format,
                      **prepare_options)
    first = config_lib.load_config(config_spec, [*overrides,
                                                 f"--config.data.dir={data_root / 'fold0'}"])
    extract.extract(first)  # The layer count; the other folds reuse it (by record).
    store = features_lib.FeatureStore.open(base.data.features)
    chosen = extract.parse_layers(layers, store.num_layers, "--layers")
    runs = [(layer, [f"--config.data.feature_layers=({layer},)",
                     "--config.model.layer_weighted_sum=False",
                     f"--config.workdir={root / f'layer{layer}'}"]) for layer in chosen]
    if weighted:
        runs.append(("weighted", ["--config.data.feature_layers=()",
                                  "--config.model.layer_weighted_sum=True",
                                  f"--config.workdir={root / 'weighted'}"]))
    rows = []
    for name, extra in runs:
        log.info("layer sweep: %s", name if name == "weighted" else f"layer {name}")
        summary = run_folds(config_spec, [*overrides, *extra], folds, data_root,
                            split_format=split_format, split=split)
        rows.append(_sweep_row(name, summary))
    sweep = {"config": config_spec, "overrides": list(overrides), "folds": folds,
             "features": str(base.data.features), "data_root": str(data_root),
             "split": split, "split_format": split_format,
             "num_layers": store.num_layers, "rows": rows}
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / SWEEP_JSON).write_text(json.dumps(sweep, indent=2))
        table = format_sweep_table(sweep)
        (root / SWEEP_TABLE).write_text(table + "\n")
        report_lib.save(plot_sweep(sweep), root / SWEEP_PLOT)
        print(table)
        print(f"layer sweep: {root / SWEEP_JSON}, {root / SWEEP_PLOT}")
    return sweep
