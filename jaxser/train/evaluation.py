"""Evaluation of parameters on a split, as the training loop and `jaxser evaluate` run it.

Every example of the split is seen exactly once (the last batch is padded with masked
examples). Metrics are accumulated as sufficient statistics, so they do not depend on the
batch size; with several hosts, each host's rows are gathered to all before accumulating.

A model with a dimensional head is scored per dimension (CCC, Pearson, MAE) over the rows
with that dimension's value, on the data set's reporting scale (`dimensions.report_scale`:
its original scale, e.g. 1-7, when all its corpora share one, else 0-1); rows without a
category are left out of the categorical metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxser.data import dimensions, shards
from jaxser.train import sharding
from jaxser.train.metrics import MetricAccumulator, majority_predictions, prior_predictions

log = logging.getLogger(__name__)


def _dimension_columns(model_dims: Sequence[str], info: dict) -> list[int]:
    """Where each of the model's dimensions sits in the data set's `dims` (-1: absent)."""
    names = dimensions.names_of(info)
    return [names.index(d) if d in names else -1 for d in model_dims]


def _batch_dims(batch: dict, columns: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(true [n, D], mask [n, D]) of a batch in the model's dimension order."""
    true = np.zeros((n, len(columns)))
    mask = np.zeros((n, len(columns)), bool)
    for j, c in enumerate(columns):
        if c >= 0 and "dims" in batch:
            true[:, j] = batch["dims"][:, c]
            mask[:, j] = batch["dims_mask"][:, c] > 0
    return true, mask


def evaluate_split(exp, params, data_dir: str, split: str, prior=None,
                   predictions: list | None = None,
                   target_columns: Sequence[int] | None = None, dims_prior=None) -> dict:
    """Metrics of `params` on a split: {"overall", "groups"} (+"prior", "majority" when
    given a prior).

    exp: the `jaxser.train.experiment.Experiment` the parameters belong to.
    prior: the training set's mean distribution [K] in the model's label order, scored the
    same way (and its majority class) so the report shows what a model that learned
    nothing scores.
    predictions: a list that receives one dict per real example (id, probs, target, meta).
    target_columns: the dataset's label column of each model label, when the dataset
    lists the same labels in another order (None: the same order).
    dims_prior: the training mean of each of the model's dimensions (0-1), the dimensional
    part of the prior baseline (a constant: CCC 0).
    """
    info = shards.load_dataset_info(data_dir)
    columns = [c for c in info.get("group_columns", []) if c]
    tie_rule = exp.cfg.train.get("tie_rule", "exclude")  # tied target argmax in WA/UA/F1
    model_dims = list(getattr(exp, "dims", []) or [])
    dim_columns = _dimension_columns(model_dims, info)
    scales = [dimensions.report_scale(info, d) for d in model_dims]
    acc_kw = {"tie_rule": tie_rule, **({"dim_names": model_dims} if model_dims else {})}
    model_acc = MetricAccumulator(exp.labels, columns, **acc_kw)
    prior_acc = MetricAccumulator(exp.labels, columns, **acc_kw) if prior is not None \
        else None
    major_acc = MetricAccumulator(exp.labels, columns, tie_rule=tie_rule) if prior is not None \
        else None
    per_host = max(exp.cfg.data.eval_batch // jax.process_count(), 1)
    per_host = -(-per_host // max(exp.pipe_cfg.batch_multiple, 1)) * exp.pipe_cfg.batch_multiple
    eval_step = exp.eval_step()
    for batch in exp.eval_batches(data_dir, split, per_host):
        if target_columns is not None:
            batch["label"] = np.asarray(batch["label"])[:, list(target_columns)]
        out = eval_step(params, exp.device_batch(batch))
        probs = sharding.host_local(out["probs"], exp.mesh, exp.rules)
        groups = local_groups = _group_codes(batch["meta"], columns)
        n_local = len(batch["valid"])
        local = {"probs": probs, "label": batch["label"], "valid": batch["valid"],
                 "label_mask": batch.get("label_mask", np.ones(n_local, np.float32))}
        dims_local = None
        if model_dims:
            true, mask = _batch_dims(batch, dim_columns, n_local)
            pred = np.asarray(sharding.host_local(out["dims"], exp.mesh, exp.rules), np.float64)
            dims_local = (_scaled(pred, scales), _scaled(true, scales), mask)
            local.update(dims_pred=dims_local[0], dims_true=dims_local[1], dims_mask=mask)
        rows = _gather_rows(local)
        if jax.process_count() > 1:  # Strings travel as codes of the dataset's values.
            groups = _gather_group_strings(groups, info, split)
        dims_kw = {k: rows[k] for k in ("dims_pred", "dims_true", "dims_mask") if k in rows}
        model_acc.update(rows["probs"], rows["label"], rows["valid"], groups,
                         label_mask=rows["label_mask"], **dims_kw)
        if prior is not None:
            n = len(rows["valid"])
            prior_dims = {}
            if dims_kw and dims_prior is not None:
                constant = np.tile(np.asarray(dims_prior, np.float64), (n, 1))
                prior_dims = dict(dims_kw, dims_pred=_scaled(constant, scales))
            prior_acc.update(prior_predictions(np.asarray(prior), n), rows["label"],
                             rows["valid"], groups, label_mask=rows["label_mask"], **prior_dims)
            major_acc.update(majority_predictions(np.asarray(prior), n), rows["label"],
                             rows["valid"], groups, label_mask=rows["label_mask"])
        if predictions is not None and jax.process_index() == 0:
            _collect(predictions, batch, probs, exp.labels, local_groups, model_dims,
                     dims_local)
    result = model_acc.result()
    if prior is not None:
        result["prior"] = prior_acc.result()
        result["majority"] = major_acc.result()
    return result


def _scaled(values: np.ndarray, scales) -> np.ndarray:
    """[n, D] 0-1 values -> each dimension's reporting scale."""
    out = np.asarray(values, np.float64).copy()
    for j, scale in enumerate(scales):
        out[:, j] = scale.original(out[:, j])
    return out


def _gather_rows(rows: dict) -> dict:
    """All hosts' rows of a host-local batch (numpy), identical on every host."""
    if jax.process_count() == 1:
        return rows
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


def _gather_group_strings(groups: dict, info: dict, split: str) -> dict:
    values = {c: sorted(info["splits"][split].get("groups", {}).get(c, {})) for c in groups}
    codes = {c: np.asarray([values[c].index(v) if v in values[c] else -1 for v in groups[c]])
             for c in groups}
    codes = _gather_rows(codes)
    return {c: np.asarray([values[c][i] if i >= 0 else "" for i in codes[c]]) for c in codes}


def _collect(predictions: list, batch: dict, probs: np.ndarray, labels: list[str],
             groups: dict[str, np.ndarray], dim_names: Sequence[str] = (),
             dims: tuple | None = None) -> None:
    """One row per real example: id, speaker, group values, prediction, target, top classes
    (`has_label` false for a row without a category); with dimensions `dims` (predicted)
    and `dims_true` (null where missing), on the reporting scale."""
    meta = batch["meta"]
    label_mask = batch.get("label_mask")
    for i in np.flatnonzero(batch["valid"] > 0):
        extra = {}
        if label_mask is not None and label_mask[i] <= 0:
            extra["has_label"] = False
        if dims is not None:
            pred, true, mask = dims
            extra["dims"] = {d: round(float(pred[i, j]), 6) for j, d in enumerate(dim_names)}
            extra["dims_true"] = {d: (round(float(true[i, j]), 6) if mask[i, j] else None)
                                  for j, d in enumerate(dim_names)}
        predictions.append({
            "id": str(meta["id"][i]), "speaker": str(meta["speaker"][i]),
            "groups": {c: str(v[i]) for c, v in groups.items()},
            "prediction": {lb: round(float(p), 6)
                           for lb, p in zip(labels, probs[i], strict=True)},
            "target": {lb: round(float(p), 6)
                       for lb, p in zip(labels, batch["label"][i], strict=True)},
            "top": labels[int(np.argmax(probs[i]))],
            "true_top": labels[int(np.argmax(batch["label"][i]))], **extra})
