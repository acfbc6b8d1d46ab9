"""The pure, jitted train and eval steps.

`train_step(state, batch, key) -> (state, metrics)` runs everything on the device:
augmentation, features (log-mel), the model, the losses, gradient accumulation over
micro-batches and the optax update. The step's key is `fold_in(key, step)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxser.audio import augment, mixup
from jaxser.models import heads, ser_model
from jaxser.train import losses
from jaxser.train.state import TrainState


def waveform_augment_config(aug: Mapping) -> augment.WaveformAugmentConfig:
    """Every waveform transform at probability `augment.p`."""
    p = float(aug["p"])
    return augment.WaveformAugmentConfig(
        polarity_p=p, gain_p=p, reverse_p=p, noise_p=p, speed_p=p, eq_p=p, echo_p=p)


def objective(loss_cfg: Mapping, out: dict, targets, weights, domains, centers):
    """Weighted sum of the configured losses; (total, {name: value})."""
    log_probs = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
    terms = {}
    if loss_cfg["kl"]:
        terms["kl"] = (loss_cfg["kl"], losses.kl_divergence(log_probs, targets, weights))
    if loss_cfg["cosine"]:
        terms["cosine"] = (loss_cfg["cosine"], losses.cosine_loss(log_probs, targets, weights))
    if loss_cfg["soft_ce"]:
        terms["soft_ce"] = (loss_cfg["soft_ce"],
                            losses.soft_cross_entropy(log_probs, targets, weights))
    if loss_cfg["focal"]:
        terms["focal"] = (loss_cfg["focal"], losses.focal_loss(
            log_probs, targets, weights, gamma=loss_cfg["focal_gamma"]))
    if loss_cfg["center"]:
        terms["center"] = (loss_cfg["center"],
                           losses.center_loss(out["embedding"], targets, centers, weights))
    if loss_cfg["supcon"]:
        terms["supcon"] = (loss_cfg["supcon"], losses.supervised_contrastive_loss(
            out["embedding"], targets, weights, temperature=loss_cfg["supcon_temperature"]))
    if "domain_logits" in out:
        # The reversal weight is applied inside the head; the loss itself has weight 1.
        terms["domain"] = (1.0, losses.domain_cross_entropy(out["domain_logits"], domains,
                                                             weights))
    total = sum(w * v for w, v in terms.values())
    return total, {k: v for k, (_, v) in terms.items()}


def make_train_step(cfg: Mapping, model: ser_model.SERModel, tx: optax.GradientTransformation,
                    schedule: Callable, total_steps: int):
    """The pure step `(state, batch, key) -> (state, metrics)` for this config."""
    family, enc_cfg = model.family, model.encoder_cfg
    aug, loss_cfg = cfg["augment"], cfg["loss"]
    wave_cfg = waveform_augment_config(aug) if aug["waveform"] else None
    accum = int(cfg["optim"]["grad_accum"])

    def prepare_inputs(batch, key):
        k_wave, k_mix, k_spec = jax.random.split(key, 3)
        audio, lengths, targets = batch["audio"], batch["length"], batch["label"]
        if wave_cfg is not None:
            audio, lengths = augment.augment_waveform(k_wave, audio, lengths, wave_cfg)
        if aug["mixup"] == "energy":
            audio, targets = mixup.energy_adaptive_mixup(
                k_mix, audio, lengths, targets, prob=aug["mixup_p"])
        elif aug["mixup"] == "classic":
            audio, targets, lengths = mixup.mixup(k_mix, audio, targets, lengths,
                                                  alpha=aug["mixup_alpha"])
        inputs, mask = ser_model.features(family, enc_cfg, audio, lengths)
        if aug["specaugment"] and family == "whisper":
            inputs = augment.spec_augment(
                k_spec, inputs, mask, num_time_masks=aug["time_masks"],
                time_mask_width=aug["time_mask_width"], num_freq_masks=aug["freq_masks"],
                freq_mask_width=aug["freq_mask_width"])
        return inputs, mask, targets

    def loss_fn(params, batch, key, grl_lambda):
        k_in, k_drop = jax.random.split(key)
        inputs, mask, targets = prepare_inputs(batch, k_in)
        out = model.apply({"params": params["model"]}, inputs, mask, deterministic=False,
                          grl_lambda=grl_lambda, rngs={"dropout": k_drop})
        total, terms = objective(loss_cfg, out, targets, batch["valid"], batch["domain"],
                                 params.get("centers"))
        if "domain_logits" in out:
            hit = jnp.argmax(out["domain_logits"], -1) == batch["domain"]
            terms["domain_accuracy"] = jnp.sum(hit * batch["valid"]) / jnp.maximum(
                jnp.sum(batch["valid"]), 1.0)
        return total, terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grl_lambda = heads.grl_schedule(state.step, total_steps, loss_cfg["domain"],
                                        kind=loss_cfg["domain_schedule"])
        if accum == 1:
            (loss, terms), grads = grad_fn(state.params, batch, key, grl_lambda)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                (loss_i, terms_i), g = grad_fn(state.params, mb, jax.random.fold_in(key, i),
                                               grl_lambda)
                return jax.tree.map(jnp.add, carry, (loss_i, terms_i, g)), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                                    key, grl_lambda)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 (shapes[0][0], shapes[0][1], shapes[1]))
            (loss, terms, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            loss, terms, grads = jax.tree.map(lambda x: x / accum, (loss, terms, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, loss=loss, grad_norm=optax.global_norm(grads),
                       update_norm=optax.global_norm(updates),
                       param_norm=optax.global_norm(params), lr=schedule(state.step),
                       grl_lambda=jnp.asarray(grl_lambda, jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: ser_model.SERModel):
    """`(params, batch) -> {probs [B, K], frame_probs?}` without augmentation."""

    def eval_step(params, batch):
        inputs, mask = ser_model.features(model.family, model.encoder_cfg, batch["audio"],
                                          batch["length"])
        out = model.apply({"params": params["model"]}, inputs, mask, deterministic=True)
        result = {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), -1)}
        if "frame_logits" in out:
            result["frame_probs"] = jax.nn.softmax(out["frame_logits"], -1)
            result["frame_mask"] = out["frame_mask"]
        return result

    return eval_step
