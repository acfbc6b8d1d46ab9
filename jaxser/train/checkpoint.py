"""Orbax checkpoints in the workdir: the latest for resuming, the best k for evaluation.

`WORKDIR/checkpoints/latest` keeps the newest state (with the data-stream position);
`WORKDIR/checkpoints/best` keeps the k best by a validation metric. Orbax writes each
step into a temporary folder and renames it when complete, so a killed save is never
picked up; the next writer deletes such leftovers. Every process of a multi-host job
constructs the managers and calls every save (Orbax writes each array shard from the
process that holds it and the JSON items from process 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxser.train.metrics import metric_direction


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


def _handlers() -> dict:
    """The items of a jaxser checkpoint (registered so their metadata can be read)."""
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def rank_key(metric: str, tiebreak: str = ""):
    """metrics -> a sortable key: the metric, then the tie-break metric oriented so that
    sorting in the metric's own direction also prefers the better tie-break."""
    if not tiebreak:
        return lambda m: (float(m[metric]),)
    sign = 1.0 if metric_direction(tiebreak) == metric_direction(metric) else -1.0
    return lambda m: (float(m[metric]), sign * float(m[tiebreak]))


def is_better(metrics: dict, best: dict | None, metric: str, tiebreak: str = "") -> bool:
    """Whether `metrics` beat `best` (both validation metric dicts) by metric, then tie-break."""
    if not best:
        return True
    key = rank_key(metric, tiebreak)
    new, old = key(metrics), key(best)
    return new < old if metric_direction(metric) == "min" else new > old


class Checkpoints:
    """The latest and best-k checkpoint managers of one workdir."""

    def __init__(self, workdir: str | Path, best_metric: str = "kl", keep_best: int = 1,
                 async_save: bool = True, read_only: bool = False, best_tiebreak: str = ""):
        root = Path(workdir).absolute() / "checkpoints"
        self.best_metric = best_metric
        common = dict(enable_async_checkpointing=async_save, read_only=read_only,
                      create=not read_only, cleanup_tmp_directories=not read_only)
        self.latest = ocp.CheckpointManager(
            root / "latest", item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, **common))
        self.best = ocp.CheckpointManager(
            root / "best", item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(
                max_to_keep=max(keep_best, 1), best_fn=rank_key(best_metric, best_tiebreak),
                best_mode=metric_direction(best_metric), **common))

    @staticmethod
    def _args(state, data_state: dict, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))

    def save_latest(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving the resume point (async: `wait()` before relying on it)."""
        # One save in flight across both managers: with several processes, two concurrent
        # async saves of the same step synchronise on barriers that can cross and hang.
        self.best.wait_until_finished()
        self.latest.save(step, args=self._args(state, data_state, meta), force=True)

    def save_best(self, step: int, state, data_state: dict, meta: dict,
                  metrics: dict[str, float]) -> None:
        """Offers a validated state to the best-k manager (kept if among the k best)."""
        self.latest.wait_until_finished()  # One save in flight (see save_latest).
        self.best.save(step, args=self._args(state, data_state, meta), force=True,
                       metrics={k: float(v) for k, v in metrics.items()
                                if isinstance(v, int | float)})

    def discard_after(self, step: int) -> list[int]:
        """Deletes best checkpoints newer than `step` (a resumed run replays those steps).

        A run killed after a best save but before its latest save resumes from an older
        step; the best checkpoints it left beyond that step belong to the abandoned run
        (and would collide with the replayed saves). Every process must call this.
        """
        newer = [s for s in self.best.all_steps() if s > step]
        for s in newer:
            self.best.delete(s)
        if newer:
            self.best.reload()
        return newer

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.best_step()

    def _manager_and_step(self, which: str | int):
        if which == "latest":
            return self.latest, self.latest.latest_step()
        if which == "best":
            step = self.best.best_step()
            return (self.best, step) if step is not None else (self.latest,
                                                                 self.latest.latest_step())
        step = int(which)
        for manager in (self.best, self.latest):
            if step in manager.all_steps():
                return manager, step
        return self.latest, None

    def restore(self, which: str | int, abstract_state: Any) -> tuple[int, Any, dict, dict]:
        """(step, state, data_state, meta) of `latest`, `best` or a step number."""
        manager, step = self._manager_and_step(which)
        if step is None:
            raise CheckpointNotFound(f"no complete checkpoint '{which}' in {manager.directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return step, restored["state"], restored["data"], restored["meta"]

    def read_meta(self, which: str | int = "best") -> tuple[int, dict]:
        """The JSON metadata (config, labels) of a checkpoint, without its arrays."""
        manager, step = self._manager_and_step(which)
        if step is None:
            raise CheckpointNotFound(f"no complete checkpoint '{which}' in {manager.directory}")
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return step, restored["meta"]

    def state_shapes(self, which: str | int = "latest") -> dict[str, tuple]:
        """{"params/model/...": (shape, dtype)} of a checkpoint's saved state, read from
        its metadata (no arrays are read); {} when the metadata cannot be read."""
        manager, step = self._manager_and_step(which)
        if step is None:
            raise CheckpointNotFound(f"no complete checkpoint '{which}' in {manager.directory}")
        try:
            tree = manager.item_metadata(step)["state"]
        except (KeyError, TypeError, ValueError, FileNotFoundError):
            return {}
        if tree is None:
            return {}
        return tree_shapes(tree)

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def tree_shapes(tree) -> dict[str, tuple]:
    """{"a/b/c": (shape, dtype name)} of the array leaves of a pytree (or its metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                            for k in path)
            out[name] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def state_bytes(tree) -> int:
    """Bytes of the array leaves of a pytree (or its abstract shapes): one checkpoint."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))
