"""Test set-up: 8 forced CPU devices for sharding tests, set before jax is imported."""

import os

# The sharding tests need exactly 8 devices: add the flag to any XLA_FLAGS already set.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# float32 parity tests (against PyTorch at 1e-4) need full-precision matmuls: on a GPU the
# default for float32 is TF32. A no-op on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiled steps are cached in a folder of this test session (the default config's
# ~/.cache/jaxser/xla is left alone); subprocesses of the tests inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxser-test-xla-")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """ROOT with corpus/, data/ and train/ (a 2-step frame_logits model), built once a session
    for the evaluation, prediction, export and notebook tests."""
    from jaxser import config as config_lib
    from jaxser.data import prepare, synthetic
    from jaxser.train import loop

    root = tmp_path_factory.getbasetemp() / "jaxser_tiny_workdir"
    if not (root / "DONE").exists():
        shutil.rmtree(root, ignore_errors=True)
        manifest = synthetic.generate_corpus(root / "corpus", num_speakers=6,
                                             utterances_per_speaker=4, seed=1)
        prepare.prepare([manifest], root / "data", split="speaker:60/20/20", workers=0,
                        progress=False)
        loop.train(config_lib.load_config(f"{DEMO_CONFIG}:smoke", [
            f"--config.workdir={root / 'train'}", f"--config.data.dir={root / 'data'}",
            "--config.train.max_steps=2", "--config.train.eval_every=2",
            "--config.data.num_buckets=1", "--config.model.pooling=frame_logits"]))
        (root / "DONE").write_text("ok")
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A tiny prepared dataset (20 train / 5 validation / 5 test), built once a session for
    the training tests (a test module may define its own `data_dir` instead)."""
    from _worker import prepared_data

    return prepared_data(tmp_path_factory)
