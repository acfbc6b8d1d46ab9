"""A head trained on cached features, with its encoder put back: audio in, the head's
outputs out (what `jaxser predict` and `jaxser export` run for such a workdir).

The encoder computes, from the waveform, exactly the features extraction cached
(`cached.layer_features`: float32 masked means, or float16 frames), the same layer
selection the feature reader made (`cached.head_inputs`), then the trained head model
(`SERModel` over `CachedEncoder`). Parameters: {"encoder": the frozen encoder's,
"probe": the head model's, as trained}.

`family` and `encoder_cfg` are the real encoder's, so code that prepares audio for a
`SERModel` (`ser_model.features`, the eval step, the export function) prepares it for this
model unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn

from jaxser.models import cached, ser_model

log = logging.getLogger(__name__)


class ReattachedModel(nn.Module):
    """Encoder -> cached-style features -> the head model trained on them.

    Attributes:
        family: the encoder family (ser_model.ENCODER_FAMILIES).
        encoder_cfg: the encoder's config (as recorded by the extraction).
        probe: the head model (`SERModel` with family `features`).
        layers: the hidden states the head reads, in its order.
        stats: mean | mean_std (pooled features).
        frames: the head reads frames (else pooled statistics).
    """

    family: str
    encoder_cfg: Any
    probe: ser_model.SERModel
    layers: tuple[int, ...]
    stats: str = "mean"
    frames: bool = False

    @nn.compact
    def __call__(self, inputs, mask, *, deterministic: bool = True, grl_lambda=0.0):
        _, encoder_cls, _ = ser_model.ENCODER_FAMILIES[self.family]
        out = encoder_cls(self.encoder_cfg, name="encoder")(inputs, mask, deterministic=True)
        feats = cached.layer_features(out, self.stats,
                                      self.layers if self.frames else ())
        x, m = cached.head_inputs(feats, self.layers, self.stats, self.frames,
                                  tuple(range(len(self.layers))))
        return self.probe(x, m, deterministic=deterministic, grl_lambda=grl_lambda)
