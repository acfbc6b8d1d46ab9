"""Orbax checkpoints in the workdir: the latest for resuming, the best k for evaluation.

`WORKDIR/checkpoints/latest` keeps the newest state (with the data-stream position);
`WORKDIR/checkpoints/best` keeps the k best by a validation metric. Orbax writes each
step into a temporary folder and renames it when complete, so a killed save is never
picked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxser.train.metrics import metric_direction


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class Checkpoints:
    """The latest and best-k checkpoint managers of one workdir."""

    def __init__(self, workdir: str | Path, best_metric: str = "kl", keep_best: int = 1,
                 async_save: bool = True, read_only: bool = False):
        root = Path(workdir).absolute() / "checkpoints"
        self.best_metric = best_metric
        common = dict(enable_async_checkpointing=async_save, read_only=read_only,
                      create=not read_only)
        self.latest = ocp.CheckpointManager(
            root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=1, **common))
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(
                max_to_keep=max(keep_best, 1), best_fn=lambda m: m[best_metric],
                best_mode=metric_direction(best_metric), **common))

    @staticmethod
    def _args(state, data_state: dict, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))

    def save_latest(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.latest.save(step, args=self._args(state, data_state, meta), force=True)

    def save_best(self, step: int, state, data_state: dict, meta: dict,
                  metrics: dict[str, float]) -> None:
        self.best.save(step, args=self._args(state, data_state, meta), force=True,
                       metrics={k: float(v) for k, v in metrics.items()
                                if isinstance(v, int | float)})

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

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
