"""Output containers shared by all jaxser speech encoders (Whisper, HuBERT, wav2vec2).

Every encoder returns an :class:`EncoderOutput` so that heads and pooling code can treat them
alike.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax

log = logging.getLogger(__name__)


class EncoderOutput(NamedTuple):
    """What a speech encoder returns.

    Attributes:
        hidden_states: exactly Hugging Face's ``output_hidden_states``: the input embeddings
            followed by each transformer layer's output, each ``[batch, frames, embed]``. As in
            HF, the LAST element has the encoder's final layer norm applied (when the model has
            one after the layers).
        mask: ``[batch, frames]`` bool, True where the output frame is valid (not padding).
    """

    hidden_states: tuple[jax.Array, ...]
    mask: jax.Array
