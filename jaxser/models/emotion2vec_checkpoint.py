"""The released emotion2vec checkpoints, read from local files (nothing is downloaded).

Two layouts:

* emotion2vec_base as fairseq trained it (`emotion2vec_base.pt`): a torch checkpoint
  {"cfg": {"model": ..., "task": {"normalize": ...}}, "model": state dict};
* FunASR / ModelScope / Hugging Face folders (iic/emotion2vec_base, emotion2vec_plus_seed,
  _base, _large): `config.yaml` (`model: Emotion2vec`, `model_conf`), `model.pt` (the
  state dict, possibly under "state_dict" / "model_state_dict" / "model", as FunASR's
  `load_pretrained_model` accepts) and `tokens.txt` (the class names of emotion2vec+'s
  head, `proj`: "生气/angry", ..., "<unk>"). `configuration.json`'s `file_path_metas` may
  name other files.

`load_emotion2vec(path)` returns the encoder config, the encoder's Flax params and, for
emotion2vec+, the head: its labels (the English half of each token, "<unk>" as "unknown";
classes named "unuse..." are dropped, which equals FunASR's -inf logits for them) and the
weights of jaxser's `EmotionHead` on mean pooling: FunASR's inference is exactly
softmax(proj(mean over frames of the last hidden state)), so `ser_params` gives a SER model
that predicts emotion2vec+'s nine emotions without training.

`model.pt` files are read without torch: a restricted unpickler (like torch's
`weights_only`) that rebuilds tensors as NumPy arrays and stands in a placeholder for any
other class (fairseq's config enums and the like), so no code from the file runs.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import logging
import operator
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import yaml

from jaxser.models import convert
from jaxser.models.emotion2vec import Emotion2vecConfig

log = logging.getLogger(__name__)

# emotion2vec+'s classes in tokens.txt order (for a folder that lacks tokens.txt).
PLUS_LABELS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad",
               "surprised", "unknown")


@dataclasses.dataclass(frozen=True)
class Emotion2vecCheckpoint:
    """What `load_emotion2vec` reads: config, encoder params, and emotion2vec+'s head
    (labels, kernel [hidden, K], bias [K]) when the checkpoint has one."""

    config: Emotion2vecConfig
    params: dict[str, Any]
    labels: tuple[str, ...] = ()
    head_kernel: np.ndarray | None = None
    head_bias: np.ndarray | None = None

    @property
    def has_head(self) -> bool:
        return self.head_kernel is not None


# ----------------------------------------------------------------------------- torch files

_STORAGE_DTYPES = {
        "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
        "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
        "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
        "UntypedStorage": np.uint8,
}


class Opaque:
    """Stands in for any pickled object the reader does not rebuild (fairseq enums,
    argparse namespaces, optimizer classes...): it keeps the constructor arguments and state
    and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque{getattr(self, 'args', ())!r}"


def _storage_dtype(name: str):
    if name == "BFloat16Storage":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _STORAGE_DTYPES[name]


class _StorageType(str):
    """The name of a torch storage class (persistent ids refer to it)."""


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_: Any) -> np.ndarray:
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset])  # a 0-d array
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: tuple, _state: Any) -> Any:
    return func(*args)  # a tensor subclass or a tensor with attributes: the array inside


_ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice, ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return Opaque

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key = pid[0], pid[1], str(pid[2])
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key] = np.frombuffer(raw, _storage_dtype(str(storage_type)))
        return self.storages[key]


def read_torch_file(path: str | Path) -> Any:
    """The object `torch.save` wrote to `path` (zip format, torch >= 1.6), with every tensor
    as a NumPy array and every other class as an `Opaque`. Does not need torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip checkpoint (torch >= 1.6); load it with "
                         "torch and save it again with torch.save")
    with zipfile.ZipFile(path) as archive:
        pickles = sorted((n for n in archive.namelist() if n.endswith("data.pkl")), key=len)
        if not pickles:
            raise ValueError(f"{path}: no data.pkl inside, not a torch checkpoint")
        prefix = pickles[0][:-len("data.pkl")]
        with archive.open(pickles[0]) as f:
            return _Unpickler(f, archive, prefix).load()


def state_dict_of(obj: Any) -> dict[str, np.ndarray]:
    """The model weights of a loaded checkpoint, unwrapped as FunASR does ("state_dict",
    "model_state_dict", "model")."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"no state dict in the checkpoint (got {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


# ----------------------------------------------------------------------------- config


def _conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `feature_encoder_spec` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...")
    evaluated without eval: list/tuple literals, + and *."""
    ops = {ast.Add: operator.add, ast.Mult: operator.mul}

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"feature_encoder_spec {spec!r}: unsupported expression")

    layers = value(ast.parse(spec, mode="eval"))
    if not layers or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"feature_encoder_spec {spec!r} is not a list of (dim, kernel, stride)")
    return layers


def _get(conf: Mapping, key: str, default: Any) -> Any:
    """conf[key], with unresolved OmegaConf interpolations ("${...}") and None as default."""
    value = conf.get(key, default)
    return default if value is None or (isinstance(value, str) and "${" in value) else value


def config_from_model_conf(conf: Mapping[str, Any], normalize: bool | None = None,
                           **overrides: Any) -> Emotion2vecConfig:
    """The encoder config of FunASR's `model_conf` (config.yaml) or fairseq's `cfg.model`.

    normalize: fairseq keeps it in `cfg.task`; FunASR in `model_conf.normalize`. Raises
    ValueError for what the released models do not use and jaxser does not implement
    (pre-LN blocks, LayerNorms without parameters, learned ALiBi tables).
    """
    audio = conf.get("modalities", {}).get("audio", {})
    if conf.get("layer_norm_first", False):
        raise ValueError("emotion2vec: layer_norm_first=True (pre-LN blocks) is not supported")
    if not conf.get("norm_affine", True):
        raise ValueError("emotion2vec: norm_affine=False is not supported")
    if audio.get("learned_alibi", False):
        raise ValueError("emotion2vec: learned_alibi=True is not supported")
    if _get(conf, "end_drop_path_rate", 0.0) or _get(audio, "end_drop_path_rate", 0.0):
        log.warning("emotion2vec: drop path (stochastic depth) is not implemented; "
                    "fine-tuning runs without it")
    layers = _conv_spec(_get(audio, "feature_encoder_spec",
                             "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"))
    embed, heads = int(_get(conf, "embed_dim", 768)), int(_get(conf, "num_heads", 12))
    depth = int(_get(audio, "conv_pos_depth", 5))
    mode = _get(audio, "extractor_mode", "layer_norm")
    if mode not in ("layer_norm", "default"):
        raise ValueError(f"emotion2vec: extractor_mode {mode!r} is not layer_norm/default")
    if normalize is None:
        normalize = bool(_get(conf, "normalize", True))
    alibi_heads = int(_get(audio, "num_alibi_heads", heads))
    fields = dict(
            hidden_size=embed, num_attention_heads=heads,
            intermediate_size=int(embed * float(_get(conf, "mlp_ratio", 4.0))),
            num_prenet_layers=int(_get(audio, "prenet_depth", 4)),
            num_hidden_layers=int(_get(conf, "depth", 8)),
            layer_norm_eps=float(_get(conf, "norm_eps", 1e-5)),
            conv_dim=[d for d, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
            conv_stride=[s for _, _, s in layers],
            feat_extract_norm="layer" if mode == "layer_norm" else "group",
            conv_pos_layers=depth,
            conv_pos_kernel=max(3, int(_get(audio, "conv_pos_width", 95)) // depth),
            conv_pos_groups=int(_get(audio, "conv_pos_groups", 16)),
            conv_pos_pre_ln=bool(_get(audio, "conv_pos_pre_ln", False)),
            num_extra_tokens=int(_get(audio, "num_extra_tokens", 0)),
            alibi=bool(_get(audio, "use_alibi_encoder", False)),
            alibi_scale_per_layer=bool(_get(audio, "learned_alibi_scale_per_layer", False)),
            alibi_scale_per_head=bool(_get(audio, "learned_alibi_scale_per_head", False)),
            num_alibi_heads=alibi_heads if alibi_heads != heads else 0,
            normalize=bool(normalize),
            hidden_dropout=float(_get(conf, "encoder_dropout", 0.1)),
            attention_dropout=float(_get(conf, "attention_dropout", 0.1)),
            activation_dropout=float(_get(conf, "activation_dropout", 0.0)),
            post_mlp_dropout=float(_get(conf, "post_mlp_drop", 0.1)),
            prenet_dropout=float(_get(audio, "prenet_dropout", 0.0)),
            input_dropout=float(_get(conf, "dropout_input", 0.0)),
            layerdrop=float(_get(conf, "layerdrop", 0.0)),
            prenet_layerdrop=float(_get(audio, "prenet_layerdrop", 0.0)))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Emotion2vecConfig)})
    if unknown:
        raise ValueError(f"unknown Emotion2vecConfig fields in overrides: {unknown}")
    fields.update(overrides)
    return Emotion2vecConfig(**fields)


# ----------------------------------------------------------------------------- checkpoints


def is_emotion2vec(path: str | Path) -> bool:
    """True for a FunASR emotion2vec folder (config.yaml naming `Emotion2vec`) or a `.pt`
    file (taken for a fairseq emotion2vec checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".pt"
    config = path / "config.yaml"
    if not config.is_file():
        return False
    try:
        return str(yaml.safe_load(config.read_text()).get("model", "")).lower() == "emotion2vec"
    except (yaml.YAMLError, AttributeError):
        return False


def _english(token: str) -> str:
    return "unknown" if token == "<unk>" else token.split("/")[-1].strip()


def _labels(folder: Path, conf: Mapping[str, Any], metas: Mapping[str, Any],
            count: int) -> list[str]:
    token_file = metas.get("tokenizer_conf", {}).get("token_list", "tokens.txt")
    tokens = None
    for candidate in (folder / str(token_file), folder / "tokens.txt", folder / "tokens.json"):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
            tokens = (json.loads(text) if candidate.suffix == ".json"
                      else [line.strip() for line in text.splitlines() if line.strip()])
            break
    if tokens is None:
        listed = conf.get("tokenizer_conf", {}).get("token_list")
        tokens = listed if isinstance(listed, list) else None
    if tokens is None:
        if count != len(PLUS_LABELS):
            raise ValueError(f"{folder}: no tokens.txt for the {count} classes of the head")
        log.warning("%s: no tokens.txt; using emotion2vec+'s nine class names", folder)
        return list(PLUS_LABELS)
    if len(tokens) != count:
        raise ValueError(f"{folder}: {len(tokens)} tokens but the head has {count} classes")
    return [str(t) for t in tokens]


def load_emotion2vec(path: str | Path, **overrides: Any) -> Emotion2vecCheckpoint:
    """Reads a released emotion2vec checkpoint (module docstring) into jaxser.

    Args:
        path: a FunASR folder (config.yaml + model.pt [+ tokens.txt]) or a fairseq `.pt`.
        overrides: Emotion2vecConfig fields to set (dtype="bfloat16", remat=True, ...).
    Returns:
        An `Emotion2vecCheckpoint`; its `params` are `Emotion2vecEncoder`'s 'params'.
    """
    path = Path(path)
    metas: Mapping[str, Any] = {}
    if path.is_dir():
        if (path / "configuration.json").is_file():
            metas = json.loads((path / "configuration.json").read_text()).get(
                    "file_path_metas", {}) or {}
        conf_file = path / str(metas.get("config", "config.yaml"))
        if not conf_file.is_file():
            raise ValueError(f"no config.yaml in {path}")
        full = yaml.safe_load(conf_file.read_text()) or {}
        weights = path / str(metas.get("init_param", "model.pt"))
        if not weights.is_file():
            raise ValueError(f"no model.pt in {path}")
        model_conf, normalize = full.get("model_conf", {}), None
        state = state_dict_of(read_torch_file(weights))
    else:
        checkpoint = read_torch_file(path)
        cfg = checkpoint.get("cfg") if isinstance(checkpoint, Mapping) else None
        if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
            raise ValueError(f"{path}: no fairseq 'cfg' with the model config in the checkpoint")
        full, model_conf = {}, cfg["model"]
        task = cfg.get("task") if isinstance(cfg.get("task"), Mapping) else {}
        normalize = task.get("normalize")
        state = state_dict_of(checkpoint)
    config = config_from_model_conf(model_conf, normalize, **overrides)
    params = convert.params_from_torch(state, config, where=str(path))
    if "proj.weight" not in state:
        return Emotion2vecCheckpoint(config, params)
    kernel = np.asarray(state["proj.weight"], np.float32).T  # [hidden, K]
    bias = np.asarray(state["proj.bias"], np.float32)
    tokens = _labels(path if path.is_dir() else path.parent, full, metas, kernel.shape[1])
    keep = [i for i, t in enumerate(tokens) if not t.startswith("unuse")]
    return Emotion2vecCheckpoint(config, params, tuple(_english(tokens[i]) for i in keep),
                                 kernel[:, keep], bias[keep])


def ser_params(checkpoint: Emotion2vecCheckpoint, template: Mapping[str, Any]) -> dict[str, Any]:
    """The `params["model"]` of jaxser's SER model with emotion2vec+'s classifier.

    template: that SER model's params (abstract is enough: `jax.eval_shape` of its init),
    built with model.pooling='mean', model.head_hidden=0 (one linear layer) and as many
    classes as `checkpoint.labels`; the encoder and the head's layer are filled in.
    """
    if not checkpoint.has_head:
        raise ValueError("this emotion2vec checkpoint has no classifier (emotion2vec_base is "
                         "self-supervised only): fine-tune it with a jaxser config")
    head = nn.meta.unbox(template)["head"]
    kernels = [path for path, _ in jax.tree_util.tree_flatten_with_path(head)[0]
               if getattr(path[-1], "key", None) == "kernel"]
    if len(kernels) != 1:
        raise ValueError("emotion2vec+'s classifier is one linear layer: model.head_hidden=0")
    names = [str(getattr(k, "key", k)) for k in kernels[0][:-1]]
    layer = {"kernel": checkpoint.head_kernel, "bias": checkpoint.head_bias}
    for name in reversed(names):
        layer = {name: layer}
    return {"encoder": checkpoint.params, "head": layer}
