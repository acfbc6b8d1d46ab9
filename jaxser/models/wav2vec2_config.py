"""The architecture of the wav2vec2-family encoders (HuBERT, wav2vec2, WavLM,
data2vec-audio) and their frame arithmetic.

`Wav2Vec2Config` keeps transformers' field names and meaning so that `from_hf(config.json)`
and `to_hf()` round-trip; `family` picks the checkpoint layout. The modules live in
`jaxser.models.frontend` (waveform -> frames -> model width, positional convolution) and
`jaxser.models.wav2vec2` (the transformer stack and the whole encoder); the torch
conversion in `jaxser.models.convert`.

Two layouts that Hugging Face ships:

* base models (`feat_extract_norm="group"`, `do_stable_layer_norm=False`): group norm on the
  first conv of the feature extractor only, post-LN transformer layers;
* large models (`feat_extract_norm="layer"`, `do_stable_layer_norm=True`): layer norm after
  every conv, pre-LN ("stable layer norm") transformer layers.

The families differ in a few places only: WavLM adds a gated relative position bias to
attention (`num_buckets`, `max_bucket_distance`; `jaxser.models.wavlm`); data2vec-audio has
layer norm after every conv, post-LN layers and a stack of `num_conv_pos_embeddings`
positional convolutions of width `conv_pos_kernel_size` (HF's names: for the other families
`num_conv_pos_embeddings` is the width of their single positional convolution).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxser.models.attention import IMPLEMENTATIONS
from jaxser.models.layers import ACTIVATIONS

log = logging.getLogger(__name__)

FAMILIES = ("hubert", "wav2vec2", "wavlm", "data2vec_audio")
# HF `model_type` of each family (config.json) and the bare model's class.
HF_MODEL_TYPES = {"hubert": "hubert", "wav2vec2": "wav2vec2", "wavlm": "wavlm",
                  "data2vec_audio": "data2vec-audio"}
HF_ARCHITECTURES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model",
                    "wavlm": "WavLMModel", "data2vec_audio": "Data2VecAudioModel"}

# HF config fields copied one to one (tuples become lists in `to_hf`), all families...
_HF_FIELDS = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout", "activation_dropout", "attention_dropout",
        "feat_proj_dropout", "layerdrop", "layer_norm_eps", "feat_extract_activation",
        "conv_dim", "conv_stride", "conv_kernel", "conv_bias", "num_conv_pos_embeddings",
        "num_conv_pos_embedding_groups",
)
# ... and those only some families' HF configs have.
_HF_FAMILY_FIELDS = {
        "hubert": ("feat_extract_norm", "do_stable_layer_norm", "feat_proj_layer_norm"),
        "wav2vec2": ("feat_extract_norm", "do_stable_layer_norm"),
        "wavlm": ("feat_extract_norm", "do_stable_layer_norm", "num_buckets",
                  "max_bucket_distance"),
        "data2vec_audio": ("conv_pos_kernel_size",),
}
# What a family's HF model always has (not a config field there).
_HF_FIXED = {
        "wav2vec2": {"feat_proj_layer_norm": True},
        "wavlm": {"feat_proj_layer_norm": True},
        "data2vec_audio": {"feat_extract_norm": "layer", "do_stable_layer_norm": False,
                           "feat_proj_layer_norm": True},
}
_TUPLE_FIELDS = ("conv_dim", "conv_stride", "conv_kernel")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Architecture of a wav2vec2-family encoder (HF field names) plus jaxser options.

    The HF fields keep transformers' names and meaning so that `from_hf(config.json)` works.
    jaxser fields: `family` (one of `FAMILIES`; see the module docstring), `dtype` (compute
    dtype, e.g.
    "bfloat16"), `param_dtype`, `remat` (rematerialise each transformer layer), `attention`
    (implementation for `dot_product_attention`: "auto", "einsum", "blockwise", "xla",
    "cudnn"), `pos_conv` (the positional convolution: "direct", "fft", or "auto": FFT on CPU,
    where XLA's 128-tap grouped convolution is >10x slower than PyTorch's, direct elsewhere)
    and `masked_group_norm` (padding-invariant group norm, see `jaxser.models.frontend`)
    and `masked_pos_conv` (data2vec-audio: zero the padded frames between its positional
    convolutions, which makes the stack padding-invariant; False computes what transformers
    computes).
    """

    family: str = "hubert"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    num_buckets: int = 320  # WavLM: relative-position buckets
    max_bucket_distance: int = 800  # WavLM: distance of the last (logarithmic) bucket
    conv_pos_kernel_size: int = 19  # data2vec-audio: width of each positional convolution
    # jaxser options.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"
    pos_conv: str = "auto"
    masked_group_norm: bool = True
    masked_pos_conv: bool = True

    def __post_init__(self):
        for name in _TUPLE_FIELDS:  # Lists (from JSON) become tuples so the config is hashable.
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides: Any) -> Wav2Vec2Config:
        """Builds a config from a HF `config.json` dict (or a transformers config object).

        Raises ValueError for model types other than those in `FAMILIES`, for HF features
        this encoder does not implement (adapters, batch-norm position conv) and for unknown
        override names.
        """
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        model_type = hf_config.get("model_type")
        families = {t: f for f, t in HF_MODEL_TYPES.items()}
        if model_type not in families:
            raise ValueError(f"model_type {model_type!r} is not one of {sorted(families)}")
        family = families[model_type]
        if hf_config.get("conv_pos_batch_norm", False):
            raise ValueError("conv_pos_batch_norm=True is not supported")
        if hf_config.get("add_adapter", False):
            raise ValueError("add_adapter=True (wav2vec2 output adapter) is not supported")
        if hf_config.get("adapter_attn_dim") is not None:
            raise ValueError("adapter_attn_dim (MMS attention adapters) is not supported")
        defaults = cls(**_defaults(family))
        names = _HF_FIELDS + _HF_FAMILY_FIELDS[family]
        kwargs = {name: hf_config.get(name, getattr(defaults, name)) for name in names}
        kwargs.update(_HF_FIXED.get(family, {}), family=family)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown Wav2Vec2Config fields in overrides: {unknown}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of the matching bare model (`HF_ARCHITECTURES`).

        `mask_time_prob` and `mask_feature_prob` are 0: jaxser has no `masked_spec_embed`
        (augmentation lives elsewhere), so the exported model must not expect one.
        """
        out: dict[str, Any] = {
                "model_type": HF_MODEL_TYPES[self.family],
                "architectures": [HF_ARCHITECTURES[self.family]],
        }
        for name in _HF_FIELDS + _HF_FAMILY_FIELDS[self.family]:
            value = getattr(self, name)
            out[name] = list(value) if name in _TUPLE_FIELDS else value
        out["num_feat_extract_layers"] = len(self.conv_dim)
        out["mask_time_prob"] = 0.0
        out["mask_feature_prob"] = 0.0
        return out


def _defaults(family: str) -> dict[str, Any]:
    """The fields a family's HF config leaves at values other than jaxser's defaults."""
    if family == "data2vec_audio":
        return {"family": family, "feat_extract_norm": "layer", "num_conv_pos_embeddings": 5}
    return {"family": family}


def _validate(cfg: Wav2Vec2Config) -> None:
    """Raises ValueError naming the first inconsistent field of `cfg`."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"family {cfg.family!r} is not one of {FAMILIES}")
    validate_conv_stack(cfg)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}")
    if cfg.hidden_size % cfg.num_conv_pos_embedding_groups:
        raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {cfg.num_conv_pos_embedding_groups}")
    for name in ("hidden_act", "feat_extract_activation"):
        if getattr(cfg, name) not in ACTIVATIONS:
            raise ValueError(f"{name} {getattr(cfg, name)!r} is not one of {sorted(ACTIVATIONS)}")
    for name, value in _HF_FIXED.get(cfg.family, {}).items():
        if getattr(cfg, name) != value:
            raise ValueError(f"{cfg.family} always has {name}={value!r}, got "
                             f"{getattr(cfg, name)!r}")
    if cfg.family == "wavlm" and not 4 <= cfg.num_buckets < 2 * cfg.max_bucket_distance:
        raise ValueError(f"num_buckets {cfg.num_buckets} must be at least 4 and below "
                         f"2 * max_bucket_distance ({cfg.max_bucket_distance})")
    if cfg.family == "data2vec_audio" and cfg.num_conv_pos_embeddings < 1:
        raise ValueError("data2vec_audio needs num_conv_pos_embeddings >= 1 (positional "
                         f"convolutions), got {cfg.num_conv_pos_embeddings}")
    validate_runtime(cfg)


def validate_conv_stack(cfg: Any) -> None:
    """Raises ValueError for a bad conv feature extractor (`feat_extract_norm`, `conv_*`)
    of a wav2vec2-family or emotion2vec config."""
    if cfg.feat_extract_norm not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm {cfg.feat_extract_norm!r} is not 'group' or 'layer'")
    if not len(cfg.conv_dim) == len(cfg.conv_stride) == len(cfg.conv_kernel) > 0:
        raise ValueError(
                f"conv_dim {cfg.conv_dim}, conv_stride {cfg.conv_stride} and conv_kernel "
                f"{cfg.conv_kernel} must have the same non-zero length")


def validate_runtime(cfg: Any) -> None:
    """Raises ValueError for a bad `attention`, `pos_conv`, `dtype` or `param_dtype` of a
    wav2vec2-family or emotion2vec config."""
    if cfg.attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention {cfg.attention!r} is not one of {IMPLEMENTATIONS}")
    if cfg.pos_conv not in ("auto", "direct", "fft"):
        raise ValueError(f"pos_conv {cfg.pos_conv!r} is not auto/direct/fft")
    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(cfg, name))
        except TypeError as e:
            raise ValueError(f"{name} {getattr(cfg, name)!r} is not a dtype") from e


def _size(family, hidden, layers, heads, mlp, norm, conv_bias, stable) -> Wav2Vec2Config:
    return Wav2Vec2Config(**{
            **_defaults(family), "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": mlp,
            "feat_extract_norm": norm, "conv_bias": conv_bias, "do_stable_layer_norm": stable})


# The published sizes (facebook/*, microsoft/wavlm-* checkpoints on the Hub), for random
# init and benchmarks; a checkpoint folder brings its own config.json.
WAV2VEC2_SIZES: dict[str, Wav2Vec2Config] = {
        "hubert-base": _size("hubert", 768, 12, 12, 3072, "group", False, False),
        "hubert-large": _size("hubert", 1024, 24, 16, 4096, "layer", True, True),
        "hubert-xlarge": _size("hubert", 1280, 48, 16, 5120, "layer", True, True),
        "wav2vec2-base": _size("wav2vec2", 768, 12, 12, 3072, "group", False, False),
        "wav2vec2-large": _size("wav2vec2", 1024, 24, 16, 4096, "group", False, False),
        "wav2vec2-large-lv60": _size("wav2vec2", 1024, 24, 16, 4096, "layer", True, True),
        "wav2vec2-xls-r-300m": _size("wav2vec2", 1024, 24, 16, 4096, "layer", True, True),
        "wavlm-base": _size("wavlm", 768, 12, 12, 3072, "group", False, False),
        "wavlm-base-plus": _size("wavlm", 768, 12, 12, 3072, "group", False, False),
        "wavlm-large": _size("wavlm", 1024, 24, 16, 4096, "layer", True, True),
        "data2vec-audio-base": _size("data2vec_audio", 768, 12, 12, 3072, "layer", False, False),
        "data2vec-audio-large": _size("data2vec_audio", 1024, 24, 16, 4096, "layer", False,
                                      False),
}


# ----------------------------------------------------------------------------- lengths, masks


def feature_lengths(config: Wav2Vec2Config | Any, lengths):
    """Frames the conv feature extractor makes from `lengths` samples (HF's formula).

    Works on Python ints, NumPy and JAX arrays (jittable). Lengths shorter than the receptive
    field give 0 or negative numbers, as in transformers.
    """
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        lengths = (lengths - kernel) // stride + 1
    return lengths


def frame_mask(config: Wav2Vec2Config, sample_lengths: jax.Array, num_frames: int) -> jax.Array:
    """[batch, num_frames] bool, True for the frames inside each utterance.

    Equals HF's `_get_feature_vector_attention_mask` (given the number of valid samples)
    except for utterances shorter than the receptive field (400 samples for the usual conv
    stack): HF's index arithmetic wraps around and marks *every* frame valid there, here no
    frame is valid.
    """
    frames = feature_lengths(config, jnp.asarray(sample_lengths))
    return jnp.arange(num_frames)[None, :] < frames[:, None]


def min_samples(config: Wav2Vec2Config | Any) -> int:
    """The fewest samples that give one frame (the conv stack's receptive field)."""
    n = 1
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride),
                              strict=True):
        n = (n - 1) * stride + kernel
    return n
