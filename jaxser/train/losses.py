"""Losses of the three methods, jittable and padding-aware.

Every loss takes `weights: [B]` (1.0 for a real example, 0.0 for batch padding; other
non-negative values weight examples) and returns the weighted mean over the examples,
computed in float32. Examples with zero weight change neither the value nor any gradient,
even when their inputs are garbage (inf, NaN-free zeros, -inf log-probabilities); with all
weights zero a loss is 0, never NaN. The lead combines the losses with config weights.

Log-probabilities are used as given, never floored: float32 log_softmax stays finite far
below log(tiny) = -87.3 (logits [0, -100] give log p = -100), and a confidently wrong
prediction on a class with target mass must keep its full loss and gradient (issue 19).
Classes with zero target are selected away with `where` on the target, so a -inf or
underflowed log-probability there contributes neither value nor gradient. A probability of
exactly 0 (log p = -inf) on a class with target mass gives an infinite loss, as in torch.

Distributions are rows over K classes: `targets` [B, K] sums to 1 per real row,
`log_probs` [B, K] is a log_softmax output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_rows(name: str, a: jax.Array, b: jax.Array, weights: jax.Array) -> None:
    """Raises ValueError unless a, b are [B, K] of one shape and weights is [B]."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two [B, K] arrays, got {a.shape} and {b.shape}")
    if weights.shape != a.shape[:1]:
        raise ValueError(f"{name}: weights shape {weights.shape} is not [{a.shape[0]}]")


def weighted_mean(per_example: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w_i l_i / sum_i w_i over examples with w_i > 0; 0 when no weight is positive.

    Values of zero-weight examples are replaced before the product, so an inf/NaN there
    cannot poison the result.
    """
    weights = _f32(weights)
    real = weights > 0
    values = jnp.where(real, _f32(per_example), 0.0)
    w = jnp.where(real, weights, 0.0)
    total = jnp.sum(w)
    return jnp.sum(w * values) / jnp.where(total > 0, total, 1.0)


def _on_target(log_probs: jax.Array, positive: jax.Array) -> jax.Array:
    """log_probs in float32 where the target is positive, 0 elsewhere (no floor: the true
    value and gradient, however negative; -inf on zero-target classes cannot leak)."""
    return jnp.where(positive, _f32(log_probs), 0.0)


def _real_rows(x: jax.Array, weights: jax.Array, fill: float) -> jax.Array:
    """x with rows of zero-weight examples replaced by `fill` (keeps their gradients out)."""
    return jnp.where((_f32(weights) > 0)[:, None], x, fill)


def kl_divergence(log_probs: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """KL(target || prediction) = sum_k t_k (log t_k - log p_k), weighted mean over examples.

    0 log 0 = 0: classes with t_k = 0 contribute nothing (and no gradient) whatever p_k is,
    so log_probs may hold -inf there. Where t_k > 0, log p_k is used as given (no floor), so a
    saturated wrong prediction keeps its value and gradient. Equal to torch's
    `kl_div(log_probs, targets, reduction='none').sum(-1)`.
    """
    _check_rows("kl_divergence", log_probs, targets, weights)
    t = _real_rows(_f32(targets), weights, 0.0)
    positive = t > 0
    safe_t = jnp.where(positive, t, 1.0)
    lp = _on_target(log_probs, positive)
    per_class = jnp.where(positive, t * (jnp.log(safe_t) - lp), 0.0)
    return weighted_mean(jnp.sum(per_class, axis=-1), weights)


def cosine_loss(
        log_probs: jax.Array, targets: jax.Array, weights: jax.Array, eps: float = 1e-8,
) -> jax.Array:
    """1 - cosine(exp(log_probs), targets), weighted mean over examples.

    The cosine is sum(p t) / sqrt(max(|p|^2 |t|^2, eps^2)) as in torch's cosine_similarity,
    so a zero target row gives loss 1 with finite gradients.
    """
    _check_rows("cosine_loss", log_probs, targets, weights)
    p = jnp.exp(_real_rows(_f32(log_probs), weights, 0.0))  # exp(-inf) = 0, zero gradient
    t = _real_rows(_f32(targets), weights, 0.0)
    dot = jnp.sum(p * t, axis=-1)
    norms = jnp.sum(p * p, axis=-1) * jnp.sum(t * t, axis=-1)
    cos = dot / jnp.sqrt(jnp.maximum(norms, eps * eps))
    return weighted_mean(1.0 - cos, weights)


def soft_cross_entropy(
        log_probs: jax.Array,
        targets: jax.Array,
        weights: jax.Array,
        label_smoothing: float = 0.0,
) -> jax.Array:
    """Cross entropy with soft targets: -sum_k t'_k log p_k, weighted mean over examples.

    With label smoothing s, t' = (1 - s) t + s / K. Classes with t'_k = 0 contribute nothing
    (log_probs may be -inf there); elsewhere log p_k is used as given (no floor).
    """
    _check_rows("soft_cross_entropy", log_probs, targets, weights)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    t = _real_rows(_f32(targets), weights, 0.0)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / t.shape[-1]
    positive = t > 0
    lp = _on_target(log_probs, positive)
    per_example = -jnp.sum(jnp.where(positive, t * lp, 0.0), axis=-1)
    return weighted_mean(per_example, weights)


def focal_loss(
        log_probs: jax.Array, targets: jax.Array, weights: jax.Array, gamma: float = 2.0,
) -> jax.Array:
    """Focal loss on soft targets: -sum_k t_k (1 - p_k)^gamma log p_k (Lin et al. 2017).

    For one-hot targets this is the usual multi-class focal loss; gamma = 0 gives the soft
    cross entropy. (1 - p) is computed as -expm1(log p) for accuracy near p = 1. Classes with
    t_k = 0 contribute nothing; elsewhere log p_k is used as given (no floor).
    """
    _check_rows("focal_loss", log_probs, targets, weights)
    if gamma < 0:
        raise ValueError(f"focal_loss gamma must be >= 0, got {gamma}")
    t = _real_rows(_f32(targets), weights, 0.0)
    positive = t > 0
    lp = _on_target(log_probs, positive)
    if gamma == 0:
        modulation = jnp.ones_like(lp)
    else:
        one_minus_p = jnp.maximum(-jnp.expm1(lp), 0.0)
        # x ** gamma has an infinite slope at x = 0 for gamma < 1: keep that point out.
        safe = jnp.where(one_minus_p > 0, one_minus_p, 1.0)
        modulation = jnp.where(one_minus_p > 0, safe ** gamma, 0.0)
    per_example = -jnp.sum(jnp.where(positive, t * modulation * lp, 0.0), axis=-1)
    return weighted_mean(per_example, weights)


def init_centers(
        key: jax.Array, num_classes: int, dim: int, stddev: float = 1.0,
) -> jax.Array:
    """Initial class centers [K, D] for `center_loss`, drawn from N(0, stddev^2).

    The centers are their own parameter collection, trained by gradient with their own
    learning rate (the optimizer's job).
    """
    if num_classes <= 0 or dim <= 0:
        raise ValueError(f"init_centers needs positive sizes, got K={num_classes}, D={dim}")
    return stddev * jax.random.normal(key, (num_classes, dim), jnp.float32)


def center_loss(
        embeddings: jax.Array, targets: jax.Array, centers: jax.Array, weights: jax.Array,
) -> jax.Array:
    """Soft-label center loss: sum_k t_k |e - c_k|^2 / 2, weighted mean over examples.

    Each embedding is pulled towards every class center in proportion to its label
    probability; for one-hot targets this is the classic center loss of Wen et al. (2016),
    |e - c_y|^2 / 2. Gradients flow to both the embeddings and the centers.

    Args:
        embeddings: [B, D] utterance embeddings.
        targets: [B, K] label distributions.
        centers: [K, D] class centers (see `init_centers`).
        weights: [B] example weights.
    """
    if embeddings.ndim != 2 or centers.ndim != 2 or embeddings.shape[1] != centers.shape[1]:
        raise ValueError(
                f"center_loss: embeddings {embeddings.shape} and centers {centers.shape} "
                "must be [B, D] and [K, D]")
    if targets.shape != (embeddings.shape[0], centers.shape[0]):
        raise ValueError(f"center_loss: targets shape {targets.shape} is not [B, K]")
    if weights.shape != embeddings.shape[:1]:
        raise ValueError(f"center_loss: weights shape {weights.shape} is not [B]")
    e = _real_rows(_f32(embeddings), weights, 0.0)
    t = _real_rows(_f32(targets), weights, 0.0)
    diff = e[:, None, :] - _f32(centers)[None, :, :]  # [B, K, D]
    dist = jnp.sum(diff * diff, axis=-1)  # [B, K]
    return weighted_mean(0.5 * jnp.sum(t * dist, axis=-1), weights)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of x scaled to unit norm; zero rows stay zero (finite gradients)."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def supervised_contrastive_loss(
        embeddings: jax.Array,
        targets: jax.Array,
        weights: jax.Array,
        temperature: float = 0.1,
) -> jax.Array:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) with soft positives.

    Embeddings are L2-normalised; for an anchor i and another real example j,
    log q_ij = z_i.z_j / T - log sum_{a != i, a real} exp(z_i.z_a / T).
    The positive weight of the pair is the cosine similarity of their label distributions,
    s_ij = cos(t_i, t_j) in [0, 1], and the anchor's loss is
        l_i = -sum_{j != i} s_ij log q_ij / sum_{j != i} s_ij.
    For one-hot labels s_ij is 1 for the same class and 0 otherwise, which is exactly
    SupCon. Padded examples (weight 0) are neither anchors, positives nor negatives.
    Anchors without any positive (sum_j s_ij = 0) are left out of the mean; the result is
    the weights-weighted mean of l_i over the remaining anchors (0 if there are none).

    Args:
        embeddings: [B, D] projections.
        targets: [B, K] label distributions.
        weights: [B] example weights.
        temperature: softmax temperature T.
    """
    if embeddings.ndim != 2 or targets.ndim != 2 or embeddings.shape[0] != targets.shape[0]:
        raise ValueError(
                f"supervised_contrastive_loss: embeddings {embeddings.shape} and targets "
                f"{targets.shape} must be [B, D] and [B, K]")
    if weights.shape != embeddings.shape[:1]:
        raise ValueError(f"supervised_contrastive_loss: weights shape {weights.shape} is not [B]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    real = _f32(weights) > 0
    batch = embeddings.shape[0]
    z = _l2_normalize(_real_rows(_f32(embeddings), weights, 0.0))
    t = _l2_normalize(_real_rows(_f32(targets), weights, 0.0))
    pair = real[:, None] & real[None, :] & ~jnp.eye(batch, dtype=bool)  # [B, B]
    logits = jnp.where(pair, (z @ z.T) / temperature, -1e30)
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, 1]
    log_q = logits - log_norm
    similarity = jnp.where(pair, jnp.maximum(t @ t.T, 0.0), 0.0)  # [B, B]
    positives = jnp.sum(similarity, axis=-1)
    has_pos = positives > 0
    weighted_log_q = jnp.sum(jnp.where(similarity > 0, similarity * log_q, 0.0), axis=-1)
    per_anchor = -weighted_log_q / jnp.where(has_pos, positives, 1.0)
    return weighted_mean(per_anchor, jnp.where(has_pos, _f32(weights), 0.0))


def domain_cross_entropy(
        logits: jax.Array, domain_ids: jax.Array, weights: jax.Array,
) -> jax.Array:
    """Cross entropy of domain logits [B, M] against integer domain ids [B].

    Ids outside [0, M) (e.g. -1 for an unknown domain) are treated like zero weight:
    they are left out of the mean.
    """
    if logits.ndim != 2 or domain_ids.shape != logits.shape[:1]:
        raise ValueError(
                f"domain_cross_entropy: logits {logits.shape} and domain_ids "
                f"{domain_ids.shape} must be [B, M] and [B]")
    if weights.shape != logits.shape[:1]:
        raise ValueError(f"domain_cross_entropy: weights shape {weights.shape} is not [B]")
    num_domains = logits.shape[1]
    ids = jnp.asarray(domain_ids, jnp.int32)
    known = (ids >= 0) & (ids < num_domains)
    w = jnp.where(known, _f32(weights), 0.0)
    log_probs = jax.nn.log_softmax(_real_rows(_f32(logits), w, 0.0), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.clip(ids, 0, num_domains - 1)[:, None], axis=1)
    return weighted_mean(-picked[:, 0], w)


def concordance_correlation(
        pred: jax.Array, target: jax.Array, weights: jax.Array, eps: float = 1e-8,
) -> jax.Array:
    """Weighted concordance correlation coefficient per dimension -> [D].

    ccc = 2 cov(p, y) / (var p + var y + (mean p - mean y)^2) with weighted population
    moments over the examples with positive weight.
    """
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"ccc: pred {pred.shape} and target {target.shape} must be one [B, D]")
    if weights.shape != pred.shape[:1]:
        raise ValueError(f"ccc: weights shape {weights.shape} is not [B]")
    w = jnp.where(_f32(weights) > 0, _f32(weights), 0.0)[:, None]  # [B, 1]
    p = _real_rows(_f32(pred), weights, 0.0)
    y = _real_rows(_f32(target), weights, 0.0)
    total = jnp.maximum(jnp.sum(w), eps)
    mean_p = jnp.sum(w * p, axis=0) / total
    mean_y = jnp.sum(w * y, axis=0) / total
    dp, dy = p - mean_p, y - mean_y
    var_p = jnp.sum(w * dp * dp, axis=0) / total
    var_y = jnp.sum(w * dy * dy, axis=0) / total
    cov = jnp.sum(w * dp * dy, axis=0) / total
    return 2.0 * cov / jnp.maximum(var_p + var_y + (mean_p - mean_y) ** 2, eps)


def ccc_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """1 - concordance correlation coefficient, averaged over dimensions (0 if no weight).

    The CCC is a batch statistic, so this is not a mean of per-example losses: the weights
    enter the weighted means, variances and covariance.
    """
    ccc = concordance_correlation(pred, target, weights)
    has_weight = jnp.sum(jnp.where(_f32(weights) > 0, _f32(weights), 0.0)) > 0
    return jnp.where(has_weight, 1.0 - jnp.mean(ccc), 0.0)


def class_weighted_cross_entropy(
        log_probs: jax.Array, targets: jax.Array, weights: jax.Array,
        class_weights: jax.Array,
) -> jax.Array:
    """Cross entropy with class weights w_k (e.g. N / (K n_k), `data.balance.class_weights`).

    Example i gets the weight omega_i = sum_k t_ik w_k (w_y for a one-hot target of class y)
    and the loss is sum_i weights_i omega_i CE_i / sum_i weights_i omega_i with
    CE_i = -sum_k t_ik log p_ik: for hard labels exactly torch's
    `cross_entropy(logits, y, weight=w)` (mean reduction divides by the summed weights).
    """
    _check_rows("class_weighted_cross_entropy", log_probs, targets, weights)
    w_k = _f32(class_weights)
    if w_k.shape != targets.shape[-1:]:
        raise ValueError(f"class_weighted_cross_entropy: class_weights shape {w_k.shape} is "
                         f"not [{targets.shape[-1]}]")
    t = _real_rows(_f32(targets), weights, 0.0)
    positive = t > 0
    per_example = -jnp.sum(jnp.where(positive, t * _on_target(log_probs, positive), 0.0), -1)
    omega = jnp.sum(t * w_k, axis=-1)
    return weighted_mean(per_example, _f32(weights) * omega)


def _check_dims(name: str, pred: jax.Array, target: jax.Array, weights: jax.Array,
                dim_weights: jax.Array) -> None:
    if pred.ndim != 2 or pred.shape != target.shape or weights.shape != pred.shape:
        raise ValueError(f"{name}: pred {pred.shape}, target {target.shape} and weights "
                         f"{weights.shape} must be one [B, D]")
    if dim_weights.shape != pred.shape[1:]:
        raise ValueError(f"{name}: dim_weights shape {dim_weights.shape} is not "
                         f"[{pred.shape[1]}]")


def _dim_mix(dim_weights: jax.Array) -> jax.Array:
    """Per-dimension weights scaled to sum 1 (all zero stays zero)."""
    w = jnp.maximum(_f32(dim_weights), 0.0)
    total = jnp.sum(w)
    return w / jnp.where(total > 0, total, 1.0)


def masked_concordance(pred: jax.Array, target: jax.Array, weights: jax.Array,
                       eps: float = 1e-8) -> jax.Array:
    """CCC of each dimension over its own rows -> [D].

    weights: [B, D], the weight of each (example, dimension): 0 for padding rows and for a
    dimension the example has no value of. Weighted population moments, as
    `concordance_correlation` computes them per column; a dimension without weight gives 0.
    """
    w = jnp.where(_f32(weights) > 0, _f32(weights), 0.0)  # [B, D]
    real = w > 0
    p = jnp.where(real, _f32(pred), 0.0)
    y = jnp.where(real, _f32(target), 0.0)
    total = jnp.sum(w, axis=0)
    safe = jnp.maximum(total, eps)
    mean_p = jnp.sum(w * p, axis=0) / safe
    mean_y = jnp.sum(w * y, axis=0) / safe
    dp, dy = jnp.where(real, p - mean_p, 0.0), jnp.where(real, y - mean_y, 0.0)
    var_p = jnp.sum(w * dp * dp, axis=0) / safe
    var_y = jnp.sum(w * dy * dy, axis=0) / safe
    cov = jnp.sum(w * dp * dy, axis=0) / safe
    ccc = 2.0 * cov / jnp.maximum(var_p + var_y + (mean_p - mean_y) ** 2, eps)
    return jnp.where(total > 0, ccc, 0.0)


def dims_ccc_loss(pred: jax.Array, target: jax.Array, weights: jax.Array,
                  dim_weights: jax.Array, shares: jax.Array | None = None) -> jax.Array:
    """sum_d a_d (1 - CCC_d) of the emotion dimensions, a = dim_weights scaled to sum 1.

    pred, target: [B, D] (0-1); weights: [B, D] (0: padding row or missing value, never
    imputed: the row is left out of that dimension's moments). CCC_d is the batch CCC
    (`masked_concordance`); a dimension without any value in the batch adds 0.
    shares: [D] this batch's share of each dimension's rows in a larger batch it is a
    micro-batch of (the train step's gradient accumulation): the loss becomes
    sum_d a_d share_d (1 - CCC_d), a row-weighted mean of the micro-batches' CCC losses.
    """
    _check_dims("dims_ccc_loss", pred, target, weights, dim_weights)
    has = jnp.sum(jnp.where(_f32(weights) > 0, _f32(weights), 0.0), axis=0) > 0
    per_dim = jnp.where(has, 1.0 - masked_concordance(pred, target, weights), 0.0)
    if shares is not None:
        per_dim = per_dim * _f32(shares)
    return jnp.sum(_dim_mix(dim_weights) * per_dim)


def dims_mse_loss(pred: jax.Array, target: jax.Array, weights: jax.Array,
                  dim_weights: jax.Array, totals: jax.Array | None = None) -> jax.Array:
    """sum_d a_d MSE_d: per dimension the weighted mean squared error over the rows with a
    value, a = dim_weights scaled to sum 1.

    totals: [D] the weight sums of the whole batch this one is a micro-batch of (the train
    step's gradient accumulation): each dimension's sum is divided by it instead of this
    batch's own sum, so the micro-batches' losses add up to the whole batch's exactly.
    """
    _check_dims("dims_mse_loss", pred, target, weights, dim_weights)
    w = jnp.where(_f32(weights) > 0, _f32(weights), 0.0)
    err = jnp.where(w > 0, _f32(pred) - _f32(target), 0.0)
    den = jnp.sum(w, axis=0) if totals is None else _f32(totals)
    per_dim = jnp.sum(w * err * err, axis=0) / jnp.where(den > 0, den, 1.0)
    return jnp.sum(_dim_mix(dim_weights) * per_dim)


# --------------------------------------------------------------------------------------
# The configured losses


class LossInputs(NamedTuple):
    """What the configured losses read from one (micro-)batch."""

    log_probs: jax.Array  # [B, K] float32 log_softmax of the emotion logits
    targets: jax.Array  # [B, K] label distributions
    weights: jax.Array  # [B] example weights (0 for padding rows and rows without a category)
    embedding: jax.Array | None = None  # [B, D] pooled embedding
    centers: jax.Array | None = None  # [K, D] class centers (center loss only)
    class_weights: jax.Array | None = None  # [K] weighted_ce's class weights
    dims_pred: jax.Array | None = None  # [B, D] the dimensional head's output
    dims: jax.Array | None = None  # [B, D] target dimensions (0-1)
    dims_weights: jax.Array | None = None  # [B, D] valid x dims_mask
    dim_weights: jax.Array | None = None  # [D] weight of each dimension in ccc / mse
    dim_shares: jax.Array | None = None  # [D] share of the whole batch's rows (accumulation)
    dim_totals: jax.Array | None = None  # [D] the whole batch's weight sums (accumulation)


# Config field `loss.<name>` is the weight of the loss `<name>` (0 leaves it out); each entry
# computes the loss from the batch's LossInputs and the loss config (for its other fields).
# Every entry is a weighted mean over examples except `supcon`, whose anchors see the whole
# batch, and `ccc`, a batch statistic (see the train step for what gradient accumulation does
# with them); `weighted_ce` weighs rows by their class weight, `ccc` and `mse` by their
# dimension masks and take their accumulation shares themselves.
LOSSES: dict[str, Callable[[LossInputs, Mapping], jax.Array]] = {
    "kl": lambda x, cfg: kl_divergence(x.log_probs, x.targets, x.weights),
    "cosine": lambda x, cfg: cosine_loss(x.log_probs, x.targets, x.weights),
    "soft_ce": lambda x, cfg: soft_cross_entropy(x.log_probs, x.targets, x.weights),
    "focal": lambda x, cfg: focal_loss(x.log_probs, x.targets, x.weights,
                                       gamma=cfg["focal_gamma"]),
    "center": lambda x, cfg: center_loss(x.embedding, x.targets, x.centers, x.weights),
    "supcon": lambda x, cfg: supervised_contrastive_loss(
        x.embedding, x.targets, x.weights, temperature=cfg["supcon_temperature"]),
    "weighted_ce": lambda x, cfg: class_weighted_cross_entropy(
        x.log_probs, x.targets, x.weights, x.class_weights),
    "ccc": lambda x, cfg: dims_ccc_loss(x.dims_pred, x.dims, x.dims_weights, x.dim_weights,
                                        x.dim_shares),
    "mse": lambda x, cfg: dims_mse_loss(x.dims_pred, x.dims, x.dims_weights, x.dim_weights,
                                        x.dim_totals),
}
