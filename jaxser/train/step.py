"""The pure, jitted train and eval steps.

`train_step(state, batch, key) -> (state, metrics)` runs everything on the device:
augmentation, features (log-mel), the model, the losses, gradient accumulation over
micro-batches and the optax update. The step's key is `fold_in(key, step)`.

The step is built from module-level pieces: `prepare_inputs` (augmentation, mixup and
features of a batch), `loss_terms` (the configured losses, from `losses.LOSSES`),
`micro_batch_loss` (one micro-batch's share of the batch's loss) and
`accumulate_gradients` (the scan over micro-batches).

Gradient accumulation (`optim.grad_accum` = n) splits the batch into n contiguous
micro-batches and gives the full-batch result however the padding rows (`valid` = 0) fall
among them: each term is a weighted mean sum(w l) / sum(w) over the whole batch, and so are
the loss and every gradient (tests/test_train_step.py checks accum 1, 2, 4 and 8 against a
plain full-batch jax.grad). The weight sums of the whole batch (`weight_totals`) are known
before the scan, so each micro-batch contributes its weighted mean times its share of the
batch's weight, and the sum over micro-batches needs no division afterwards. What stays
inside a micro-batch: the supervised contrastive loss (pairs form only within a
micro-batch; the step takes the mean of the micro-batches' SupCon, weighted by their valid
rows), mixup partners, and the random draws of augmentation (key `fold_in(key, i)` for
micro-batch i). The center loss is per example (centers trained by gradient), so it is
exact under accumulation.

Weights. The categorical losses weigh a row by `valid` x `label_mask` (a row with
dimensions but no category adds nothing to them); `weighted_ce` by that times the row's
class weight (sum_k t_k w_k); the domain loss by `valid` over the rows with a domain id; the
dimensional losses (`ccc`, `mse`) each dimension by `valid` x `dims_mask[:, d]` (a missing
value is masked, never imputed). Each term's accumulation share uses its own weight sums
(`weight_totals`: rows, labelled, class_weighted, domain, and per dimension).

Batch CCC. `ccc` is 1 - CCC with the CCC computed from the moments of the batch the step
sees at once: the global batch over all devices (the sums run over the whole sharded
batch, so data parallelism does not change it); under accumulation each micro-batch's CCC
(a batch of size global_batch / grad_accum: 8 for the MSP-Podcast recipe's 32 as 8 x 4),
and the step's loss is the mean of the micro-batches' 1 - CCC weighted by their rows with
that dimension (`losses.dims_ccc_loss` shares). That is what a PyTorch loop that steps
after 4 backward passes computes; it is not the CCC of the 32 rows together (a
two-pass statistic no accumulation can give), and a small micro-batch makes the CCC, and
its gradient, noisier. `mse` is a per-example mean and exact under accumulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxser.audio import augment, mixup
from jaxser.models import cached, heads, ser_model
from jaxser.train import losses, optimizer
from jaxser.train.state import TrainState

# The weight sum (`weight_totals` key) by which each term's accumulation share is taken; the
# terms not listed count the rows with a category (`labelled`). SELF_SHARED terms take
# their per-dimension shares inside the loss (`losses.dims_ccc_loss`, `dims_mse_loss`).
TERM_TOTALS = {"domain": "domain", "weighted_ce": "class_weighted"}
SELF_SHARED = ("ccc", "mse")
DIMENSION_LOSSES = ("ccc", "mse")


def waveform_augment_config(aug: Mapping) -> augment.WaveformAugmentConfig:
    """Every waveform transform at probability `augment.p`."""
    p = float(aug["p"])
    return augment.WaveformAugmentConfig(
        polarity_p=p, gain_p=p, reverse_p=p, noise_p=p, speed_p=p, eq_p=p, echo_p=p)


def prepare_inputs(aug: Mapping, model: ser_model.SERModel, batch: Mapping, key: jax.Array):
    """Augmentation, mixup and features of a batch: (inputs, mask, targets [B, K])."""
    if model.family == cached.FAMILY:  # Cached encoder features (`data.features`): as read.
        return batch["features"], batch["frame_mask"], batch["label"]
    k_wave, k_mix, k_spec = jax.random.split(key, 3)
    audio, lengths, targets = batch["audio"], batch["length"], batch["label"]
    if aug["waveform"]:
        audio, lengths = augment.augment_waveform(k_wave, audio, lengths,
                                                  waveform_augment_config(aug))
    if aug["mixup"] == "energy":
        audio, targets = mixup.energy_adaptive_mixup(
            k_mix, audio, lengths, targets, valid=batch["valid"], prob=aug["mixup_p"])
    elif aug["mixup"] == "classic":
        audio, targets, lengths = mixup.mixup(k_mix, audio, targets, lengths,
                                              alpha=aug["mixup_alpha"], valid=batch["valid"])
    inputs, mask = ser_model.features(model.family, model.encoder_cfg, audio, lengths)
    if aug["specaugment"] and model.family == "whisper":
        inputs = augment.spec_augment(
            k_spec, inputs, mask, num_time_masks=aug["time_masks"],
            time_mask_width=aug["time_mask_width"], num_freq_masks=aug["freq_masks"],
            freq_mask_width=aug["freq_mask_width"])
    return inputs, mask, targets


def loss_terms(loss_cfg: Mapping, out: Mapping, targets, weights, domains,
               centers, extra: Mapping | None = None,
               domain_weights=None) -> dict[str, tuple[float, jax.Array]]:
    """{name: (weight, value)} of the configured losses on one batch.

    Every loss of `losses.LOSSES` whose config weight `loss.<name>` is not 0; with a domain
    head, the domain cross-entropy with weight 1 (its reversal weight acts inside the head).
    `weights` weigh the categorical losses; `extra` fills the other `losses.LossInputs`
    fields (class weights, dimensions); `domain_weights` (default `weights`) the domain loss.
    """
    x = losses.LossInputs(
        log_probs=jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1),
        targets=targets, weights=weights, embedding=out.get("embedding"), centers=centers,
        dims_pred=out.get("dims"), **dict(extra or {}))
    terms = {name: (loss_cfg[name], fn(x, loss_cfg))
             for name, fn in losses.LOSSES.items() if loss_cfg.get(name)}
    if "domain_logits" in out:
        terms["domain"] = (1.0, losses.domain_cross_entropy(
            out["domain_logits"], domains, weights if domain_weights is None else domain_weights))
    return terms


def domain_accuracy(domain_logits: jax.Array, domains: jax.Array,
                    weights: jax.Array) -> jax.Array:
    """Share of the weighted rows whose domain is predicted right, over the rows the domain
    loss counts: positive weight and a domain id in [0, M) (-1, no domain label, is left
    out, not a miss); 0 without such rows."""
    known = (domains >= 0) & (domains < domain_logits.shape[-1])
    hit = (jnp.argmax(domain_logits, -1) == domains).astype(jnp.float32)
    return losses.weighted_mean(hit, jnp.where(known, weights.astype(jnp.float32), 0.0))


def categorical_weights(batch: Mapping) -> jax.Array:
    """[B] weight of each row in the categorical losses: `valid` x `label_mask` (a row
    without a category weighs 0; batches without `label_mask` count every row)."""
    valid = batch["valid"].astype(jnp.float32)
    w = jnp.where(valid > 0, valid, 0.0)
    if "label_mask" in batch:
        w = w * batch["label_mask"].astype(jnp.float32)
    return w


def dimension_weights(batch: Mapping) -> jax.Array:
    """[B, D] weight of each (row, dimension) in the dimensional losses: `valid` x
    `dims_mask`."""
    valid = batch["valid"].astype(jnp.float32)
    return jnp.where(valid > 0, valid, 0.0)[:, None] * batch["dims_mask"].astype(jnp.float32)


def weight_totals(batch: Mapping, num_domains: int,
                  class_weights: jax.Array | None = None) -> dict[str, jax.Array]:
    """The denominators of the batch's weighted means: `rows`, the sum of the positive
    `valid` weights; `labelled`, the same over rows with a category; `domain`, over rows
    with a domain id in [0, num_domains); with class weights `class_weighted`, the rows'
    weights in `weighted_ce`; with dimensions `dims` [D], per dimension over the rows with
    its value."""
    valid = batch["valid"].astype(jnp.float32)
    w = jnp.where(valid > 0, valid, 0.0)
    known = (batch["domain"] >= 0) & (batch["domain"] < num_domains)
    cat = categorical_weights(batch)
    out = {"rows": jnp.sum(w), "domain": jnp.sum(jnp.where(known, w, 0.0)),
           "labelled": jnp.sum(cat)}
    if class_weights is not None:
        omega = batch["label"].astype(jnp.float32) @ jnp.asarray(class_weights, jnp.float32)
        out["class_weighted"] = jnp.sum(cat * omega)
    if "dims" in batch:
        out["dims"] = jnp.sum(dimension_weights(batch), axis=0)
    return out


def _share(part: jax.Array, whole: jax.Array) -> jax.Array:
    """part / whole, 0 when whole is 0 (a batch of padding only)."""
    return jnp.where(whole > 0, part / jnp.where(whole > 0, whole, 1.0), 0.0)


def micro_batch_loss(cfg: Mapping, model: ser_model.SERModel, params, batch: Mapping,
                     key: jax.Array, grl_lambda, totals: Mapping, class_weights=None,
                     dim_weights=None):
    """(loss, {term: value}) of a micro-batch, each term scaled by the micro-batch's share
    of the whole batch's weight (`totals`, from `weight_totals` of the whole batch): summed
    over the micro-batches, the terms, the loss and the gradients are the full-batch ones
    (except the batch statistics SupCon and CCC, see the module docstring). With the whole
    batch as the micro-batch every share is 1."""
    k_in, k_drop = jax.random.split(key)
    inputs, mask, targets = prepare_inputs(cfg["augment"], model, batch, k_in)
    out = model.apply({"params": params["model"]}, inputs, mask, deterministic=False,
                      grl_lambda=grl_lambda, rngs={"dropout": k_drop})
    shares = jax.tree.map(_share, weight_totals(batch, model.num_domains, class_weights),
                          dict(totals))
    extra = {}
    if class_weights is not None:
        extra["class_weights"] = class_weights
    if "dims" in out:
        extra.update(dims=batch["dims"], dims_weights=dimension_weights(batch),
                     dim_weights=dim_weights, dim_shares=shares["dims"],
                     dim_totals=totals["dims"])
    valid = batch["valid"].astype(jnp.float32)
    terms = loss_terms(cfg["loss"], out, targets, categorical_weights(batch), batch["domain"],
                       params.get("centers"), extra, jnp.where(valid > 0, valid, 0.0))
    terms = {name: (weight, value if name in SELF_SHARED else
                    value * shares[TERM_TOTALS.get(name, "labelled")])
             for name, (weight, value) in terms.items()}
    total = sum(weight * value for weight, value in terms.values())
    values = {name: value for name, (_, value) in terms.items()}
    if "domain_logits" in out:
        values["domain_accuracy"] = shares["domain"] * domain_accuracy(
            out["domain_logits"], batch["domain"], batch["valid"])
    return total, values


def accumulate_gradients(grad_fn: Callable, params, batch: Mapping, key: jax.Array,
                         accum: int):
    """The sum of `grad_fn(params, micro_batch, key_i)` over `accum` contiguous
    micro-batches of `batch` (key_i = fold_in(key, i)); with accum 1, `grad_fn(params,
    batch, key)` itself. grad_fn returns any pytree ((loss, terms), grads); the micro-batches
    run one after another in a scan, so memory is that of one micro-batch."""
    if accum == 1:
        return grad_fn(params, batch, key)
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % accum:
        raise ValueError(f"optim.grad_accum={accum} does not divide the batch of {size}")
    micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

    def body(carry, xs):
        i, mb = xs
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb, jax.random.fold_in(key, i))), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return total


def check_losses(cfg: Mapping, model: ser_model.SERModel, class_weights) -> None:
    """ValueError for a loss config this model and data set cannot train."""
    loss_cfg, mixing = cfg["loss"], cfg["augment"]["mixup"] != "none"
    dimensional = [n for n in DIMENSION_LOSSES if loss_cfg.get(n)]
    if dimensional and not model.num_dims:
        raise ValueError(f"loss.{dimensional[0]} needs the dimensional head: set "
                         "model.dims_head (and a data set with emotion dimensions)")
    if loss_cfg.get("weighted_ce") and class_weights is None:
        raise ValueError("loss.weighted_ce needs class weights from the training split")
    if mixing and (dimensional or loss_cfg.get("weighted_ce")):
        raise ValueError(f"augment.mixup={cfg['augment']['mixup']!r} mixes the category "
                         "targets only: it cannot be combined with loss.ccc, loss.mse or "
                         "loss.weighted_ce")


def make_train_step(cfg: Mapping, model: ser_model.SERModel, tx: optax.GradientTransformation,
                    schedule: Callable, total_steps: int, class_weights=None,
                    dim_weights=None):
    """The pure step `(state, batch, key) -> (state, metrics)` for this config.

    Parameters matching `optim.freeze` enter the loss through `stop_gradient`
    (optimizer.stop_frozen): their gradients are exact zeros and their backward pass is not
    computed. With `optim.unfreeze_after` > 0 a `lax.cond` on the step picks the frozen or
    the full gradient computation (both compiled in the one step, one runs).

    class_weights: [K] weights of `loss.weighted_ce` (`data.balance.class_weights` of the
    training split). dim_weights: [D] weight of each dimension in `loss.ccc` / `loss.mse`
    (default: equal).
    """
    loss_cfg = cfg["loss"]
    accum = int(cfg["optim"]["grad_accum"])
    freeze = tuple(cfg["optim"]["freeze"])
    unfreeze = int(cfg["optim"]["unfreeze_after"])
    check_losses(cfg, model, class_weights)
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, jnp.float32)
    if model.num_dims:
        dim_weights = jnp.asarray(jnp.ones(model.num_dims) if dim_weights is None
                                  else dim_weights, jnp.float32)

    def gradients(params, batch, key, grl_lambda, totals, frozen):
        def loss(p, b, k):
            return micro_batch_loss(cfg, model, optimizer.stop_frozen(p, frozen), b, k,
                                    grl_lambda, totals, class_weights, dim_weights)

        return accumulate_gradients(jax.value_and_grad(loss, has_aux=True), params, batch,
                                    key, accum)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grl_lambda = heads.grl_schedule(state.step, total_steps, loss_cfg["domain"],
                                        kind=loss_cfg["domain_schedule"])
        totals = weight_totals(batch, model.num_domains, class_weights)
        compute = functools.partial(gradients, state.params, batch, key, grl_lambda, totals)
        frozen = optimizer.frozen_mask(state.params, freeze)
        if frozen is not None and unfreeze > 0:
            (loss, terms), grads = jax.lax.cond(state.step >= unfreeze,
                                                lambda: compute(None), lambda: compute(frozen))
        else:
            (loss, terms), grads = compute(frozen)
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
    """`(params, batch) -> {probs [B, K], dims? [B, D], frame_probs?, frame_mask?}` without
    augmentation (`dims`: the dimensional head's 0-1 values)."""

    def eval_step(params, batch):
        if model.family == cached.FAMILY:
            inputs, mask = batch["features"], batch["frame_mask"]
        else:
            inputs, mask = ser_model.features(model.family, model.encoder_cfg, batch["audio"],
                                              batch["length"])
        out = model.apply({"params": params["model"]}, inputs, mask, deterministic=True)
        result = {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), -1)}
        if "dims" in out:
            result["dims"] = out["dims"].astype(jnp.float32)
        if "frame_logits" in out:
            result["frame_probs"] = jax.nn.softmax(out["frame_logits"], -1)
            result["frame_mask"] = out["frame_mask"]
        return result

    return eval_step
