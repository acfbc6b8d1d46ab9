"""jaxser.accelerator (issue 20): dtype 'auto' per backend, the GPU-but-CPU warning, the
CUDA install target, the persistent compilation cache."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxser import accelerator

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("backend,expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                              ("cuda", "bfloat16"), ("rocm", "bfloat16"),
                                              ("tpu", "bfloat16"), ("METAL", "float32")])
def test_auto_dtype_resolves_per_backend(backend, expected):
    """(d) 'auto': bfloat16 compute on GPU/TPU, float32 on CPU (and unknown backends)."""
    assert accelerator.resolve_dtype("auto", backend) == expected


def test_explicit_dtypes_pass_through_and_unknown_names_fail(monkeypatch):
    for name in ("float32", "bfloat16", "float16"):
        assert accelerator.resolve_dtype(name, "gpu") == name
        assert accelerator.resolve_dtype(name, "cpu") == name
    with pytest.raises(ValueError, match="model.dtype"):
        accelerator.resolve_dtype("fp8", "gpu")
    assert accelerator.resolve_dtype("auto") == ("float32" if jax.default_backend() == "cpu"
                                                 else "bfloat16")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert accelerator.resolve_dtype("auto") == "bfloat16"


# ----------------------------------------------------------------------------- backend


def _fake_nvidia_smi(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return bin_dir


def test_warns_loudly_when_nvidia_smi_sees_a_gpu_but_jax_runs_on_cpu(tmp_path, monkeypatch,
                                                                      caplog):
    assert jax.default_backend() == "cpu"
    bin_dir = _fake_nvidia_smi(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-1234)"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with caplog.at_level(logging.INFO, logger=accelerator.__name__):
        info = accelerator.report_backend()
    assert info["cpu_while_gpu"] and info["gpus_seen"] == ["GPU 0: NVIDIA H200 (UUID: GPU-1234)"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "JAX IS RUNNING ON THE CPU" in text and "NVIDIA H200" in text
    assert "make install ACCEL=cuda" in text
    assert any("backend cpu" in r.getMessage() for r in caplog.records)  # backend + devices


@pytest.mark.parametrize("body", ["exit 9", 'echo "No devices were found"'])
def test_no_warning_without_a_gpu(tmp_path, monkeypatch, caplog, body):
    bin_dir = _fake_nvidia_smi(tmp_path, body)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with caplog.at_level(logging.INFO, logger=accelerator.__name__):
        assert not accelerator.report_backend()["cpu_while_gpu"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_nvidia_smi_on_path_is_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert accelerator.nvidia_smi_gpus() == []


# ----------------------------------------------------------------------------- install


def _pin(path: Path, name: str) -> str:
    for line in path.read_text().splitlines():
        m = re.match(rf"{re.escape(name)}(\[[\w-]+\])?==([\w.]+)", line.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"no {name} pin in {path}")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("accel,reqs", [("cuda", "requirements-cuda.txt"),
                                        ("cuda13", "requirements-cuda13.txt")])
def test_make_install_accel_installs_the_cuda_build_of_the_pinned_jax(accel, reqs):
    out = subprocess.run(["make", "-n", "-B", "install", f"ACCEL={accel}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    pip = [line for line in out.splitlines() if "pip install" in line and "-r" in line]
    assert pip and f"-r {reqs}" in pip[0] and "-r requirements.txt" in pip[0]
    assert f".installed-{accel}" in out  # its own stamp: a CPU install does not hide it
    version = _pin(ROOT / "requirements.txt", "jax")
    assert _pin(ROOT / "requirements.txt", "jaxlib") == version
    plugin = "jax-cuda12-plugin" if accel == "cuda" else "jax-cuda13-plugin"
    assert _pin(ROOT / reqs, "jax") == _pin(ROOT / reqs, plugin) == version


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_cpu_and_unknown_accel():
    out = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "requirements-cuda" not in out and ".venv/.installed" in out
    bad = subprocess.run(["make", "-n", "install", "ACCEL=rocm"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "ACCEL=rocm" in bad.stderr


def test_slurm_script_installs_the_cuda_build_once_before_the_tasks():
    text = (ROOT / "launch/slurm_gpu.sbatch").read_text()
    batch_step = text[text.index('if [[ -z ${JAXSER_SLURM_TASK:-} ]]'):text.index("exec srun")]
    assert 'make install ACCEL="${ACCEL:-cuda}"' in batch_step


# ----------------------------------------------------------------------------- cache

_CACHE_PROBE = """
import json, sys, time
import jax, jax.numpy as jnp
from jaxser import accelerator
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
accelerator.configure_compilation_cache(sys.argv[1], min_compile_secs=0)

def f(x):
    for i in range(40):  # enough ops for a compilation worth caching
        x = jnp.tanh(x @ x.T + i) * 0.5
    return x.sum()

t0 = time.perf_counter()
jax.jit(f).lower(jnp.ones((64, 64))).compile()
print(json.dumps({"compile_s": time.perf_counter() - t0, "hits": len(hits),
                  "dir": jax.config.jax_compilation_cache_dir}))
"""


def _probe(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(cache)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_second_identical_run_in_a_fresh_process_hits_the_compilation_cache(tmp_path):
    cache = tmp_path / "xla-cache"
    first = _probe(cache)
    entries = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    assert first["hits"] == 0 and first["dir"] == str(cache) and entries
    second = _probe(cache)
    assert second["hits"] >= 1
    assert second["compile_s"] < first["compile_s"]


def test_compilation_cache_dir_expansion_and_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert accelerator.compilation_cache_dir("~/c/xla") == tmp_path / "c" / "xla"
    assert accelerator.compilation_cache_dir("") is None
    previous = jax.config.jax_compilation_cache_dir
    try:
        assert accelerator.configure_compilation_cache("") is None
        assert jax.config.jax_compilation_cache_dir is None
        assert accelerator.configure_compilation_cache(str(tmp_path / "on")) == tmp_path / "on"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "on")
        assert (tmp_path / "on").is_dir()
    finally:
        accelerator.configure_compilation_cache(previous or "")


def test_base_config_has_a_cache_default_outside_the_workdir():
    from jaxser.config import base_config

    c = base_config()
    assert c.train.compilation_cache == accelerator.DEFAULT_COMPILATION_CACHE
    assert c.train.compilation_cache.startswith("~")


def test_the_model_builder_resolves_auto_on_this_backend(monkeypatch):
    """(d) model.dtype='auto' reaches the encoder as float32 on CPU, bfloat16 on a GPU."""
    from jaxser.config import base_config
    from jaxser.models import ser_model

    model = base_config().model
    assert model.dtype == "auto"
    model.size = "whisper-tiny"
    assert jax.default_backend() == "cpu"
    assert ser_model.encoder_config(model).dtype == "float32"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ser_model.encoder_config(model).dtype == "bfloat16"
    model.dtype = "float32"
    assert ser_model.encoder_config(model).dtype == "float32"


def test_the_environment_cache_dir_wins_over_the_default_only(tmp_path, monkeypatch):
    previous = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    try:
        used = accelerator.configure_compilation_cache(accelerator.DEFAULT_COMPILATION_CACHE)
        assert used == tmp_path / "env"
        assert accelerator.configure_compilation_cache(str(tmp_path / "cfg")) == tmp_path / "cfg"
        assert accelerator.configure_compilation_cache("") is None
    finally:
        accelerator.configure_compilation_cache(previous or "")
