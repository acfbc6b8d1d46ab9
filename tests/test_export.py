"""Export: TensorFlow SavedModel (jax2tf), StableHLO (jax.export), Hugging Face encoder."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxser import export
from jaxser.data import synthetic
from jaxser.predict import Predictor
from jaxser.train.experiment import load_for_inference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch():
    """Three waveforms of different lengths (not multiples of 320), zero-padded."""
    rng = np.random.default_rng(0)
    speaker = synthetic.make_speakers(1, ["synth_de"], seed=5)[0]
    waves = [synthetic.synthesize_utterance(rng, np.eye(6)[i], speaker,
                                            synthetic.language_profile("synth_de"), s, 16000)
             for i, s in enumerate((1.7013, 0.61, 2.2))]
    lengths = np.asarray([len(w) for w in waves], np.int32)
    audio = np.zeros((3, lengths.max()), np.float32)
    for i, w in enumerate(waves):
        audio[i, :len(w)] = w
    return waves, audio, lengths


@pytest.fixture(scope="module")
def reference(tiny_workdir, batch):
    return Predictor.load(tiny_workdir / "train").probabilities(batch[0])


def test_savedmodel_matches_jaxser(tiny_workdir, batch, reference, tmp_path):
    import tensorflow as tf

    out = export.export_savedmodel(tiny_workdir / "train", tmp_path / "saved")
    assert (out / "saved_model.pb").exists()
    meta = json.loads((out / export.METADATA).read_text())
    assert meta["checkpoint_step"] == 2 and meta["max_seconds"] == 30.0
    loaded = tf.saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    _, audio, lengths = batch
    result = serve(waveform=tf.constant(audio), lengths=tf.constant(lengths))
    np.testing.assert_allclose(result["probs"].numpy(), reference["probs"], atol=1e-4)
    assert [s.decode() for s in loaded.labels.numpy()] == meta["labels"]
    frames, mask = result["frame_probs"].numpy(), result["frame_mask"].numpy()
    for i, expected in enumerate(reference["frame_probs"]):
        np.testing.assert_allclose(frames[i][mask[i]], expected, atol=1e-4)
    # Another batch size and length through the same signature, and the numpy loader.
    model = export.load_savedmodel(out)
    one = model(batch[0][1])
    np.testing.assert_allclose(one[0], reference["probs"][1], atol=1e-4)


def test_stablehlo_matches_jaxser(tiny_workdir, batch, reference, tmp_path):
    out = export.export_stablehlo(tiny_workdir / "train", tmp_path / "shlo")
    model = export.load_stablehlo(out)
    _, audio, lengths = batch
    np.testing.assert_allclose(model(audio, lengths), reference["probs"], atol=1e-4)
    assert model.labels == json.loads((out / export.METADATA).read_text())["labels"]


def test_export_encoder(tiny_workdir, tmp_path):
    import transformers

    from jaxser.models.pretrained import load_pretrained

    out = export.export_encoder(tiny_workdir / "train", tmp_path / "hf")
    assert (out / "model.safetensors").exists()
    assert transformers.AutoConfig.from_pretrained(out).model_type == "whisper"
    family, cfg, params = load_pretrained(out)
    exp, trained, _, _ = load_for_inference(tiny_workdir / "train")
    assert family == "whisper" and cfg.d_model == exp.enc_cfg.d_model
    expected = jax.device_get(trained["model"]["encoder"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b)),
                 params, expected)
