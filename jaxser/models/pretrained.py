"""Import and export of Hugging Face encoder checkpoints (local folders, no downloads).

`load_pretrained(folder)` reads `config.json` and the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`) of a Whisper, HuBERT or wav2vec2
checkpoint, keeps the encoder's weights only (decoder, heads and classifiers are ignored) and
converts them to the Flax params of jaxser's encoder. Every missing or unexpected encoder key
and every shape mismatch is reported at once in one ValueError.

`export_pretrained(...)` writes the inverse: a folder that transformers loads.
- Whisper: `config.json` (a full WhisperConfig; the decoder mirrors the encoder's sizes unless
  `hf_overrides` say otherwise), `model.safetensors` with `encoder.*` keys only, and
  `preprocessor_config.json`. `WhisperModel`/`WhisperForAudioClassification.from_pretrained`
  load the encoder and initialise the absent decoder/projector/classifier (transformers warns
  about these missing weights).
- HuBERT / wav2vec2: `config.json` and `model.safetensors` of a bare `HubertModel` /
  `Wav2Vec2Model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxser.models import whisper

FAMILIES = ("whisper", "hubert", "wav2vec2")

# Prefixes under which the Whisper encoder sits in the task models (first match wins); keys
# outside them (decoder, proj_out, projector, classifier, layer_weights) are ignored. The
# wav2vec2 family's converter (jaxser.models.hubert.params_from_torch) strips and checks its own.
_WHISPER_PREFIXES = ("model.encoder.", "encoder.")


def _hubert():
    """The wav2vec2-family module (imported lazily: written separately, heavy to trace)."""
    from jaxser.models import hubert

    return hubert


# ----------------------------------------------------------------------------------------------
# Reading


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors -> numpy; bfloat16 files (which safetensors.numpy rejects) via ml_dtypes."""
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except TypeError:
        pass
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    header.pop("__metadata__", None)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + start:base + end], dtypes[info["dtype"]]).reshape(
                info["shape"])
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    import torch  # only for legacy .bin checkpoints

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """All weights of a HF checkpoint folder as numpy arrays, keyed as in the torch model."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(folder / shard))
        return state
    if legacy.exists():
        return _read_torch_bin(legacy)
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                     f"in {folder}")


def _family_of(hf_config: dict[str, Any], folder: Path) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{folder}/config.json: model_type {model_type!r} is not one of "
                         f"{FAMILIES}")
    return model_type


def whisper_encoder_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Whisper encoder's weights with encoder-relative keys (task-model prefixes stripped).

    A checkpoint with no key under the prefixes is a bare WhisperEncoder: all keys are kept.
    """
    for prefix in _WHISPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def check_state_dict(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                     where: str = "checkpoint") -> None:
    """Raises ONE ValueError listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} != expected {expected[k]}"
                        for k in set(state) & set(expected)
                        if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{where} does not fit the encoder config:\n  " + "\n  ".join(problems))


def load_pretrained(path: str | Path, **overrides: Any) -> tuple[str, Any, dict]:
    """Reads a local HF checkpoint folder into jaxser's encoder.

    Args:
        path: folder with `config.json` and weights of WhisperModel,
            WhisperForConditionalGeneration, WhisperForAudioClassification, HubertModel,
            HubertForSequenceClassification, Wav2Vec2Model or Wav2Vec2ForCTC.
        overrides: jaxser config fields to set (e.g. dtype="bfloat16", variable_length=True).
    Returns:
        (family, encoder config, params) where params is the encoder module's 'params'
        collection (numpy arrays): `encoder.apply({"params": params}, ...)`.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ValueError(f"no config.json in {folder}")
    hf_config = json.loads(config_file.read_text())
    family = _family_of(hf_config, folder)
    state = read_state_dict(folder)
    if family == "whisper":
        config = whisper.WhisperConfig.from_hf(hf_config, **overrides)
        state = whisper_encoder_state_dict(state)
        check_state_dict(state, whisper.torch_shapes(config), where=str(folder))
        return family, config, whisper.params_from_torch(state, config)
    hubert = _hubert()
    config = hubert.HubertConfig.from_hf(hf_config, **overrides)
    return family, config, hubert.params_from_torch(state, config)  # checks keys itself


# ----------------------------------------------------------------------------------------------
# Writing


def _save_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    import safetensors.numpy

    state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})


def export_pretrained(family: str, config: Any, params: dict, out_dir: str | Path,
                      hf_overrides: dict[str, Any] | None = None) -> Path:
    """Writes a HF checkpoint folder of the encoder (see the module docstring for what loads).

    Args:
        family: "whisper", "hubert" or "wav2vec2".
        config: the jaxser encoder config.
        params: the encoder's 'params' collection (boxed or not, on device or numpy).
        out_dir: folder to create (existing files are overwritten).
        hf_overrides: extra HF config fields (e.g. the original decoder sizes, id2label).
    Returns:
        The folder.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} not in {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(nn.meta.unbox(params))
    if family == "whisper":
        state = {f"encoder.{k}": v for k, v in whisper.params_to_torch(params, config).items()}
        architecture = "WhisperModel"
    else:
        state = dict(_hubert().params_to_torch(params, config))
        architecture = "HubertModel" if family == "hubert" else "Wav2Vec2Model"
    hf = {**config.to_hf(), **(hf_overrides or {})}
    hf.pop("architectures", None)
    model_type = hf.pop("model_type", family)
    hf_config = transformers.AutoConfig.for_model(model_type, **hf)
    hf_config.architectures = [architecture]
    hf_config.save_pretrained(out)
    _save_safetensors(state, out / "model.safetensors")
    if family == "whisper":
        transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out
