"""Readable evaluation reports: text tables and PNG plots of an evaluation.

Tables take the report dict `jaxser.evaluate.evaluate_workdir` writes; plots take the
report and, where they need single examples, the rows of `<split>_predictions.jsonl`.
Figures are plain `matplotlib.figure.Figure` objects (no pyplot state, no display), so
they render headless (Agg) and inside threads; `write_plots` saves them beside the JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TABLE_METRICS = ("kl", "cosine", "chebyshev", "intersection", "accuracy", "ua", "macro_f1")
GROUP_METRICS = ("kl", "cosine", "accuracy", "ua")
# Per emotion dimension, in tables and beside the prior (the training mean: CCC 0).
DIM_METRICS = ("ccc", "pearson", "mae")
BASELINE_METRICS = ("cosine", "intersection", "accuracy", "ua", "macro_f1")
DPI = 110


# ------------------------------------------------------------------------------ tables


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{round(value, 4) + 0.0:.4f}"  # + 0.0: no "-0.0000"
    return str(value)


def _grid(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip()
             for r in rows]
    return "\n".join([lines[0], "-" * max(len(line) for line in lines), *lines[1:]])


def overall_table(report: dict, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Model and baselines (training prior, majority class) side by side, a metric a row."""
    rows = [("metric", "model", "prior", "majority")]
    for name in metrics:
        if name in report["metrics"]:
            rows.append((name, *(_fmt(report.get(k, {}).get(name))
                                 for k in ("metrics", "prior", "majority"))))
    return _grid(rows)


def dimension_metric_names(report: dict) -> list[str]:
    """ccc_/pearson_/mae_<dimension> of each of the model's dimensions, then the means and
    macro_f1_ccc (empty for a model without a dimensional head)."""
    names = ((report.get("dimensions") or {}).get("names")) or []
    out = [f"{m}_{d}" for d in names for m in DIM_METRICS]
    if names:
        out += ["ccc_mean", "pearson_mean", "mae_mean", "macro_f1_ccc"]
    return [m for m in out if m in report.get("metrics", {})]


def dimension_note(report: dict) -> str:
    """The scale the dimensional metrics are reported on, or '' without dimensions."""
    dims = report.get("dimensions") or {}
    if not dims.get("names"):
        return ""
    scales = ", ".join(f"{d} {lo:g}-{hi:g}" for d, (lo, hi) in dims["scale"].items())
    return (f"emotion dimensions on the scale ({scales}); the prior predicts the training "
            "mean (CCC 0); MAE on that scale")


def group_table(report: dict, metrics: Sequence[str] = GROUP_METRICS) -> str:
    """One row per group value (gender=female, ...): count, then each metric with the
    prior baseline's value on the same examples in brackets."""
    rows = [("group", "n", *(f"{m} (prior)" for m in metrics))]
    prior_groups = report.get("prior_groups", {})
    for column, by_value in report.get("groups", {}).items():
        for value, m in by_value.items():
            prior = prior_groups.get(column, {}).get(value, {})
            rows.append((f"{column}={value}", str(m.get("count", "")),
                         *(f"{_fmt(m.get(k))} ({_fmt(prior.get(k))})" for k in metrics)))
    return _grid(rows) if len(rows) > 1 else "(no group columns in this dataset)"


def tie_note(metrics: dict) -> str:
    """How many rows had a tied target argmax and what the classification metrics did with
    them (`jaxser.train.metrics` tie rules)."""
    tied, rule = metrics.get("tied_targets", 0), metrics.get("tie_rule", "exclude")
    what = {"exclude": "left out of", "any": "kept in (any tied class counts as right)",
            "first": "kept in (first tied class is the truth)"}.get(rule, f"tie rule {rule}:")
    return (f"{tied} utterances with a tied top target class {what} accuracy/UA/F1 "
            f"(tie rule {rule!r}; {metrics.get('classification_count', '?')} classified)")


def text_report(report: dict) -> str:
    """The whole evaluation as text: header, warnings, overall table, per-group table."""
    head = (f"{report['split']} split of {report['data_dir']}: checkpoint step "
            f"{report['checkpoint_step']}, {report['metrics']['count']} utterances, "
            f"{len(report['labels'])} classes")
    parts = [head, tie_note(report["metrics"])]
    dim_names = dimension_metric_names(report)
    if dim_names:
        parts.append(dimension_note(report))
    parts += [f"WARNING: {w}" for w in report.get("warnings", [])]
    parts += ["", "overall (prior: the training mean distribution for every utterance; "
                  "majority: its top class)",
              overall_table(report, (*TABLE_METRICS, *dim_names))]
    group_metrics = (*GROUP_METRICS, *(["ccc_mean", "mae_mean"] if dim_names else []))
    parts += ["", "per group", group_table(report, group_metrics)]
    if report.get("plots"):
        parts += ["", "plots:", *(f"  {path}" for path in report["plots"].values())]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ numbers


def normalised_confusion(confusion) -> np.ndarray:
    """Rows (true classes) scaled to sum 1; rows without examples are NaN."""
    c = np.asarray(confusion, np.float64)
    support = c.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, c / np.where(support > 0, support, 1), np.nan)


def is_soft(predictions: Sequence[dict], tol: float = 1e-3) -> bool:
    """True when some target is a distribution rather than one class (rows without a
    category left out)."""
    return any(max(row["target"].values()) < 1 - tol for row in labelled(predictions))


def labelled(predictions: Sequence[dict]) -> list[dict]:
    """The prediction rows with a category (`has_label` is false for dimensions only)."""
    return [row for row in predictions if row.get("has_label", True)]


def _matrix(predictions: Sequence[dict], key: str, labels: Sequence[str]) -> np.ndarray:
    return np.asarray([[row[key][label] for label in labels] for row in predictions],
                      np.float64)  # [N, K]


def pick_examples(predictions: Sequence[dict], count: int = 4) -> list[dict]:
    """`count` rows spread evenly over the predictions sorted by id (deterministic)."""
    rows = sorted(predictions, key=lambda r: r["id"])
    if len(rows) <= count:
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, count).round()]


# ------------------------------------------------------------------------------ figures


def _short(labels: Sequence[str], width: int = 10) -> list[str]:
    return [label if len(label) <= width else label[:width - 1] + "." for label in labels]


def confusion_figure(confusion, labels: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix normalised per true class (rows), counts in the cells."""
    counts = np.asarray(confusion)
    norm = normalised_confusion(counts)
    k = len(labels)
    size = min(max(3.5, 0.45 * k + 2), 16)
    fig = Figure(figsize=(size + 1, size), dpi=DPI)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#e8e8e8")  # Classes not present.
    image = ax.imshow(np.ma.masked_invalid(norm), vmin=0, vmax=1, cmap=cmap)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(k)
    ax.set_xticks(ticks, _short(labels), rotation=60 if k > 4 else 0, ha="right"
                  if k > 4 else "center")
    ax.set_yticks(ticks, _short(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 16:
        for i in range(k):
            for j in range(k):
                if counts[i].sum() == 0:
                    continue
                ax.text(j, i, f"{norm[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center",
                        fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (rows sum to 1)")
    fig.tight_layout()
    return fig


def recall_figure(confusion, labels: Sequence[str], title: str = "") -> Figure:
    """Recall of each class (bar), with its number of true examples above the bar."""
    counts = np.asarray(confusion, np.float64)
    support = counts.sum(1)
    recall = np.where(support > 0, np.diag(counts) / np.where(support > 0, support, 1), np.nan)
    k = len(labels)
    fig = Figure(figsize=(min(max(4, 0.5 * k + 2), 18), 3.6), dpi=DPI)
    ax = fig.subplots()
    x = np.arange(k)
    ax.bar(x, np.nan_to_num(recall), color="tab:blue")
    for i in range(k):
        ax.text(i, (0 if np.isnan(recall[i]) else recall[i]) + 0.02,
                "n/a" if support[i] == 0 else f"n={int(support[i])}", ha="center", fontsize=7)
    present = support > 0
    if present.any():
        ua = float(np.mean(recall[present]))
        ax.axhline(ua, color="tab:red", lw=1, ls="--", label=f"UA (mean recall) {ua:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(x, _short(labels), rotation=60 if k > 4 else 0, ha="right" if k > 4 else
                  "center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("recall")
    ax.set_title(title or "per-class recall")
    fig.tight_layout()
    return fig


def _paired_bars(ax, labels: Sequence[str], pred: np.ndarray, true: np.ndarray) -> None:
    x = np.arange(len(labels))
    ax.bar(x - 0.2, true, width=0.4, label="true", color="tab:gray")
    ax.bar(x + 0.2, pred, width=0.4, label="predicted", color="tab:orange")
    ax.set_xticks(x, _short(labels), rotation=60 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center", fontsize=8)


def mean_distribution_figure(predictions: Sequence[dict], labels: Sequence[str],
                             title: str = "") -> Figure:
    """The mean predicted distribution beside the mean true distribution."""
    pred = _matrix(predictions, "prediction", labels).mean(0)
    true = _matrix(predictions, "target", labels).mean(0)
    fig = Figure(figsize=(min(max(4, 0.5 * len(labels) + 2), 18), 3.6), dpi=DPI)
    ax = fig.subplots()
    _paired_bars(ax, labels, pred, true)
    ax.set_ylabel("mean probability")
    ax.legend(fontsize=8)
    ax.set_title(title or f"mean distribution over {len(predictions)} utterances")
    fig.tight_layout()
    return fig


def examples_figure(predictions: Sequence[dict], labels: Sequence[str],
                    count: int = 4) -> Figure:
    """A few utterances: predicted and true distribution side by side, one panel each."""
    rows = pick_examples(predictions, count)
    fig = Figure(figsize=(min(max(4, 0.5 * len(labels) + 2), 18), 2.6 * max(len(rows), 1)),
                 dpi=DPI)
    axes = np.atleast_1d(fig.subplots(max(len(rows), 1), 1, squeeze=False)[:, 0])
    for ax, row in zip(axes, rows, strict=False):
        _paired_bars(ax, labels, np.asarray([row["prediction"][lb] for lb in labels]),
                     np.asarray([row["target"][lb] for lb in labels]))
        ax.set_ylim(0, 1)
        ax.set_title(f"{row['id']} (speaker {row.get('speaker', '?')})", fontsize=9)
    if rows:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def baselines_figure(report: dict, metrics: Sequence[str] = BASELINE_METRICS) -> Figure:
    """Model vs prior vs majority baseline on the higher-is-better metrics; KL of the model
    and the prior beside them (a one-hot majority guess has a meaningless, clipped KL)."""
    names = [m for m in metrics if m in report["metrics"]]
    fig = Figure(figsize=(8, 3.4), dpi=DPI)
    ax_kl, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(len(names), 1)]})
    x = np.arange(len(names))
    sources = (("metrics", "model", "tab:blue"), ("prior", "prior", "tab:gray"),
               ("majority", "majority", "tab:olive"))
    for i, (key, label, color) in enumerate(sources):
        values = [report.get(key, {}).get(m, np.nan) for m in names]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=label, color=color)
        if key != "majority":
            kl = report.get(key, {}).get("kl", np.nan)
            ax_kl.bar(i, kl, color=color)
            ax_kl.text(i, kl, f"{kl:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("higher is better", fontsize=9)
    ax_kl.set_xticks(range(2), ["model", "prior"], fontsize=8)
    ax_kl.set_title("KL (lower is better)", fontsize=9)
    fig.tight_layout()
    return fig


def dims_scatter_figure(predictions: Sequence[dict], names: Sequence[str],
                        scales: dict | None = None, metrics: dict | None = None) -> Figure:
    """Predicted vs true value of each emotion dimension, one panel each, with the
    identity line and the dimension's CCC / Pearson / MAE in the title."""
    fig = Figure(figsize=(3.4 * max(len(names), 1), 3.4), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(1, max(len(names), 1), squeeze=False)[0])
    for ax, name in zip(axes, names, strict=False):
        pairs = [(row["dims_true"][name], row["dims"][name]) for row in predictions
                 if row.get("dims_true", {}).get(name) is not None]
        true = np.asarray([t for t, _ in pairs], np.float64)
        pred = np.asarray([p for _, p in pairs], np.float64)
        ax.scatter(true, pred, s=8, alpha=0.5, color="tab:blue", edgecolors="none")
        lo, hi = (scales or {}).get(name, (np.min(true, initial=0), np.max(true, initial=1)))
        ax.plot([lo, hi], [lo, hi], color="tab:red", lw=1, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        m = metrics or {}
        ax.set_title(f"{name}: CCC {_fmt(m.get(f'ccc_{name}'))}, r "
                     f"{_fmt(m.get(f'pearson_{name}'))}, MAE {_fmt(m.get(f'mae_{name}'))}"
                     f" (n={len(pairs)})", fontsize=8)
    fig.tight_layout()
    return fig


def timeline_figure(rows: Sequence[dict], labels: Sequence[str],
                    segments: Sequence[tuple[float, float, dict]] | None = None,
                    title: str = "emotion over time") -> Figure:
    """Predicted distribution over time (stacked, at window centres); with `segments`
    [(start, end, {label: p})] the true dominant emotion as a strip above."""
    # Window centres, held flat out to the first start and the last end.
    times = np.asarray([rows[0]["start"], *((r["start"] + r["end"]) / 2 for r in rows),
                        rows[-1]["end"]])
    probs = np.asarray([[r["distribution"][lb] for lb in labels] for r in rows]).T  # [K, T]
    probs = np.concatenate([probs[:, :1], probs, probs[:, -1:]], axis=1)  # [K, T + 2]
    colors = [f"C{i % 10}" for i in range(len(labels))]
    fig = Figure(figsize=(10, 3.8 if segments else 3.2), dpi=DPI)
    if segments:
        ax_true, ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 5]})
        for start, end, dist in segments:
            top = max(dist, key=dist.get)
            color = colors[labels.index(top)] if top in labels else "lightgray"
            ax_true.axvspan(start, end, color=color, alpha=0.8)
            ax_true.text((start + end) / 2, 0.5, top, ha="center", va="center", fontsize=7)
        ax_true.set_yticks([])
        ax_true.set_ylabel("true", rotation=0, ha="right", va="center")
    else:
        ax = fig.subplots()
    ax.stackplot(times, probs, labels=_short(labels), colors=colors, alpha=0.9)
    ax.set_xlim(rows[0]["start"], rows[-1]["end"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ files


def save(fig: Figure, path: str | Path) -> Path:
    """Writes a figure as PNG (Agg) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_plots(report: dict, predictions: Sequence[dict], out_dir: str | Path,
                split: str) -> dict[str, str]:
    """All plots of an evaluation as `out_dir/<split>_<name>.png`; {name: path}.

    Always: confusion, recall, baselines. With soft (distribution) targets also the
    mean predicted vs true distribution and a few examples side by side. With emotion
    dimensions the scatter of predicted vs true values per dimension (`dims_scatter`).
    """
    labels = report["labels"]
    dims = report.get("dimensions") or {}
    categorical = labelled(predictions)
    confusion = report["metrics"]["confusion"]
    figures = {
        "confusion": lambda: confusion_figure(
            confusion, labels, f"{split}: confusion (rows = true class, sum 1)"),
        "recall": lambda: recall_figure(confusion, labels, f"{split}: per-class recall"),
        "baselines": lambda: baselines_figure(report),
    }
    if categorical and is_soft(categorical):
        figures["mean_distribution"] = lambda: mean_distribution_figure(categorical, labels)
        figures["examples"] = lambda: examples_figure(categorical, labels)
    if dims.get("names") and predictions:
        figures["dims_scatter"] = lambda: dims_scatter_figure(
            predictions, dims["names"], dims.get("scale"), report["metrics"])
    return {name: str(save(make(), Path(out_dir) / f"{split}_{name}.png"))
            for name, make in figures.items()}
