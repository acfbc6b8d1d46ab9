"""Experiment configs: the base ConfigDict every config file starts from, and loading.

A config file is a Python file with `get_config(arg=None)` returning an
`ml_collections.ConfigDict`; it imports `base_config()` from here and changes a few
fields. `load_config("configs/x.py:variant", ["--config.optim.lr=1e-4"])` loads it,
applies command-line overrides and locks it, so a typo or a wrong type fails at start,
naming the field and the closest valid names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import ml_collections

log = logging.getLogger(__name__)

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def base_config() -> ConfigDict:
    """Every field jaxser reads, with its default. Configs change a few of them."""
    c = ConfigDict()
    c.workdir = ""  # Checkpoints, logs and eval reports; running again on it resumes.
    c.seed = 0  # Seeds parameters, data order, augmentation and dropout.

    c.data = ConfigDict()
    c.data.dir = ""  # A prepared dataset (the --out of `jaxser prepare`).
    c.data.train_split = "train"  # Split trained on.
    c.data.eval_split = "validation"  # Split evaluated periodically (model selection).
    c.data.test_split = "test"  # Split of the final evaluation of the best checkpoint.
    c.data.global_batch = 16  # Utterances per global batch (fixed-batch mode).
    c.data.batch_seconds = 0.0  # Audio seconds per global batch (token budget); 0: fixed.
    c.data.buckets_seconds = ()  # Padded lengths in seconds; () derives them from data.
    c.data.num_buckets = 4  # How many buckets to derive when buckets_seconds is ().
    c.data.max_seconds = 0.0  # Crop longer utterances (random in training); 0: no crop.
    c.data.skip_corrupt = False  # Drop damaged records (warns, naming the files); False: stop.
    # Each epoch a class-balanced draw with replacement instead of every utterance once
    # (same batches per epoch, exact resume); not together with loss.weighted_ce.
    c.data.class_balanced = False
    c.data.eval_batch = 16  # Utterances per global evaluation batch.
    # A feature folder of `jaxser extract`: train the heads on the cached features of a
    # frozen encoder (no audio read, no encoder run); "": train on audio.
    c.data.features = ""
    # Cached hidden states the heads read (0: embeddings, -1: last); (): all of them with
    # model.layer_weighted_sum, else the last.
    c.data.feature_layers = ()
    c.data.feature_stats = "mean"  # Pooled features: mean | mean_std (extract.stats=mean_std).

    c.model = ConfigDict()
    c.model.encoder = "whisper"  # Encoder family: whisper | hubert | wav2vec2.
    c.model.size = ""  # A preset such as whisper-base or hubert-large; "" uses only overrides.
    c.model.encoder_overrides = ConfigDict()  # Encoder config fields changed from the preset.
    c.model.pretrained = ""  # A local Hugging Face checkpoint folder to start from.
    c.model.pooling = "mean"  # mean | attentive_stats | frame_attention | frame_logits.
    c.model.attention_heads = 16  # Heads of the frame_attention pooling module.
    c.model.layer_weighted_sum = False  # Learned weighted sum of all encoder layers (SUPERB).
    c.model.head_hidden = 0  # Hidden width of the emotion head; 0: linear head.
    c.model.dropout = 0.0  # Dropout before the emotion head.
    c.model.head_norm = False  # LayerNorm after the heads' hidden layer (before the ReLU).
    c.model.head_dropout = 0.0  # Dropout after the heads' hidden layer.
    # Dimensional head (arousal/valence/dominance, 0-1) on the pooled embedding beside the
    # emotion head; needs a data set with dimensions; trained by loss.ccc / loss.mse.
    c.model.dims_head = False
    c.model.dims_hidden = 0  # Hidden width of the dimensional head; 0: linear head.
    c.model.dims_activation = "none"  # Output activation: none | sigmoid | tanh.
    c.model.dtype = "auto"  # Compute: auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16.
    # Rematerialise each encoder layer in the backward pass: keeps only the layer inputs
    # (a scan over the layers; costs 20-30% step time and two copies of the layer weights).
    c.model.remat = False
    c.model.attention = "auto"  # auto (by backend) | einsum | blockwise | xla | cudnn.
    c.model.domain_head = False  # Domain-adversarial head on the corpus id (gradient reversal).
    c.model.domain_hidden = 256  # Hidden width of the domain head.

    c.loss = ConfigDict()
    c.loss.kl = 1.0  # Weight of KL(target || prediction).
    c.loss.cosine = 0.0  # Weight of 1 - cosine(prediction, target).
    c.loss.soft_ce = 0.0  # Weight of soft-target cross-entropy.
    c.loss.focal = 0.0  # Weight of the focal loss on soft targets.
    c.loss.focal_gamma = 2.0  # Focusing parameter of the focal loss.
    c.loss.center = 0.0  # Weight of the center loss on pooled embeddings.
    c.loss.supcon = 0.0  # Weight of the supervised contrastive loss.
    c.loss.supcon_temperature = 0.1  # Temperature of the supervised contrastive loss.
    c.loss.domain = 0.0  # Maximum gradient-reversal weight of the domain loss.
    c.loss.domain_schedule = "constant"  # Reversal weight schedule: constant | dann.
    # Cross-entropy with class weights N / (K n_k) from the training split's class counts.
    c.loss.weighted_ce = 0.0
    c.loss.ccc = 0.0  # Weight of 1 - CCC of the emotion dimensions (batch CCC, masked).
    c.loss.mse = 0.0  # Weight of the mean squared error of the emotion dimensions (0-1).
    # Weight of each dimension in loss.ccc and loss.mse (a dimension not listed: 1).
    c.loss.dim_weights = ConfigDict({"arousal": 1.0, "valence": 1.0, "dominance": 1.0})

    c.augment = ConfigDict()
    c.augment.waveform = False  # The seven waveform transforms (probabilities below).
    c.augment.p = 0.2  # Probability of each waveform transform per example.
    c.augment.specaugment = False  # Time and frequency masks on log-mel features.
    c.augment.time_masks = 2  # SpecAugment: number of time masks.
    c.augment.time_mask_width = 20  # SpecAugment: maximum width of a time mask (frames).
    c.augment.freq_masks = 2  # SpecAugment: number of frequency masks.
    c.augment.freq_mask_width = 10  # SpecAugment: maximum width of a frequency mask (bins).
    c.augment.mixup = "none"  # none | energy (energy-adaptive) | classic (Beta weights).
    c.augment.mixup_p = 1.0  # Probability of mixing each example (energy mixup).
    c.augment.mixup_alpha = 0.4  # Beta(alpha, alpha) of classic mixup.

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw | adam.
    c.optim.lr = 1e-4  # Peak learning rate.
    c.optim.weight_decay = 0.0  # Decoupled weight decay (adamw).
    c.optim.b1 = 0.9  # Adam beta1.
    c.optim.b2 = 0.999  # Adam beta2.
    c.optim.eps = 1e-8  # Adam epsilon.
    c.optim.schedule = "constant"  # constant | cosine | linear | epoch_decay.
    c.optim.warmup_steps = 0  # Linear warmup steps.
    c.optim.epoch_decay = 0.875  # Learning rate factor per epoch (schedule=epoch_decay).
    c.optim.clip_norm = 0.0  # Global gradient norm clip; 0: off.
    c.optim.grad_accum = 1  # Micro-batches per step; exact full-batch grads except SupCon (README).
    c.optim.freeze = ()  # Parameter path patterns (fnmatch) kept frozen, e.g. encoder/conv*.
    c.optim.unfreeze_after = 0  # Step at which frozen parameters start training; 0: never.
    c.optim.head_lr_scale = 1.0  # Learning-rate factor of the heads.
    c.optim.center_lr = 5e-3  # Learning rate of the center-loss centers.

    c.train = ConfigDict()
    c.train.epochs = 10  # Training epochs.
    c.train.max_steps = 0  # Stop after this many steps; 0: epochs decide.
    c.train.log_every = 10  # Steps between metric logs.
    c.train.eval_every = 0  # Steps between validation runs; 0: once per epoch.
    c.train.checkpoint_every = 0  # Steps between latest-checkpoint saves; 0: with evaluation.
    # Validation metric that picks the best checkpoint: kl, macro_f1, ccc_mean, ccc_arousal,
    # macro_f1_ccc (mean of macro-F1 and mean CCC), ...
    c.train.best_metric = "kl"
    c.train.best_tiebreak = ""  # Second validation metric that breaks ties; "": none.
    # Rows whose target argmax is tied (0.45/0.45) in WA/UA/F1: exclude (left out, counted
    # in tied_targets) | any (a prediction of any tied class is right) | first (taxonomy order).
    c.train.tie_rule = "exclude"
    c.train.keep_best = 1  # Best checkpoints kept.
    c.train.patience = 0  # Evaluations without improvement before stopping; 0: off.
    c.train.async_checkpoints = True  # Save checkpoints in the background.
    c.train.compilation_cache = "~/.cache/jaxser/xla"  # Persistent XLA compile cache; "": off.

    c.extract = ConfigDict()  # `jaxser extract`: what a feature folder keeps.
    c.extract.stats = "mean"  # Per-layer statistics over valid frames: mean | mean_std.
    c.extract.frame_layers = ""  # Layers whose frames are kept (float16): "" | all | last | "0,6".
    c.extract.max_seconds = 0.0  # Centre crop; 0: Whisper 30 s (one pass), others none.
    c.extract.batch = 0  # Utterances per global batch; 0: data.eval_batch.
    c.extract.chunk = 512  # Utterances per committed chunk (what an interruption loses).

    c.mesh = ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size; -1: all devices left over.
    c.mesh.fsdp = 1  # Axis over which parameters and optimizer state are sharded.
    c.mesh.tensor = 1  # Tensor-parallel axis (attention heads, MLP).
    # Logical axis name -> mesh axes; the model's layers carry the logical names.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("length", None),
        ("channels", None),
        ("num_mel", None),
        ("conv_kernel", None),
        ("classes", None),
        ("layers", None),
        ("norm", None),
    )
    return c


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"jaxser_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config()")
    return module


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _leaf_names(cfg: ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, ConfigDict):
            names.extend(_leaf_names(value, name + "."))
    return names


def _unknown_field(cfg: ConfigDict, dotted: str) -> ConfigError:
    close = difflib.get_close_matches(dotted, _leaf_names(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config field '{dotted}'{hint}")


def set_field(cfg: ConfigDict, dotted: str, value) -> None:
    """Sets `a.b.c` in cfg, refusing unknown fields and values of the wrong type."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node or not isinstance(node[part], ConfigDict):
            raise _unknown_field(cfg, dotted)
        node = node[part]
    if leaf not in node:
        if parents and parents[-1] == "encoder_overrides":
            with node.unlocked():  # Free-form: checked by the encoder's config class.
                node[leaf] = value
            return
        raise _unknown_field(cfg, dotted)
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if old is not None and not isinstance(old, ConfigDict) and type(value) is not type(old):
        raise ConfigError(
            f"config field '{dotted}' takes {type(old).__name__}, got {value!r} "
            f"({type(value).__name__})")
    node[leaf] = value


def parse_overrides(args: Sequence[str]) -> list[tuple[str, object]]:
    """`--config.a.b=v` or `--config.a.b v` pairs -> [(a.b, value)]."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --config.a.b=v")
        if "=" in arg:
            name, text = arg[len("--config."):].split("=", 1)
        elif i + 1 < len(args):
            name, text = arg[len("--config."):], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg} has no value")
        pairs.append((name, _parse_value(text)))
        i += 1
    return pairs


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py[:arg]`, applies `--config.x=y` overrides and locks the result."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return make_config(_load_module(path).get_config, arg, overrides)


def make_config(get_config, variant: str = "", overrides: Sequence[str] = ()) -> ConfigDict:
    """`get_config(variant)` of a config file, checked against `base_config()`, locked,
    with `--config.x=y` overrides applied (what `load_config` does after loading the file)."""
    cfg = get_config(variant) if variant else get_config()
    reference = base_config()
    unknown = [n for n in _leaf_names(cfg) if n not in _leaf_names(reference)
               and ".encoder_overrides." not in f".{n}"]
    if unknown:
        raise _unknown_field(reference, unknown[0])
    cfg.lock()
    for name, value in parse_overrides(overrides):
        set_field(cfg, name, value)
    return cfg


def config_to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ConfigDict:
    """Rebuilds a saved config (lists become tuples, as in the files)."""

    def fix(value):
        if isinstance(value, dict):
            return ConfigDict({k: fix(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(fix(v) for v in value)
        return value

    return fix(json.loads(text))
