"""Probing a frozen encoder on cached features (`data.features=DIR`): what an experiment
needs to train, evaluate and serve heads on the features `jaxser extract` wrote.

- `check_config`: a config that needs audio (waveform augmentation, mixup, SpecAugment,
  random crops, fine-tuning the encoder) fails at start, naming the field.
- `FeatureInputs`: the head model (`SERModel` over `cached.CachedEncoder`: the same
  layer-weighted sum, poolings, heads and parameter names as audio training), its sample
  inputs, and the feature reader (`jaxser.data.features`) in place of the audio pipeline.
- `attach_encoder`: the trained head with its encoder re-attached from the identity the
  feature folder recorded (the same pretrained weights, checked by fingerprint, or the
  same random initialisation), for `jaxser predict` and `jaxser export`.
- The encoder's identity (`weights_sha256`, `encoder_fields`, `encoder_shapes`) and its
  parameters (`encoder_params`), shared with the extraction (`jaxser.train.extract`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxser import accelerator
from jaxser.config import ConfigError
from jaxser.constants import SAMPLE_RATE
from jaxser.data import features as features_lib
from jaxser.data import pipeline
from jaxser.models import cached, ser_model
from jaxser.models.pretrained import load_pretrained
from jaxser.models.reattached import ReattachedModel
from jaxser.train import optimizer, sharding
from jaxser.train import state as state_lib

log = logging.getLogger(__name__)

# Compute choices that leave the features unchanged (not part of the encoder's identity).
_FREE_ENCODER_FIELDS = ("remat", "attention")


# --------------------------------------------------------------------------------------
# Identity of an encoder


def audio_config(cfg):
    """A copy of `cfg` that reads audio (data.features unset): the encoder it describes."""
    cfg = copy.deepcopy(cfg)
    if cfg.data.get("features"):
        with cfg.unlocked():
            cfg.data.features = ""
    return cfg


def weights_files(path: str | Path) -> list[list]:
    """[name, size, mtime_ns] of the files of a checkpoint folder (or of one file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size,
             p.stat().st_mtime_ns] for p in files]


def weights_sha256(path: str | Path, recorded: Mapping | None = None) -> str:
    """sha256 over the names and contents of a checkpoint's files; `recorded` ({files,
    sha256} of an earlier call) is trusted while the files' sizes and times are unchanged."""
    files = weights_files(path)
    if recorded and files == [list(f) for f in recorded.get("files") or []]:
        return str(recorded["sha256"])
    root = Path(path)
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(name.encode() + b"\0")
        with open(root / name if root.is_dir() else root, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def encoder_fields(enc_cfg) -> dict:
    """The encoder config fields that decide its features (JSON-able)."""
    fields = dataclasses.asdict(enc_cfg)
    for name in _FREE_ENCODER_FIELDS:
        fields.pop(name, None)
    return json.loads(json.dumps(fields, default=str))


def _encoder_abstract(family: str, enc_cfg):
    """(EncoderOutput, params) of the encoder as shapes (nothing computed)."""
    encoder = ser_model.ENCODER_FAMILIES[family][1](enc_cfg)
    inputs, mask = ser_model.features(family, enc_cfg, jnp.zeros((1, SAMPLE_RATE)),
                                      jnp.full((1,), SAMPLE_RATE))
    out, variables = jax.eval_shape(lambda k: encoder.init_with_output(
        k, inputs, mask, deterministic=True), jax.random.key(0))
    return out, nn.meta.unbox(variables).get("params", {})


def encoder_shapes(family: str, enc_cfg) -> dict:
    """{num_layers, dim}: the hidden states the encoder returns (embeddings first) and
    their width."""
    out, _ = _encoder_abstract(family, enc_cfg)
    return {"num_layers": len(out.hidden_states), "dim": int(out.hidden_states[-1].shape[-1])}


def encoder_params(model: ser_model.SERModel, sample, seed: int, mesh, rules,
                   pretrained=None):
    """The encoder's parameters of the audio `model` (sample: its sample inputs) in their
    shardings on `mesh`: `pretrained` (loaded weights) put in place, or the random
    initialisation training with `seed` starts from (the arrays `loop.train` creates, bit
    for bit)."""
    key = jax.random.fold_in(jax.random.key(seed), 0)  # What `loop.train` initialises with.
    init = state_lib.init_fn(model, optax.set_to_zero(), *sample)
    boxed = jax.eval_shape(init, key)
    shardings = nn.meta.unbox(sharding.logical_shardings(boxed, mesh, rules))
    enc_sharding = shardings.params["model"]["encoder"]
    if pretrained is not None:
        return jax.device_put(pretrained, enc_sharding)
    with mesh, nn.logical_axis_rules(rules):  # Only the encoder is returned: XLA drops the
        return jax.jit(lambda k: nn.meta.unbox(init(k)).params["model"]["encoder"],  # rest
                       out_shardings=enc_sharding)(key)


# --------------------------------------------------------------------------------------
# Configs that need audio


def check_config(cfg, encoder_param_tree=None) -> None:
    """ConfigError naming the first field that needs audio while data.features is set:
    waveform augmentation, mixup, SpecAugment, random crops, or an encoder that trains
    (`encoder_param_tree`: the encoder's parameters, or shapes, to check optim.freeze)."""
    aug, why = cfg.augment, "needs audio, but data.features trains on cached features"
    if aug.waveform:
        raise ConfigError(f"augment.waveform {why}: set augment.waveform=False")
    if aug.mixup != "none":
        raise ConfigError(f"augment.mixup={aug.mixup!r} {why}: set augment.mixup='none'")
    if aug.specaugment:
        raise ConfigError(f"augment.specaugment {why}: set augment.specaugment=False")
    if cfg.data.max_seconds:
        raise ConfigError(f"data.max_seconds={cfg.data.max_seconds} (random crops) {why}: "
                          "set data.max_seconds=0 (extract.max_seconds crops at extraction)")
    if cfg.optim.unfreeze_after:
        raise ConfigError(f"optim.unfreeze_after={cfg.optim.unfreeze_after} fine-tunes the "
                          f"encoder, which {why[6:]}: set optim.unfreeze_after=0")
    if encoder_param_tree is not None:
        labels = optimizer.param_labels({"model": {"encoder": encoder_param_tree}},
                                        tuple(cfg.optim.freeze))
        paths = [optimizer.path_str(p) for p, label in
                 jax.tree_util.tree_flatten_with_path(labels)[0] if label != "frozen"]
        if paths:
            raise ConfigError(
                f"optim.freeze={tuple(cfg.optim.freeze)} leaves encoder parameters to train "
                f"(e.g. {paths[0].removeprefix('model/')}): fine-tuning {why[6:]}; freeze the "
                "encoder with optim.freeze=('encoder/*',)")


# --------------------------------------------------------------------------------------
# The head model and its inputs


def recorded_encoder(cfg, store: features_lib.FeatureStore):
    """The encoder config a feature folder recorded, after checking that `cfg.model`
    names the same encoder (FeatureMismatch naming each difference)."""
    identity = store.info["encoder"]
    family = identity["family"]
    if family != cfg.model.encoder:
        raise features_lib.FeatureMismatch(
            f"data.features {store.folder} holds {family} features but model.encoder is "
            f"{cfg.model.encoder!r}")
    cls = ser_model.ENCODER_FAMILIES[family][0]
    fields = dict(identity["config"], dtype=accelerator.resolve_dtype(cfg.model.dtype))
    known = {f.name for f in dataclasses.fields(cls)}
    enc_cfg = cls(**{k: v for k, v in fields.items() if k in known})
    diffs = []
    source = store.info.get("source") or {}
    if bool(cfg.model.pretrained) != identity["weights"].startswith("sha256:"):
        diffs.append(f"model.pretrained: {cfg.model.pretrained!r}, the features come from "
                     f"{source.get('pretrained') or 'a random initialisation'}")
    elif cfg.model.pretrained:
        now = str(Path(cfg.model.pretrained).resolve())
        if now != source.get("pretrained") and Path(now).exists() and \
                "sha256:" + weights_sha256(now) != identity["weights"]:
            diffs.append(f"model.pretrained: {now} holds other weights than "
                         f"{source.get('pretrained')}, which the features come from")
    else:
        wanted = encoder_fields(ser_model.encoder_config(cfg.model))
        recorded = dict(identity["config"])
        diffs += [d for d in features_lib.differences(recorded, wanted, "encoder.")
                  if not d.startswith("encoder.dtype")]
    if diffs:
        raise features_lib.FeatureMismatch(
            f"data.features {store.folder} was extracted with another encoder than this "
            "config's (extract again into another folder, or change the config):\n  "
            + "\n  ".join(diffs))
    return enc_cfg


def selected_layers(cfg, num_layers: int) -> tuple[int, ...]:
    """The cached hidden states the head reads: data.feature_layers (negative from the
    end), else all of them with model.layer_weighted_sum, else the last."""
    chosen = tuple(cfg.data.get("feature_layers") or ())
    if not chosen:
        return tuple(range(num_layers)) if cfg.model.layer_weighted_sum else (num_layers - 1,)
    bad = [i for i in chosen if not -num_layers <= int(i) < num_layers]
    if bad:
        raise ConfigError(f"data.feature_layers={chosen}: the encoder has {num_layers} hidden "
                          "states (0 = embeddings, -1 = the last)")
    if len(chosen) > 1 and not cfg.model.layer_weighted_sum:
        raise ConfigError(f"data.feature_layers={chosen} names {len(chosen)} layers: set "
                          "model.layer_weighted_sum=True to learn their weighted sum")
    return tuple(int(i) % num_layers for i in chosen)


class FeatureInputs:
    """What an experiment with data.features trains on: the head model over cached
    features, its sample inputs, and the feature reader in place of the audio pipeline.

    `audio_model` is the experiment's audio model (`SERModel` with the encoder); the
    head model is the same with `cached.CachedEncoder` in the encoder's place.
    """

    def __init__(self, cfg, audio_model: ser_model.SERModel, enc_cfg, dp: int):
        self.dir, self.data_dir = str(cfg.data.features), str(cfg.data.dir)
        self.audio_model = audio_model
        out, enc_params = _encoder_abstract(audio_model.family, enc_cfg)
        check_config(cfg, enc_params)
        num_layers, dim = len(out.hidden_states), int(out.hidden_states[-1].shape[-1])
        stats = str(cfg.data.get("feature_stats") or "mean")
        if stats not in cached.STATS:
            raise ConfigError(f"data.feature_stats={stats!r}: one of {', '.join(cached.STATS)}")
        frames = cfg.model.pooling in cached.FRAME_POOLINGS
        self.spec = features_lib.FeatureSpec(selected_layers(cfg, num_layers), stats, frames)
        width = dim * 2 if stats == "mean_std" and not frames else dim
        self.head_cfg = cached.CachedFeaturesConfig(len(self.spec.layers), width, frames,
                                                    str(enc_cfg.dtype))
        self.model = audio_model.clone(family=cached.FAMILY, encoder_cfg=self.head_cfg)
        self.sample = (jnp.zeros((dp, len(self.spec.layers), 1, width), jnp.float32),
                       jnp.ones((dp, 1), bool))
        self.audio_sample = ser_model.features(  # The audio model's sample inputs.
            audio_model.family, enc_cfg, jnp.zeros((dp, SAMPLE_RATE)),
            jnp.full((dp,), SAMPLE_RATE))

    def check_store(self) -> features_lib.FeatureStore:
        """The feature folder, checked to hold what this run reads."""
        store = features_lib.open_store(self.dir)
        features_lib.check_spec(store, self.spec)
        return store

    def meta(self) -> dict:
        """What a checkpoint records of the features (to re-attach the encoder)."""
        store = self.check_store()
        return {"dir": str(Path(self.dir).resolve()), "encoder": store.info["encoder"],
                "source": store.info.get("source") or {}, "options": store.info["options"],
                "layers": list(self.spec.layers), "stats": self.spec.stats,
                "frames": self.spec.frames}

    def epoch_steps(self, pipe_cfg: pipeline.PipelineConfig, split: str) -> int:
        self.check_store()
        return features_lib.epoch_steps(self.dir, self.data_dir, split, pipe_cfg, self.spec)

    def train_iterator(self, pipe_cfg: pipeline.PipelineConfig, split: str,
                       state: dict | None = None):
        return features_lib.train_iterator(self.dir, self.data_dir, split, pipe_cfg,
                                           self.spec, state=state)

    def eval_batches(self, data_dir: str, split: str, per_host: int,
                     pipe_cfg: pipeline.PipelineConfig):
        return features_lib.eval_batches(self.dir, data_dir, split, per_host, pipe_cfg,
                                         self.spec)


# --------------------------------------------------------------------------------------
# The encoder re-attached


def _pretrained_weights(recorded: Mapping) -> tuple[str, dict]:
    """(family, params) of the pretrained checkpoint the features came from, checked
    against the recorded fingerprint."""
    source = recorded.get("source") or {}
    path = source.get("pretrained")
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"the encoder checkpoint the features came from ({path or 'unrecorded'}) is not "
            "there: the head was trained on cached features and needs that encoder to read "
            "audio")
    sha = "sha256:" + weights_sha256(path, source)
    if sha != recorded["encoder"]["weights"]:
        raise features_lib.FeatureMismatch(
            f"{path} holds other weights than the features were extracted with "
            f"({recorded['encoder']['weights'][:19]}..., now {sha[:19]}...)")
    family, _, params = load_pretrained(path)
    return family, params


def attach_encoder(exp, params: dict, meta: Mapping):
    """(model, params) of a head trained on cached features with its encoder re-attached:
    `ReattachedModel` (audio in) and {"model": {"encoder", "probe"}, ...}.

    The encoder's weights are those the feature folder recorded: the pretrained checkpoint
    (its fingerprint checked) or the random initialisation of the recorded seed.
    """
    recorded = meta.get("features")
    if not recorded:
        raise ValueError("the checkpoint does not record the features it was trained on")
    feats: FeatureInputs = exp.features
    model = ReattachedModel(family=feats.audio_model.family, encoder_cfg=exp.enc_cfg,
                            probe=exp.model, layers=tuple(recorded["layers"]),
                            stats=recorded["stats"], frames=bool(recorded["frames"]))
    weights = recorded["encoder"]["weights"]
    pretrained = _pretrained_weights(recorded)[1] if weights.startswith("sha256:") else None
    seed = 0 if pretrained is not None else int(weights.split("seed=")[1])
    enc = encoder_params(feats.audio_model, feats.audio_sample, seed, exp.mesh, exp.rules,
                         pretrained)
    out = dict(params)
    out["model"] = {"encoder": enc, "probe": params["model"]}
    return model, out
