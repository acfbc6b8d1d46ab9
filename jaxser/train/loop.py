"""`jaxser train`: the training driver around the pure jitted step.

One call of `train(config)` builds the mesh, the model and the optimizer, restores the
workdir's latest checkpoint if there is one (resume), streams batches from the prepared
shards, evaluates periodically on the validation split, keeps the best checkpoints, and
stops cleanly on SIGTERM (checkpoint, exit 0) or on a non-finite loss (names the step,
keeps the last good checkpoint).
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
from jaxser.train.checkpoint import Checkpoints
from jaxser.train.experiment import Experiment
from jaxser.train.metrics import metric_direction
from jaxser.train.writers import MetricWriter, log, setup_logging


class NonFiniteLoss(JaxserError):
    """Training produced NaN or inf; the workdir keeps the last good checkpoint."""


def _check_resume_compatible(saved: dict, cfg) -> None:
    """A resumed run must build the same model; say what differs."""
    now = json.loads(config_lib.config_to_json(cfg))
    diffs = [f"model.{k}: checkpoint {saved['model'].get(k)!r} vs now {v!r}"
             for k, v in now["model"].items()
             if k not in ("dtype", "remat", "attention", "pretrained")
             and saved["model"].get(k) != v]
    if diffs:
        raise ValueError("the config changes the model of the checkpoint in the workdir:\n  "
                         + "\n  ".join(diffs))


def train(cfg) -> dict:
    """Trains (or resumes) in cfg.workdir; returns the final summary."""
    if not cfg.workdir or not cfg.data.dir:
        raise ValueError("config.workdir and config.data.dir must be set")
    workdir = Path(cfg.workdir)
    workdir_lib.check_writable(workdir)
    with workdir_lib.lock(workdir):
        setup_logging(workdir)
        return _train_locked(cfg, workdir)


def _train_locked(cfg, workdir: Path) -> dict:
    info = shards.load_dataset_info(cfg.data.dir)
    exp = Experiment(cfg, info["labels"], info.get("corpora", []))
    log.info("mesh %s, %d process(es), %d steps/epoch, %d steps in all", dict(exp.mesh.shape),
             jax.process_count(), exp.steps_per_epoch, exp.total_steps)
    ckpt = Checkpoints(workdir, cfg.train.best_metric, cfg.train.keep_best,
                       cfg.train.async_checkpoints)
    meta = {"config": json.loads(config_lib.config_to_json(cfg)), "labels": exp.labels,
            "corpora": exp.corpora, "encoder_fields": exp.encoder_fields(),
            "prior": info["splits"][cfg.data.train_split]["prior"]}
    key = jax.random.key(cfg.seed)
    with exp.mesh_context():
        data_state, best = None, {}
        if ckpt.latest_step() is not None:
            _, saved_meta = ckpt.read_meta("latest")
            _check_resume_compatible(saved_meta["config"], cfg)
            target, shardings = exp.abstract_state(jax.random.fold_in(key, 0))
            step, state, data_state, saved_meta = ckpt.restore("latest", target)
            best = saved_meta.get("best", {})
            log.info("resumed from step %d in %s", step, workdir)
        else:
            state, shardings = exp.init_state(jax.random.fold_in(key, 0))
        jit_train = exp.train_step(shardings)
        train_iter = pipeline.train_iterator(cfg.data.dir, cfg.data.train_split, exp.pipe_cfg,
                                             state=data_state)
        summary = _run(cfg, exp, ckpt, meta, state, best, train_iter, jit_train,
                       jax.random.fold_in(key, 1))
    ckpt.close()
    return summary


class _StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_):
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _validate(cfg, exp, params, step, writer) -> dict:
    result = evaluate_split(exp, params, cfg.data.dir, cfg.data.eval_split)
    metrics = result["overall"]
    writer.write(step, metrics, prefix=cfg.data.eval_split)
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("kl", "cosine", "accuracy", "ua")
                      if k in metrics)
    log.info("step %d %s: %s", step, cfg.data.eval_split, shown)
    return metrics


def _improved(value: float, best: dict, metric: str) -> bool:
    if "value" not in best:
        return True
    return value < best["value"] if metric_direction(metric) == "min" else value > best["value"]


def _run(cfg, exp, ckpt, meta, state, best, train_iter, jit_train, key) -> dict:
    writer = MetricWriter(cfg.workdir)
    step = int(state.step)
    eval_every = cfg.train.eval_every or exp.steps_per_epoch
    save_every = cfg.train.checkpoint_every or eval_every
    metric = cfg.train.best_metric
    stale = int(best.get("stale", 0))
    stop_reason = "finished"
    progress = tqdm(total=exp.total_steps, initial=step, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    window_start, window_audio, window_steps = time.time(), 0.0, 0
    with _StopSignal() as stop:
        while step < exp.total_steps:
            batch = next(train_iter)
            window_audio += float(np.sum(batch["length"] * batch["valid"])) / 16000
            state, metrics = jit_train(state, exp.device_batch(batch), key)
            step += 1
            window_steps += 1
            progress.update(1)
            if step % cfg.train.log_every == 0 or step == exp.total_steps:
                metrics = jax.device_get(metrics)
                if not all(math.isfinite(float(v)) for v in metrics.values()):
                    bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
                    raise NonFiniteLoss(
                        f"non-finite training metrics at step {step}: {bad}; the workdir keeps "
                        f"the last good checkpoint (step {ckpt.latest_step()})")
                elapsed = time.time() - window_start
                metrics.update(step_time=elapsed / window_steps,
                               examples_per_s=window_steps * cfg.data.global_batch / elapsed,
                               audio_seconds_per_s=window_audio / elapsed,
                               epoch=train_iter.epoch)
                writer.write(step, metrics)
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                window_start, window_audio, window_steps = time.time(), 0.0, 0
            done = step >= exp.total_steps
            if step % eval_every == 0 or done:
                values = _validate(cfg, exp, state.params, step, writer)
                if _improved(values[metric], best, metric):
                    best, stale = {"step": step, "value": values[metric]}, 0
                else:
                    stale += 1
                ckpt.save_best(step, state, train_iter.state(),
                               dict(meta, best=dict(best, stale=stale)), values)
            if step % save_every == 0 or done or stop.received:
                ckpt.save_latest(step, state, train_iter.state(),
                                 dict(meta, best=dict(best, stale=stale)))
            if stop.received:
                stop_reason = "preempted"
                break
            if cfg.train.patience and stale >= cfg.train.patience:
                stop_reason = "early_stopped"
                log.info("no improvement of %s in %d evaluations: stopping early", metric, stale)
                break
    progress.close()
    ckpt.wait()
    if stop_reason == "preempted":
        log.info("SIGTERM: saved a checkpoint at step %d in %s; run again to resume", step,
                 cfg.workdir)
    return {"step": step, "stopped": stop_reason, "best": best}
