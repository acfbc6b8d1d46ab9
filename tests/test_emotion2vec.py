"""emotion2vec(+) against FunASR's own PyTorch modules (CPU, float32).

The reference is FunASR's model source from the installed `funasr` wheel
(requirements-test.txt), loaded without running `funasr/__init__.py`, which imports every
FunASR model and its runtime (modelscope, kaldiio, ffmpeg probing...: ~10 s and dozens of
swallowed import errors). `_load_funasr()` puts empty package shells for `funasr`,
`funasr.models`, `funasr.models.emotion2vec` and `funasr.utils` in `sys.modules`, pointing
at the wheel's folders, so only `funasr/register.py`, `funasr/utils/amp.py` and
`funasr/models/emotion2vec/*.py` run (they need torch and omegaconf); the audio-file
loader `funasr.utils.load_utils` becomes a pass-through for in-memory waveforms. Nothing is
vendored; funasr is a test requirement, so its absence is an error, not a skip.

Random weights are written in the released layouts by the reference model itself: a
fairseq emotion2vec_base `.pt` ({"cfg": {"model", "task"}, "model": state dict}, with
data2vec's decoder and a pickled fairseq-style enum) and a FunASR emotion2vec+ folder
(config.yaml, model.pt, tokens.txt, 9-class `proj` head). Hidden states of FunASR come
from forward hooks (the prenet's LayerNorm, then every block), one utterance at a time as
FunASR's `inference` runs; jaxser runs the padded batch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch  # noqa: E402  (a test requirement)
import yaml

from jaxser import cli
from jaxser import config as config_lib
from jaxser.constants import SAMPLE_RATE
from jaxser.models import convert, emotion2vec_checkpoint, ser_model
from jaxser.models.emotion2vec import (
    EMOTION2VEC_SIZES,
    Emotion2vecConfig,
    Emotion2vecEncoder,
    alibi_slopes,
    input_features,
    param_shapes,
)
from jaxser.models.pretrained import load_pretrained

torch.set_num_threads(1)  # Tiny models; threads only fight the other processes on the CPU.

LENGTHS = (5200, 3100, 4432)  # samples: ~0.2-0.33 s, at most 35 frames of the tiny stack
TOKENS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
          "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]
ATOL = 1e-4


# ----------------------------------------------------------------------------- the reference


def _load_funasr():
    """FunASR's emotion2vec model module, imported from the installed wheel's files without
    its package __init__ (module docstring)."""
    spec = importlib.util.find_spec("funasr")  # finds the package, runs nothing
    if spec is None or importlib.util.find_spec("omegaconf") is None:
        raise ImportError("funasr and omegaconf (requirements-test.txt) are needed: make install")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (("funasr", ""), ("funasr.models", "models"),
                         ("funasr.models.emotion2vec", "models/emotion2vec"),
                         ("funasr.utils", "utils")):
        shell = types.ModuleType(name)
        shell.__path__ = [str(root / folder)]
        sys.modules[name] = shell
    loader = types.ModuleType("funasr.utils.load_utils")
    # FunASR's loader returns tensors as they are and turns arrays into tensors.
    loader.load_audio_text_image_video = lambda data, **_: [
            x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x)) for x in data]
    sys.modules["funasr.utils.load_utils"] = loader
    return importlib.import_module("funasr.models.emotion2vec.model")


@pytest.fixture(scope="module")
def funasr():
    saved = {k: v for k, v in sys.modules.items() if k == "funasr" or k.startswith("funasr.")}
    try:
        yield _load_funasr()  # The shells stay while the module's models are built (lazy imports).
    finally:
        for key in [k for k in sys.modules if k == "funasr" or k.startswith("funasr.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def model_conf(embed: int = 32, heads: int = 4, depth: int = 2, **audio) -> dict:
    """A tiny FunASR `model_conf` with every field FunASR reads (the released config.yaml
    has the same keys, at 768/1024 wide)."""
    audio_conf = dict(
            type="AUDIO", prenet_depth=2, prenet_layerdrop=0.0, prenet_dropout=0.1,
            start_drop_path_rate=0.0, end_drop_path_rate=0.0, num_extra_tokens=3,
            init_extra_token_zero=False, mask_noise_std=0.01, mask_prob_min=None,
            mask_prob=0.7, inverse_mask=False, mask_prob_adjust=0.0, keep_masked_pct=0.0,
            mask_length=5, add_masks=False, remove_masks=False, mask_dropout=0.0,
            encoder_zero_mask=True, mask_channel_prob=0.0, mask_channel_length=64,
            ema_local_encoder=False, local_grad_mult=1.0, use_alibi_encoder=True,
            alibi_scale=1.0, learned_alibi=False, alibi_max_pos=None, learned_alibi_scale=True,
            learned_alibi_scale_per_head=True, learned_alibi_scale_per_layer=False,
            num_alibi_heads=heads, model_depth=depth, decoder=None, extractor_mode="layer_norm",
            feature_encoder_spec="[(16, 10, 5)] + [(16, 3, 2)] * 2", conv_pos_width=6,
            conv_pos_groups=4, conv_pos_depth=2, conv_pos_pre_ln=False)
    audio_conf.update(audio)
    return dict(
            loss_beta=0.0, loss_scale=None, depth=depth, start_drop_path_rate=0.0,
            end_drop_path_rate=0.0, num_heads=heads, norm_eps=1e-5, norm_affine=True,
            encoder_dropout=0.1, post_mlp_drop=0.1, attention_dropout=0.1,
            activation_dropout=0.0, dropout_input=0.0, layerdrop=0.05, embed_dim=embed,
            mlp_ratio=4.0, layer_norm_first=False, average_top_k_layers=depth,
            end_of_block_targets=False, clone_batch=1, normalize=True,
            modalities={"audio": audio_conf})


DECODER = dict(decoder_dim=16, decoder_groups=4, decoder_kernel=3, decoder_layers=2,
               input_dropout=0.1, add_positions_masked=False, add_positions_all=False,
               decoder_residual=True, projection_layers=1, projection_ratio=2.0)

# name: (layout, FunASR model_conf). "base": emotion2vec_base's fairseq layout (shared per-
# head ALiBi scales, data2vec's decoder in the file); "plus": an emotion2vec+ FunASR folder
# with the other options the released code has (per-layer ALiBi scales on 2 of 4 heads,
# group-norm feature extractor, LayerNorm before the positional convs, even kernel).
CASES = {
        "base": ("fairseq", model_conf(decoder=DECODER)),
        "plus": ("funasr", model_conf(learned_alibi_scale_per_layer=True, num_alibi_heads=2,
                                      extractor_mode="default", conv_pos_pre_ln=True,
                                      conv_pos_width=8)),
}


@dataclasses.dataclass
class Released:
    path: Path  # the .pt file or the folder, as released
    model: object  # FunASR's Emotion2vec holding the same weights


def _randomise(model, seed: int) -> None:
    """Non-trivial norms, biases, ALiBi scales (some negative: FunASR clamps them at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("bias") or "alibi_scale" in key or (
                    "local_encoder" in key and param.ndim == 1):
                param.add_(0.5 * torch.randn(param.shape, generator=gen))


def _write(funasr, name: str, folder: Path) -> Released:
    layout, conf = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    plus = layout == "funasr"
    # As FunASR's AutoModel builds it: model_conf plus the vocabulary size of the tokens.
    model = funasr.Emotion2vec(model_conf=conf, vocab_size=len(TOKENS) if plus else -1).eval()
    _randomise(model, sum(map(ord, name)))
    state = model.state_dict()
    if not plus:  # fairseq's checkpoint: config as a dict (with an enum object), weights.
        from funasr.models.emotion2vec.modules import Modality

        path = folder / "emotion2vec_base.pt"
        cfg = {"model": {**conf, "_name": "data2vec_multi", "supported_modality": Modality.AUDIO},
               "task": {"_name": "audio_pretraining", "normalize": True}}
        torch.save({"cfg": cfg, "model": state, "optimizer_history": [{"num_updates": 7}]},
                   path)
        return Released(path, model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
            "model": "Emotion2vec", "model_conf": conf, "tokenizer": "CharTokenizer",
            "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True}},
            allow_unicode=True), encoding="utf-8")
    (folder / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    torch.save(state, folder / "model.pt")
    return Released(folder, model)


@pytest.fixture(scope="module", params=list(CASES))
def released(request, funasr, tmp_path_factory) -> Released:
    return _write(funasr, request.param, tmp_path_factory.mktemp(request.param))


def _funasr_outputs(model, wave: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """FunASR on one utterance as its `inference` runs it: F.layer_norm over the waveform,
    extract_features; returns every hidden state (extra tokens cut) and proj's logits."""
    audio = model.modality_encoders["AUDIO"]
    blocks = [*audio.context_encoder.blocks, *model.blocks]
    states = []
    hooks = [audio.context_encoder.norm.register_forward_hook(
            lambda _m, _i, out: states.append(out))]
    hooks += [b.register_forward_hook(lambda _m, _i, out: states.append(out[0]))
              for b in blocks]
    try:
        with torch.no_grad():
            source = torch.from_numpy(wave)[None]
            source = torch.nn.functional.layer_norm(source, source.shape)
            x = model.extract_features(source, padding_mask=None)["x"]
            logits = model.proj(x.mean(dim=1))[0].numpy() if model.proj is not None else None
    finally:
        for hook in hooks:
            hook.remove()
    extra = audio.modality_cfg.num_extra_tokens
    states = [s[0, extra:].numpy() for s in states]
    np.testing.assert_array_equal(states[-1], x[0].numpy())
    return states, logits


# ----------------------------------------------------------------------------- jaxser side


def _batch(seed: int = 0, garbage: bool = True):
    """Audio [3, max] (padding garbage unless told) and the valid lengths."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((len(LENGTHS), max(LENGTHS))).astype(np.float32)
    valid = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
    audio = np.where(valid, audio, 9.0 if garbage else 0.0).astype(np.float32)
    return audio, np.array(LENGTHS)


@functools.cache
def _jitted(config: Emotion2vecConfig):
    model = Emotion2vecEncoder(config)
    return jax.jit(lambda p, audio, lengths: model.apply(
            {"params": p}, *input_features(config, audio, lengths)))


def test_hidden_states_and_head_match_funasr_on_a_padded_batch(released):
    checkpoint = emotion2vec_checkpoint.load_emotion2vec(released.path)
    config = checkpoint.config
    assert config.num_prenet_layers == 2 and config.num_extra_tokens == 3
    audio, lengths = _batch()
    out = _jitted(config)(checkpoint.params, audio, lengths)
    assert len(out.hidden_states) == config.num_layers + 1
    if checkpoint.has_head:
        model_cfg = config_lib.base_config().model
        model_cfg.encoder, model_cfg.pooling = "emotion2vec", "mean"
        model, _ = ser_model.build_model(model_cfg, len(checkpoint.labels), 1, config)
        inputs = input_features(config, audio, lengths)
        template = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
        params = emotion2vec_checkpoint.ser_params(checkpoint, template)
        logits = jax.jit(model.apply)({"params": params}, *inputs)["logits"]
    for row, n in enumerate(LENGTHS):
        states, ref_logits = _funasr_outputs(released.model, audio[row, :n])
        frames = len(states[0])
        assert int(out.mask[row].sum()) == frames
        for layer, (ours, ref) in enumerate(zip(out.hidden_states, states, strict=True)):
            np.testing.assert_allclose(np.asarray(ours[row, :frames]), ref, rtol=0, atol=ATOL,
                                       err_msg=f"utterance {row}, hidden state {layer}")
        if checkpoint.has_head:
            np.testing.assert_allclose(np.asarray(logits[row]), ref_logits, rtol=0, atol=ATOL)
    assert checkpoint.has_head == (released.path.is_dir())


def test_padding_invariance(released):
    """An utterance gives the same hidden states alone, in a batch, and in another batch
    with more padding (other garbage in it) and other neighbours."""
    checkpoint = emotion2vec_checkpoint.load_emotion2vec(released.path)
    run = functools.partial(_jitted(checkpoint.config), checkpoint.params)
    audio, lengths = _batch(seed=3)
    batch = run(audio, lengths)
    rng = np.random.default_rng(4)
    more = rng.standard_normal((len(LENGTHS), max(LENGTHS) + 640)).astype(np.float32) * 50
    more[:, :max(LENGTHS)] = np.where(np.arange(max(LENGTHS)) < lengths[::-1, None],
                                      audio[::-1], more[:, :max(LENGTHS)])
    other = run(more, lengths[::-1])
    short = int(np.argmin(lengths))
    alone = run(audio[short:short + 1, :lengths[short]], lengths[short:short + 1])
    for row in range(len(LENGTHS)):
        frames = int(batch.mask[row].sum())
        assert int(other.mask[len(LENGTHS) - 1 - row].sum()) == frames
        for a, b in zip(batch.hidden_states, other.hidden_states, strict=True):
            np.testing.assert_allclose(np.asarray(b[len(LENGTHS) - 1 - row, :frames]),
                                       np.asarray(a[row, :frames]), rtol=0, atol=ATOL)
        if row == short:
            assert alone.mask.shape == (1, frames)
            for a, b in zip(alone.hidden_states, batch.hidden_states, strict=True):
                np.testing.assert_allclose(np.asarray(b[row, :frames]), np.asarray(a[0]),
                                           rtol=0, atol=ATOL)


def test_jaxser_predict_gives_funasrs_probabilities(funasr, tmp_path, capsys):
    released = _write(funasr, "plus", tmp_path / "emotion2vec_plus_tiny")
    rng = np.random.default_rng(11)
    files = []
    for i, n in enumerate((6000, 3900)):
        wave = (0.3 * rng.standard_normal(n)).clip(-1, 1)
        files.append(tmp_path / f"clip{i}.wav")
        soundfile.write(files[-1], wave, SAMPLE_RATE, subtype="PCM_16")
    assert cli.main(["predict", "--pretrained", str(released.path), *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    english = [emotion2vec_checkpoint._english(t) for t in TOKENS]

    class Tokenizer:  # What FunASR's CharTokenizer gives `inference`: the token list.
        token_list = TOKENS

    for path, row in zip(files, rows, strict=True):
        wave = soundfile.read(path, dtype="int16")[0].astype(np.float32) / 32768.0
        with torch.no_grad():  # As FunASR's AutoModel.inference calls it.
            results, _ = released.model.inference([torch.from_numpy(wave)], key=["x"],
                                                  tokenizer=Tokenizer(), device="cpu",
                                                  extract_embedding=False)
        assert results[0]["labels"] == TOKENS
        assert list(row["distribution"]) == english
        np.testing.assert_allclose([row["distribution"][k] for k in english],
                                   results[0]["scores"], rtol=0, atol=ATOL)
        assert row["top"] == english[int(np.argmax(results[0]["scores"]))]


# ----------------------------------------------------------------------------- the rest


def test_released_layouts_load_through_load_pretrained(released):
    family, config, params = load_pretrained(released.path, dtype="bfloat16")
    assert family == "emotion2vec" and config.dtype == "bfloat16"
    assert config.alibi_scale_per_layer == (released.path.is_dir())
    expected = param_shapes(config)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, expected)


def test_state_dict_wrappers_and_unused_classes(funasr, tmp_path):
    released = _write(funasr, "plus", tmp_path / "plus")
    state = torch.load(released.path / "model.pt", weights_only=True)
    torch.save({"state_dict": state, "epoch": 3}, released.path / "model.pt")
    tokens = [*TOKENS[:5], "unuse_5", *TOKENS[6:]]
    (released.path / "tokens.txt").write_text("\n".join(tokens), encoding="utf-8")
    checkpoint = emotion2vec_checkpoint.load_emotion2vec(released.path)
    assert checkpoint.labels == ("angry", "disgusted", "fearful", "happy", "neutral", "sad",
                                 "surprised", "unknown")
    weight = state["proj.weight"].numpy()
    np.testing.assert_array_equal(checkpoint.head_kernel, np.delete(weight, 5, axis=0).T)


def test_torch_files_are_read_without_running_their_code(tmp_path):
    """The restricted reader rebuilds tensors (views, dtypes, parameters, scalars) and puts a
    placeholder for other classes instead of importing them."""
    base = torch.arange(12.0).reshape(3, 4)
    tagged = torch.ones(3)
    tagged.note = "attribute"  # pickled through _rebuild_from_type_v2
    tensors = {"t": base.t(), "view": base[1:, 2:], "half": base.half(), "bf16": base.bfloat16(),
               "long": torch.arange(5), "param": torch.nn.Parameter(torch.ones(2)),
               "scalar": torch.tensor(3.5), "tagged": tagged}
    torch.save({"model": tensors, "args": types.SimpleNamespace(a=1)}, tmp_path / "x.pt")
    loaded = emotion2vec_checkpoint.read_torch_file(tmp_path / "x.pt")
    for key, tensor in tensors.items():
        np.testing.assert_array_equal(np.asarray(loaded["model"][key], np.float32),
                                      tensor.detach().float().numpy())
    assert isinstance(loaded["args"], emotion2vec_checkpoint.Opaque)
    assert set(emotion2vec_checkpoint.state_dict_of(loaded)) == set(tensors)
    (tmp_path / "old.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="zip"):
        emotion2vec_checkpoint.read_torch_file(tmp_path / "old.pt")


def test_conversion_errors_list_every_problem(released):
    state = emotion2vec_checkpoint.state_dict_of(
            emotion2vec_checkpoint.read_torch_file(
                    released.path / "model.pt" if released.path.is_dir() else released.path))
    config = emotion2vec_checkpoint.load_emotion2vec(released.path).config
    state.pop("blocks.1.mlp.fc1.bias")
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-1]
    state["modality_encoders.AUDIO.surprise"] = np.zeros(3)
    with pytest.raises(ValueError) as info:
        convert.params_from_torch(state, config)
    message = str(info.value)
    for part in ("encoder.layers.1.mlp.fc1.bias", "encoder.layers.0.attention.qkv.weight",
                 "modality_encoders.AUDIO.surprise"):
        assert part in message


def test_config_from_model_conf_and_presets():
    released_like = model_conf(embed=768, heads=12, depth=8, prenet_depth=4, num_extra_tokens=10,
                               feature_encoder_spec="[(512, 10, 5)] + [(512, 3, 2)] * 4 + "
                               "[(512,2,2)] + [(512,2,2)]", conv_pos_width=95,
                               conv_pos_groups=16, conv_pos_depth=5, num_alibi_heads="${x}")
    config = emotion2vec_checkpoint.config_from_model_conf(released_like)
    assert config == dataclasses.replace(EMOTION2VEC_SIZES["base"], layerdrop=0.05)
    assert config.conv_pos_kernel == 19 and config.alibi_heads == 12
    with pytest.raises(ValueError, match="unsupported"):
        emotion2vec_checkpoint.config_from_model_conf(
                model_conf(feature_encoder_spec="__import__('os')"))
    with pytest.raises(ValueError, match="layer_norm_first"):
        emotion2vec_checkpoint.config_from_model_conf({**model_conf(), "layer_norm_first": True})
    with pytest.raises(ValueError, match="conv_pos_groups"):
        Emotion2vecConfig(hidden_size=30, num_attention_heads=3)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    assert len(alibi_slopes(12)) == 12
    large = EMOTION2VEC_SIZES["large"]
    assert (large.hidden_size, large.num_layers) == (1024, 24)


def _tiny(**overrides) -> Emotion2vecConfig:
    return Emotion2vecConfig(
            hidden_size=32, num_attention_heads=4, intermediate_size=64, num_prenet_layers=1,
            num_hidden_layers=2, conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3),
            conv_stride=(5, 2, 2), conv_pos_layers=2, conv_pos_kernel=3, conv_pos_groups=4,
            num_extra_tokens=2, **overrides)


def _abstract(config: Emotion2vecConfig) -> dict:
    return jax.eval_shape(Emotion2vecEncoder(config).init, jax.random.key(0),
                          jnp.zeros((1, 2000)))


def _random_params(config: Emotion2vecConfig, seed: int = 1) -> dict:
    """Random params from the abstract tree (compiling `init` would cost seconds)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        value = rng.normal(0.0, 0.2, shape.shape)
        one = path[-1].key in ("scale", "alibi_scale")
        return (value + 1.0 if one else value).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(_abstract(config))["params"])


def test_every_parameter_has_logical_axis_names():
    config = _tiny(alibi_scale_per_layer=True, feat_extract_norm="group", conv_pos_pre_ln=True)
    variables = _abstract(config)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_bfloat16_remat_dropout_and_attention_paths():
    config = _tiny()
    params = _random_params(config)
    audio, lengths = _batch(seed=5, garbage=False)
    audio, lengths = audio[:, :2400], np.minimum(lengths, 2400 - 300 * np.arange(3))
    ref = _jitted(config)(params, audio, lengths)
    valid = np.asarray(ref.mask)
    bf16 = _jitted(dataclasses.replace(config, dtype="bfloat16"))(params, audio, lengths)
    assert bf16.hidden_states[-1].dtype == jnp.bfloat16
    for a, b in zip(bf16.hidden_states, ref.hidden_states, strict=True):
        a, b = np.asarray(a, np.float32)[valid], np.asarray(b)[valid]
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05
    # jax.nn's attention with the bias, the direct positional conv: the same numbers.
    other = _jitted(dataclasses.replace(config, attention="xla", pos_conv="direct"))(
            params, audio, lengths)
    np.testing.assert_allclose(np.asarray(other.hidden_states[-1])[valid],
                               np.asarray(ref.hidden_states[-1])[valid], atol=1e-5)

    x, mask = input_features(config, audio, lengths)

    def loss(blocks, cfg):  # Grads of the (rematerialised) blocks only: no conv backward.
        out = Emotion2vecEncoder(cfg).apply({"params": {**params, **blocks}}, x, mask)
        return sum(jnp.mean(jnp.where(out.mask[..., None], h, 0) ** 2)
                   for h in out.hidden_states)

    blocks = {k: params[k] for k in ("prenet", "encoder")}
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v_ref, g_ref = grad(blocks, config)
    v_remat, g_remat = grad(blocks, dataclasses.replace(config, remat=True))
    np.testing.assert_allclose(v_remat, v_ref, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale),
                 g_remat, g_ref)

    train = jax.jit(lambda p, k: Emotion2vecEncoder(config).apply(
            {"params": p}, x, mask, deterministic=False, rngs={"dropout": k}))
    a, b = train(params, jax.random.key(5)), train(params, jax.random.key(6))
    assert np.all(np.isfinite(np.asarray(a.hidden_states[-1])))
    assert not np.allclose(np.asarray(a.hidden_states[-1]), np.asarray(b.hidden_states[-1]))


@pytest.mark.slow
def test_fine_tuning_from_a_released_checkpoint_with_another_config(funasr, tmp_path):
    """An existing recipe with model.encoder=emotion2vec and model.pretrained=<folder>: the
    released encoder is put in place under another pooling and head, and a train step runs
    on 8 devices."""
    from jaxser.train.experiment import Experiment

    released = _write(funasr, "plus", tmp_path / "plus")
    cfg = config_lib.load_config("configs/em2ldl_hubert.py", [
            "--config.model.encoder=emotion2vec", f"--config.model.pretrained={released.path}",
            "--config.model.pooling=attentive_stats", "--config.model.head_hidden=16",
            "--config.model.layer_weighted_sum=True", "--config.optim.lr=1e-3"])
    labels = ["neutral", "happy", "sad", "angry"]
    exp = Experiment(cfg, labels, ["synth"], steps_per_epoch=10)
    loaded = emotion2vec_checkpoint.load_emotion2vec(released.path).params
    rng = np.random.default_rng(0)
    lengths = rng.integers(3000, 6000, 8).astype(np.int32)
    audio = np.where(np.arange(6000) < lengths[:, None], rng.normal(0, 0.1, (8, 6000)), 0)
    label = rng.dirichlet(np.ones(len(labels)), 8).astype(np.float32)
    batch = {"audio": audio.astype(np.float32), "length": lengths, "label": label,
             "class_index": label.argmax(-1).astype(np.int32),
             "domain": np.zeros(8, np.int32), "valid": np.ones(8, np.float32)}
    with exp.mesh_context():
        state, shardings = exp.init_state(jax.random.key(0))
        before = jax.device_get(state.params["model"]["encoder"])
        jax.tree.map(np.testing.assert_array_equal, before, loaded)
        state, metrics = exp.train_step(shardings)(state, exp.device_batch(batch),
                                                   jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params["model"]["encoder"])
    assert not np.array_equal(after["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
                              before["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
