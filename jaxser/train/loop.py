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

import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxser import config as config_lib
from jaxser import workdir as workdir_lib
from jaxser.data import pipeline, shards
from jaxser.errors import JaxserError
from jaxser.evaluate import evaluate_split
from jaxser.train.checkpoint import Checkpoints, is_better, tree_shapes
from jaxser.train.experiment import Experiment
from jaxser.train.writers import MetricWriter, log, setup_logging

# Model fields that do not change the parameters (free to change on resume).
_FREE_MODEL_FIELDS = ("dtype", "remat", "attention", "pretrained", "dropout")
# Fields outside `model` that change the shape of the train state.
_STATE_FIELDS = ("optim.name", "optim.freeze", "optim.clip_norm>0", "optim.unfreeze_after>0",
                 "loss.center>0")


class NonFiniteLoss(JaxserError):
    """Training produced NaN or inf; the workdir keeps the last good checkpoint."""


class DataError(JaxserError):
    """The prepared shards cannot be read as their dataset.json describes."""


class ResumeMismatch(JaxserError):
    """The config (or dataset) would build another train state than the checkpoint's."""


# --------------------------------------------------------------------------------------
# Start-up checks


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _state_fields(config: dict) -> dict:
    """The config values that decide the train state's structure and shapes."""
    flat = _flatten(config)
    out = {k: v for k, v in flat.items()
           if k.startswith("model.") and k.split(".")[1] not in _FREE_MODEL_FIELDS}
    for field in _STATE_FIELDS:
        name, _, positive = field.partition(">")
        value = flat.get(name)
        if isinstance(value, list):
            value = tuple(value)
        out[field] = (bool(value) and value > 0) if positive and value is not None else value
    return out


def _check_resume_compatible(saved: dict, cfg, labels: list[str] | None = None,
                             saved_labels: list[str] | None = None,
                             saved_shapes: dict | None = None,
                             now_shapes: dict | None = None) -> None:
    """A resumed run must build the same train state; raises ResumeMismatch saying what
    differs: config fields (`saved` is the checkpoint's config dict), the dataset's
    labels, or the saved arrays' shapes ({path: (shape, dtype)}, when given)."""
    now = json.loads(config_lib.config_to_json(cfg))
    old_fields, new_fields = _state_fields(saved), _state_fields(now)
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


def _check_split_complete(data_dir: str, split: str, info: dict, skip: bool = False) -> None:
    """The shards of `split` must hold every record dataset.json counts (never fewer);
    `skip` (config `data.skip_corrupt`) turns a shortfall into a warning naming the files."""
    expected = info.get("splits", {}).get(split)
    if not expected:
        return
    try:
        index = shards.load_index(data_dir, split)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged split
        raise DataError(f"cannot index split {split!r} in {data_dir}: {type(e).__name__}: "
                        f"{e}{_damage_report(data_dir, split)}") from e
    if len(index) == int(expected["count"]):
        return
    files = expected.get("files") or []
    counts = expected.get("shard_lengths") or []
    have = _records_per_file(index, files)
    short = [f"{f} ({n} of {want} records)"
             for f, want, n in zip(files, counts, have, strict=False) if n != want]
    where = f": {', '.join(short)}" if short else ""
    if skip and len(index) < int(expected["count"]):
        log.warning("data.skip_corrupt: split %r in %s has %d of the %s records dataset.json "
                    "counts%s; training on the rest", split, data_dir, len(index),
                    expected["count"], where)
        return
    raise DataError(f"split {split!r} in {data_dir} has {len(index)} records in its shards but "
                    f"dataset.json says {expected['count']}{where}; re-run jaxser prepare or "
                    "restore the missing shards")


def _records_per_file(index: shards.ShardIndex, files: list[str]) -> list[int]:
    by_name = dict(zip(index.files, index.shard_lengths, strict=True))
    return [by_name.get(f, 0) for f in files]


def _damaged_shards(data_dir: str, split: str) -> list[str]:
    """'file (problem)' for each shard of `split` whose records fail TFRecord checksums or
    do not match the index; reads every shard once (only called after a failure)."""
    import tensorflow as tf

    try:
        names = shards.split_files(data_dir, split)
    except Exception:  # noqa: BLE001
        return []
    try:
        expected = dict(zip(*_index_counts(data_dir, split), strict=True))
    except Exception:  # noqa: BLE001
        expected = {}
    damaged = []
    for name in names:
        path, count = str(name), 0
        try:
            for _ in tf.data.TFRecordDataset(path).as_numpy_iterator():
                count += 1
        except Exception as e:  # noqa: BLE001 - the error is the report
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            damaged.append(f"{path} ({type(e).__name__} after {count} records: {first})")
            continue
        base = Path(path).name
        if base in expected and expected[base] != count:
            damaged.append(f"{path} ({count} records, the index says {expected[base]})")
    return damaged


def _index_counts(data_dir: str, split: str) -> tuple[list[str], list[int]]:
    index = shards.load_index(data_dir, split)
    return index.files, index.shard_lengths


def _damage_report(data_dir: str, split: str) -> str:
    damaged = _damaged_shards(data_dir, split)
    if not damaged:
        return ""
    return "; damaged shard(s): " + "; ".join(damaged)


def _next_batch(train_iter, cfg, step: int) -> dict:
    """The next training batch; a read or parse failure becomes a DataError naming the
    damaged shard(s) and the step."""
    try:
        return next(train_iter)
    except Exception as e:  # noqa: BLE001 - the pipeline reads only data: name it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"reading the batch of step {step} of split {cfg.data.train_split!r} in "
            f"{cfg.data.dir} failed ({type(e).__name__}: {first})"
            f"{_damage_report(cfg.data.dir, cfg.data.train_split)}; re-run jaxser prepare "
            "or restore the damaged files") from e


def _state_bytes(abstract) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract)))


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
        return _train_locked(cfg, workdir)


def _train_locked(cfg, workdir: Path) -> dict:
    info = shards.load_dataset_info(cfg.data.dir)
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.eval_split)):
        _check_split_complete(cfg.data.dir, split, info, cfg.data.get("skip_corrupt", False))
    exp = Experiment(cfg, info["labels"], info.get("corpora", []))
    log.info("mesh %s, %d process(es), %d steps/epoch, %d steps in all", dict(exp.mesh.shape),
             jax.process_count(), exp.steps_per_epoch, exp.total_steps)
    key = jax.random.key(cfg.seed)
    target, shardings = exp.abstract_state(jax.random.fold_in(key, 0))
    keep = max(cfg.train.keep_best, 1) + 2  # best-k, latest, one save in flight
    workdir_lib.check_free_space(workdir, keep * _state_bytes(target),
                                 f"{keep} checkpoints of this model")
    ckpt = Checkpoints(workdir, cfg.train.best_metric, cfg.train.keep_best,
                       cfg.train.async_checkpoints, best_tiebreak=cfg.train.best_tiebreak)
    meta = {"config": json.loads(config_lib.config_to_json(cfg)), "labels": exp.labels,
            "corpora": exp.corpora, "encoder_fields": exp.encoder_fields(),
            "prior": info["splits"][cfg.data.train_split]["prior"]}
    train_iter = None
    try:
        with exp.mesh_context():
            data_state, best = None, {}
            if ckpt.latest_step() is not None:
                state, data_state, best = _resume(cfg, exp, ckpt, target, workdir)
            else:
                state, shardings = exp.init_state(jax.random.fold_in(key, 0))
            jit_train = exp.train_step(shardings)
            train_iter = pipeline.train_iterator(cfg.data.dir, cfg.data.train_split,
                                                 exp.pipe_cfg, state=data_state)
            return _run(cfg, exp, ckpt, meta, state, best, train_iter, jit_train,
                        jax.random.fold_in(key, 1))
    finally:
        if train_iter is not None:
            train_iter.close()
        ckpt.close()  # Waits for saves in flight: the last good checkpoint is complete.


def _resume(cfg, exp, ckpt: Checkpoints, target, workdir: Path):
    """(state, data_state, best) of the latest checkpoint, after checking it fits."""
    step, saved_meta = ckpt.read_meta("latest")
    _check_resume_compatible(saved_meta["config"], cfg, exp.labels, saved_meta.get("labels"),
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


def _preemption_service() -> bool:
    """True when JAX's distributed preemption sync manager is running (multi-process)."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - private module moved
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class _StopSignal:
    """Turns SIGTERM (preemption) into a decision all processes take at the same step.

    One process: a Python handler sets a flag the loop reads after each step. Several
    processes: JAX's preemption sync manager (installed by jax.distributed.initialize)
    catches SIGTERM on any process and `reached_preemption_sync_point` turns true on
    every process at the same step; without it, the flag is all-gathered every step.
    """

    def __init__(self):
        self.received = False
        self._old = None
        self._installed = False
        self._sync = _preemption_service()

    def __enter__(self):
        if not self._sync:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, *_):
        self.received = True

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step; true at the agreed stop step."""
        if self._sync:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = True
        elif jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.received))
            self.received = bool(np.max(flags))
        return self.received

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)


def _validate(cfg, exp, params, step, writer) -> dict:
    result = evaluate_split(exp, params, cfg.data.dir, cfg.data.eval_split)
    metrics = result["overall"]
    writer.write(step, metrics, prefix=cfg.data.eval_split)
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("kl", "cosine", "accuracy", "ua")
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


def _run(cfg, exp, ckpt, meta, state, best, train_iter, jit_train, key) -> dict:
    writer = MetricWriter(cfg.workdir)
    step = int(state.step)
    eval_every = cfg.train.eval_every or exp.steps_per_epoch
    save_every = cfg.train.checkpoint_every or eval_every
    metric = cfg.train.best_metric
    stale = int(best.get("stale", 0))
    stop_reason = "finished"
    guard = _FiniteGuard(ckpt)
    progress = tqdm(total=exp.total_steps, initial=step, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    window_start, window_audio, window_steps = time.time(), 0.0, 0
    with _StopSignal() as stop:
        while step < exp.total_steps:
            batch = _next_batch(train_iter, cfg, step + 1)
            window_audio += float(np.sum(batch["length"] * batch["valid"])) / 16000
            state, metrics = jit_train(state, exp.device_batch(batch), key)
            step += 1
            window_steps += 1
            progress.update(1)
            guard.push(step, metrics, batch["meta"]["id"])
            if step % cfg.train.log_every == 0 or step == exp.total_steps:
                metrics = dict(guard.current())
                elapsed = time.time() - window_start
                metrics.update(step_time=elapsed / window_steps,
                               examples_per_s=window_steps * cfg.data.global_batch / elapsed,
                               audio_seconds_per_s=window_audio / elapsed,
                               epoch=train_iter.epoch)
                writer.write(step, metrics)
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                window_start, window_audio, window_steps = time.time(), 0.0, 0
            done = step >= exp.total_steps
            preempted = stop.should_stop(step)
            evaluate = step % eval_every == 0 or done
            if evaluate or step % save_every == 0 or preempted:
                guard.current()  # Never save a non-finite state.
            if evaluate:
                values = _validate(cfg, exp, state.params, step, writer)
                if is_better(values, best.get("metrics"), metric, cfg.train.best_tiebreak):
                    best, stale = {"step": step, "value": values[metric],
                                   "metrics": _scalars(values)}, 0
                else:
                    stale += 1
                ckpt.save_best(step, state, train_iter.state(),
                               dict(meta, best=dict(best, stale=stale)), values)
            if step % save_every == 0 or done or preempted:
                ckpt.save_latest(step, state, train_iter.state(),
                                 dict(meta, best=dict(best, stale=stale)))
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
