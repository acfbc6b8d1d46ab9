"""WavLM and data2vec-audio encoders against transformers' PyTorch models (CPU, float32).

Tiny random checkpoints of every variant (group-norm and layer-norm front ends, stable layer
norm on and off, several bucket settings, odd and even positional kernels) are written with
`save_pretrained` and read back through `jaxser.models.pretrained`, as a Hub folder would be.
"""

from __future__ import annotations

import dataclasses
import json

import _wav2vec2_family as fam
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.models.wavlm import modeling_wavlm

from jaxser.models import attention, convert, pretrained, ser_model, wavlm
from jaxser.models.wav2vec2 import Wav2Vec2Encoder
from jaxser.models.wav2vec2_config import WAV2VEC2_SIZES, Wav2Vec2Config

# name: (HF class, heads, feat_extract_norm, stable layer norm, family-specific fields)
CASES = {
        "wavlm-base": ("WavLMModel", 4, "group", False,
                       dict(num_conv_pos_embeddings=16, num_buckets=320, max_bucket_distance=800)),
        "wavlm-large-ctc": ("WavLMForCTC", 2, "layer", True,
                            dict(num_conv_pos_embeddings=15, num_buckets=32,
                                 max_bucket_distance=64)),
        "wavlm-group-stable-cls": ("WavLMForSequenceClassification", 4, "group", True,
                                   dict(num_conv_pos_embeddings=16, num_buckets=16,
                                        max_bucket_distance=40)),
        "wavlm-layer-postln": ("WavLMModel", 2, "layer", False,
                               dict(num_conv_pos_embeddings=15, num_buckets=64,
                                    max_bucket_distance=100)),
        "data2vec-audio": ("Data2VecAudioModel", 4, None, None,
                           dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=5)),
        "data2vec-audio-cls": ("Data2VecAudioForSequenceClassification", 2, None, None,
                               dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=4)),
}
torch.set_num_threads(1)  # Tiny models; threads only fight the other processes on the CPU.


@dataclasses.dataclass
class Checkpoint:
    folder: object  # the save_pretrained folder
    hf_config: dict
    base: torch.nn.Module  # the bare WavLMModel / Data2VecAudioModel, for reference outputs
    family: str


def _make_checkpoint(name: str, folder) -> Checkpoint:
    cls_name, heads, norm, stable, extra = CASES[name]
    wavlm_case = cls_name.startswith("WavLM")
    kwargs = dict(fam.TINY, num_attention_heads=heads, vocab_size=11, num_labels=3, **extra)
    if wavlm_case:
        kwargs.update(feat_extract_norm=norm, do_stable_layer_norm=stable,
                      conv_bias=norm == "layer")
        config = transformers.WavLMConfig(**kwargs)
    else:
        config = transformers.Data2VecAudioConfig(**kwargs)
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # Non-trivial norms, biases, gains and position tables.
        for key, param in model.named_parameters():
            if ("norm" in key or key.endswith("bias") or key.endswith("original0")
                    or "rel_pos" in key):
                param.add_(0.3 * torch.randn_like(param))
            if "rel_attn_embed" in key:
                param.mul_(30.0)  # HF's init (std 0.02) would hide a wrong bucket
    model.save_pretrained(folder)
    family = "wavlm" if wavlm_case else "data2vec_audio"
    base = getattr(model, "wavlm" if wavlm_case else "data2vec_audio", model)
    return Checkpoint(folder, json.loads((folder / "config.json").read_text()), base, family)


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory) -> Checkpoint:
    return _make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def _hf_exact(ckpt: Checkpoint) -> Wav2Vec2Config:
    """The checkpoint's config computing exactly what transformers computes on padding."""
    return Wav2Vec2Config.from_hf(ckpt.hf_config, masked_group_norm=False, masked_pos_conv=False)


def test_matches_transformers_padded_batch(ckpt):
    family, config, params = pretrained.load_pretrained(
            ckpt.folder, masked_group_norm=False, masked_pos_conv=False)
    assert family == ckpt.family == config.family
    fam.assert_matches_transformers(config, params, ckpt.base)


def test_matches_transformers_unpadded(ckpt):
    # Each utterance alone, no mask, jaxser's defaults (masked statistics change nothing here).
    _, config, params = pretrained.load_pretrained(ckpt.folder)
    audio, _ = fam.batch()
    one = audio[1:2, :fam.LENGTHS[1]]
    out = fam.apply(config, params, one)
    fam.assert_hidden_close(out.hidden_states, fam.torch_hidden(ckpt.base, one))


def test_export_loads_in_transformers(ckpt, tmp_path):
    config = _hf_exact(ckpt)
    params = convert.params_from_torch(load_file(str(ckpt.folder / "model.safetensors")), config)
    out = pretrained.export_pretrained(config.family, config, params, tmp_path / "export")
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    assert type(loaded) is type(ckpt.base)
    audio, mask = fam.batch()
    fam.assert_hidden_close(fam.torch_hidden(loaded, audio, mask),
                            fam.torch_hidden(ckpt.base, audio, mask), atol=1e-6)
    family, again_config, again = pretrained.load_pretrained(
            out, masked_group_norm=False, masked_pos_conv=False)
    assert family == config.family and again_config == config
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_conversion_errors_list_every_problem(ckpt):
    config = Wav2Vec2Config.from_hf(ckpt.hf_config)
    state = dict(load_file(str(ckpt.folder / "model.safetensors")))
    prefix = next((p for p in ("wavlm.", "data2vec_audio.") if any(k.startswith(p) for k in state)),
                  "")
    state.pop(prefix + "encoder.layers.1.feed_forward.output_dense.bias")
    state[prefix + "encoder.layers.7.attention.q_proj.weight"] = np.zeros((32, 32), np.float32)
    state[prefix + "feature_projection.projection.weight"] = np.zeros((31, 32), np.float32)
    state["classifier.weight"] = np.zeros(3)  # outside the encoder: ignored
    with pytest.raises(ValueError) as err:
        convert.params_from_torch(state, config)
    message = str(err.value)
    for needle in ("encoder.layers.1.feed_forward.output_dense.bias",
                   "encoder.layers.7.attention.q_proj.weight",
                   "feature_projection.projection.weight: checkpoint (31, 32)"):
        assert needle in message
    assert "classifier" not in message


@pytest.mark.parametrize("family,norm,stable", [
        ("wavlm", "group", False), ("wavlm", "layer", True), ("data2vec_audio", "layer", False)])
def test_padding_invariance(family, norm, stable):
    extra = dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=5) if family != "wavlm" else dict(
            num_conv_pos_embeddings=16, num_buckets=32, max_bucket_distance=64)
    config = Wav2Vec2Config(family=family, num_attention_heads=4, **fam.TINY, **extra,
                            feat_extract_norm=norm, do_stable_layer_norm=stable,
                            conv_bias=norm == "layer")
    params = fam.random_params(config, 0)
    fam.assert_padding_invariant(config, params)
    if family == "data2vec_audio":  # transformers' stack lets padding into valid frames
        assert fam.padding_leak(dataclasses.replace(config, masked_pos_conv=False), params) > 1e-3


@pytest.mark.parametrize("num_buckets,max_distance", [(320, 800), (32, 64), (16, 40), (10, 12)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    attn = modeling_wavlm.WavLMAttention(8, 2, num_buckets=num_buckets, max_distance=max_distance)
    for length in (1, 7, 300, 1700):
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = attn._relative_positions_bucket(relative).numpy()
        ours = wavlm.relative_position_buckets(length, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, expected)
        assert ours.min() >= 0 and ours.max() < num_buckets


def test_gradients_of_relative_position_parameters_match_torch(tmp_path):
    ckpt = _make_checkpoint("wavlm-base", tmp_path)
    config = dataclasses.replace(_hf_exact(ckpt), attention="blockwise")
    params = convert.params_from_torch(load_file(str(tmp_path / "model.safetensors")), config)
    audio, mask = fam.batch(seed=2)
    target = np.random.default_rng(3).standard_normal((3, 259, 32)).astype(np.float32)
    valid = jnp.asarray(ckpt.base._get_feature_vector_attention_mask(
            259, torch.from_numpy(mask.astype(np.int64))).numpy())[..., None]

    def loss(p):
        out = Wav2Vec2Encoder(config).apply({"params": p}, audio, mask)
        return jnp.sum(jnp.where(valid, out.hidden_states[-1] * target, 0.0))

    grads = jax.jit(jax.grad(loss))(params)
    base = ckpt.base.train(False)
    base.zero_grad()
    out = base(torch.from_numpy(audio), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    torch.sum(out.last_hidden_state * torch.from_numpy(target) * torch.from_numpy(
            np.asarray(valid, np.float32))).backward()
    named = dict(base.named_parameters())
    enc = grads["encoder"]
    pairs = {"encoder.layers.0.attention.rel_attn_embed.weight": enc["rel_attn_embed"]["embedding"]}
    for i in range(2):
        attn = enc[f"layers_{i}"]["attention"]
        pairs[f"encoder.layers.{i}.attention.gru_rel_pos_const"] = attn["gru_rel_pos_const"]
        pairs[f"encoder.layers.{i}.attention.gru_rel_pos_linear.weight"] = \
            attn["gru_rel_pos_linear"]["kernel"].T
        pairs[f"encoder.layers.{i}.attention.gru_rel_pos_linear.bias"] = \
            attn["gru_rel_pos_linear"]["bias"]
    for key, ours in pairs.items():
        ref = named[key].grad.numpy().reshape(np.shape(ours))
        assert np.abs(ref).max() > 0, key
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-3 * np.abs(ref).max(),
                                   err_msg=key)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_bias_on_every_cpu_path(masked, monkeypatch):
    """einsum, blockwise (in several query chunks) and XLA take the same bias and give the
    same outputs and gradients (q, k, v and the bias)."""
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 64 * 150)  # 4 query chunks of 50
    b, t, h, d = 2, 200, 3, 8
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
    bias = jax.random.normal(keys[3], (b, h, t, t)) * 3.0
    key_mask = (jnp.arange(t)[None, :] < jnp.array([200, 131])[:, None]) if masked else None
    target = jax.random.normal(keys[4], (b, t, h, d))

    def loss(q, k, v, bias, impl):
        out = attention.dot_product_attention(q, k, v, key_mask, impl, bias=bias)
        if key_mask is not None:  # XLA zeroes padded query rows; the others compute them
            out = jnp.where(key_mask[:, :, None, None], out, 0.0)
        return jnp.sum(out * target), out

    results = {impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                             static_argnums=4)(q, k, v, bias, impl)
               for impl in ("einsum", "blockwise", "xla")}
    (_, ref_out), ref_grads = results["einsum"]
    assert float(jnp.abs(ref_grads[3]).max()) > 0
    for impl in ("blockwise", "xla"):
        (_, out), grads = results[impl]
        np.testing.assert_allclose(out, ref_out, atol=2e-5, err_msg=impl)
        for name, g, r in zip("qkvb", grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=2e-5, err_msg=f"{impl} d{name}")


def _small(family="wavlm", **overrides) -> Wav2Vec2Config:
    extra = (dict(num_conv_pos_embeddings=16, num_buckets=32, max_bucket_distance=64)
             if family == "wavlm" else
             dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=5, feat_extract_norm="layer"))
    return Wav2Vec2Config(**{**fam.TINY, "family": family, "num_attention_heads": 4, **extra,
                             **overrides})


@pytest.mark.parametrize("family", ["wavlm", "data2vec_audio"])
def test_bfloat16_and_remat(family):
    config = _small(family, num_hidden_layers=2)
    g_remat = fam.assert_bf16_close_and_remat_exact(config, fam.random_params(config, 1))
    if family == "wavlm":  # the relative-position table gets a gradient through the scan
        assert float(jnp.abs(g_remat["rel_attn_embed"]["embedding"]).max()) > 0


def test_sharding_of_initialised_params():
    fam.assert_sharded(_small(intermediate_size=64), {
            ("layers_0", "feed_forward", "intermediate_dense", "kernel"): (None, "model"),
            ("layers_0", "attention", "q_proj", "kernel"): (None, "model", None),
            ("layers_0", "attention", "out_proj", "kernel"): ("model", None, None),
            ("layers_1", "attention", "gru_rel_pos_const"): ("model",),
            ("rel_attn_embed", "embedding"): (None, "model"),
    })


def test_presets_and_config_round_trip():
    hf_configs = {"wavlm": transformers.WavLMConfig,
                  "data2vec_audio": transformers.Data2VecAudioConfig}
    for name in ("wavlm-base", "wavlm-base-plus", "wavlm-large", "data2vec-audio-base",
                 "data2vec-audio-large"):
        config = WAV2VEC2_SIZES[name]
        hf = config.to_hf()
        assert Wav2Vec2Config.from_hf(hf) == config, name
        hf_config = hf_configs[config.family](**hf)
        assert hf_config.model_type == hf["model_type"]
    assert WAV2VEC2_SIZES["wavlm-large"].do_stable_layer_norm
    assert WAV2VEC2_SIZES["data2vec-audio-base"].num_conv_pos_embeddings == 5
    with pytest.raises(ValueError, match="always has feat_extract_norm"):
        Wav2Vec2Config(family="data2vec_audio")
    with pytest.raises(ValueError, match="num_buckets"):
        _small(num_buckets=2)


def test_ser_model_builds_both_families():
    from jaxser.config import base_config

    for family in ("wavlm", "data2vec_audio"):
        cfg = base_config().model
        cfg.encoder, cfg.size, cfg.pooling = family, "", "mean"
        for key, value in dataclasses.asdict(_small(family, num_hidden_layers=1)).items():
            if key not in ("dtype", "param_dtype", "remat", "attention"):
                cfg.encoder_overrides[key] = value
        model, enc_cfg = ser_model.build_model(cfg, 4, 1)
        assert enc_cfg.family == family
        audio = jnp.asarray(fam.batch()[0][:, :2000])
        lengths = jnp.array([2000, 1500, 1800])
        inputs, mask = ser_model.features(family, enc_cfg, audio, lengths)
        variables = model.init(jax.random.key(0), inputs, mask)
        out = model.apply(variables, inputs, mask)
        assert out["logits"].shape == (3, 4)
    cfg.size = "wavlm-base"
    with pytest.raises(ValueError, match="preset"):
        ser_model.encoder_config(cfg)


def test_method_configs_use_wavlm():
    from jaxser import config as config_lib

    ml = config_lib.load_config("configs/mll_eam_flam.py")
    assert (ml.model.encoder, ml.model.size) == ("wavlm", "wavlm-large")
    for variant in ("wavlm-base", "wavlm-base-plus", "wavlm-large"):
        em = config_lib.load_config(f"configs/em2ldl_hubert.py:gender_male,{variant}")
        assert (em.model.encoder, em.model.size) == ("wavlm", variant)
        assert em.workdir.endswith(f"em2ldl_{variant}/gender_male")
    assert config_lib.load_config("configs/em2ldl_hubert.py").model.encoder == "hubert"
    for spec in ("configs/mll_eam_flam.py:smoke", "configs/em2ldl_hubert.py:smoke,wavlm-large"):
        cfg = config_lib.load_config(spec)  # the smoke variants build a tiny WavLM
        model, enc_cfg = ser_model.build_model(cfg.model, 4, 1)
        assert enc_cfg.family == "wavlm"
        inputs, mask = ser_model.features("wavlm", enc_cfg, jnp.zeros((1, 800)), jnp.array([800]))
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs, mask))
        table = params["params"]["encoder"]["encoder"]["rel_attn_embed"]["embedding"]
        assert table.shape == (enc_cfg.num_buckets, enc_cfg.num_attention_heads)
