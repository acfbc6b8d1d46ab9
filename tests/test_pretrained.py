"""Loading HF checkpoint folders into jaxser encoders and exporting them back."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxser.models import pretrained, wav2vec2, whisper

MAX_POS = 30


def _whisper_config(num_mel=80) -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
            num_mel_bins=num_mel, d_model=64, encoder_layers=2, encoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
            decoder_ffn_dim=128, max_source_positions=MAX_POS, max_target_positions=16,
            vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, num_labels=3, classifier_proj_size=16)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial biases and norms so that a wrong mapping cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def _features(num_mel=80, batch=2):
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 2 * MAX_POS, num_mel)).astype(np.float32)


def _torch_hidden(encoder: torch.nn.Module, x: np.ndarray):
    with torch.no_grad():
        out = encoder(torch.from_numpy(x.transpose(0, 2, 1)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def _jax_hidden(config, params, x):
    out = jax.jit(whisper.WhisperEncoder(config).apply)({"params": params}, x)
    return [np.asarray(h) for h in out.hidden_states]


def _assert_close(ours, theirs, atol=1e-4):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("cls_name,num_mel", [
        ("WhisperModel", 80),
        ("WhisperForConditionalGeneration", 128),
        ("WhisperForAudioClassification", 80),
])
def test_load_whisper_checkpoints(tmp_path, cls_name, num_mel):
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(_whisper_config(num_mel)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    family, config, params = pretrained.load_pretrained(tmp_path, attention="einsum")
    assert family == "whisper" and config.num_mel_bins == num_mel
    assert config.attention == "einsum"
    x = _features(num_mel)
    _assert_close(_jax_hidden(config, params, x), _torch_hidden(model.get_encoder(), x))


def test_load_pytorch_bin_and_bare_encoder(tmp_path):
    torch.manual_seed(1)
    model = transformers.WhisperModel(_whisper_config()).eval()
    _randomise(model)
    model.config.save_pretrained(tmp_path)
    torch.save(model.encoder.state_dict(), tmp_path / "pytorch_model.bin")  # bare keys
    _, config, params = pretrained.load_pretrained(tmp_path)
    x = _features()
    _assert_close(_jax_hidden(config, params, x), _torch_hidden(model.encoder, x))


def test_load_sharded_safetensors(tmp_path):
    torch.manual_seed(4)
    model = transformers.WhisperForConditionalGeneration(_whisper_config()).eval()
    _randomise(model)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, config, params = pretrained.load_pretrained(tmp_path)
    x = _features(batch=1)
    _assert_close(_jax_hidden(config, params, x), _torch_hidden(model.get_encoder(), x))


def test_load_bfloat16_safetensors(tmp_path):
    torch.manual_seed(2)
    model = transformers.WhisperModel(_whisper_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, config, params = pretrained.load_pretrained(tmp_path)
    ref = model.encoder.conv1.weight.detach().float().numpy().transpose(2, 1, 0)
    np.testing.assert_array_equal(params["conv1"]["kernel"], ref)
    assert params["conv1"]["kernel"].dtype == np.float32


def test_bad_checkpoint_lists_every_problem(tmp_path):
    torch.manual_seed(3)
    transformers.WhisperModel(_whisper_config()).save_pretrained(tmp_path)
    state = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del state["encoder.layers.1.fc2.bias"]
    del state["encoder.layer_norm.weight"]
    state["encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    state["encoder.conv1.weight"] = np.zeros((64, 80, 5), np.float32)
    state["decoder.whatever"] = np.zeros(2, np.float32)  # outside the encoder: ignored
    safetensors.numpy.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        pretrained.load_pretrained(tmp_path)
    msg = str(err.value)
    for needle in ("layers.1.fc2.bias", "layer_norm.weight", "layers.0.extra.weight",
                   "conv1.weight: checkpoint (64, 80, 5) != expected (64, 80, 3)"):
        assert needle in msg
    assert "decoder.whatever" not in msg


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        pretrained.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        pretrained.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match="model.safetensors"):
        pretrained.load_pretrained(tmp_path)


def test_export_loads_back_in_transformers(tmp_path):
    cfg = whisper.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                encoder_ffn_dim=128, max_source_positions=MAX_POS,
                                num_mel_bins=128)
    x = _features(128)
    variables = jax.jit(whisper.WhisperEncoder(cfg).init)(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a + 0.01, jax.device_get(variables["params"]))  # boxed
    out = pretrained.export_pretrained("whisper", cfg, params, tmp_path / "export",
                                       hf_overrides={"vocab_size": 100, "pad_token_id": 0,
                                                     "bos_token_id": 1, "eos_token_id": 2,
                                                     "decoder_start_token_id": 1})
    ours = _jax_hidden(cfg, jax.device_get(jax.tree.map(lambda a: a, params)), x)
    for cls_name in ("WhisperModel", "WhisperForAudioClassification"):
        model = getattr(transformers, cls_name).from_pretrained(out).eval()
        _assert_close(ours, _torch_hidden(model.get_encoder(), x))
    fe = transformers.WhisperFeatureExtractor.from_pretrained(out)
    assert fe.feature_size == 128
    family, cfg2, params2 = pretrained.load_pretrained(out)
    assert family == "whisper" and cfg2 == cfg
    _assert_close(_jax_hidden(cfg2, params2, x), ours, atol=1e-6)


def test_hubert_family_dispatch(tmp_path):
    kwargs = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                  conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                  num_conv_pos_embedding_groups=2, vocab_size=12)
    cases = [(transformers.HubertConfig, "HubertForSequenceClassification", "hubert"),
             (transformers.Wav2Vec2Config, "Wav2Vec2ForCTC", "wav2vec2")]
    audio = np.random.default_rng(0).standard_normal((1, 800)).astype(np.float32)
    for config_cls, cls_name, family in cases:
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(config_cls(**kwargs)).eval()
        folder = tmp_path / cls_name
        model.save_pretrained(folder)
        got_family, config, params = pretrained.load_pretrained(folder)
        assert got_family == family == config.family
        out = jax.jit(wav2vec2.Wav2Vec2Encoder(config).apply)({"params": params}, audio)
        with torch.no_grad():
            base = getattr(model, family)
            ref = base(torch.from_numpy(audio), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(np.asarray(out.hidden_states[-1]), ref[-1].numpy(),
                                   atol=1e-4)
        exported = pretrained.export_pretrained(family, config, params, tmp_path / f"x{family}")
        loaded = transformers.AutoModel.from_pretrained(exported).eval()
        with torch.no_grad():
            again = loaded(torch.from_numpy(audio), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(again[-1].numpy(), ref[-1].numpy(), atol=1e-5)
