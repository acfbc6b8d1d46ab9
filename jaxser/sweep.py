"""`jaxser sweep`: probe a frozen encoder layer by layer over k folds (the SUPERB / EmoBox
protocol), from one extraction.

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
from collections.abc import Sequence
from pathlib import Path

import jax
from matplotlib.figure import Figure

from jaxser import config as config_lib
from jaxser import folds as folds_lib
from jaxser import report as report_lib
from jaxser.data import features as features_lib
from jaxser.train import extract

log = logging.getLogger(__name__)

SWEEP_JSON = "layer_sweep.json"
SWEEP_TABLE = "layer_sweep.md"
SWEEP_PLOT = "layer_sweep.png"
METRICS = (("ua", "UA"), ("wa", "WA"), ("macro_f1", "macro-F1"))


def _row(name: str, summary: dict) -> dict:
    metrics = summary["metrics"]
    return {"layer": name, "workdir": summary["workdir"], "count": summary["count"],
            "metrics": {m: {k: metrics[m][k] for k in ("mean", "std", "values")}
                        for m, _ in METRICS if m in metrics}}


def format_table(sweep: dict) -> str:
    """A markdown table: one row per layer (then the weighted sum), mean +- std over folds."""
    head = "| layer | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [f"{sweep['folds']} folds of {sweep['config']} on the cached features of "
             f"{sweep['features']} ({sweep['split']} split, mean +- std over folds)", "",
             head, "|" + "---|" * (len(METRICS) + 1)]
    for row in sweep["rows"]:
        cells = []
        for m, _ in METRICS:
            s = row["metrics"].get(m)
            cells.append(f"{s['mean']:.4f} +- {s['std']:.4f}" if s else "-")
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(sweep: dict) -> Figure:
    """UA, WA and macro-F1 (mean over folds, std as error bars) against the layer; the
    weighted sum of all layers as dashed lines."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    layers = [r for r in sweep["rows"] if isinstance(r["layer"], int)]
    weighted = [r for r in sweep["rows"] if r["layer"] == "weighted"]
    x = [r["layer"] for r in layers]
    for (m, label), color in zip(METRICS, ("C0", "C1", "C2"), strict=True):
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
                split_format: str = folds_lib.DEFAULT_SPLIT_FORMAT, split: str = "test",
                **prepare_options) -> dict:
    """Runs the folds on each layer (`layers`: "all" or "0,3,-1") and, with `weighted`, on
    the weighted sum of all layers; writes WORKDIR/layer_sweep.{json,md,png}, prints the
    table and returns the summary. Fold options as `jaxser.folds.run_folds`."""
    folds_lib.check_fold_options(folds, manifests, prepare_options)
    base = config_lib.load_config(config_spec, overrides)  # Typos fail before any work.
    if not base.data.get("features"):
        raise ValueError("a layer sweep trains heads on cached features: set data.features "
                         "to a feature folder (`jaxser extract` writes it)")
    if not base.workdir:
        raise ValueError("config.workdir must be set: the sweep runs in WORKDIR/layer{l}")
    root = Path(base.workdir)
    data_root = Path(data_root or folds_lib.default_data_root(base.data.dir))
    if manifests:
        folds_lib.prepare_folds(manifests, data_root, folds, split_format=split_format,
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
        summary = folds_lib.run_folds(config_spec, [*overrides, *extra], folds, data_root,
                                      split_format=split_format, split=split)
        rows.append(_row(name, summary))
    sweep = {"config": config_spec, "overrides": list(overrides), "folds": folds,
             "features": str(base.data.features), "data_root": str(data_root),
             "split": split, "split_format": split_format,
             "num_layers": store.num_layers, "rows": rows}
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / SWEEP_JSON).write_text(json.dumps(sweep, indent=2))
        table = format_table(sweep)
        (root / SWEEP_TABLE).write_text(table + "\n")
        report_lib.save(plot(sweep), root / SWEEP_PLOT)
        print(table)
        print(f"layer sweep: {root / SWEEP_JSON}, {root / SWEEP_PLOT}")
    return sweep
