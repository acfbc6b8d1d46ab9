"""Property tests of energy-adaptive mixup and classic mixup (1 device, tiny batches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxser.audio import mixup as mx

N = 16000
LENGTHS = np.array([16000, 12000, 9001, 3000], np.int32)
B, K = len(LENGTHS), 5


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    amp = np.array([1.0, 0.2, 0.5, 2.0])[:, None]
    x = amp * rng.standard_normal((B, N))
    x = np.where(np.arange(N)[None] < LENGTHS[:, None], x, 0.0).astype(np.float32)
    labels = np.eye(K, dtype=np.float32)[[0, 1, 2, 3]]
    labels[3] = [0.1, 0.2, 0.3, 0.4, 0.0]  # a soft row too
    return jnp.asarray(x), jnp.asarray(LENGTHS), jnp.asarray(labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_energy_mixup_follows_energy_formula(seed):
    x, lengths, labels = _batch(seed)
    out, y, info = mx.energy_adaptive_mixup(jax.random.key(seed), x, lengths, labels,
                                            return_info=True)
    xn, outn, yn, lab = (np.asarray(a, np.float64) for a in (x, out, y, labels))
    info = {k: np.asarray(v) for k, v in info.items()}
    np.testing.assert_allclose(yn.sum(1), 1.0, atol=1e-5)
    assert np.all(info["partner"] != np.arange(B))
    assert np.all(info["applied"])
    for i in range(B):
        j, length = info["partner"][i], LENGTHS[i]
        seg_len, off, start = info["segment_length"][i], info["offset"][i], info["segment_start"][i]
        assert 1 <= seg_len <= min(LENGTHS[j], length // 2)
        assert 0 <= off and off + seg_len <= length
        assert 0 <= start and start + seg_len <= LENGTHS[j]
        diff = outn[i] - xn[i]  # the scaled segment, recovered from the returned audio
        assert np.all(outn[i, length:] == 0.0)
        assert np.all(diff[:off] == 0.0) and np.all(diff[off + seg_len:] == 0.0)
        np.testing.assert_allclose(diff[off:off + seg_len],
                                   info["scale"][i] * xn[j, start:start + seg_len],
                                   rtol=1e-4, atol=1e-5)
        e_i = np.sum(xn[i, :length] ** 2)
        e_j = np.sum(diff ** 2)
        p_target, p_seg = e_i / length, e_j / seg_len
        assert 10 * np.log10(p_target / p_seg) == pytest.approx(info["snr_db"][i], abs=1e-2)
        assert -5.0 <= info["snr_db"][i] <= 10.0
        expected = (e_i * lab[i] + e_j * lab[j]) / (e_i + e_j)
        np.testing.assert_allclose(yn[i], expected, atol=1e-5)


def test_energy_mixup_probability_and_determinism():
    x, lengths, labels = _batch()
    out, y = mx.energy_adaptive_mixup(jax.random.key(0), x, lengths, labels, prob=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(labels))
    run = jax.jit(mx.energy_adaptive_mixup)
    a = run(jax.random.key(1), x, lengths, labels)
    b = run(jax.random.key(1), x, lengths, labels)
    c = run(jax.random.key(2), x, lengths, labels)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))


def test_energy_mixup_partial_probability_leaves_others_unchanged():
    x, lengths, labels = _batch()
    for k in range(8):
        out, y, info = mx.energy_adaptive_mixup(jax.random.key(k), x, lengths, labels,
                                                prob=0.5, return_info=True)
        untouched = ~np.asarray(info["applied"])
        np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(x)[untouched])
        np.testing.assert_array_equal(np.asarray(y)[untouched], np.asarray(labels)[untouched])


def test_energy_mixup_silent_target_and_bad_input():
    x, lengths, labels = _batch()
    x = x.at[1].set(0.0)
    out, y = mx.energy_adaptive_mixup(jax.random.key(0), x, lengths, labels)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(np.asarray(y[1]), np.asarray(labels[1]))
    with pytest.raises(ValueError, match="max_fraction"):
        mx.energy_adaptive_mixup(jax.random.key(0), x, lengths, labels, max_fraction=0.0)


def test_classic_mixup_convex_labels_and_lengths():
    x, lengths, _ = _batch()
    labels = jnp.eye(B, dtype=jnp.float32)  # one class per example: y[i] reveals lam and j
    for seed in range(4):
        out, y, new_len = mx.mixup(jax.random.key(seed), x, labels, lengths, alpha=0.4)
        yn, outn, xn = np.asarray(y, np.float64), np.asarray(out), np.asarray(x)
        np.testing.assert_allclose(yn.sum(1), 1.0, atol=1e-6)
        assert np.all(yn >= 0) and np.all(yn <= 1)
        for i in range(B):
            assert np.count_nonzero(yn[i] > 1e-7) <= 2
            others = [j for j in range(B) if j != i and yn[i, j] > 1e-7]
            j = others[0] if others else i
            lam = yn[i, i]
            np.testing.assert_allclose(outn[i], lam * xn[i] + (1 - lam) * xn[j], atol=1e-5)
            if others:
                assert int(new_len[i]) == max(LENGTHS[i], LENGTHS[j])
            else:
                assert int(new_len[i]) >= LENGTHS[i]
            assert np.all(outn[i, int(new_len[i]):] == 0.0)


def test_classic_mixup_features_without_lengths():
    feats = jax.random.normal(jax.random.key(0), (B, 20, 8))
    _, labels = _batch()[1:]
    out, y, new_len = mx.mixup(jax.random.key(1), feats, labels)
    assert out.shape == feats.shape and new_len is None
    np.testing.assert_allclose(np.asarray(y).sum(1), 1.0, atol=1e-6)


def _padded_batch(seed: int = 0):
    """B = 8 rows: 5 real, then 3 padding rows that copy real rows (as the eval/epoch-end
    batches pad), one of them a copy of row 0, with valid = 0."""
    rng = np.random.default_rng(seed)
    n, real = 8000, 5
    lengths = np.array([8000, 6000, 5000, 7000, 4000, 8000, 6000, 8000], np.int32)
    x = rng.standard_normal((8, n)) * np.array([1.0, 0.5, 2.0, 1.0, 0.3, 1.0, 0.5, 1.0])[:, None]
    labels = np.eye(8, dtype=np.float32)  # one class per row: a label reveals its source row
    for pad, source in zip(range(real, 8), (0, 1, 0), strict=True):
        x[pad], lengths[pad] = x[source], lengths[source]
        labels[pad] = labels[source]
    x = np.where(np.arange(n)[None] < lengths[:, None], x, 0.0).astype(np.float32)
    valid = np.array([1] * real + [0] * (8 - real), np.float32)
    return jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(labels), jnp.asarray(valid)


def test_energy_mixup_partners_are_real_rows_other_than_self():
    """Issue 19: a padding row (a copy of a real example, maybe of the target itself) must
    never be a partner, nor the target itself; padding targets stay as they are."""
    x, lengths, labels, valid = _padded_batch()
    real = np.flatnonzero(np.asarray(valid) > 0)
    run = jax.jit(lambda k: mx.energy_adaptive_mixup(k, x, lengths, labels, valid=valid,
                                                     return_info=True))
    seen = {int(i): set() for i in real}
    for seed in range(40):
        out, y, info = run(jax.random.key(seed))
        partner, applied = np.asarray(info["partner"]), np.asarray(info["applied"])
        assert np.all(applied[real]) and not np.any(applied[~np.isin(np.arange(8), real)])
        for i in real:
            j = int(partner[i])
            assert j in real and j != i, (seed, i, j)
            seen[int(i)].add(j)
            # the label moved only towards the partner's own class (not a copy's source)
            assert set(np.flatnonzero(np.asarray(y[i]) > 0)) == {int(i), j}
        pad = np.asarray(valid) == 0
        np.testing.assert_array_equal(np.asarray(out)[pad], np.asarray(x)[pad])
        np.testing.assert_array_equal(np.asarray(y)[pad], np.asarray(labels)[pad])
    for i in real:  # every other real row is drawn (uniform over 4 choices, 40 draws)
        assert seen[int(i)] == set(real.tolist()) - {int(i)}


def test_energy_mixup_without_a_second_real_row_mixes_nothing():
    x, lengths, labels, _ = _padded_batch()
    one = jnp.asarray([1, 0, 0, 0, 0, 0, 0, 0], jnp.float32)
    out, y, info = mx.energy_adaptive_mixup(jax.random.key(0), x, lengths, labels, valid=one,
                                            return_info=True)
    assert not np.any(np.asarray(info["applied"]))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(labels))
    single = mx.energy_adaptive_mixup(jax.random.key(0), x[:1], lengths[:1], labels[:1])
    np.testing.assert_array_equal(np.asarray(single[0]), np.asarray(x[:1]))
    with pytest.raises(ValueError, match="valid"):
        mx.energy_adaptive_mixup(jax.random.key(0), x, lengths, labels, valid=one[:3])


def test_classic_mixup_partners_are_real_rows():
    """A padding row is never a real row's partner (it is a copy, or silence); padding rows
    stay as they are; the partners of the real rows are a permutation of the real rows, and
    every real row is drawn as a partner over seeds."""
    x, lengths, labels, valid = _padded_batch()
    real = np.flatnonzero(np.asarray(valid) > 0)
    run = jax.jit(lambda k: mx.mixup(k, x, labels, lengths, alpha=0.4, valid=valid))
    seen = {int(i): set() for i in real}
    for seed in range(40):
        out, y, _ = run(jax.random.key(seed))
        perm = np.asarray(mx.real_permutation(jax.random.split(jax.random.key(seed))[0], 8,
                                              valid))
        assert sorted(perm[real]) == real.tolist()
        np.testing.assert_array_equal(perm[5:], np.arange(5, 8))
        for i in real:
            classes = set(np.flatnonzero(np.asarray(y[i]) > 1e-7).tolist())
            assert classes <= set(real.tolist()) and int(perm[i]) in classes | {int(i)}
            seen[int(i)].add(int(perm[i]))
        # (lam x + (1 - lam) x: x up to rounding)
        np.testing.assert_allclose(np.asarray(out)[5:], np.asarray(x)[5:], atol=1e-6)
        np.testing.assert_allclose(np.asarray(y)[5:], np.asarray(labels)[5:], atol=1e-6)
    for i in real:
        assert seen[int(i)] == set(real.tolist())
    with pytest.raises(ValueError, match="valid"):
        mx.mixup(jax.random.key(0), x, labels, lengths, valid=valid[:3])
