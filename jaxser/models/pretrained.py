"""Import and export of Hugging Face encoder checkpoints (local folders, no downloads).

`load_pretrained(folder)` reads `config.json` and the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`) of a Whisper, HuBERT, wav2vec2, WavLM
or data2vec-audio checkpoint, keeps the encoder's weights only (decoder, heads and
classifiers are ignored) and converts them to the Flax params of jaxser's encoder through
`jaxser.models.convert` (the one place for torch <-> Flax conversion). Every missing or
unexpected encoder key and every shape mismatch is reported at once in one ValueError. This
module is the one place that reads and writes HF folders.

`export_pretrained(...)` writes the inverse: a folder that transformers loads.
- Whisper: `config.json` (a full WhisperConfig; the decoder mirrors the encoder's sizes unless
  `hf_overrides` say otherwise), `model.safetensors` with `encoder.*` keys only, and
  `preprocessor_config.json`. `WhisperModel`/`WhisperForAudioClassification.from_pretrained`
  load the encoder and initialise the absent decoder/projector/classifier (transformers warns
  about these missing weights).
- HuBERT / wav2vec2 / WavLM / data2vec-audio: `config.json` and `model.safetensors` of a
  bare `HubertModel` / `Wav2Vec2Model` / `WavLMModel` / `Data2VecAudioModel`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxser.models import convert, emotion2vec_checkpoint
from jaxser.models.wav2vec2_config import HF_ARCHITECTURES, HF_MODEL_TYPES, Wav2Vec2Config
from jaxser.models.whisper import WhisperConfig

log = logging.getLogger(__name__)

FAMILIES = ("whisper", *HF_MODEL_TYPES)  # whisper, hubert, wav2vec2, wavlm, data2vec_audio
# config.json's model_type -> family.
_MODEL_TYPES = {"whisper": "whisper", **{t: f for f, t in HF_MODEL_TYPES.items()}}

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
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"{folder}/config.json: model_type {model_type!r} is not one of "
                         f"{sorted(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def load_pretrained(path: str | Path, **overrides: Any) -> tuple[str, Any, dict]:
    """Reads a local HF checkpoint folder into jaxser's encoder.

    Args:
        path: folder with `config.json` and weights of WhisperModel,
            WhisperForConditionalGeneration, WhisperForAudioClassification, HubertModel,
            HubertForSequenceClassification, Wav2Vec2Model, Wav2Vec2ForCTC, WavLMModel,
            WavLMForSequenceClassification, WavLMForCTC, Data2VecAudioModel or
            Data2VecAudioForSequenceClassification (any model with that encoder); or an
            emotion2vec checkpoint (FunASR folder with config.yaml + model.pt, or fairseq
            `.pt`: `jaxser.models.emotion2vec_checkpoint`, its classifier left out).
        overrides: jaxser config fields to set (e.g. dtype="bfloat16", variable_length=True).
    Returns:
        (family, encoder config, params) where params is the encoder module's 'params'
        collection (numpy arrays): `encoder.apply({"params": params}, ...)`.
    """
    folder = Path(path)
    if emotion2vec_checkpoint.is_emotion2vec(folder):  # a FunASR folder or a fairseq .pt
        checkpoint = emotion2vec_checkpoint.load_emotion2vec(folder, **overrides)
        return "emotion2vec", checkpoint.config, checkpoint.params
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ValueError(f"no config.json in {folder}")
    hf_config = json.loads(config_file.read_text())
    family = _family_of(hf_config, folder)
    state = read_state_dict(folder)
    if family == "whisper":
        config = WhisperConfig.from_hf(hf_config, **overrides)
    else:
        config = Wav2Vec2Config.from_hf(hf_config, **overrides)
    return family, config, convert.params_from_torch(state, config, where=str(folder))


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
        family: one of `FAMILIES`.
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
    state = convert.params_to_torch(params, config)
    if family == "whisper":  # WhisperModel keeps its encoder under `encoder.`
        state = {f"encoder.{k}": v for k, v in state.items()}
        architecture = "WhisperModel"
    else:
        architecture = HF_ARCHITECTURES[family]
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
