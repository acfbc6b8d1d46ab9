"""Parity of the Flax HuBERT / wav2vec2 encoder with transformers' PyTorch models (CPU).

Tiny random checkpoints are written with `save_pretrained` and read back with
`safetensors.numpy.load_file`, as a real Hub folder would be.
"""

from __future__ import annotations

import dataclasses
import json

import _wav2vec2_family as fam
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxser.constants import SAMPLE_RATE
from jaxser.models.convert import params_from_torch, params_to_torch
from jaxser.models.frontend import WeightNormConv, _masked_instance_norm, normalize_waveform
from jaxser.models.wav2vec2 import Wav2Vec2Encoder
from jaxser.models.wav2vec2_config import (
    WAV2VEC2_SIZES,
    Wav2Vec2Config,
    feature_lengths,
    frame_mask,
)

# name: (family, large-style, HF class, heads, pos-conv kernel, feat_proj_layer_norm)
CASES = {
        "hubert-base": ("hubert", False, "HubertModel", 4, 16, True),
        "hubert-large-noprojln": ("hubert", True, "HubertForSequenceClassification", 2, 15,
                                  False),
        "wav2vec2-base": ("wav2vec2", False, "Wav2Vec2ForCTC", 2, 15, True),
        "wav2vec2-large": ("wav2vec2", True, "Wav2Vec2Model", 4, 16, True),
}
_HF_CONFIGS = {"hubert": transformers.HubertConfig, "wav2vec2": transformers.Wav2Vec2Config}
_HF_MODELS = {"hubert": transformers.HubertModel, "wav2vec2": transformers.Wav2Vec2Model}
torch.set_num_threads(1)  # Tiny models; threads only fight the other processes on the CPU.


@dataclasses.dataclass
class Checkpoint:
    hf_config: dict
    state: dict  # numpy state dict as saved (maybe with a model prefix and head keys)
    base: torch.nn.Module  # the HubertModel / Wav2Vec2Model inside, for reference outputs


def _make_checkpoint(name: str, tmp_dir) -> Checkpoint:
    family, large, cls_name, heads, pos_kernel, proj_ln = CASES[name]
    kwargs = dict(fam.TINY, num_attention_heads=heads, num_conv_pos_embeddings=pos_kernel,
                  feat_extract_norm="layer" if large else "group", do_stable_layer_norm=large,
                  conv_bias=large, vocab_size=11, num_labels=3)
    if family == "hubert":
        kwargs["feat_proj_layer_norm"] = proj_ln
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, cls_name)(_HF_CONFIGS[family](**kwargs)).eval()
    with torch.no_grad():  # Non-trivial norms, biases and weight-norm gains.
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("bias") or key.endswith("original0"):
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(tmp_dir)
    state = load_file(str(tmp_dir / "model.safetensors"))
    hf_config = json.loads((tmp_dir / "config.json").read_text())
    base = getattr(model, family, model)
    return Checkpoint(hf_config, state, base)


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, tmp_path_factory) -> Checkpoint:
    return _make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_matches_transformers_padded_batch(ckpt):
    # Group-norm models: masked_group_norm=False is HF's computation (stats over padding).
    config = Wav2Vec2Config.from_hf(ckpt.hf_config, masked_group_norm=False)
    params = params_from_torch(ckpt.state, config)
    audio, mask = fam.assert_matches_transformers(config, params, ckpt.base)
    if config.feat_extract_norm == "layer":  # Layer-norm models: the default is HF exact too.
        out = fam.apply(dataclasses.replace(config, masked_group_norm=True), params, audio, mask)
        fam.assert_hidden_close(out.hidden_states, fam.torch_hidden(ckpt.base, audio, mask))


def test_matches_transformers_unpadded(ckpt):
    # Each utterance alone, no mask, jaxser's default masked_group_norm=True.
    config = Wav2Vec2Config.from_hf(ckpt.hf_config)
    params = params_from_torch(ckpt.state, config)
    audio, _ = fam.batch()
    one = audio[1:2, :fam.LENGTHS[1]]
    out = fam.apply(config, params, one)
    fam.assert_hidden_close(out.hidden_states, fam.torch_hidden(ckpt.base, one))
    assert bool(np.all(np.asarray(out.mask)))


def test_params_to_torch_round_trip(ckpt, tmp_path):
    config = Wav2Vec2Config.from_hf(ckpt.hf_config, masked_group_norm=False)
    params = params_from_torch(ckpt.state, config)
    exported = params_to_torch(params, config)
    fresh = _HF_MODELS[config.family](_HF_CONFIGS[config.family](**config.to_hf())).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    audio, mask = fam.batch()
    fam.assert_hidden_close(fam.torch_hidden(fresh, audio, mask),
                            fam.torch_hidden(ckpt.base, audio, mask), atol=1e-6)
    # A save_pretrained-style folder (config.json + model.safetensors) loads in transformers.
    save_file(exported, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is _HF_MODELS[config.family]
    fam.assert_hidden_close(fam.torch_hidden(loaded, audio, mask),
                            fam.torch_hidden(ckpt.base, audio, mask), atol=1e-6)
    # And the conversion is lossless both ways.
    again = params_from_torch(exported, config)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_old_weight_norm_key_names(ckpt):
    config = Wav2Vec2Config.from_hf(ckpt.hf_config)
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v
               for k, v in ckpt.state.items()}
    assert any(k.endswith("weight_g") for k in renamed)
    params = params_from_torch(ckpt.state, config)
    jax.tree.map(np.testing.assert_array_equal, params_from_torch(renamed, config), params)

    def kernel(p):  # The effective (weight-normalised) position-conv kernel.
        conv = p["encoder"]["pos_conv_embed"]["conv"]
        v, g = conv["weight_v"], conv["weight_g"]
        return v * g[:, None, None] / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))

    # A checkpoint with weight norm folded into a plain `weight` converts to the same kernel.
    plain = {k: v for k, v in renamed.items() if not k.endswith(("weight_g", "weight_v"))}
    key = next(k for k in renamed if k.endswith("weight_g"))[:-len("_g")]
    plain[key] = np.transpose(kernel(params), (2, 1, 0))
    np.testing.assert_allclose(kernel(params_from_torch(plain, config)), kernel(params),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("large", [False, True])
def test_padding_invariance(large):
    config = Wav2Vec2Config(num_attention_heads=4, num_conv_pos_embeddings=16, **fam.TINY,
                            feat_extract_norm="layer" if large else "group",
                            do_stable_layer_norm=large, conv_bias=large)
    params = fam.random_params(config, 0)
    fam.assert_padding_invariant(config, params)
    if not large:  # HF's group norm (stats over the padding) is not invariant: the known bug.
        assert fam.padding_leak(dataclasses.replace(config, masked_group_norm=False), params) > 1e-3


def test_feature_lengths_and_mask_match_transformers():
    hf = transformers.HubertModel(transformers.HubertConfig(**fam.TINY, num_attention_heads=4))
    config = Wav2Vec2Config(**fam.TINY, num_attention_heads=4)
    lengths = np.concatenate([np.arange(0, 2000), np.random.default_rng(0).integers(0, 10**6, 500)])
    expected = hf._get_feat_extract_output_lengths(torch.from_numpy(lengths)).numpy()
    np.testing.assert_array_equal(feature_lengths(config, lengths), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda n: feature_lengths(config, n))(
            jnp.asarray(lengths))), expected)
    assert [feature_lengths(config, int(n)) for n in lengths[:50]] == list(expected[:50])
    for name in ("hubert-base", "wav2vec2-large-lv60"):  # The real 7-layer stack: 320x, rf 400.
        real = WAV2VEC2_SIZES[name]
        assert feature_lengths(real, SAMPLE_RATE) == 49 and feature_lengths(real, 400) == 1
    # The frame mask equals HF's for every length that gives at least one frame.
    valid = np.arange(40, 1400, 7)  # 40 samples: the receptive field
    audio_mask = np.arange(1400)[None, :] < valid[:, None]
    num_frames = int(feature_lengths(config, 1400))
    hf_mask = hf._get_feature_vector_attention_mask(num_frames, torch.from_numpy(audio_mask.astype(
            np.int64)))
    np.testing.assert_array_equal(np.asarray(frame_mask(config, valid, num_frames)), hf_mask)


def test_normalize_waveform_matches_feature_extractor():
    rng = np.random.default_rng(3)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.3 + 0.1 for n in (900, 1500, 1200)]
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True,
                                                      return_attention_mask=True)
    ref = extractor(waves, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="np")
    padded = np.zeros((3, 1500), np.float32)
    for i, w in enumerate(waves):
        padded[i, :len(w)] = w
    lengths = jnp.asarray([len(w) for w in waves])
    ours = jax.jit(normalize_waveform)(padded, lengths)
    np.testing.assert_allclose(np.asarray(ours), ref["input_values"], atol=1e-5)


def test_conversion_errors_list_every_problem(ckpt):
    config = Wav2Vec2Config.from_hf(ckpt.hf_config)
    state = dict(ckpt.state)
    prefix = "hubert." if any(k.startswith("hubert.") for k in state) else (
            "wav2vec2." if any(k.startswith("wav2vec2.") for k in state) else "")
    state.pop(prefix + "encoder.layers.1.feed_forward.output_dense.bias")
    state[prefix + "encoder.layers.7.attention.q_proj.weight"] = np.zeros((32, 32), np.float32)
    state[prefix + "feature_projection.projection.weight"] = np.zeros((31, 32), np.float32)
    # Non-encoder keys are ignored.
    state.update({"lm_head.weight": np.zeros(3), "quantizer.codevectors": np.zeros(3),
                  "project_q.weight": np.zeros(3), "masked_spec_embed": np.zeros(3)})
    with pytest.raises(ValueError) as err:
        params_from_torch(state, config)
    message = str(err.value)
    assert "encoder.layers.1.feed_forward.output_dense.bias" in message
    assert "encoder.layers.7.attention.q_proj.weight" in message
    assert "feature_projection.projection.weight" in message
    assert "lm_head" not in message and "quantizer" not in message


def test_config_round_trip_and_validation():
    for name, config in WAV2VEC2_SIZES.items():
        if config.family not in _HF_CONFIGS:  # WavLM, data2vec-audio: tests/test_wavlm.py
            continue
        hf = config.to_hf()
        assert Wav2Vec2Config.from_hf(hf) == config, name
        assert hf["architectures"][0] in ("HubertModel", "Wav2Vec2Model")
        _HF_CONFIGS[config.family](**hf)  # transformers accepts it.
    assert WAV2VEC2_SIZES["hubert-large"].do_stable_layer_norm
    overridden = Wav2Vec2Config.from_hf(WAV2VEC2_SIZES["hubert-base"].to_hf(), dtype="bfloat16")
    assert overridden.dtype == "bfloat16"
    with pytest.raises(ValueError, match="model_type"):
        Wav2Vec2Config.from_hf({"model_type": "unispeech"})
    with pytest.raises(ValueError, match="add_adapter"):
        Wav2Vec2Config.from_hf({"model_type": "wav2vec2", "add_adapter": True})
    with pytest.raises(ValueError, match="nonsense"):
        Wav2Vec2Config.from_hf({"model_type": "hubert"}, nonsense=1)
    with pytest.raises(ValueError, match="num_attention_heads"):
        Wav2Vec2Config(hidden_size=30, num_attention_heads=4)


def _small_config(**overrides) -> Wav2Vec2Config:
    return Wav2Vec2Config(**{**fam.TINY, "num_attention_heads": 4, "num_conv_pos_embeddings": 16,
                             **overrides})


def test_bfloat16_remat_and_dropout():
    config = _small_config(num_hidden_layers=1)
    params = fam.random_params(config, 1)
    fam.assert_bf16_close_and_remat_exact(config, params)
    audio, mask = fam.batch(seed=2)
    audio, mask = audio[:, :2400], mask[:, :2400]
    train = jax.jit(lambda p, k: Wav2Vec2Encoder(config).apply(
            {"params": p}, audio, mask, deterministic=False, rngs={"dropout": k}))
    a, b = train(params, jax.random.key(5)), train(params, jax.random.key(6))
    assert np.all(np.isfinite(np.asarray(a.hidden_states[-1])))
    assert not np.allclose(np.asarray(a.hidden_states[-1]), np.asarray(b.hidden_states[-1]))


def test_sharding_of_initialised_params():
    config = Wav2Vec2Config(**dict(fam.TINY, intermediate_size=64), num_attention_heads=4,
                            num_conv_pos_embeddings=16)
    fam.assert_sharded(config, {
            ("layers_0", "feed_forward", "intermediate_dense", "kernel"): (None, "model"),
            ("layers_0", "feed_forward", "output_dense", "kernel"): ("model", None),
            ("layers_0", "attention", "q_proj", "kernel"): (None, "model", None),
            ("layers_0", "attention", "out_proj", "kernel"): ("model", None, None),
    })


@pytest.mark.parametrize("kernel,groups,frames", [(16, 4, 37), (128, 16, 200), (7, 1, 5)])
def test_fft_positional_conv_equals_direct(kernel, groups, frames):
    """The FFT positional convolution (CPU default) computes the direct grouped conv."""
    base = dict(fam.TINY, num_attention_heads=4, num_conv_pos_embeddings=kernel,
                num_conv_pos_embedding_groups=groups)
    hidden = base["hidden_size"]
    x = jax.random.normal(jax.random.key(1), (2, frames, hidden))
    outs = {}
    for method in ("direct", "fft"):
        conv = WeightNormConv(Wav2Vec2Config(**base, pos_conv=method))
        variables = conv.init(jax.random.key(0), x)
        outs[method] = np.asarray(conv.apply(variables, x))
    assert outs["fft"].shape == outs["direct"].shape == (2, frames + 1 - kernel % 2, hidden)
    np.testing.assert_allclose(outs["fft"], outs["direct"], atol=2e-5)


def test_pos_conv_option_is_checked():
    with pytest.raises(ValueError, match="pos_conv"):
        Wav2Vec2Config(**fam.TINY, num_attention_heads=4, pos_conv="fast")


def test_masked_instance_norm_gradient_matches_autodiff():
    """The hand-written backward of the feature extractor's group norm equals autodiff of
    the plain formula, padded frames included (they are normalised with the valid stats)."""
    def reference(x, w):
        w3 = w[:, :, None]
        n = jnp.maximum(jnp.sum(w3, axis=1, keepdims=True), 1.0)
        mean = jnp.sum(x * w3, axis=1, keepdims=True) / n
        var = jnp.sum(((x - mean) * w3) ** 2, axis=1, keepdims=True) / n
        return (x - mean) * jax.lax.rsqrt(var + 1e-5)

    x = jax.random.normal(jax.random.key(0), (2, 50, 6)) * 3 + 1
    w = jnp.ones((2, 50)).at[1, 31:].set(0.0)
    target = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_allclose(_masked_instance_norm(x, w), reference(x, w), atol=1e-5)
    grads = [jax.grad(lambda x, f=f: jnp.sum(jnp.tanh(f(x, w)) * target))(x)
             for f in (_masked_instance_norm, reference)]
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_layerdrop_in_training_mode_with_and_without_remat(remat):
    config = _small_config(num_hidden_layers=2, remat=remat, layerdrop=1.0)
    audio, mask = fam.batch(seed=4)
    audio, mask = audio[:, :2400], mask[:, :2400]
    params = fam.random_params(config, 2)

    def run(p, key):
        out = Wav2Vec2Encoder(config).apply({"params": p}, audio, mask, deterministic=False,
                                          rngs={"dropout": key})
        return jnp.mean(out.hidden_states[-1] ** 2), out.hidden_states

    (_, hidden), grads = jax.jit(jax.value_and_grad(run, has_aux=True))(params, jax.random.key(0))
    for h in hidden[1:]:  # LayerDrop 1.0: every layer is skipped
        np.testing.assert_array_equal(h, hidden[0])
    assert not np.any(grads["encoder"]["layers_0"]["feed_forward"]["output_dense"]["kernel"])

    config = dataclasses.replace(config, layerdrop=0.0)  # only dropout: layers run
    (_, hidden), _ = jax.value_and_grad(run, has_aux=True)(params, jax.random.key(0))
    assert not np.allclose(hidden[2], hidden[1])
