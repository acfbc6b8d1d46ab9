"""Losses against PyTorch / numpy formulations: values, gradients, zeros and masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxser.train import losses as L

B, K, D = 6, 5, 8
RTOL, ATOL = 2e-5, 2e-6


def _targets(rng: np.random.Generator, n: int = B, k: int = K) -> np.ndarray:
    """Soft targets with exact zeros; row 0 one-hot."""
    t = rng.dirichlet(np.ones(k), size=n)
    t[rng.random((n, k)) < 0.4] = 0.0
    t[np.arange(n), rng.integers(0, k, n)] += 0.2
    t[0] = np.eye(k)[1]
    return t / t.sum(1, keepdims=True)


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, K)) * 2.0
    targets = _targets(rng)
    weights = np.array([1, 1, 0, 1, 1, 0], np.float64)
    return logits, targets, weights


def _t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(x, np.float64), requires_grad=grad)


def _weighted(per_example: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    w = _t(weights)
    return (per_example * w).sum() / w.sum()


def _jax_value_and_grad(loss_fn, *args, argnums=0):
    f32 = [jnp.asarray(a, jnp.float32) if not isinstance(a, (float, int)) else a for a in args]
    return jax.jit(jax.value_and_grad(loss_fn, argnums=argnums))(*f32)


# Distribution losses, as functions of logits, with their torch references.
def _torch_kl(lp, t, w, **_):
    return _weighted(F.kl_div(lp, t, reduction="none").sum(-1), w)


def _torch_cos(lp, t, w, **_):
    return _weighted(1 - F.cosine_similarity(lp.exp(), t, dim=-1), w)


def _torch_ce(lp, t, w, label_smoothing=0.0):
    per = F.cross_entropy(lp, t, reduction="none", label_smoothing=label_smoothing)
    return _weighted(per, w)


def _torch_focal(lp, t, w, gamma=2.0):
    return _weighted(-(t * (1 - lp.exp()) ** gamma * lp).sum(-1), w)


DISTRIBUTION_LOSSES = [
        ("kl", L.kl_divergence, _torch_kl, {}),
        ("cosine", L.cosine_loss, _torch_cos, {}),
        ("ce", L.soft_cross_entropy, _torch_ce, {}),
        ("ce_smooth", L.soft_cross_entropy, _torch_ce, {"label_smoothing": 0.1}),
        ("focal", L.focal_loss, _torch_focal, {"gamma": 2.0}),
        ("focal_half", L.focal_loss, _torch_focal, {"gamma": 0.5}),
]


@pytest.mark.parametrize("name,loss,reference,kwargs", DISTRIBUTION_LOSSES,
                         ids=[d[0] for d in DISTRIBUTION_LOSSES])
def test_distribution_losses_match_torch(name, loss, reference, kwargs):
    logits, targets, weights = _setup()
    fn = lambda z, t, w: loss(jax.nn.log_softmax(z), t, w, **kwargs)
    value, grad = _jax_value_and_grad(fn, logits, targets, weights)
    z = _t(logits, grad=True)
    expected = reference(F.log_softmax(z, -1), _t(targets), weights, **kwargs)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,loss,reference,kwargs", DISTRIBUTION_LOSSES,
                         ids=[d[0] for d in DISTRIBUTION_LOSSES])
def test_distribution_losses_masking_and_zeros(name, loss, reference, kwargs):
    logits, targets, weights = _setup(1)
    fn = lambda lp, t, w: loss(lp, t, w, **kwargs)
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    # Zero predictions where the target is zero: -inf log-probabilities stay harmless.
    # (Label smoothing makes every target positive, so there a probability of exactly 0 is an
    # infinite loss, as in torch: it gets an underflowed but finite log p instead.)
    zero_target = targets == 0
    zero_target[:, 0] = False
    lp_inf = np.where(zero_target, -1e4 if name == "ce_smooth" else -np.inf, log_probs)
    value, grad = _jax_value_and_grad(fn, lp_inf, targets, weights)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    if name in ("kl", "focal", "focal_half", "ce"):  # classes with t = 0 do not matter
        clean, clean_grad = _jax_value_and_grad(fn, log_probs, targets, weights)
        np.testing.assert_allclose(value, clean, rtol=RTOL)
        np.testing.assert_allclose(grad[~zero_target], clean_grad[~zero_target], rtol=RTOL)
    # Padded examples: garbage there changes neither the value nor real gradients.
    garbage_lp, garbage_t = lp_inf.copy(), targets.copy()
    garbage_lp[weights == 0] = -np.inf
    garbage_t[weights == 0] = np.array([1e3, -5.0, 0.0, np.inf, 2.0])
    value2, grad2 = _jax_value_and_grad(fn, garbage_lp, garbage_t, weights)
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    np.testing.assert_allclose(grad2, grad, rtol=1e-6)
    assert np.all(grad2[weights == 0] == 0)
    # A real example predicting probability exactly 0 (log p = -inf) for a class with target
    # mass: the true loss, as torch computes it (infinite except for the cosine loss; no
    # floor hides it). Finite but saturated log p: see test_..._saturated_logits_match_torch.
    bad = log_probs.copy()
    bad[1, np.argmax(targets[1])] = -np.inf
    value3, _ = _jax_value_and_grad(fn, bad, targets, weights)
    expected3 = reference(_t(bad), _t(targets), weights, **kwargs).item()
    assert (np.isinf(expected3) and value3 == expected3) or name == "cosine"
    np.testing.assert_allclose(value3, expected3, rtol=RTOL)
    # All weights zero: 0, not NaN.
    value0, grad0 = _jax_value_and_grad(fn, log_probs, targets, np.zeros(B))
    assert value0 == 0.0 and np.all(grad0 == 0.0)


@pytest.mark.parametrize("name,loss,reference,kwargs", DISTRIBUTION_LOSSES,
                         ids=[d[0] for d in DISTRIBUTION_LOSSES])
def test_distribution_losses_saturated_logits_match_torch(name, loss, reference, kwargs):
    """Confidently wrong predictions: log p of a class with target mass far below
    log(tiny) = -87.3 yet finite in float32. Value and gradient must be torch's (issue 19: a
    floor on log p gave KL 42.98 and gradient [0, 0] for logits [0, -100], target [0.5, 0.5]).
    """
    logits, targets, weights = _setup(4)
    top = np.argmax(targets, 1)
    logits[0, top[0]] -= 100.0
    logits[1, top[1]] -= 300.0
    logits[3, top[3]] -= 1e4  # p underflows to exactly 0 in float32; log p = -1e4 is exact
    zero = np.argwhere(targets[4] == 0)[:, 0]
    logits[4, zero] -= 1e4  # underflow where the target is 0: contributes nothing
    fn = lambda z, t, w: loss(jax.nn.log_softmax(z), t, w, **kwargs)
    value, grad = _jax_value_and_grad(fn, logits, targets, weights)
    z = _t(logits, grad=True)
    expected = reference(F.log_softmax(z, -1), _t(targets), weights, **kwargs)
    expected.backward()
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=RTOL, atol=ATOL)
    if name != "cosine":  # a wrong, saturated row pushes its logits like torch, not by 0
        assert np.abs(np.asarray(grad)[[0, 1, 3]]).max() > 0.1


@pytest.mark.parametrize("loss,kwargs,expected", [
        (L.kl_divergence, {}, 50.0 - np.log(2.0)),  # 0.5 (log 0.5 - 0) + 0.5 (log 0.5 + 100)
        (L.soft_cross_entropy, {}, 50.0),
        (L.focal_loss, {"gamma": 2.0}, 50.0),  # (1 - p)^2 = 1 on the missed class, 0 on the hit
])
def test_saturated_two_class_example_of_issue_19(loss, kwargs, expected):
    """logits [0, -100], target [0.5, 0.5]: hand-derived value (torch: KL 49.31) and the
    gradient [0.5, -0.5] = softmax - target (for focal: d/dz of 0.5 * 100 * 1, the hit class
    contributing (1 - p)^2 log p = O(e^-200)); torch's autograd agrees."""
    fn = lambda z, t, w: loss(jax.nn.log_softmax(z), t, w, **kwargs)
    value, grad = _jax_value_and_grad(fn, [[0.0, -100.0]], [[0.5, 0.5]], [1.0])
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad, [[0.5, -0.5]], rtol=1e-6)
    z = _t([[0.0, -100.0]], grad=True)
    ref = {L.kl_divergence: _torch_kl, L.soft_cross_entropy: _torch_ce,
           L.focal_loss: _torch_focal}[loss](F.log_softmax(z, -1), _t([[0.5, 0.5]]), np.ones(1),
                                             **kwargs)
    ref.backward()
    np.testing.assert_allclose(value, ref.item(), rtol=1e-6)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-6)


def test_focal_gamma_zero_is_cross_entropy():
    logits, targets, weights = _setup(2)
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    t, w = jnp.asarray(targets, jnp.float32), jnp.asarray(weights, jnp.float32)
    np.testing.assert_allclose(
            L.focal_loss(lp, t, w, gamma=0.0), L.soft_cross_entropy(lp, t, w), rtol=1e-6)


def test_center_loss_matches_reference():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(B, D))
    centers = np.asarray(L.init_centers(jax.random.key(0), K, D), np.float64)
    assert centers.shape == (K, D)
    _, targets, weights = _setup(3)
    (value, (g_emb, g_cent)) = _jax_value_and_grad(
            L.center_loss, emb, targets, centers, weights, argnums=(0, 2))
    # numpy loop for the value
    per = [sum(targets[i, k] * np.sum((emb[i] - centers[k]) ** 2) / 2 for k in range(K))
           for i in range(B)]
    expected = np.sum(np.array(per) * weights) / weights.sum()
    np.testing.assert_allclose(value, expected, rtol=RTOL)
    # torch autograd for the gradients
    e, c = _t(emb, True), _t(centers, True)
    dist = ((e[:, None, :] - c[None]) ** 2).sum(-1)
    _weighted(0.5 * (_t(targets) * dist).sum(-1), weights).backward()
    np.testing.assert_allclose(g_emb, e.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_cent, c.grad.numpy(), rtol=RTOL, atol=ATOL)
    # one-hot targets: the classic center loss
    onehot = np.eye(K)[[0, 1, 2, 3, 4, 0]]
    classic = np.mean(0.5 * np.sum((emb - centers[[0, 1, 2, 3, 4, 0]]) ** 2, 1))
    value1, _ = _jax_value_and_grad(L.center_loss, emb, onehot, centers, np.ones(B))
    np.testing.assert_allclose(value1, classic, rtol=RTOL)


def _supcon_torch_onehot(features: torch.Tensor, labels: np.ndarray, temperature: float):
    """SupCon as in Khosla et al.'s reference code (one view, base_temperature = T)."""
    features = F.normalize(features, dim=1)
    labels = torch.tensor(labels).view(-1, 1)
    mask = torch.eq(labels, labels.T).double()
    logits = features @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    logits_mask = 1 - torch.eye(len(labels), dtype=torch.float64)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def test_supcon_reduces_to_khosla_for_one_hot():
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 0, 2, 1, 2, 2, 0])
    emb = rng.normal(size=(len(labels), D))
    targets = np.eye(3)[labels]
    weights = np.ones(len(labels))
    value, grad = _jax_value_and_grad(
            lambda e, t, w: L.supervised_contrastive_loss(e, t, w, temperature=0.2),
            emb, targets, weights)
    e = _t(emb, True)
    expected = _supcon_torch_onehot(e, labels, 0.2)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
    np.testing.assert_allclose(grad, e.grad.numpy(), rtol=1e-4, atol=1e-5)


def _supcon_numpy_soft(emb, targets, weights, temperature):
    """Soft SupCon by loops: positives weighted by the cosine of the label distributions."""
    z = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    real = [i for i in range(len(emb)) if weights[i] > 0]
    total, norm = 0.0, 0.0
    for i in real:
        others = [j for j in real if j != i]
        log_den = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
        sims = {j: targets[i] @ targets[j] / np.linalg.norm(targets[i])
                / np.linalg.norm(targets[j]) for j in others}
        if sum(sims.values()) == 0:
            continue
        li = -sum(s * (z[i] @ z[j] / temperature - log_den) for j, s in sims.items())
        total += weights[i] * li / sum(sims.values())
        norm += weights[i]
    return total / norm


def test_supcon_soft_and_masking():
    rng = np.random.default_rng(5)
    n = 7
    emb = rng.normal(size=(n, D))
    targets = _targets(rng, n, K)
    targets[3] = np.eye(K)[4]
    targets[:, 4] = 0.0
    targets[3] = np.eye(K)[4]  # example 3 has no positive: not an anchor
    targets /= targets.sum(1, keepdims=True)
    weights = np.array([1, 1, 1, 1, 0, 1, 0], np.float64)
    fn = lambda e, t, w: L.supervised_contrastive_loss(e, t, w, temperature=0.1)
    value, grad = _jax_value_and_grad(fn, emb, targets, weights)
    np.testing.assert_allclose(value, _supcon_numpy_soft(emb, targets, weights, 0.1), rtol=RTOL)
    # Padded examples are neither anchors, positives nor negatives.
    emb2, targets2 = emb.copy(), targets.copy()
    emb2[weights == 0] = rng.normal(size=(2, D)) * 100
    targets2[weights == 0] = targets[0]
    value2, grad2 = _jax_value_and_grad(fn, emb2, targets2, weights)
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    np.testing.assert_allclose(grad2, grad, rtol=1e-5, atol=1e-7)
    assert np.all(grad2[weights == 0] == 0)
    value0, grad0 = _jax_value_and_grad(fn, emb, targets, np.zeros(n))
    assert value0 == 0.0 and np.all(np.isfinite(grad0))


def test_domain_cross_entropy_matches_torch():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(B, 3))
    ids = np.array([0, 2, 1, 1, -1, 2])
    weights = np.array([1, 1, 0, 1, 1, 1], np.float64)
    value, grad = jax.jit(jax.value_and_grad(L.domain_cross_entropy))(
            jnp.asarray(logits, jnp.float32), jnp.asarray(ids), jnp.asarray(weights, jnp.float32))
    z = _t(logits, True)
    known = weights * (ids >= 0)
    per = F.cross_entropy(z, torch.tensor(np.maximum(ids, 0)), reduction="none")
    expected = _weighted(per, known)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=RTOL, atol=ATOL)
    assert L.domain_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros(B)) == 0.0


def test_domain_accuracy_counts_the_rows_the_domain_loss_counts():
    """Rows without a domain label (id -1) and padding rows are left out of the logged domain
    accuracy, as domain_cross_entropy leaves them out (issue 19: they counted as misses)."""
    from sklearn.metrics import accuracy_score

    from jaxser.train import step

    rng = np.random.default_rng(8)
    ids = np.array([0, 2, 1, 1, -1, 2, -1, 0])
    weights = np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float64)
    logits = rng.normal(size=(len(ids), 3))
    logits[np.arange(len(ids)), np.maximum(ids, 0)] += 3.0  # mostly right ...
    logits[7] = [0.0, 5.0, 0.0]  # ... one known row wrong
    counted = (weights > 0) & (ids >= 0)
    expected = accuracy_score(ids[counted], logits[counted].argmax(1))
    got = step.domain_accuracy(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                               jnp.asarray(weights, jnp.float32))
    assert float(got) == pytest.approx(expected) and expected == 0.8  # 4 of 5 rows
    none = step.domain_accuracy(jnp.asarray(logits), jnp.full(len(ids), -1), jnp.ones(len(ids)))
    assert float(none) == 0.0


def test_ccc_loss_matches_reference():
    rng = np.random.default_rng(7)
    target = rng.normal(size=(B, 3)) + [0.0, 1.0, -2.0]
    pred = 0.5 * target + rng.normal(size=(B, 3))
    weights = np.array([1, 1, 0, 1, 1, 1], np.float64)
    value, grad = _jax_value_and_grad(L.ccc_loss, pred, target, weights)
    real = weights > 0
    ccc = []
    for d in range(3):
        p, y = pred[real, d], target[real, d]
        cov = np.mean((p - p.mean()) * (y - y.mean()))
        ccc.append(2 * cov / (p.var() + y.var() + (p.mean() - y.mean()) ** 2))
    np.testing.assert_allclose(value, 1 - np.mean(ccc), rtol=RTOL)
    p = _t(pred, True)
    pr, yr = p[torch.tensor(real)], _t(target[real])
    mp, my = pr.mean(0), yr.mean(0)
    cov = ((pr - mp) * (yr - my)).mean(0)
    den = ((pr - mp) ** 2).mean(0) + ((yr - my) ** 2).mean(0) + (mp - my) ** 2
    (1 - (2 * cov / den).mean()).backward()
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-4, atol=1e-6)
    pred2 = pred.copy()
    pred2[~real] = 1e6
    value2, grad2 = _jax_value_and_grad(L.ccc_loss, pred2, target, weights)
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    np.testing.assert_allclose(grad2, grad, rtol=1e-6)
    value0, grad0 = _jax_value_and_grad(L.ccc_loss, pred, target, np.zeros(B))
    assert value0 == 0.0 and np.all(np.isfinite(grad0))


def test_bad_shapes_raise():
    lp = jnp.zeros((B, K))
    with pytest.raises(ValueError, match="weights"):
        L.kl_divergence(lp, lp, jnp.ones(B + 1))
    with pytest.raises(ValueError, match="center_loss"):
        L.center_loss(jnp.zeros((B, D)), lp, jnp.zeros((K, D + 1)), jnp.ones(B))
