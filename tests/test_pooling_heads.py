"""Pooling (padding invariance, masking) and heads (shapes, gradient reversal, axis names)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxser.models import heads as H
from jaxser.models import pooling as P

B, T, D = 3, 7, 16


def _frames(seed: int = 0, batch: int = B, frames: int = T, dim: int = D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, frames, dim)).astype(np.float32)
    lengths = np.array([frames, 4, 1][:batch])
    mask = np.arange(frames)[None, :] < lengths[:, None]
    return x, mask


def _repad(x: np.ndarray, mask: np.ndarray, frames: int, fill: float) -> tuple:
    """The same valid frames, padded to `frames` with `fill` values."""
    out = np.full((x.shape[0], frames, x.shape[2]), fill, np.float32)
    new_mask = np.zeros((x.shape[0], frames), bool)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        out[i, :n] = x[i, :n]
        new_mask[i, :n] = True
    return out, new_mask


def test_masked_mean_values_and_padding():
    x, mask = _frames()
    got = P.masked_mean(jnp.asarray(x), jnp.asarray(mask))
    for i in range(B):
        np.testing.assert_allclose(got[i], x[i, mask[i]].mean(0), rtol=1e-6)
    garbage = np.where(mask[..., None], x, np.nan).astype(np.float32)
    np.testing.assert_allclose(P.masked_mean(jnp.asarray(garbage), jnp.asarray(mask)), got)
    grad = jax.grad(lambda v: P.masked_mean(v, jnp.asarray(mask)).sum())(jnp.asarray(x))
    assert np.all(np.asarray(grad)[~mask] == 0)
    empty = P.masked_mean(jnp.asarray(x), jnp.zeros((B, T), bool))
    assert np.all(np.asarray(empty) == 0)
    logits = x[..., :5]
    np.testing.assert_allclose(
            P.frame_logits_mean(jnp.asarray(logits), jnp.asarray(mask)), got[:, :5], rtol=1e-6)


def test_masked_mean_rejects_bad_mask():
    with pytest.raises(ValueError, match="mask"):
        P.masked_mean(jnp.zeros((B, T, D)), jnp.ones((B, T + 1), bool))


POOLINGS = [
        ("attentive_stats", P.AttentiveStatsPooling(attention_dim=8), 2 * D),
        ("frame_attention", P.FrameAttentionPooling(num_heads=4), D),
        ("frame_attention_einsum", P.FrameAttentionPooling(num_heads=2, attention_impl="einsum"),
         D),
]


@pytest.mark.parametrize("name,module,out_dim", POOLINGS, ids=[p[0] for p in POOLINGS])
def test_pooling_is_padding_invariant(name, module, out_dim):
    x, mask = _frames(1)
    variables = module.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(mask))
    apply = jax.jit(module.apply)
    out = apply(variables, jnp.asarray(x), jnp.asarray(mask))
    assert out.shape == (B, out_dim)
    for frames, fill in ((T + 5, 1e4), (T, -3.0), (T + 2, 0.0)):
        xp, mp = _repad(x, mask, frames, fill)
        np.testing.assert_allclose(
                apply(variables, jnp.asarray(xp), jnp.asarray(mp)), out, rtol=1e-5, atol=1e-5)
    # An example alone equals the same example in a padded batch.
    alone = apply(variables, jnp.asarray(x[1:2, :4]), jnp.ones((1, 4), bool))
    np.testing.assert_allclose(alone, out[1:2], rtol=1e-5, atol=1e-5)
    empty = apply(variables, jnp.asarray(x), jnp.zeros((B, T), bool))
    assert np.all(np.isfinite(np.asarray(empty))) and np.all(np.asarray(empty) == 0)


def test_frame_attention_checks_heads_and_axis_names():
    x, mask = _frames()
    with pytest.raises(ValueError, match="num_heads"):
        P.FrameAttentionPooling(num_heads=5).init(jax.random.key(0), x, mask)
    variables = P.FrameAttentionPooling(num_heads=4).init(jax.random.key(0), x, mask)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["pool_query"]) == ("heads", "kv")
    assert tuple(specs["self_query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["pool_out"]["kernel"]) == ("heads", "kv", "embed")
    module = P.FrameAttentionPooling(num_heads=4, dropout_rate=0.5)
    out = module.apply(variables, x, mask, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
    assert out.shape == (B, D)


def test_attentive_stats_matches_uniform_attention():
    """With zero scoring weights attention is uniform: mean and std over valid frames."""
    x, mask = _frames(2)
    module = P.AttentiveStatsPooling(attention_dim=8)
    variables = module.init(jax.random.key(0), x, mask)
    variables = jax.tree.map(jnp.zeros_like, variables)
    out = np.asarray(module.apply(variables, x, mask))
    for i in range(B):
        valid = x[i, mask[i]]
        np.testing.assert_allclose(out[i, :D], valid.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
                out[i, D:], np.sqrt(np.maximum(valid.var(0), 1e-6)), rtol=1e-4, atol=1e-5)


def test_layer_weighted_sum():
    rng = np.random.default_rng(3)
    layers = tuple(jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32) for _ in range(4))
    module = P.LayerWeightedSum()
    variables = module.init(jax.random.key(0), layers)
    assert tuple(nn.get_partition_spec(variables)["params"]["layer_weights"]) == ("layers",)
    np.testing.assert_allclose(module.apply(variables, layers), np.mean(layers, 0), rtol=1e-5)
    logits = jnp.array([0.0, 1.0, -1.0, 2.0])
    w = np.exp(logits) / np.exp(logits).sum()
    boxed = nn.unbox(variables)
    boxed["params"]["layer_weights"] = logits
    expected = sum(wi * np.asarray(h) for wi, h in zip(w, layers, strict=True))
    np.testing.assert_allclose(module.apply(boxed, layers), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        module.apply(variables, ())


def test_layer_weighted_sum_normalize_matches_numpy_and_torch():
    """normalize=True: each layer layer-normalised over features (no parameters, eps 1e-5,
    biased variance), then the softmax-weighted sum, as s3prl's featurizer with layer_norm
    (torch F.layer_norm) computes it."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(5)
    # layers of very different scale and offset: normalising must change the mix
    layers = tuple(jnp.asarray(rng.normal(size=(2, 5, D)) * 10.0 ** i + 3.0 * i, jnp.float32)
                   for i in range(4))
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    module = P.LayerWeightedSum(normalize=True)
    variables = nn.unbox(module.init(jax.random.key(0), layers))
    variables["params"]["layer_weights"] = jnp.asarray(logits, jnp.float32)
    got = np.asarray(module.apply(variables, layers), np.float64)
    w = np.exp(logits) / np.exp(logits).sum()
    stacked = np.stack([np.asarray(h, np.float64) for h in layers])  # [L, B, T, D]
    mean = stacked.mean(-1, keepdims=True)
    var = ((stacked - mean) ** 2).mean(-1, keepdims=True)
    expected = np.einsum("l,lbtd->btd", w, (stacked - mean) / np.sqrt(var + 1e-5))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    hs = torch.tensor(stacked)
    ref = (torch.tensor(w)[:, None, None, None] * F.layer_norm(hs, (D,), eps=1e-5)).sum(0)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
    # every normalised layer has zero mean and unit variance per frame, so the sum does too
    # up to the weights; unnormalised, the largest layer dominates
    plain = np.asarray(P.LayerWeightedSum().apply(variables, layers), np.float64)
    assert np.abs(plain - got).max() > 1.0
    np.testing.assert_allclose(got.mean(-1), 0.0, atol=1e-5)


def test_gradient_reversal_scales_gradient():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, D)), jnp.float32)
    f = lambda v: jnp.sum(jnp.sin(v) * v)
    plain = jax.grad(f)(x)

    @jax.jit
    def reversed_grad(v, lam):
        return jax.grad(lambda u: f(H.gradient_reversal(u, lam)))(v)

    for lam in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(reversed_grad(x, lam), -lam * plain, rtol=1e-6)
    np.testing.assert_array_equal(H.gradient_reversal(x, 0.7), x)
    lam_grad = jax.grad(lambda lam: f(H.gradient_reversal(x, lam)))(0.5)
    assert lam_grad == 0.0


def test_grl_schedule():
    assert float(H.grl_schedule(0, 100, 1.0)) == pytest.approx(0.0)
    assert float(H.grl_schedule(100, 100, 0.5)) == pytest.approx(
            0.5 * (2 / (1 + np.exp(-10)) - 1), rel=1e-6)
    assert float(H.grl_schedule(250, 100, 1.0)) == pytest.approx(2 / (1 + np.exp(-10)) - 1)
    mid = jax.jit(lambda s: H.grl_schedule(s, 100, 1.0))(jnp.int32(50))
    assert float(mid) == pytest.approx(2 / (1 + np.exp(-5)) - 1, rel=1e-6)
    assert float(H.grl_schedule(3, 100, 0.01, kind="constant")) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="kind"):
        H.grl_schedule(0, 10, 1.0, kind="linear")


@pytest.mark.parametrize("hidden", [None, 12])
def test_emotion_head_shapes_and_names(hidden):
    x, _ = _frames(5)
    head = H.EmotionHead(num_classes=6, hidden_dim=hidden, dropout_rate=0.1)
    variables = head.init(jax.random.key(0), x[:, 0])
    assert head.apply(variables, x[:, 0]).shape == (B, 6)
    frames = head.apply(variables, x)
    assert frames.shape == (B, T, 6) and frames.dtype == jnp.float32
    np.testing.assert_allclose(frames[:, 0], head.apply(variables, x[:, 0]), rtol=1e-6)
    specs = nn.get_partition_spec(variables)["params"]["mlp"]
    assert tuple(specs["out"]["kernel"]) == ("mlp" if hidden else "embed", "classes")
    if hidden:
        assert tuple(specs["hidden"]["kernel"]) == ("embed", "mlp")
    with pytest.raises(ValueError, match="EmotionHead"):
        head.apply(variables, x[0, 0])


def test_domain_head_reverses_gradient():
    x, _ = _frames(6)
    pooled = jnp.asarray(x[:, 0])
    head = H.DomainHead(num_domains=4, hidden_dim=8, activation="gelu")
    variables = head.init(jax.random.key(0), pooled, 1.0)
    assert head.apply(variables, pooled, 0.5).shape == (B, 4)
    np.testing.assert_allclose(
            head.apply(variables, pooled, 0.5), head.apply(variables, pooled, -2.0))
    loss = lambda v, lam: jnp.sum(head.apply(variables, v, lam) ** 2)
    forward_grad = jax.grad(loss)(pooled, -1.0)  # lam = -1: the plain gradient
    np.testing.assert_allclose(jax.grad(loss)(pooled, 0.25), -0.25 * forward_grad, rtol=1e-5)
    assert head.apply(variables, jnp.asarray(x), 1.0).shape == (B, T, 4)


def test_dimensional_head():
    x, _ = _frames(7)
    head = H.DimensionalHead(hidden_dim=8, output_activation="sigmoid")
    variables = head.init(jax.random.key(0), x[:, 0])
    out = head.apply(variables, x[:, 0])
    assert out.shape == (B, 3) and np.all((out > 0) & (out < 1))
    assert H.DimensionalHead(num_outputs=2).init_with_output(
            jax.random.key(0), x)[0].shape == (B, T, 2)
    with pytest.raises(ValueError, match="activation"):
        H.DimensionalHead(output_activation="relu6").init(jax.random.key(0), x[:, 0])
