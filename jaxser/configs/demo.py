"""The demo: a small Whisper-style encoder learning emotion distributions from the
built-in synthetic corpus (what `jaxser demo` and `make demo` run). EM2LDL-style
objective: masked mean pooling, linear head, log-softmax, KL + 0.3 * (1 - cosine), best
epoch by validation KL.

Variant `smoke` (`--config configs/demo.py:smoke`, `jaxser demo --fast`) runs in seconds
on CPU for tests. `configs/demo.py` is this file for `jaxser train --config`.
"""

from jaxser.config import ConfigDict, base_config
from jaxser.configs import common


def get_config(variant: str = "") -> ConfigDict:
    c = base_config()
    c.workdir = "runs/demo"  # Checkpoints, logs and eval reports.
    c.data.dir = "runs/demo/data"  # Prepared by `jaxser demo` (or `jaxser prepare`).
    c.data.global_batch = 16  # Utterances per step.
    c.data.eval_batch = 32  # Utterances per evaluation batch.

    c.model.encoder = "whisper"  # A Whisper-style encoder on log-mel features.
    c.model.encoder_overrides.num_mel_bins = 80  # Whisper's 80 mel bins.
    c.model.encoder_overrides.d_model = 128  # Small: trains in minutes on 2 CPU cores.
    c.model.encoder_overrides.encoder_layers = 2  # Transformer layers.
    c.model.encoder_overrides.encoder_attention_heads = 4  # Attention heads.
    c.model.encoder_overrides.encoder_ffn_dim = 512  # MLP width.
    c.model.encoder_overrides.max_source_positions = 1500  # 30 s, as Whisper.
    c.model.pooling = "mean"  # Masked mean over valid frames.

    c.loss.kl = 1.0  # KL(target || prediction).
    c.loss.cosine = 0.3  # + 0.3 * (1 - cosine), as EM2LDL.

    c.optim.name = "adamw"  # AdamW.
    c.optim.lr = 1e-3  # A small model from scratch takes a large rate.
    c.optim.weight_decay = 1e-4  # Light decoupled weight decay.
    c.optim.schedule = "cosine"  # Cosine decay after warmup.
    c.optim.warmup_steps = 30  # Linear warmup.
    c.optim.clip_norm = 1.0  # Global gradient clipping.

    c.train.epochs = 30  # Passes over the training split.
    c.train.log_every = 10  # Steps between logged metrics.
    c.train.best_metric = "kl"  # Lowest validation KL picks the best checkpoint.

    if variant == "smoke":  # The demo's own workdir and data; the tiny shared encoder.
        c.model.encoder_overrides = common.tiny_encoder("whisper")
        c.data.global_batch = 8
        c.train.epochs = 2
        c.train.log_every = 2
        c.optim.warmup_steps = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/demo.py: smoke")
    return c
