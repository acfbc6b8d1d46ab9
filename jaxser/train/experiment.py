"""An experiment: what a config and a prepared dataset build (mesh, model, optimizer,
sharded state, jitted steps). Shared by training, evaluation and prediction;
`load_for_inference` rebuilds one from a trained workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser import accelerator
from jaxser import config as config_lib
from jaxser.constants import SAMPLE_RATE
from jaxser.data import features, pipeline
from jaxser.models import ser_model
from jaxser.models.pretrained import load_pretrained
from jaxser.train import optimizer, probe, sharding
from jaxser.train import state as state_lib
from jaxser.train import step as step_lib
from jaxser.train.checkpoint import Checkpoints

log = logging.getLogger(__name__)


def pipeline_config(cfg, batch_multiple: int) -> pipeline.PipelineConfig:
    d = cfg.data
    return pipeline.PipelineConfig(
        global_batch=d.global_batch, buckets_seconds=tuple(d.buckets_seconds),
        num_buckets=d.num_buckets, batch_seconds=d.batch_seconds, max_seconds=d.max_seconds,
        seed=cfg.seed, batch_multiple=batch_multiple,
        skip_corrupt=bool(d.get("skip_corrupt", False)),
        class_balanced=bool(d.get("class_balanced", False)))


class Experiment:
    """Mesh, model, optimizer and jitted steps for one config and dataset.

    `labels`, `corpora` and `dims` (the emotion dimensions) come from the dataset
    (training) or from a checkpoint's metadata (evaluation on another dataset);
    `encoder_fields` re-creates the encoder config saved with a checkpoint, so a pretrained
    folder is read only when training starts. `steps_per_epoch` is counted from the
    training split unless given. `class_weights` [K]: the weights of `loss.weighted_ce`
    (training only).
    """

    def __init__(self, cfg, labels: list[str], corpora: list[str],
                 encoder_fields: dict | None = None, steps_per_epoch: int | None = None,
                 dims: list[str] | tuple[str, ...] = (), class_weights=None):
        self.cfg = cfg
        self.labels, self.corpora = list(labels), list(corpora)
        self.dims = list(dims) if cfg.model.get("dims_head", False) else []
        self.class_weights = class_weights
        accelerator.configure_compilation_cache(cfg.train.get("compilation_cache", ""))
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.rules_tuple(cfg.mesh.rules)
        self.dp = sharding.data_parallel_size(self.mesh, self.rules)
        self.pretrained_params = None
        family = cfg.model.encoder
        self.features: probe.FeatureInputs | None = None  # data.features: cached features
        if encoder_fields is not None:
            cls = ser_model.ENCODER_FAMILIES[family][0]
            # model.dtype 'auto' resolves on this machine (bf16 on a GPU, float32 on a CPU).
            enc_cfg = cls(**dict(encoder_fields,
                                 dtype=accelerator.resolve_dtype(cfg.model.dtype)))
        elif cfg.data.get("features"):  # The encoder the features came from (no weights).
            enc_cfg = probe.recorded_encoder(cfg, features.open_store(cfg.data.features))
        elif cfg.model.pretrained:
            loaded_family, enc_cfg, self.pretrained_params = load_pretrained(
                cfg.model.pretrained)
            if loaded_family != family:
                raise ValueError(f"model.pretrained is a {loaded_family} checkpoint but "
                                 f"model.encoder is {family}")
            enc_cfg = ser_model.encoder_config(cfg.model, base=enc_cfg)
        else:
            enc_cfg = None
        self.model, self.enc_cfg = ser_model.build_model(
            cfg.model, len(self.labels), len(self.corpora) or 1, enc_cfg, len(self.dims))
        if cfg.data.get("features"):  # The heads alone, over the cached features.
            self.features = probe.FeatureInputs(cfg, self.model, self.enc_cfg, self.dp)
            self.model = self.features.model
        self.pipe_cfg = pipeline_config(cfg, max(self.dp // jax.process_count(), 1))
        if steps_per_epoch is None and self.features:
            steps_per_epoch = self.features.epoch_steps(self.pipe_cfg, cfg.data.train_split)
        elif steps_per_epoch is None:  # Training: the schedule needs the epoch length.
            steps_per_epoch = pipeline.epoch_steps(cfg.data.dir, cfg.data.train_split,
                                                   self.pipe_cfg)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.num_centers = len(self.labels) if cfg.loss.center else 0
        self.sample = self.features.sample if self.features else ser_model.features(
            family, self.enc_cfg, jnp.zeros((self.dp, SAMPLE_RATE)),
            jnp.full((self.dp,), SAMPLE_RATE))
        abstract_params = jax.eval_shape(
            lambda k: self.model.init({"params": k, "dropout": k}, *self.sample),
            jax.random.key(0))
        labelled = {"model": nn.meta.unbox(abstract_params)["params"]}
        if self.num_centers:
            labelled["centers"] = jnp.zeros(())  # Only its path matters to the optimizer.
        self.tx, self.schedule = optimizer.make_optimizer(
            cfg.optim, self.total_steps, steps_per_epoch, labelled)
        self._init = state_lib.init_fn(self.model, self.tx, *self.sample, self.num_centers)
        self._eval_step = None

    def encoder_fields(self) -> dict:
        return dataclasses.asdict(self.enc_cfg)

    def train_iterator(self, state: dict | None = None):
        """The resumable training batches of this host: audio, or cached features."""
        split = self.cfg.data.train_split
        if self.features:
            return self.features.train_iterator(self.pipe_cfg, split, state)
        return pipeline.train_iterator(self.cfg.data.dir, split, self.pipe_cfg, state=state)

    def eval_batches(self, data_dir: str, split: str, per_host: int):
        """Every example of `split` once (`pipeline.eval_batches`, or the cached features of
        the prepared dataset `data_dir`)."""
        if self.features:
            return self.features.eval_batches(data_dir, split, per_host, self.pipe_cfg)
        return pipeline.eval_batches(data_dir, split, per_host, self.pipe_cfg)

    def mesh_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(self.mesh)
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def abstract_state(self, key):
        return state_lib.abstract_state(self._init, key, self.mesh, self.rules)

    def init_state(self, key):
        """(state, shardings), with pretrained encoder weights put in place."""
        state, shardings = state_lib.create_state(self._init, key, self.mesh, self.rules)
        if self.pretrained_params is not None:
            enc = jax.device_put(self.pretrained_params, shardings.params["model"]["encoder"])
            params = dict(state.params)
            params["model"] = dict(params["model"], encoder=enc)
            opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
        return state, shardings

    def dim_weights(self) -> list[float]:
        """[D] weight of each dimension in loss.ccc / loss.mse (`loss.dim_weights`, 1 for a
        dimension it does not list)."""
        table = dict(self.cfg.loss.get("dim_weights", {}) or {})
        return [float(table.get(d, 1.0)) for d in self.dims]

    def train_step(self, shardings):
        step = step_lib.make_train_step(self.cfg, self.model, self.tx, self.schedule,
                                        self.total_steps, self.class_weights,
                                        self.dim_weights() if self.dims else None)
        batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        return jax.jit(step, in_shardings=(shardings, batch_sh, None),
                       out_shardings=(shardings, None), donate_argnums=(0,))

    def eval_step(self):
        """The jitted `(params, batch) -> {probs, ...}`, compiled once per batch shape."""
        if self._eval_step is None:
            self._eval_step = jax.jit(step_lib.make_eval_step(self.model))
        return self._eval_step

    def device_batch(self, batch: dict) -> dict:
        numeric = {k: v for k, v in batch.items() if k != "meta"}
        return sharding.global_batch(numeric, self.mesh, self.rules)


def check_checkpoint(checkpoint: str | int) -> str:
    """`best`, `latest` or a step number; ValueError naming anything else."""
    value = str(checkpoint)
    if value not in ("best", "latest") and not re.fullmatch(r"\d+", value):
        raise ValueError(f"checkpoint must be best, latest or a step number, got {value!r}")
    return value


def load_for_inference(workdir: str | Path, checkpoint: str = "best",
                       data_dir: str | None = None,
                       audio: bool = False) -> tuple[Experiment, dict, int, dict]:
    """(experiment, params, step, meta) of a trained workdir, for evaluation, prediction
    and export.

    checkpoint: `best` (falls back to the latest when no best was kept), `latest` or a
    step number. data_dir: another prepared dataset to point the experiment at.
    audio: the model will read audio (prediction, export): heads trained on cached
    features (`data.features`) get their encoder re-attached (`probe.attach_encoder`).
    """
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
                         encoder_fields=meta["encoder_fields"], steps_per_epoch=1,
                         dims=(meta.get("dimensions") or {}).get("names", []))
        with exp.mesh_context():
            target, _ = exp.abstract_state(jax.random.key(cfg.seed))
            step, state, _, meta = ckpt.restore(step, target)
    finally:
        ckpt.close()
    params = state.params
    if audio and exp.features is not None:  # Heads trained on cached features: the encoder.
        exp.model, params = probe.attach_encoder(exp, params, meta)
    return exp, params, step, meta
