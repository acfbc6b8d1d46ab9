"""`jaxser train`: the training driver around the pure jitted step.

One call of `train(config)` builds the mesh, the model and the optimizer, restores the
workdir's latest checkpoint if there is one (resume), streams batches from the prepared
shards, evaluates periodically on the validation split, keeps the best checkpoints, and
stops cleanly on SIGTERM (checkpoint, exit 0) or on a non-finite loss (names the step,
keeps the last good checkpoint).

What a run guarantees (tests/test_reliability.py, tests/test_engine.py prove each):

- Resuming is exact: a run stopped at any point (SIGTERM, SIGKILL, a crash, even during a
  checkpoint save) and started again with the same command ends with parameters bit
  for bit equal to an uninterrupted run on the same devices. The checkpoint holds the
  train state and the data-stream position; the step's randomness is `fold_in(key, step)`.
- A half-written checkpoint is never picked (Orbax writes a temporary folder and renames
  it when complete); best checkpoints newer than the resume point are dropped.
- Nothing that fails at start wastes a step: an unwritable or full workdir, a second job
  on the same workdir, a config that changes the model or optimizer of the checkpoint,
  a dataset with other labels, or shards that hold fewer records than dataset.json says
  all stop before the first step with a message naming the problem.
- A non-finite loss or gradient stops the run naming the step (and its examples) before
  that state is ever saved; a damaged shard stops it naming the file.
- With several processes, every process restores, saves and stops at the same step
  (SIGTERM on any of them stops all through JAX's preemption sync point); logs, metrics
  and checkpoint metadata are written by process 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxser import accelerator
from jaxser import config as config_lib
from jaxser import workdir as workdir_lib
from jaxser.constants import SAMPLE_RATE
from jaxser.data import balance, dimensions, records, shards
from jaxser.errors import JaxserError
from jaxser.train import resume
from jaxser.train.checkpoint import Checkpoints, is_better, state_bytes
from jaxser.train.evaluation import evaluate_split
from jaxser.train.experiment import Experiment
from jaxser.train.preemption import StopSignal
from jaxser.train.writers import MetricWriter, setup_logging

log = logging.getLogger(__name__)


class NonFiniteLoss(JaxserError):
    """Training produced NaN or inf; the workdir keeps the last good checkpoint."""


# --------------------------------------------------------------------------------------
# Pieces of the loop


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (log, evaluate, save) is due after `step`
    of `total`: at each multiple of `every` and at the last step."""
    return step % every == 0 or step >= total


def next_batch(train_iter, cfg, step: int) -> dict:
    """The next training batch; a read or parse failure becomes a records.DataError naming
    the damaged shard(s) and the step."""
    try:
        return next(train_iter)
    except Exception as e:  # noqa: BLE001 - the pipeline reads only data: name it
        raise records.read_failure(cfg.data.dir, cfg.data.train_split,
                                   f"the batch of step {step}", e) from e


# --------------------------------------------------------------------------------------
# Driver


def train(cfg) -> dict:
    """Trains (or resumes) in cfg.workdir; returns the final summary
    {"step", "stopped": finished | preempted | early_stopped, "best"}."""
    if not cfg.workdir or not cfg.data.dir:
        raise ValueError("config.workdir and config.data.dir must be set")
    workdir = Path(cfg.workdir)
    workdir_lib.check_writable(workdir)
    with workdir_lib.lock(workdir):
        setup_logging(workdir)
        accelerator.report_backend()  # backend, devices; loud if a GPU is seen but unused
        return _train_locked(cfg, workdir)


def _train_locked(cfg, workdir: Path) -> dict:
    info = shards.load_dataset_info(cfg.data.dir)
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.eval_split)):
        if not cfg.data.get("features"):  # Cached features: no shard is read.
            records.check_complete(cfg.data.dir, split, info,
                                   cfg.data.get("skip_corrupt", False))
    exp = Experiment(cfg, info["labels"], info.get("corpora", []),
                     dims=dimensions.names_of(info), class_weights=_class_weights(cfg, info))
    log.info("mesh %s, %d process(es), %d steps/epoch, %d steps in all", dict(exp.mesh.shape),
             jax.process_count(), exp.steps_per_epoch, exp.total_steps)
    key = jax.random.key(cfg.seed)
    target, shardings = exp.abstract_state(jax.random.fold_in(key, 0))
    keep = max(cfg.train.keep_best, 1) + 2  # best-k, latest, one save in flight
    workdir_lib.check_free_space(workdir, keep * state_bytes(target),
                                 f"{keep} checkpoints of this model")
    ckpt = Checkpoints(workdir, cfg.train.best_metric, cfg.train.keep_best,
                       cfg.train.async_checkpoints, best_tiebreak=cfg.train.best_tiebreak)
    meta = {"config": json.loads(config_lib.config_to_json(cfg)), "labels": exp.labels,
            "corpora": exp.corpora, "encoder_fields": exp.encoder_fields(),
            "prior": info["splits"][cfg.data.train_split]["prior"],
            **_dimension_meta(exp, info, cfg.data.train_split)}
    if exp.features:  # What predict and export re-attach the encoder from.
        meta["features"] = exp.features.meta()
    train_iter = None
    try:
        with exp.mesh_context():
            data_state, best = None, {}
            if ckpt.latest_step() is not None:
                state, data_state, best = resume.restore_latest(ckpt, cfg, exp.labels,
                                                                target, workdir)
            else:
                state, shardings = exp.init_state(jax.random.fold_in(key, 0))
            train_iter = exp.train_iterator(data_state)
            return _run(Run(cfg, exp, ckpt, meta, state, best, train_iter,
                            exp.train_step(shardings), jax.random.fold_in(key, 1)))
    finally:
        if train_iter is not None:
            train_iter.close()
        ckpt.close()  # Waits for saves in flight: the last good checkpoint is complete.


def _class_weights(cfg, info: dict):
    """The weights of loss.weighted_ce from the training split (None when it is off)."""
    if not cfg.loss.get("weighted_ce"):
        return None
    if cfg.data.get("class_balanced"):
        log.warning("loss.weighted_ce with data.class_balanced corrects the class imbalance "
                    "twice; use one of them")
    weights = balance.class_weights(balance.class_counts(info, cfg.data.train_split))
    log.info("class weights N/(K n_k) of split %s: %s", cfg.data.train_split,
             dict(zip(info["labels"], [round(float(w), 4) for w in weights], strict=True)))
    return weights


def _dimension_meta(exp, info: dict, train_split: str) -> dict:
    """Checkpoint metadata of a model with a dimensional head: the data set's `dimensions`
    (names, scales) and the training mean of each dimension (0-1), the prior baseline."""
    if not exp.dims:
        return {}
    stats = info["splits"][train_split].get("dims") or {}
    return {"dimensions": info["dimensions"],
            "dims_prior": [float((stats.get(d) or {}).get("mean", 0.5)) for d in exp.dims],
            "class_weights": None if exp.class_weights is None else
            [float(w) for w in exp.class_weights]}


def _validate(cfg, exp, params, step, writer) -> dict:
    result = evaluate_split(exp, params, cfg.data.dir, cfg.data.eval_split)
    metrics = result["overall"]
    writer.write(step, metrics, prefix=cfg.data.eval_split)
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("kl", "cosine", "accuracy", "ua",
                                                        "macro_f1", "ccc_mean")
                      if k in metrics)
    log.info("step %d %s: %s", step, cfg.data.eval_split, shown)
    return metrics


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


class _FiniteGuard:
    """Checks each step's metrics (loss, gradient and parameter norms) for NaN/inf.

    The check of step s runs after step s+1 is dispatched (the device stays busy), and
    before any save of step s, so a non-finite state is never checkpointed.
    """

    def __init__(self, ckpt: Checkpoints):
        self.ckpt = ckpt
        self.pending: tuple[int, dict, list[str]] | None = None
        self.checked: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict, ids) -> None:
        previous, self.pending = self.pending, (step, metrics, [str(i) for i in ids if i])
        if previous is not None:
            self._check(*previous)

    def current(self) -> dict:
        """The host metrics of the newest step, checked."""
        step, metrics, ids = self.pending
        if self.checked is None or self.checked[0] != step:
            self._check(step, metrics, ids)
        return self.checked[1]

    def _check(self, step: int, metrics: dict, ids: list[str]) -> None:
        host = jax.device_get(metrics)
        bad = {k: float(v) for k, v in host.items() if not math.isfinite(float(v))}
        if bad:
            shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
            raise NonFiniteLoss(
                f"non-finite training metrics at step {step}: {bad}; examples of that batch "
                f"on this host: {shown or '?'}. Nothing of this step was saved: the workdir "
                f"keeps the last good checkpoint (step {self.ckpt.latest_step()}), and running "
                "again resumes from it (lower optim.lr, set optim.clip_norm, or check those "
                "examples)")
        self.checked = (step, host)


@dataclasses.dataclass
class Run:
    """What the loop runs: built once by `train` (fresh or resumed), read by `_run`."""

    cfg: Any  # The run's ConfigDict.
    exp: Experiment
    ckpt: Checkpoints
    meta: dict  # JSON metadata saved with every checkpoint (config, labels, ...).
    state: Any  # The TrainState to start from.
    best: dict  # {"step", "value", "metrics", "stale"} of the best evaluation so far.
    train_iter: Any  # The resumable Experiment.train_iterator.
    train_step: Callable  # The jitted (state, batch, key) -> (state, metrics).
    key: jax.Array  # The step key; step s uses fold_in(key, s).


def _run(run: Run) -> dict:
    cfg, exp, ckpt, train_iter = run.cfg, run.exp, run.ckpt, run.train_iter
    writer = MetricWriter(cfg.workdir)
    state, best, step = run.state, run.best, int(run.state.step)
    eval_every = cfg.train.eval_every or exp.steps_per_epoch
    save_every = cfg.train.checkpoint_every or eval_every
    metric = cfg.train.best_metric
    stale = int(best.get("stale", 0))
    stop_reason = "finished"
    guard = _FiniteGuard(ckpt)
    progress = tqdm(total=exp.total_steps, initial=step, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    window_start, window_audio, window_steps = time.time(), 0.0, 0
    with StopSignal() as stop:
        while step < exp.total_steps:
            batch = next_batch(train_iter, cfg, step + 1)
            window_audio += float(np.sum(batch["length"] * batch["valid"])) / SAMPLE_RATE
            state, metrics = run.train_step(state, exp.device_batch(batch), run.key)
            step += 1
            window_steps += 1
            progress.update(1)
            guard.push(step, metrics, batch["meta"]["id"])
            if due(step, cfg.train.log_every, exp.total_steps):
                metrics = dict(guard.current())
                elapsed = time.time() - window_start
                metrics.update(step_time=elapsed / window_steps,
                               examples_per_s=window_steps * cfg.data.global_batch / elapsed,
                               audio_seconds_per_s=window_audio / elapsed,
                               epoch=train_iter.epoch)
                writer.write(step, metrics)
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                window_start, window_audio, window_steps = time.time(), 0.0, 0
            preempted = stop.should_stop(step)
            evaluate = due(step, eval_every, exp.total_steps)
            save = due(step, save_every, exp.total_steps) or preempted
            if evaluate or save:
                guard.current()  # Never save a non-finite state.
            if evaluate:
                values = _validate(cfg, exp, state.params, step, writer)
                if is_better(values, best.get("metrics"), metric, cfg.train.best_tiebreak):
                    best, stale = {"step": step, "value": values[metric],
                                   "metrics": _scalars(values)}, 0
                else:
                    stale += 1
                ckpt.save_best(step, state, train_iter.state(),
                               dict(run.meta, best=dict(best, stale=stale)), values)
            if save:
                ckpt.save_latest(step, state, train_iter.state(),
                                 dict(run.meta, best=dict(best, stale=stale)))
            if preempted:
                stop_reason = "preempted"
                break
            if cfg.train.patience and stale >= cfg.train.patience:
                stop_reason = "early_stopped"
                log.info("no improvement of %s in %d evaluations: stopping early", metric, stale)
                break
    progress.close()
    ckpt.wait()
    if stop_reason == "preempted":
        log.info("SIGTERM (preemption): stopped at step %d of %d and saved a checkpoint in %s; "
                 "run the same command again to resume", step, exp.total_steps,
                 Path(cfg.workdir) / "checkpoints" / "latest")
    return {"step": step, "stopped": stop_reason,
            "best": {k: v for k, v in best.items() if k != "metrics"}}
