"""`jaxser evaluate`: metrics of a trained workdir on a split, beside the prior baseline.

`evaluate_workdir` evaluates any split of any prepared dataset with the model's taxonomy
(cross-corpus evaluation) and writes `WORKDIR/eval/<split>.json` (metrics overall and per
group, the training-prior and majority baselines, the checkpoint step, the dataset's
speaker-overlap status), `<split>_predictions.jsonl` (one row per utterance) and the plots
of `jaxser.report` as `<split>_<plot>.png`. The metrics themselves come from
`jaxser.train.evaluation.evaluate_split`, the same code the training loop validates with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from jaxser import report as report_lib
from jaxser.data import dimensions, shards
from jaxser.train.evaluation import evaluate_split
from jaxser.train.experiment import load_for_inference

TABLE_METRICS = report_lib.TABLE_METRICS
log = logging.getLogger(__name__)


def format_table(report: dict) -> str:
    """Model and baselines side by side, one metric a row (overall)."""
    return report_lib.overall_table(report)


def format_group_table(report: dict) -> str:
    """One row per group value with the model's and the prior's metrics."""
    return report_lib.group_table(report)


def format_report(report: dict) -> str:
    """The whole evaluation as readable text (what `jaxser evaluate` prints)."""
    return report_lib.text_report(report)


def _target_columns(model_labels: list[str], data_labels: list[str]) -> list[int] | None:
    """Where each model label sits in the dataset (None: same order); ValueError if the
    label sets differ."""
    if list(data_labels) == list(model_labels):
        return None
    missing = [lb for lb in model_labels if lb not in data_labels]
    extra = [lb for lb in data_labels if lb not in model_labels]
    if missing or extra or len(data_labels) != len(model_labels):
        raise ValueError(
            f"the dataset's labels differ from the model's: the model has {model_labels}, "
            f"the dataset {list(data_labels)} (missing {missing}, extra {extra}); prepare it "
            "with the model's taxonomy (jaxser prepare --taxonomy ... --map ...)")
    return [list(data_labels).index(lb) for lb in model_labels]


def split_leak(info: dict, split: str) -> dict:
    """The dataset's speaker-overlap status as recorded by `jaxser prepare`."""
    overlap = info.get("speaker_overlap") or {}
    pairs = {k: list(v) for k, v in (overlap.get("pairs") or {}).items() if v}
    return {"speakers_overlap": bool(pairs), "allowed": bool(overlap.get("allowed", False)),
            "pairs": pairs, "involves_split": sorted(k for k in pairs if split in k.split("/"))}


def _leak_warning(leak: dict, split: str) -> str:
    pairs = "; ".join(f"{k}: {len(v)} speaker(s)" for k, v in leak["pairs"].items())
    where = ("this split shares speakers with another" if leak["involves_split"]
             else f"not the {split} split itself")
    return (f"the dataset's splits share speakers ({pairs}; {where}): the results are not "
            "speaker-independent")


def _prior(meta: dict, info: dict, train_split: str, columns: list[int] | None):
    """The know-nothing baseline: the model's training mean distribution."""
    if meta.get("prior") is not None:
        return np.asarray(meta["prior"], np.float64), "the checkpoint's training split"
    if train_split in info["splits"]:
        prior = np.asarray(info["splits"][train_split]["prior"], np.float64)
        return (prior if columns is None else prior[columns]), f"dataset split {train_split}"
    return None, None


def evaluate_workdir(workdir: str | Path, split: str = "test", checkpoint: str = "best",
                     data_dir: str | None = None, plots: bool = True) -> dict:
    """Evaluates a trained workdir on a split of its dataset or of `data_dir`.

    Writes WORKDIR/eval/<split>.json, <split>_predictions.jsonl and (with `plots`) the
    PNG plots <split>_<plot>.png, and returns the report. Another dataset than the one
    trained on (cross-corpus) writes into WORKDIR/eval/<its folder name>/ instead, so it
    never overwrites the in-domain results. A dataset whose splits share speakers is
    reported (and warned about) on every evaluation.
    """
    exp, params, step, meta = load_for_inference(workdir, checkpoint, data_dir)
    trained_on = meta["config"]["data"]["dir"]
    cross = bool(data_dir) and Path(data_dir).resolve() != Path(trained_on).resolve()
    out = Path(workdir) / "eval" / (Path(data_dir).resolve().name if cross else "")
    info = shards.load_dataset_info(exp.cfg.data.dir)
    if split not in info["splits"]:
        raise ValueError(f"split {split!r} not in {exp.cfg.data.dir}: {sorted(info['splits'])}")
    columns = _target_columns(exp.labels, list(info["labels"]))
    leak = split_leak(info, split)
    warnings = [_leak_warning(leak, split)] if leak["speakers_overlap"] else []
    for warning in warnings:
        log.warning("%s", warning)
    prior, prior_source = _prior(meta, info, exp.cfg.data.train_split, columns)
    dims_prior = meta.get("dims_prior") if exp.dims else None
    predictions: list = []
    with exp.mesh_context():
        result = evaluate_split(exp, params, exp.cfg.data.dir, split, prior=prior,
                                predictions=predictions, target_columns=columns,
                                dims_prior=dims_prior)
    overall = result["overall"]
    report = {
        "split": split, "checkpoint": str(checkpoint), "checkpoint_step": int(step),
        "workdir": str(workdir), "data_dir": str(exp.cfg.data.dir),
        "trained_on": str(trained_on), "cross_corpus": cross,
        "taxonomy": (info.get("taxonomy") or {}).get("name"),
        "labels": exp.labels, "count": overall["count"],
        "group_counts": {c: {v: m["count"] for v, m in by.items()}
                         for c, by in result["groups"].items()},
        "metrics": overall, "groups": result["groups"],
        "prior_source": prior_source,
        "prior": result.get("prior", {}).get("overall", {}),
        "majority": result.get("majority", {}).get("overall", {}),
        "prior_groups": result.get("prior", {}).get("groups", {}),
        "majority_groups": result.get("majority", {}).get("groups", {}),
        "speaker_overlap": info.get("speaker_overlap"), "split_leak": leak,
        "warnings": warnings, "soft_labels": report_lib.is_soft(predictions),
        "dimensions": {"names": exp.dims, "scale": {
            d: dimensions.report_scale(info, d).to_json() for d in exp.dims}} if exp.dims
        else None,
        "plots": {},
    }
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{split}_predictions.jsonl", "w") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
        if plots:
            report["plots"] = report_lib.write_plots(report, predictions, out, split)
        (out / f"{split}.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return report


def _json_default(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
