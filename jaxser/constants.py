"""Constants shared by every layer of jaxser."""

SAMPLE_RATE = 16000
"""The one sample rate of the whole package (Hz): prepare writes shards at it, every
encoder, the pipeline, prediction and export read audio at it."""
