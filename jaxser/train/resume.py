"""Resuming a run: the workdir's checkpoint must hold the train state this config builds.

`check_compatible` compares what decides the structure and shapes of the train state (the
model fields that shape parameters, the optimizer and loss fields that add state, the
dataset's labels, the saved arrays' shapes) and raises ResumeMismatch naming every
difference before any array is read. `restore_latest` runs that check and restores the
latest checkpoint, dropping best checkpoints the abandoned run left beyond it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jaxser import config as config_lib
from jaxser.errors import JaxserError
from jaxser.train.checkpoint import Checkpoints, tree_shapes

log = logging.getLogger(__name__)

# Model fields that do not change the parameters (free to change on resume).
FREE_MODEL_FIELDS = ("dtype", "remat", "attention", "pretrained", "dropout", "head_dropout",
                     "dims_activation")
# Fields outside `model` that change the shape of the train state (`>0`: only whether the
# value is positive matters).
STATE_FIELDS = ("optim.name", "optim.freeze", "optim.clip_norm>0", "optim.unfreeze_after>0",
                "loss.center>0")


class ResumeMismatch(JaxserError):
    """The config (or dataset) would build another train state than the checkpoint's."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def state_fields(config: dict) -> dict:
    """The values of a config dict that decide the train state's structure and shapes."""
    flat = _flatten(config)
    out = {k: v for k, v in flat.items()
           if k.startswith("model.") and k.split(".")[1] not in FREE_MODEL_FIELDS}
    for field in STATE_FIELDS:
        name, _, positive = field.partition(">")
        value = flat.get(name)
        if isinstance(value, list):
            value = tuple(value)
        out[field] = (bool(value) and value > 0) if positive and value is not None else value
    return out


def check_compatible(saved_config: dict, cfg, labels: list[str] | None = None,
                     saved_labels: list[str] | None = None,
                     saved_shapes: dict | None = None,
                     now_shapes: dict | None = None) -> None:
    """A resumed run must build the same train state; raises ResumeMismatch saying what
    differs: config fields (`saved_config` is the checkpoint's config dict), the dataset's
    labels, or the saved arrays' shapes ({path: (shape, dtype)}, when given)."""
    now = json.loads(config_lib.config_to_json(cfg))
    old_fields, new_fields = state_fields(saved_config), state_fields(now)
    # A field the checkpoint's config predates (added to jaxser since) had its default then.
    defaults = state_fields(json.loads(config_lib.config_to_json(config_lib.base_config())))
    saved_flat = _flatten(saved_config)
    for k in new_fields:
        if k.partition(">")[0] not in saved_flat and k in defaults:
            old_fields[k] = defaults[k]
    diffs = [f"{k}: checkpoint {old_fields.get(k)!r} vs now {new_fields.get(k)!r}"
             for k in sorted(set(old_fields) | set(new_fields))
             if old_fields.get(k) != new_fields.get(k)]
    if labels is not None and saved_labels is not None and list(labels) != list(saved_labels):
        diffs.append(f"labels: checkpoint {list(saved_labels)} vs dataset {list(labels)}")
    if not diffs and saved_shapes and now_shapes:
        for path in sorted(set(saved_shapes) | set(now_shapes)):
            old, new = saved_shapes.get(path), now_shapes.get(path)
            if old != new:
                diffs.append(f"{path}: checkpoint {_shape_text(old)} vs now {_shape_text(new)}")
    if diffs:
        shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
        raise ResumeMismatch(
            "the config changes the train state of the checkpoint in the workdir "
            "(use a new workdir, or undo these changes to resume):\n  " + "\n  ".join(shown))


def _shape_text(entry) -> str:
    return "absent" if entry is None else f"{entry[1]}{list(entry[0])}"


def restore_latest(ckpt: Checkpoints, cfg, labels: list[str], target, workdir: Path):
    """(state, data_state, best) of the latest checkpoint, after checking that this config
    and dataset (`labels`) build the same state (`target`, the abstract state)."""
    step, saved_meta = ckpt.read_meta("latest")
    check_compatible(saved_meta["config"], cfg, labels, saved_meta.get("labels"),
                     ckpt.state_shapes("latest"), tree_shapes(target))
    try:
        step, state, data_state, saved_meta = ckpt.restore("latest", target)
    except Exception as e:  # noqa: BLE001 - say which checkpoint and why
        raise ResumeMismatch(f"cannot restore the checkpoint of step {step} in {workdir} with "
                             f"this config: {type(e).__name__}: {e}") from e
    dropped = ckpt.discard_after(step)
    if dropped:
        log.info("dropped best checkpoint(s) %s newer than the resume point", dropped)
    log.info("resumed from step %d in %s", step, workdir)
    return state, data_state, saved_meta.get("best", {})
