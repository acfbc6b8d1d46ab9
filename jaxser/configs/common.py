"""What the experiment configs share, written once: the tiny encoder of every family and
the `smoke` variant built on it.

A `smoke` variant is the same experiment at toy size: a random tiny encoder, CPU-sized
batches and one epoch, so tests and `launch/local.sh` run it in seconds. Every config in
`configs/` calls `smoke(c, name)` for its `smoke` variant and then changes what is its own
(e.g. the domain head's width).
"""

from __future__ import annotations

import logging

from jaxser.config import ConfigDict

log = logging.getLogger(__name__)

# Encoder config fields of a random encoder that runs a step in milliseconds on CPU.
_TINY_WHISPER = dict(
    num_mel_bins=80,  # Whisper's 80 mel bins.
    d_model=32,  # Embedding width.
    encoder_layers=1,  # Transformer layers.
    encoder_attention_heads=2,  # Attention heads.
    encoder_ffn_dim=64,  # MLP width.
    max_source_positions=1500,  # 30 s, as Whisper.
)
_TINY_WAV2VEC2 = dict(  # HuBERT and wav2vec2 share the architecture.
    hidden_size=32,  # Embedding width.
    num_hidden_layers=1,  # Transformer layers.
    num_attention_heads=2,  # Attention heads.
    intermediate_size=64,  # MLP width.
    conv_dim=(32, 32, 32),  # Three conv layers instead of seven...
    conv_stride=(5, 2, 2),  # ... 20 samples per frame instead of 320.
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,  # Convolutional position embedding width.
    num_conv_pos_embedding_groups=4,
)
_TINY_EMOTION2VEC = dict(
    hidden_size=32,  # Embedding width.
    num_attention_heads=4,  # Attention heads.
    intermediate_size=64,  # MLP width.
    num_prenet_layers=1,  # Modality-specific blocks...
    num_hidden_layers=1,  # ... and shared blocks.
    conv_dim=(16, 16, 16),  # Three conv layers, 20 samples per frame.
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    conv_pos_layers=2,  # Convolutional positional encoder.
    conv_pos_kernel=3,
    conv_pos_groups=4,
    num_extra_tokens=2,
)
TINY_ENCODERS = {
    "whisper": _TINY_WHISPER,
    "hubert": _TINY_WAV2VEC2,
    "wav2vec2": _TINY_WAV2VEC2,
    "wavlm": dict(_TINY_WAV2VEC2, num_buckets=32,  # Relative position buckets.
                  max_bucket_distance=64),
    "data2vec_audio": dict(_TINY_WAV2VEC2, feat_extract_norm="layer", conv_bias=True,
                           num_conv_pos_embeddings=3,  # Positional conv layers...
                           conv_pos_kernel_size=5),  # ... and their kernel.
    "emotion2vec": _TINY_EMOTION2VEC,
}


def tiny_encoder(family: str) -> ConfigDict:
    """`model.encoder_overrides` of a tiny random encoder of `family`."""
    if family not in TINY_ENCODERS:
        raise ValueError(f"no tiny encoder for model.encoder {family!r}: "
                         f"{', '.join(TINY_ENCODERS)}")
    return ConfigDict(dict(TINY_ENCODERS[family]))


def smoke(c: ConfigDict, name: str) -> ConfigDict:
    """Turns config `c` (named `name`) into its `smoke` variant, for `c.model.encoder`'s
    family: a random tiny encoder and CPU-sized batches, trained for one epoch."""
    c.workdir = f"runs/{name}/smoke"
    c.data.dir = "runs/smoke/data"
    c.data.global_batch = 8  # One utterance per forced CPU device in tests.
    c.data.eval_batch = 8
    c.data.num_buckets = 1  # One compiled shape: faster tests.
    c.model.size = ""  # No preset: only the tiny encoder below.
    c.model.pretrained = ""  # Random initialisation.
    c.model.encoder_overrides = tiny_encoder(c.model.encoder)
    c.optim.lr = 1e-3  # A random tiny model needs a large rate.
    c.train.epochs = 1
    c.train.log_every = 1
    return c
