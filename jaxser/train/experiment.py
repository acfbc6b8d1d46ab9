"""An experiment: what a config and a prepared dataset build (mesh, model, optimizer,
sharded state, jitted steps). Shared by training, evaluation and prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxser.data import pipeline
from jaxser.models import ser_model
from jaxser.models.pretrained import load_pretrained
from jaxser.train import optimizer, sharding
from jaxser.train import state as state_lib
from jaxser.train import step as step_lib


def pipeline_config(cfg, batch_multiple: int) -> pipeline.PipelineConfig:
    d = cfg.data
    return pipeline.PipelineConfig(
        global_batch=d.global_batch, buckets_seconds=tuple(d.buckets_seconds),
        num_buckets=d.num_buckets, batch_seconds=d.batch_seconds, max_seconds=d.max_seconds,
        seed=cfg.seed, batch_multiple=batch_multiple,
        skip_corrupt=bool(d.get("skip_corrupt", False)))


class Experiment:
    """Mesh, model, optimizer and jitted steps for one config and dataset.

    `labels` and `corpora` come from the dataset (training) or from a checkpoint's
    metadata (evaluation on another dataset); `encoder_fields` re-creates the encoder
    config saved with a checkpoint, so a pretrained folder is read only when training
    starts. `steps_per_epoch` is counted from the training split unless given.
    """

    def __init__(self, cfg, labels: list[str], corpora: list[str],
                 encoder_fields: dict | None = None, steps_per_epoch: int | None = None):
        self.cfg = cfg
        self.labels, self.corpora = list(labels), list(corpora)
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.rules_tuple(cfg.mesh.rules)
        self.dp = sharding.data_parallel_size(self.mesh, self.rules)
        self.pretrained_params = None
        family = cfg.model.encoder
        if encoder_fields is not None:
            cls = ser_model.ENCODER_FAMILIES[family][0]
            enc_cfg = cls(**encoder_fields)
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
            cfg.model, len(self.labels), len(self.corpora) or 1, enc_cfg)
        self.pipe_cfg = pipeline_config(cfg, max(self.dp // jax.process_count(), 1))
        if steps_per_epoch is None:  # Training: the schedule needs the epoch length.
            steps_per_epoch = pipeline.epoch_steps(cfg.data.dir, cfg.data.train_split,
                                                   self.pipe_cfg)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.num_centers = len(self.labels) if cfg.loss.center else 0
        self.sample = ser_model.features(family, self.enc_cfg, jnp.zeros((self.dp, 16000)),
                                         jnp.full((self.dp,), 16000))
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

    def train_step(self, shardings):
        step = step_lib.make_train_step(self.cfg, self.model, self.tx, self.schedule,
                                        self.total_steps)
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
