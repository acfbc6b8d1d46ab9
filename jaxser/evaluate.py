"""`jaxser evaluate`: metrics of a checkpoint on a split, beside the prior baseline.

Every example of the split is seen exactly once (the last batch is padded with masked
examples). Metrics are accumulated as sufficient statistics, so they do not depend on the
batch size; with several hosts, each host's rows are gathered to all before accumulating.

`evaluate_workdir` evaluates any split of any prepared dataset with the model's taxonomy
(cross-corpus evaluation) and writes `WORKDIR/eval/<split>.json` (metrics overall and per
group, the training-prior and majority baselines, the checkpoint step, the dataset's
speaker-overlap status), `<split>_predictions.jsonl` (one row per utterance) and the plots
of `jaxser.report` as `<split>_<plot>.png`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxser import config as config_lib
from jaxser import report as report_lib
from jaxser.data import pipeline, shards
from jaxser.train import sharding
from jaxser.train.checkpoint import Checkpoints
from jaxser.train.metrics import MetricAccumulator, majority_predictions, prior_predictions

TABLE_METRICS = report_lib.TABLE_METRICS
log = logging.getLogger("jaxser")


def _gather_rows(rows: dict) -> dict:
    """All hosts' rows of a host-local batch (numpy), identical on every host."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    return {k: np.concatenate(list(multihost_utils.process_allgather(v)), axis=0)
            for k, v in rows.items()}


def _group_codes(meta: dict, columns: list[str]) -> dict[str, np.ndarray]:
    out = {}
    attrs = [json.loads(a) if a else {} for a in meta.get("attrs", [])]
    for col in columns:
        if col in meta:
            out[col] = np.asarray(meta[col]).astype(str)
        else:
            out[col] = np.asarray([str(a.get(col, "")) for a in attrs])
    return out


def evaluate_split(exp, params, data_dir: str, split: str, prior=None,
                   predictions: list | None = None,
                   target_columns: Sequence[int] | None = None) -> dict:
    """Metrics of `params` on a split: {"overall", "groups"} (+"prior", "majority" when
    given a prior).

    prior: the training set's mean distribution [K] in the model's label order, scored the
    same way (and its majority class) so the report shows what a model that learned
    nothing scores.
    predictions: a list that receives one dict per real example (id, probs, target, meta).
    target_columns: the dataset's label column of each model label, when the dataset
    lists the same labels in another order (None: the same order).
    """
    info = shards.load_dataset_info(data_dir)
    columns = [c for c in info.get("group_columns", []) if c]
    model_acc = MetricAccumulator(exp.labels, columns)
    prior_acc = MetricAccumulator(exp.labels, columns) if prior is not None else None
    major_acc = MetricAccumulator(exp.labels, columns) if prior is not None else None
    per_host = max(exp.cfg.data.eval_batch // jax.process_count(), 1)
    per_host = -(-per_host // max(exp.pipe_cfg.batch_multiple, 1)) * exp.pipe_cfg.batch_multiple
    eval_step = exp.eval_step()
    for batch in pipeline.eval_batches(data_dir, split, per_host, exp.pipe_cfg):
        if target_columns is not None:
            batch["label"] = np.asarray(batch["label"])[:, list(target_columns)]
        out = eval_step(params, exp.device_batch(batch))
        probs = sharding.host_local(out["probs"], exp.mesh, exp.rules)
        groups = local_groups = _group_codes(batch["meta"], columns)
        rows = _gather_rows({"probs": probs, "label": batch["label"], "valid": batch["valid"]})
        if jax.process_count() > 1:  # Strings travel as codes of the dataset's values.
            groups = _gather_group_strings(groups, info, split)
        model_acc.update(rows["probs"], rows["label"], rows["valid"], groups)
        if prior is not None:
            n = len(rows["valid"])
            prior_acc.update(prior_predictions(np.asarray(prior), n), rows["label"],
                             rows["valid"], groups)
            major_acc.update(majority_predictions(np.asarray(prior), n), rows["label"],
                             rows["valid"], groups)
        if predictions is not None and jax.process_index() == 0:
            _collect(predictions, batch, probs, exp.labels, local_groups)
    result = model_acc.result()
    if prior is not None:
        result["prior"] = prior_acc.result()
        result["majority"] = major_acc.result()
    return result


def _gather_group_strings(groups: dict, info: dict, split: str) -> dict:
    values = {c: sorted(info["splits"][split].get("groups", {}).get(c, {})) for c in groups}
    codes = {c: np.asarray([values[c].index(v) if v in values[c] else -1 for v in groups[c]])
             for c in groups}
    codes = _gather_rows(codes)
    return {c: np.asarray([values[c][i] if i >= 0 else "" for i in codes[c]]) for c in codes}


def _collect(predictions: list, batch: dict, probs: np.ndarray, labels: list[str],
             groups: dict[str, np.ndarray]) -> None:
    """One row per real example: id, speaker, group values, prediction, target, top classes."""
    meta = batch["meta"]
    for i in np.flatnonzero(batch["valid"] > 0):
        predictions.append({
            "id": str(meta["id"][i]), "speaker": str(meta["speaker"][i]),
            "groups": {c: str(v[i]) for c, v in groups.items()},
            "prediction": {lb: round(float(p), 6)
                           for lb, p in zip(labels, probs[i], strict=True)},
            "target": {lb: round(float(p), 6)
                       for lb, p in zip(labels, batch["label"][i], strict=True)},
            "top": labels[int(np.argmax(probs[i]))],
            "true_top": labels[int(np.argmax(batch["label"][i]))]})


def check_checkpoint(checkpoint: str | int) -> str:
    """`best`, `latest` or a step number; ValueError naming anything else."""
    value = str(checkpoint)
    if value not in ("best", "latest") and not re.fullmatch(r"\d+", value):
        raise ValueError(f"checkpoint must be best, latest or a step number, got {value!r}")
    return value


def load_for_inference(workdir: str | Path, checkpoint: str = "best", data_dir: str | None = None):
    """(experiment, params, step, meta) of a trained workdir, for evaluation or prediction.

    checkpoint: `best` (falls back to the latest when no best was kept), `latest` or a
    step number. data_dir: another prepared dataset to point the experiment at.
    """
    from jaxser.train.experiment import Experiment

    checkpoint = check_checkpoint(checkpoint)
    if not (Path(workdir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}: is it a training workdir?")
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step, meta = ckpt.read_meta(checkpoint)
        cfg = config_lib.config_from_json(json.dumps(meta["config"]))
        if data_dir:
            cfg.data.dir = str(data_dir)
        exp = Experiment(cfg, meta["labels"], meta["corpora"],
                         encoder_fields=meta["encoder_fields"], steps_per_epoch=1)
        with exp.mesh_context():
            target, _ = exp.abstract_state(jax.random.key(cfg.seed))
            step, state, _, meta = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return exp, state.params, step, meta


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
    predictions: list = []
    with exp.mesh_context():
        result = evaluate_split(exp, params, exp.cfg.data.dir, split, prior=prior,
                                predictions=predictions, target_columns=columns)
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
