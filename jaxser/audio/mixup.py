"""On-device mixup: energy-adaptive mixup (arXiv 2512.04551) and classic Beta mixup.

Both are pure, jittable, batched functions of (key, arrays) with static shapes, meant to
run inside the jitted train step after the waveform augmentation. Partners come from the
same batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _valid(lengths: jax.Array, n: int) -> jax.Array:
    return jnp.arange(n)[None, :] < lengths[:, None]  # [B, N]


def energy_adaptive_mixup(
        key: jax.Array,
        audio: jax.Array,
        lengths: jax.Array,
        labels: jax.Array,
        *,
        valid: jax.Array | None = None,
        prob: float = 1.0,
        snr_db: tuple[float, float] = (-5.0, 10.0),
        max_fraction: float = 0.5,
        return_info: bool = False,
):
    """Mixes a scaled segment of another utterance into each target, with energy-set labels.

    For each target i (audio [B, N] with valid length L_i, labels [B, K], `valid` [B] the
    batch's real-row mask, 1 / True for a real example and 0 for batch padding, which is a
    copy of a real example and must not be mixed in; None: every row is real):
      * partner j uniform among the real rows other than i (drawn independently per
        target); a padding target, or a target without another real row, is not mixed;
      * segment length L_seg uniform in [1, min(L_j, floor(max_fraction * L_i))], taken
        from j at a random start in [0, L_j - L_seg], added to i at a random offset
        o in [0, L_i - L_seg] (so it stays inside the target's valid part);
      * SNR s uniform in `snr_db`; with P_i = (1 / L_i) * sum_{t < L_i} x_i[t]^2 and
        P_seg = (1 / L_seg) * sum_t seg[t]^2, the segment is scaled by
        g = sqrt(P_i / (P_seg * 10^(s / 10))), so 10 * log10(P_i / (g^2 P_seg)) = s;
      * out_i[t] = x_i[t] + g * seg[t - o] for o <= t < o + L_seg, else x_i[t];
      * with E_i = sum_{t < L_i} x_i[t]^2 and E_j = sum_t (g * seg[t])^2 = g^2 * L_seg * P_seg,
            y_i' = (E_i * y_i + E_j * y_j) / (E_i + E_j)
        (E_j / E_i = (L_seg / L_i) * 10^(-s / 10)).
    Each real target is mixed with probability `prob`; others are returned unchanged. Silent
    targets or segments get no mix (g = 0). Labels stay convex combinations (rows sum to 1
    when the input rows do); lengths are unchanged and padding stays zero.

    Returns (audio, labels), or (audio, labels, info) with `return_info=True`, where info
    holds the per-example partner, segment_start, segment_length, offset, snr_db, scale,
    applied, energy_target and energy_segment ([B] each) for tests and debugging (partner is
    the row itself where no partner could be drawn).
    """
    if audio.ndim != 2 or lengths.shape != audio.shape[:1] or labels.shape[:1] != lengths.shape:
        raise ValueError(f"need audio [B, N], lengths [B], labels [B, K]; got {audio.shape}, "
                         f"{lengths.shape}, {labels.shape}")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction={max_fraction} must be in (0, 1]")
    b, n = audio.shape
    if valid is not None and valid.shape != lengths.shape:
        raise ValueError(f"valid {valid.shape} must be [B] like lengths {lengths.shape}")
    k_partner, k_apply, k_len, k_start, k_off, k_snr = jax.random.split(key, 6)
    audio = jnp.where(_valid(lengths, n), audio, 0.0)
    lengths = lengths.astype(jnp.int32)

    real = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid) > 0  # [B]
    candidate = real[None, :] & ~jnp.eye(b, dtype=bool)  # [B, B]: j real and j != i
    has_partner = real & jnp.any(candidate, axis=1)
    drawn = jax.random.categorical(k_partner, jnp.where(candidate, 0.0, -jnp.inf), axis=-1)
    partner = jnp.where(has_partner, drawn, jnp.arange(b)).astype(jnp.int32)  # [B]
    partner_len = lengths[partner]
    max_len = jnp.minimum(partner_len, jnp.floor(max_fraction * lengths).astype(jnp.int32))
    max_len = jnp.maximum(max_len, 0)

    def uniform_int(k, high):
        """[B] integers uniform in [0, high] (high >= 0 per example)."""
        u = jax.random.uniform(k, (b,))
        return jnp.minimum(jnp.floor(u * (high + 1)).astype(jnp.int32), high)

    seg_len = jnp.minimum(1 + uniform_int(k_len, jnp.maximum(max_len - 1, 0)), max_len)
    seg_start = uniform_int(k_start, jnp.maximum(partner_len - seg_len, 0))
    offset = uniform_int(k_off, jnp.maximum(lengths - seg_len, 0))
    snr = jax.random.uniform(k_snr, (b,), jnp.float32, snr_db[0], snr_db[1])
    applied = jax.random.bernoulli(k_apply, prob, (b,)) & (seg_len > 0) & has_partner

    t = jnp.arange(n)[None, :]
    inside = (t >= offset[:, None]) & (t < (offset + seg_len)[:, None])  # [B, N]
    source = jnp.clip(t - offset[:, None] + seg_start[:, None], 0, n - 1)
    segment = jnp.where(inside, jnp.take_along_axis(audio[partner], source, axis=1), 0.0)

    energy_i = jnp.sum(jnp.square(audio), axis=1)  # [B]
    seg_energy = jnp.sum(jnp.square(segment), axis=1)
    p_target = energy_i / jnp.maximum(lengths, 1)
    p_seg = seg_energy / jnp.maximum(seg_len, 1)
    ok = applied & (p_target > 0) & (p_seg > 0)
    ratio = p_target / (jnp.maximum(p_seg, 1e-30) * jnp.power(10.0, snr / 10.0))
    scale = jnp.where(ok, jnp.sqrt(ratio), 0.0)
    mixed = audio + scale[:, None] * segment

    energy_j = jnp.square(scale) * seg_energy
    labels_f = labels.astype(jnp.float32)
    denom = jnp.maximum(energy_i + energy_j, 1e-30)[:, None]
    new_labels = (energy_i[:, None] * labels_f + energy_j[:, None] * labels_f[partner]) / denom
    new_labels = jnp.where(ok[:, None], new_labels, labels_f).astype(labels.dtype)
    out = jnp.where(ok[:, None], mixed, audio).astype(audio.dtype)
    if not return_info:
        return out, new_labels
    info = dict(partner=partner, segment_start=seg_start, segment_length=seg_len,
                offset=offset, snr_db=snr, scale=scale, applied=ok,
                energy_target=energy_i, energy_segment=energy_j)
    return out, new_labels, info


def real_permutation(key: jax.Array, b: int, valid: jax.Array | None = None) -> jax.Array:
    """[b] int32: a uniform random permutation of the rows with `valid` > 0 among
    themselves; every other row maps to itself."""
    if valid is None:
        return jax.random.permutation(key, b).astype(jnp.int32)
    real = jnp.asarray(valid) > 0
    # Real rows first in a random order, then the others in index order.
    order = [jnp.argsort(jnp.where(real, jax.random.uniform(k, (b,)), 1.0 + jnp.arange(b)))
             for k in jax.random.split(key)]
    # The k-th real row of one random order is mixed with the k-th of the other; padding
    # rows come last in both, in index order, so they pair with themselves.
    return jnp.zeros((b,), jnp.int32).at[order[0]].set(order[1].astype(jnp.int32))


def mixup(
        key: jax.Array,
        x: jax.Array,
        labels: jax.Array,
        lengths: jax.Array | None = None,
        *,
        alpha: float = 0.4,
        valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Classic mixup (Zhang et al. 2018) of waveforms [B, N] or features [B, T, ...].

    Partner j = a random permutation of the real rows (`valid` > 0; all rows without
    `valid`): a padding row is never a partner and is its own, so it stays as it is;
    lam_i ~ Beta(alpha, alpha) per example;
    x_i' = lam_i x_i + (1 - lam_i) x_j and y_i' = lam_i y_i + (1 - lam_i) y_j (convex, so
    label rows keep their sum). Both inputs start at time 0, so the mix is non-zero over the
    longer of the two: the new length is max(L_i, L_j) (padding stays zero if it was zero).
    Returns (x, labels, lengths) with lengths None when None was given.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha={alpha} must be > 0")
    if labels.shape[:1] != x.shape[:1]:
        raise ValueError(f"labels {labels.shape} and x {x.shape} differ in batch size")
    b = x.shape[0]
    if valid is not None and valid.shape != (b,):
        raise ValueError(f"valid {valid.shape} must be [B] for x {x.shape}")
    k_perm, k_lam = jax.random.split(key)
    perm = real_permutation(k_perm, b, valid)
    lam = jax.random.beta(k_lam, alpha, alpha, (b,)).astype(jnp.float32)
    lam_x = lam.reshape((b,) + (1,) * (x.ndim - 1))
    mixed = (lam_x * x + (1.0 - lam_x) * x[perm]).astype(x.dtype)
    new_labels = (lam[:, None] * labels + (1.0 - lam[:, None]) * labels[perm])
    new_lengths = None if lengths is None else jnp.maximum(lengths, lengths[perm])
    return mixed, new_labels.astype(labels.dtype), new_lengths
