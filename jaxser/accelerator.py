"""What the machine runs: the compute dtype for `model.dtype='auto'`, the backend report at
start (with a loud warning when a GPU is present but JAX runs on the CPU), and JAX's
persistent compilation cache.

A base module: it imports only jax and the standard library.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

log = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

# Backends whose matrix units run bfloat16 at full rate (and whose float32 matmuls are
# TF32/bf16-pass by default anyway): 'auto' computes in bfloat16 there.
_BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")

DEFAULT_COMPILATION_CACHE = "~/.cache/jaxser/xla"


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """The compute dtype name for config.model.dtype.

    'auto' is 'bfloat16' on GPU and TPU and 'float32' on CPU (and any other backend);
    explicit names pass through. Only the compute dtype changes: parameters, LayerNorm
    statistics, softmax, the pooled features, logits and losses stay float32.
    `backend` defaults to `jax.default_backend()`.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"model.dtype {name!r} not in {DTYPE_NAMES}")
    if name != "auto":
        return name
    backend = (backend or jax.default_backend()).lower()
    return "bfloat16" if backend in _BF16_BACKENDS else "float32"


def nvidia_smi_gpus(timeout: float = 10.0) -> list[str]:
    """The GPUs `nvidia-smi -L` lists ('GPU 0: NVIDIA H200 (UUID: ...)'); [] when there is
    no nvidia-smi on PATH or it fails (no driver, no GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]


def _cpu_while_gpu_message(gpus: list[str]) -> str:
    hidden = []
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu",):
        hidden.append("JAX_PLATFORMS=cpu is set")
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        hidden.append("CUDA_VISIBLE_DEVICES hides the GPUs")
    cause = ("; ".join(hidden) if hidden else
             "the installed jax has no CUDA plugin (requirements.txt pins the CPU build)")
    bar = "!" * 78
    return "\n".join([
        bar,
        f"JAX IS RUNNING ON THE CPU, BUT nvidia-smi SEES {len(gpus)} GPU(S):",
        *(f"    {g}" for g in gpus[:8]),
        f"Likely cause: {cause}.",
        "Training on the CPU is one to two orders of magnitude slower. Install the CUDA build",
        "of the pinned jax with `make install ACCEL=cuda` (requirements-cuda.txt; ACCEL=cuda13",
        "for CUDA 13 drivers), then check `python -c 'import jax; print(jax.devices())'`.",
        bar,
    ])


def report_backend(logger: logging.Logger | None = None) -> dict:
    """Logs JAX's backend and devices; warns loudly when `nvidia-smi` sees a GPU while JAX
    runs on the CPU. Returns {'backend', 'devices', 'local_devices', 'gpus_seen',
    'cpu_while_gpu'}."""
    logger = logger or log
    backend = jax.default_backend()
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in local})
    logger.info("jax %s backend %s: %d device(s) in all, %d local (%s)", jax.__version__,
                backend, jax.device_count(), len(local), ", ".join(kinds))
    gpus = nvidia_smi_gpus() if backend == "cpu" else []
    if gpus:
        logger.warning("%s", _cpu_while_gpu_message(gpus))
    return {"backend": backend, "devices": jax.device_count(), "local_devices": len(local),
            "gpus_seen": gpus, "cpu_while_gpu": bool(gpus)}


def compilation_cache_dir(path: str) -> Path | None:
    """The directory config.train.compilation_cache names ('~' and $VARS expanded);
    None for '' (off)."""
    if not path:
        return None
    return Path(os.path.expandvars(os.path.expanduser(path))).absolute()


def configure_compilation_cache(path: str, min_compile_secs: float | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at `path` ('' turns it off).

    Compiled executables (train and eval steps, every bucket) are written there and read
    back by later runs with the same program, jax/jaxlib version, flags and devices, so a
    second run skips compiling. The directory should be on a local disk, private to the
    user (the cache is trusted code). JAX caches only compilations that took at least
    `jax_persistent_cache_min_compile_time_secs` (1 s by default; `min_compile_secs`
    changes it). A directory that cannot be created turns the cache off with a warning.
    With the default `path` (DEFAULT_COMPILATION_CACHE), a JAX_COMPILATION_CACHE_DIR set
    in the environment wins; any other path in the config wins over it.
    Returns the directory in use, or None.
    """
    env_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path == DEFAULT_COMPILATION_CACHE and env_dir:
        path = env_dir
    directory = compilation_cache_dir(path)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("compilation cache off: cannot create %s (%s)", directory, e)
            directory = None
    wanted = None if directory is None else str(directory)
    if jax.config.jax_compilation_cache_dir != wanted:
        jax.config.update("jax_compilation_cache_dir", wanted)
        cc.reset_cache()  # JAX opens its cache once per process: reopen it at the new place
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    if wanted is not None:
        log.info("XLA compilation cache: %s", wanted)
    return directory
