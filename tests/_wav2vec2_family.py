"""What the wav2vec2-family encoder tests share (tests/test_hubert.py, tests/test_wavlm.py):
a tiny architecture, a padded batch, transformers' hidden states, a jitted forward, random
parameters without compiling `init`, and the 2 x 4 forced-CPU sharding check."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxser.models.wav2vec2 import Wav2Vec2Encoder, param_shapes

# Tiny encoder fields of every family (heads and positional convolution per test).
TINY = dict(
        hidden_size=32, num_hidden_layers=2, intermediate_size=37, conv_dim=(32, 32, 32),
        conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embedding_groups=4)
LENGTHS = (5200, 3100, 4432)  # samples: ~0.2-0.33 s at 16 kHz; 259, 154 and 220 frames.


def batch(seed: int = 0, pad_noise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Padded audio [3, max] with a mask; padding is zero or (pad_noise) random garbage."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((len(LENGTHS), max(LENGTHS))).astype(np.float32)
    mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
    if not pad_noise:
        audio = np.where(mask, audio, 0.0).astype(np.float32)
    return audio, mask


def torch_hidden(base: torch.nn.Module, audio: np.ndarray, mask=None) -> list[np.ndarray]:
    """HF hidden states as jaxser defines them: hidden_states[:-1] + [last_hidden_state]."""
    with torch.no_grad():
        out = base(torch.from_numpy(audio),
                   attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)),
                   output_hidden_states=True)
    if not getattr(base.config, "do_stable_layer_norm", False):  # Post-LN: the last entry
        np.testing.assert_array_equal(  # already is the output.
                out.hidden_states[-1].numpy(), out.last_hidden_state.numpy())
    return [h.numpy() for h in out.hidden_states[:-1]] + [out.last_hidden_state.numpy()]


def assert_matches_transformers(config, params, base: torch.nn.Module):
    """Hidden states and frame mask of `batch()` equal HF `base`'s; returns (audio, mask)."""
    audio, mask = batch()
    out = apply(config, params, audio, mask)
    assert_hidden_close(out.hidden_states, torch_hidden(base, audio, mask))
    hf_mask = base._get_feature_vector_attention_mask(
            out.mask.shape[1], torch.from_numpy(mask.astype(np.int64)))
    np.testing.assert_array_equal(np.asarray(out.mask), hf_mask.numpy())
    return audio, mask


@functools.cache
def _jitted_apply(config):
    return jax.jit(Wav2Vec2Encoder(config).apply)


def apply(config, params, audio, mask=None):
    """`Wav2Vec2Encoder(config)` on a batch, jitted once per config."""
    return _jitted_apply(config)({"params": params}, audio, mask)


def random_params(config, seed: int) -> dict:
    """Random params from the abstract tree (compiling `init` would cost seconds per test):
    N(0, 0.2), around 1 for scales and gains, x10 for position-bias tables (so that they
    matter)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        value = rng.normal(0.0, 0.2, shape.shape)
        if name == "embedding":
            value = value * 10.0
        return (value + 1.0 if name in ("scale", "weight_g", "gru_rel_pos_const")
                else value).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def assert_hidden_close(ours, ref, atol: float = 1e-4) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=0, err_msg=f"hidden {i}")


def pool(hidden, mask) -> np.ndarray:
    """Masked mean over frames."""
    m = np.asarray(mask)[..., None].astype(np.float32)
    return (np.asarray(hidden) * m).sum(1) / m.sum(1)


def assert_padding_invariant(config, params, seed: int = 1) -> None:
    """Utterances 1 and 2 give the same hidden states (and pooled embedding) alone as inside
    a batch padded with garbage."""
    audio, mask = batch(seed=seed, pad_noise=True)
    batched = apply(config, params, audio, mask)
    for i in (1, 2):  # Utterance 0 is the longest: unpadded in the batch.
        alone = apply(config, params, audio[i:i + 1, :LENGTHS[i]])
        frames = alone.mask.shape[1]
        assert int(batched.mask[i].sum()) == frames
        for a, b in zip(batched.hidden_states, alone.hidden_states, strict=True):
            np.testing.assert_allclose(np.asarray(a[i, :frames]), np.asarray(b[0]), atol=1e-4)
        np.testing.assert_allclose(
                pool(batched.hidden_states[-1][i:i + 1], batched.mask[i:i + 1]),
                pool(alone.hidden_states[-1], alone.mask), atol=1e-4)


def padding_leak(config, params, seed: int = 1) -> float:
    """How much utterance 1's pooled embedding changes between alone and padded."""
    audio, mask = batch(seed=seed, pad_noise=True)
    batched = apply(config, params, audio, mask)
    alone = apply(config, params, audio[1:2, :LENGTHS[1]])
    return float(np.abs(pool(batched.hidden_states[-1][1:2], batched.mask[1:2])
                        - pool(alone.hidden_states[-1], alone.mask)).max())


def assert_sharded(config, specs: dict[tuple[str, ...], tuple]) -> None:
    """Initialises `Wav2Vec2Encoder(config)` under the 2 x 4 (data, model) mesh of the 8
    forced CPU devices; every parameter in `specs` (path under params/encoder) has that
    partition spec and is split 4 ways, and the sharded forward pass equals the plain one."""
    assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("mlp", "model"), ("heads", "model"))
    model = Wav2Vec2Encoder(config)
    audio, mask = batch(seed=4)
    audio, mask = np.concatenate([audio, audio[:1]]), np.concatenate([mask, mask[:1]])

    def init(key):
        return model.init(key, audio[:1, :1000])

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    for path, spec in specs.items():
        leaf = variables["params"]["encoder"]
        for p in path:
            leaf = leaf[p]
        array = leaf.value
        assert tuple(array.sharding.spec) == spec, path
        shard_shape = array.addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 4 == array.size, path
    params = nn.meta.unbox(variables)["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(model.apply)({"params": params}, audio, mask)
    plain = apply(config, jax.device_get(params), audio, mask)
    # Valid frames only: padded frames carry no meaning, and the FFT positional conv on CPU
    # rounds them differently when sharded (they still differ by < 2e-3).
    valid = np.asarray(plain.mask)
    np.testing.assert_array_equal(np.asarray(sharded.mask), valid)
    np.testing.assert_allclose(np.asarray(sharded.hidden_states[-1])[valid],
                               np.asarray(plain.hidden_states[-1])[valid], atol=1e-5)


def assert_bf16_close_and_remat_exact(config, params) -> dict:
    """bfloat16 compute stays within 5% of float32 (every hidden state), and remat gives the
    float32 loss and encoder gradients of the plain stack; returns the remat gradients."""
    audio, mask = batch(seed=2)
    audio, mask = audio[:, :2400], mask[:, :2400]
    ref = apply(config, params, audio, mask)
    bf16 = apply(dataclasses.replace(config, dtype="bfloat16"), params, audio, mask)
    assert bf16.hidden_states[-1].dtype == jnp.bfloat16
    for a, b in zip(bf16.hidden_states, ref.hidden_states, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05

    def loss(encoder_params, cfg):  # Grads of the (rematerialised) transformer layers only:
        p = {**params, "encoder": encoder_params}  # no conv backward to compile.
        out = Wav2Vec2Encoder(cfg).apply({"params": p}, audio, mask)
        return sum(jnp.mean(h ** 2) for h in out.hidden_states)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v_ref, g_ref = grad(params["encoder"], config)
    v_remat, g_remat = grad(params["encoder"], dataclasses.replace(config, remat=True))
    np.testing.assert_allclose(v_remat, v_ref, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale),
                 g_remat, g_ref)
    return g_remat
