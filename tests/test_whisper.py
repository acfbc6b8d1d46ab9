"""Flax Whisper encoder: parity with transformers' PyTorch encoder, modes, dtypes, sharding."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from transformers.models.whisper import modeling_whisper

from jaxser.models import convert, whisper

MAX_POS = 50  # 100 input frames: small, so every mode stays fast


def _hf_config(num_mel=80, max_pos=MAX_POS) -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
            num_mel_bins=num_mel, d_model=64, encoder_layers=2, encoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
            decoder_ffn_dim=128, max_source_positions=max_pos, max_target_positions=32,
            vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)


def _hf_encoder(num_mel=80, max_pos=MAX_POS):
    """A random HF WhisperEncoder with non-trivial biases and norms, and its state dict."""
    torch.manual_seed(num_mel)
    model = modeling_whisper.WhisperEncoder(_hf_config(num_mel, max_pos)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state


def _features(batch, frames, num_mel, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, frames, num_mel)).astype(np.float32)


def _small(**overrides) -> whisper.WhisperConfig:
    return whisper.WhisperConfig(**{
            "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128, "max_source_positions": MAX_POS, **overrides})


@pytest.mark.parametrize("num_mel", [80, 128])
def test_hidden_states_match_pytorch(num_mel):
    model, state = _hf_encoder(num_mel)
    cfg = whisper.WhisperConfig.from_hf(model.config, attention="einsum")
    params = convert.params_from_torch(state, cfg)
    x = _features(2, 2 * MAX_POS, num_mel)
    out = jax.jit(whisper.WhisperEncoder(cfg).apply)({"params": params}, x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 2, 1)), output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.encoder_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.hidden_states[-1]),
                               ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    assert out.mask.shape == (2, MAX_POS) and bool(out.mask.all())


def test_xla_attention_matches_einsum():
    _, state = _hf_encoder()
    x = _features(1, 2 * MAX_POS, 80)
    outs = []
    for impl in ("einsum", "xla"):
        cfg = _small(attention=impl)
        out = jax.jit(whisper.WhisperEncoder(cfg).apply)(
                {"params": convert.params_from_torch(state, cfg)}, x)
        outs.append(np.asarray(out.hidden_states[-1]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_conversion_round_trip_and_tree():
    _, state = _hf_encoder()
    cfg = _small()
    params = convert.params_from_torch(state, cfg)
    back = convert.params_to_torch(params, cfg)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)
    assert {k: v.shape for k, v in state.items()} == convert.torch_shapes(cfg)
    init = jax.jit(whisper.WhisperEncoder(cfg).init)(jax.random.key(0),
                                                     _features(1, 2 * MAX_POS, 80))
    init_shapes = jax.tree.map(np.shape, nn.meta.unbox(init)["params"])
    assert init_shapes == jax.tree.map(np.shape, params)
    assert sorted(params) == ["conv1", "conv2", "embed_positions", "layer_norm", "layers_0",
                              "layers_1"]
    np.testing.assert_allclose(nn.meta.unbox(init)["params"]["embed_positions"],
                               whisper.sinusoids(MAX_POS, 64), atol=1e-6)


def test_thirty_second_mode_rejects_other_lengths():
    cfg = _small()
    with pytest.raises(ValueError, match="expects 100 frames"):
        whisper.WhisperEncoder(cfg).init(jax.random.key(0), _features(1, 60, 80))
    with pytest.raises(ValueError, match="exceed"):
        whisper.WhisperEncoder(dataclasses.replace(cfg, variable_length=True)).init(
                jax.random.key(0), _features(1, 102, 80))
    with pytest.raises(ValueError, match="mel bins"):
        whisper.WhisperEncoder(cfg).init(jax.random.key(0), _features(1, 100, 128))


def test_variable_length_padding_invariance():
    _, state = _hf_encoder()
    cfg = _small(variable_length=True, mask_attention=True, attention="einsum")
    params = {"params": convert.params_from_torch(state, cfg)}
    enc = whisper.WhisperEncoder(cfg)
    lengths = [60, 37]  # odd length: ceil(37 / 2) = 19 output frames
    x = _features(2, 60, 80, seed=3)
    mask = np.arange(60)[None, :] < np.array(lengths)[:, None]
    x_padded = np.where(mask[..., None], x, 1.5)  # junk in the padding
    batched = jax.jit(enc.apply)(params, x_padded, mask)
    assert batched.mask.shape == (2, 30)
    np.testing.assert_array_equal(np.asarray(batched.mask.sum(1)), [30, 19])
    for i, n in enumerate(lengths):
        alone = jax.jit(enc.apply)(params, x[i:i + 1, :n])
        t = (n + 1) // 2
        assert alone.hidden_states[0].shape == (1, t, 64)
        for ours, ref in zip(batched.hidden_states, alone.hidden_states, strict=True):
            np.testing.assert_allclose(np.asarray(ours[i, :t]), np.asarray(ref[0]), atol=1e-4)


def test_variable_length_full_input_equals_thirty_second_mode():
    _, state = _hf_encoder()
    x = _features(1, 2 * MAX_POS, 80)
    cfg = _small()
    p = {"params": convert.params_from_torch(state, cfg)}
    a = jax.jit(whisper.WhisperEncoder(cfg).apply)(p, x).hidden_states[-1]
    b = jax.jit(whisper.WhisperEncoder(dataclasses.replace(
            cfg, variable_length=True, mask_attention=True)).apply)(p, x).hidden_states[-1]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bfloat16_compute_is_close():
    _, state = _hf_encoder()
    x = _features(2, 2 * MAX_POS, 80)
    ref_cfg = _small()
    ref = jax.jit(whisper.WhisperEncoder(ref_cfg).apply)(
            {"params": convert.params_from_torch(state, ref_cfg)}, x).hidden_states[-1]
    cfg = _small(dtype="bfloat16")
    out = jax.jit(whisper.WhisperEncoder(cfg).apply)(
            {"params": convert.params_from_torch(state, cfg)}, x).hidden_states[-1]
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
    assert err.max() < 0.1 * np.abs(np.asarray(ref)).max() and err.mean() < 0.02


def test_remat_gives_identical_outputs_and_grads():
    _, state = _hf_encoder()
    x = _features(1, 60, 80)
    results = []
    for remat in (False, True):
        cfg = _small(remat=remat, variable_length=True)
        params = convert.params_from_torch(state, cfg)
        enc = whisper.WhisperEncoder(cfg)

        def loss(p, enc=enc):
            return jnp.mean(enc.apply({"params": p}, x).hidden_states[-1] ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_remat_lowers_the_compiled_backward_memory():
    # XLA:CPU merges an unrolled jax.checkpoint away; the scan over layers must not be.
    x = jnp.asarray(_features(4, 400, 80))
    temp = {}
    for remat in (False, True):
        cfg = _small(remat=remat, encoder_layers=6, variable_length=True, max_source_positions=200)
        enc = whisper.WhisperEncoder(cfg)
        params = enc.init(jax.random.key(0), x[:1])["params"]

        def loss(p, enc=enc):
            return jnp.mean(enc.apply({"params": p}, x).hidden_states[-1] ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.6 * temp[False], temp


def test_remat_in_training_mode_draws_fresh_dropout_per_layer():
    cfg = _small(remat=True, dropout=0.3, activation_dropout=0.3, variable_length=True)
    x = jnp.asarray(_features(2, 60, 80))
    enc = whisper.WhisperEncoder(cfg)
    params = enc.init(jax.random.key(0), x)["params"]

    def loss(p, key):
        out = enc.apply({"params": p}, x, deterministic=False, rngs={"dropout": key})
        return jnp.mean(out.hidden_states[-1] ** 2), out.hidden_states

    (l1, h1), g1 = jax.value_and_grad(loss, has_aux=True)(params, jax.random.key(1))
    (l2, _), _ = jax.value_and_grad(loss, has_aux=True)(params, jax.random.key(2))
    (l1b, _), _ = jax.value_and_grad(loss, has_aux=True)(params, jax.random.key(1))
    assert float(l1) != float(l2) and float(l1) == float(l1b)
    plain = enc.apply({"params": params}, x).hidden_states
    for a, b in zip(h1[1:], plain[1:], strict=True):  # every layer is perturbed by dropout
        assert not np.allclose(a, b)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(g1))


def test_dropout_needs_rng_and_changes_output():
    cfg = _small(dropout=0.5, variable_length=True)
    enc = whisper.WhisperEncoder(cfg)
    x = _features(1, 20, 80)
    params = jax.jit(enc.init)(jax.random.key(0), x)
    a = jax.jit(enc.apply)(params, x).hidden_states[-1]
    b = jax.jit(lambda p, k: enc.apply(p, x, deterministic=False, rngs={"dropout": k}))(
            params, jax.random.key(1)).hidden_states[-1]
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_config_hf_round_trip_and_sizes():
    cfg = _small(dtype="bfloat16")
    hf = cfg.to_hf()
    assert hf["model_type"] == "whisper" and hf["decoder_layers"] == cfg.encoder_layers
    assert whisper.WhisperConfig.from_hf(hf, dtype="bfloat16") == cfg
    transformers.WhisperConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    for name, sizes in whisper.WHISPER_SIZES.items():
        c = whisper.WhisperConfig(**sizes)
        assert c.head_dim == 64, name
    assert whisper.WhisperConfig(**whisper.WHISPER_SIZES["whisper-large-v3"]).num_mel_bins == 128
    with pytest.raises(ValueError, match="unknown"):
        whisper.WhisperConfig.from_hf(hf, nonsense=1)
    with pytest.raises(ValueError, match="attention"):
        _small(attention="flash")


RULES = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("embed", None),
         ("kv", None), ("length", None), ("num_mel", None), ("channels", None),
         ("conv_kernel", None))


def test_sharded_init_shards_big_kernels():
    assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cfg = _small(variable_length=True)
    enc = whisper.WhisperEncoder(cfg)
    x = jnp.asarray(_features(2, 40, 80))

    def init(key):
        return enc.init(key, x)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        out = jax.jit(enc.apply)(variables, x)
    layer = nn.meta.unbox(variables)["params"]["layers_0"]
    expect = {
            ("fc1", "kernel"): (P(None, "model"), (64, 32)),
            ("fc2", "kernel"): (P("model", None), (32, 64)),
            ("self_attn", "q_proj", "kernel"): (P(None, "model", None), (64, 1, 16)),
            ("self_attn", "k_proj", "kernel"): (P(None, "model", None), (64, 1, 16)),
            ("self_attn", "v_proj", "kernel"): (P(None, "model", None), (64, 1, 16)),
            ("self_attn", "out_proj", "kernel"): (P("model", None, None), (1, 16, 64)),
    }
    for path, (spec, shard_shape) in expect.items():
        leaf = layer
        for p in path:
            leaf = leaf[p]
        assert leaf.sharding.spec == spec, path
        assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), path
    ref = jax.jit(enc.apply)(jax.device_get(nn.meta.unbox(variables)), np.asarray(x))
    np.testing.assert_allclose(np.asarray(out.hidden_states[-1]),
                               np.asarray(ref.hidden_states[-1]), atol=1e-5)
