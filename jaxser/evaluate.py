"""`jaxser evaluate`: metrics of a checkpoint on a split, beside the prior baseline.

Every example of the split is seen exactly once (the last batch is padded with masked
examples). Metrics are accumulated as sufficient statistics, so they do not depend on the
batch size; with several hosts, each host's rows are gathered to all before accumulating.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxser import config as config_lib
from jaxser.data import pipeline, shards
from jaxser.train import sharding
from jaxser.train.checkpoint import Checkpoints
from jaxser.train.metrics import MetricAccumulator, majority_predictions, prior_predictions

TABLE_METRICS = ("kl", "cosine", "chebyshev", "intersection", "accuracy", "ua", "macro_f1")


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
                   predictions: list | None = None) -> dict:
    """Metrics of `params` on a split: {"overall", "groups"} (+"prior" when given a prior).

    prior: the training set's mean distribution, scored the same way (and the majority
    class) so the report shows what a model that learned nothing scores.
    predictions: a list that receives one dict per real example (id, probs, target, meta).
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
        out = eval_step(params, exp.device_batch(batch))
        probs = sharding.host_local(out["probs"], exp.mesh, exp.rules)
        groups = _group_codes(batch["meta"], columns)
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
            _collect(predictions, batch, probs, exp.labels)
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


def _collect(predictions: list, batch: dict, probs: np.ndarray, labels: list[str]) -> None:
    meta = batch["meta"]
    for i in np.flatnonzero(batch["valid"] > 0):
        predictions.append({
            "id": str(meta["id"][i]), "speaker": str(meta["speaker"][i]),
            "prediction": {l: round(float(p), 6) for l, p in zip(labels, probs[i])},
            "target": {l: round(float(p), 6) for l, p in zip(labels, batch["label"][i])},
            "top": labels[int(np.argmax(probs[i]))],
            "true_top": labels[int(np.argmax(batch["label"][i]))]})


def load_for_inference(workdir: str | Path, checkpoint: str = "best", data_dir: str | None = None):
    """(experiment, params, step, meta) of a trained workdir, for evaluation or prediction."""
    from jaxser.train.experiment import Experiment

    ckpt = Checkpoints(workdir, read_only=True)
    step, meta = ckpt.read_meta(checkpoint)
    cfg = config_lib.config_from_json(json.dumps(meta["config"]))
    if data_dir:
        cfg.data.dir = str(data_dir)
    exp = Experiment(cfg, meta["labels"], meta["corpora"], encoder_fields=meta["encoder_fields"],
                     steps_per_epoch=1)
    with exp.mesh_context():
        target, _ = exp.abstract_state(jax.random.key(cfg.seed))
        step, state, _, meta = ckpt.restore(checkpoint if checkpoint != "best" else step, target)
    ckpt.close()
    return exp, state.params, step, meta


def format_table(report: dict) -> str:
    """Model and baselines side by side, one metric a row."""
    rows = [("metric", "model", "prior", "majority")]
    for name in TABLE_METRICS:
        if name in report["metrics"]:
            rows.append((name, *(f"{report[k][name]:.4f}" for k in ("metrics", "prior",
                                                                     "majority"))))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def evaluate_workdir(workdir: str | Path, split: str = "test", checkpoint: str = "best",
                     data_dir: str | None = None) -> dict:
    """Evaluates a trained workdir; writes WORKDIR/eval/<split>.json and returns it."""
    exp, params, step, meta = load_for_inference(workdir, checkpoint, data_dir)
    info = shards.load_dataset_info(exp.cfg.data.dir)
    if split not in info["splits"]:
        raise ValueError(f"split {split!r} not in {exp.cfg.data.dir}: {sorted(info['splits'])}")
    if list(info["labels"]) != exp.labels:
        raise ValueError(f"the dataset's labels {info['labels']} differ from the model's "
                         f"{exp.labels}; prepare it with the model's taxonomy")
    prior = info["splits"][exp.cfg.data.train_split]["prior"] \
        if exp.cfg.data.train_split in info["splits"] else meta.get("prior")
    predictions: list = []
    with exp.mesh_context():
        result = evaluate_split(exp, params, exp.cfg.data.dir, split, prior=prior,
                                predictions=predictions)
    report = {
        "split": split, "checkpoint_step": int(step), "data_dir": str(exp.cfg.data.dir),
        "metrics": result["overall"], "groups": result["groups"],
        "prior": result["prior"]["overall"], "majority": result["majority"]["overall"],
        "prior_groups": result["prior"]["groups"], "labels": exp.labels,
        "speaker_overlap": info.get("speaker_overlap"),
    }
    if jax.process_index() == 0:
        out = Path(workdir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.json").write_text(json.dumps(report, indent=2, default=_json_default))
        with open(out / f"{split}_predictions.jsonl", "w") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
    return report


def _json_default(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
