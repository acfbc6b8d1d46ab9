"""Shared helpers of the training benchmarks (`bench/train_step.py`, `bench/epoch.py`).

- the machine and its load (`machine`, `load_average`, `wait_for_quiet`), printed with
  every result, because on a shared CPU the figures mean little without them;
- timing statistics (`stats`) and a counter of XLA compilations (`CompileCounter`);
- the two models of the comparison, built from one preset name: jaxser's `SERModel`
  (encoder + masked mean pool + linear head, the trainer's own encoder config) and the
  same architecture in PyTorch transformers (`WhisperEncoder` or `HubertModel`, mean
  pool, `nn.Linear`), with every dropout and LayerDrop off on both sides so that the two
  do the same work in every step;
- the loss both sides train with: KL(target || softmax(logits)), batch mean.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxser.constants import SAMPLE_RATE

HOP = 160  # Whisper log-mel hop: 100 frames per second
NUM_CLASSES = 8
LR = 1e-4
WEIGHT_DECAY = 0.01

# bf16/fp32 dense peak FLOP/s of accelerators with a known peak (per chip), for MFU.
PEAK_FLOPS = {
        "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
        "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
        "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
        "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
        "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
        "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
        "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
        "NVIDIA A100": {"bfloat16": 312e12, "float32": 19.5e12},
}

# Dropouts of the wav2vec2 family switched off in the benchmarks (both frameworks).
_HUBERT_NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                          feat_proj_dropout=0.0, layerdrop=0.0)


# ----------------------------------------------------------------------------- machine


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
    return tuple(round(x, 2) for x in os.getloadavg())


# ISA extensions that decide which kernels XLA:CPU (Eigen, oneDNN, YNNPACK) and PyTorch
# (oneDNN, MKL) can use, as /proc/cpuinfo spells them.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq",
              "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
              "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def _microarchitecture(vendor: str, family: int | None, model: int | None) -> str | None:
    """A best-effort core name from the CPUID family/model (None when not in this table).

    Hypervisors often hide the marketing name ("AMD EPYC" only); family/model still tell
    the generation, which decides the vector units (e.g. Zen 4 runs 512-bit AVX-512 as two
    256-bit halves, Zen 5 and Intel Xeons natively; only Intel Xeons since Sapphire Rapids
    have AMX).
    """
    if family is None or model is None:
        return None
    if vendor == "AuthenticAMD":
        if family == 0x17:
            return "Zen 2" if model >= 0x30 else "Zen / Zen+"
        if family == 0x19:
            return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
        if family == 0x1A:
            return "Zen 5"
    if vendor == "GenuineIntel" and family == 6:
        return {0x55: "Skylake-SP / Cascade Lake", 0x6A: "Ice Lake-SP", 0x6C: "Ice Lake-D",
                0x8F: "Sapphire Rapids", 0xCF: "Emerald Rapids", 0xAD: "Granite Rapids",
                0xAF: "Sierra Forest"}.get(model)
    return None


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU the figures come from: vendor, model name, family/model, ISA extensions.

    Read from `cpuinfo` (first processor), else `lscpu`, else `platform`. `isa`:
    `avx2` (bool), `avx512` and `amx` (the variants present, /proc/cpuinfo spelling), and
    `flags` (every extension of `_ISA_FLAGS` present). On a machine where nothing can be
    read the fields are None / empty rather than guessed.
    """
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # first processor only
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if not fields.get("model name"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True,
                                 check=False).stdout
            for line in out.splitlines():
                key, _, value = line.partition(":")
                key = {"Vendor ID": "vendor_id", "Model name": "model name",
                       "CPU family": "cpu family", "Model": "model", "Flags": "flags"}.get(
                        key.strip())
                if key:
                    fields.setdefault(key, value.strip())
        except OSError:
            pass

    def number(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    vendor = fields.get("vendor_id") or None
    flags = set(fields.get("flags", "").split())
    present = [f for f in _ISA_FLAGS if f in flags]
    family, model = number("cpu family"), number("model")
    return {
            "cpu_vendor": vendor,
            "cpu_model_name": fields.get("model name") or platform.processor() or None,
            "cpu_family": family,
            "cpu_model": model,
            "microarchitecture": _microarchitecture(vendor or "", family, model),
            "hypervisor": "hypervisor" in flags,
            "isa": {"avx2": "avx2" in flags,
                    "avx512": [f for f in present if f.startswith("avx512")],
                    "amx": [f for f in present if f.startswith("amx")],
                    "flags": present},
    }


def cpu_model() -> str:
    """`lscpu`'s model name (kept for the one-line device strings)."""
    return cpu_info()["cpu_model_name"] or "unknown"


def describe_cpu(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine, e.g. 'AuthenticAMD AMD EPYC (family 25 model 17, Zen 4),
    2 cores, AVX2, AVX-512 (f, dq, ...), no AMX'."""
    info = info or {**cpu_info(), "cores": len(os.sched_getaffinity(0))}
    isa = info["isa"]
    avx512 = (f"AVX-512 ({', '.join(f.removeprefix('avx512').lstrip('_') for f in isa['avx512'])})"
              if isa["avx512"] else "no AVX-512")
    amx = f"AMX ({', '.join(f.removeprefix('amx_') for f in isa['amx'])})" if isa["amx"] \
        else "no AMX"
    arch = f", {info['microarchitecture']}" if info.get("microarchitecture") else ""
    return (f"{info['cpu_vendor']} {info['cpu_model_name']} (family {info['cpu_family']} "
            f"model {info['cpu_model']}{arch}), {info['cores']} cores, "
            f"{'AVX2' if isa['avx2'] else 'no AVX2'}, {avx512}, {amx}")


def machine(with_torch: bool = True) -> dict[str, Any]:
    """What the figures were measured on: the CPU (`cpu_info`), cores, framework versions,
    load. Every benchmark puts this dict in its final JSON line (`machine`).
    `with_torch=False`: torch's version from its metadata, without importing it."""
    import importlib.metadata

    dev = jax.devices()[0]
    info = cpu_info()
    out = {
            "cpu": info["cpu_model_name"] or "unknown",
            **info,
            "cores": len(os.sched_getaffinity(0)),
            "jax_device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "jax": jax.__version__,
            "load_average": load_average(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # jaxser.hugepages
    }
    if with_torch:
        import torch

        out["torch"], out["torch_threads"] = torch.__version__, torch.get_num_threads()
    else:
        try:
            out["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            out["torch"] = None
        out["torch_threads"] = None
    out["summary"] = describe_cpu(out)
    return out


def wait_for_quiet(max_wait_s: float, threshold: float, poll_s: float = 15.0) -> tuple:
    """Waits (up to `max_wait_s`) until the 1-minute load average is below `threshold`.

    Other processes on a shared CPU slow PyTorch's OpenMP threads much more than XLA's
    (PERF_NOTES), so the comparison is only fair on a quiet machine. Returns the load
    average at the end of the wait.
    """
    end = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < end:
        time.sleep(poll_s)
    return load_average()


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of the first device if it is a known accelerator, else None (CPU)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    kind = getattr(dev, "device_kind", "")
    for name, peaks in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peaks.get(dtype)
    return None


# ----------------------------------------------------------------------------- timing


def stats(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of durations (seconds)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "n": len(times)}


def fmt_stats(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f}, n={s['n']})"


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while it is active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event == self.EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled executable from XLA's cost analysis (None if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


# ----------------------------------------------------------------------------- models


# Preset name prefix -> model.encoder.
_PRESET_FAMILIES = {"whisper": "whisper", "hubert": "hubert", "wav2vec2": "wav2vec2",
                    "wavlm": "wavlm", "data2vec-audio": "data2vec_audio"}


def family_of(model: str) -> str:
    """model.encoder ('whisper', 'hubert', 'wav2vec2', 'wavlm', 'data2vec_audio') from a
    preset name such as 'whisper-base' or 'wavlm-large'."""
    for prefix, family in _PRESET_FAMILIES.items():
        if model.startswith(prefix):
            return family
    raise ValueError(f"model {model!r} is not a preset of "
                     f"{', '.join(p + '-*' for p in _PRESET_FAMILIES)}")


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--override`) as encoder config overrides; values are Python
    literals when they parse as one (`encoder_layers=2`, `conv_dim=(32,32)`), else strings."""
    import ast

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def jaxser_model_config(model: str, dtype: str = "float32", remat: bool = False,
                        attention: str = "auto", overrides: dict[str, Any] | None = None):
    """config.model for a preset, as `jaxser train` would build it (dropouts off).

    `overrides`: encoder fields on top of the preset (HF names, e.g. `encoder_layers`), the
    same for the PyTorch twin, which is built from the resulting config (`to_hf()`)."""
    from jaxser.config import base_config

    family = family_of(model)
    cfg = base_config().model
    cfg.encoder = family
    cfg.size = model
    cfg.dtype = dtype
    cfg.remat = remat
    cfg.attention = attention
    cfg.pooling = "mean"
    if family != "whisper":
        # ser_model.encoder_config expects dict presets, WAV2VEC2_SIZES holds Wav2Vec2Config
        # objects: pass the preset's fields as overrides instead of `size`.
        from jaxser.models import wav2vec2_config

        preset = dataclasses.asdict(wav2vec2_config.WAV2VEC2_SIZES[model])
        cfg.size = ""
        for key, value in preset.items():
            if key not in ("dtype", "param_dtype", "remat", "attention"):
                cfg.encoder_overrides[key] = value
        for key, value in _HUBERT_NO_DROPOUT.items():
            cfg.encoder_overrides[key] = value
    for key, value in (overrides or {}).items():
        cfg.encoder_overrides[key] = value
    return cfg


def build_jaxser(model: str, dtype: str = "float32", remat: bool = False,
                 attention: str = "auto", overrides: dict[str, Any] | None = None):
    """(SERModel, encoder config) of the trainer for a preset (plus encoder `overrides`)."""
    from jaxser.models import ser_model

    return ser_model.build_model(
            jaxser_model_config(model, dtype, remat, attention, overrides), NUM_CLASSES, 1)


def jaxser_optimizer(total_steps: int = 1000, freeze: Sequence[str] = ()):
    """jaxser's own optimizer from the config (AdamW, constant rate); `freeze`: the
    `optim.freeze` patterns (those parameters get no updates)."""
    from jaxser.config import base_config
    from jaxser.train import optimizer

    optim = base_config().optim
    optim.name, optim.lr, optim.weight_decay = "adamw", LR, WEIGHT_DECAY
    optim.freeze = tuple(freeze)

    def make(params):
        return optimizer.make_optimizer(optim, total_steps, total_steps, params)[0]

    return make


def make_jaxser_step(model, make_tx: Callable,
                     freeze: Sequence[str] = ()) -> tuple[Callable, Callable]:
    """(init(key, inputs, mask) -> state, jitted step(state, batch) -> (state, loss)).

    The step: model forward (encoder, masked mean pool, linear head), KL loss, backward,
    optax update; one jitted function with the state donated, as in the trainer. `batch`
    is a dict of `inputs` (log-mel frames or waveform), `mask`, `targets`, `weights`.
    """
    import flax.linen as nn
    import optax

    from jaxser.train import losses, optimizer

    def init(key, inputs, mask):
        params = nn.meta.unbox(model.init({"params": key, "dropout": key}, inputs, mask)
                               )["params"]
        tx = make_tx(params)
        return {"params": params, "opt_state": tx.init(params)}, tx

    def loss_fn(params, batch):
        # Frozen parameters enter through stop_gradient, as in jaxser's train step: no
        # backward pass for them.
        params = optimizer.stop_frozen(params, optimizer.frozen_mask(params, tuple(freeze)))
        out = model.apply({"params": params}, batch["inputs"], batch["mask"],
                          deterministic=True)
        log_probs = jax.nn.log_softmax(out["logits"].astype(jnp.float32), -1)
        return losses.kl_divergence(log_probs, batch["targets"], batch["weights"])

    def make_step(tx):
        def step(state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            return {"params": params, "opt_state": opt_state}, loss

        return jax.jit(step, donate_argnums=(0,))

    return init, make_step


def torch_encoder(model: str, enc_cfg, frames: int | None = None):
    """The transformers PyTorch encoder of the same architecture, random init.

    Whisper: `WhisperEncoder` with `max_source_positions = frames // 2` (HF only accepts
    exactly `2 * max_source_positions` input frames; the size of the position table does
    not change the compute). HuBERT / wav2vec2 / WavLM / data2vec-audio: `HubertModel` /
    `Wav2Vec2Model` / `WavLMModel` / `Data2VecAudioModel` from the jaxser config's `to_hf()`
    (dropouts, LayerDrop and time masking off; WavLM has no sdpa: its own attention).
    """
    import transformers
    from transformers.models.whisper import modeling_whisper

    family = family_of(model)
    if family == "whisper":
        hf = enc_cfg.to_hf()
        if frames is not None:
            hf["max_source_positions"] = frames // 2
        config = transformers.WhisperConfig(**hf, attn_implementation="sdpa")
        return modeling_whisper.WhisperEncoder(config)
    hf = dict(enc_cfg.to_hf(), **_HUBERT_NO_DROPOUT, mask_time_prob=0.0, mask_feature_prob=0.0)
    hf.pop("model_type", None)
    cls, model_cls = {
            "hubert": (transformers.HubertConfig, transformers.HubertModel),
            "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
            "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
            "data2vec_audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel),
    }[family]
    config = cls(**hf, attn_implementation="eager" if family == "wavlm" else "sdpa")
    return model_cls(config)


def torch_ser_model(model: str, enc_cfg, frames: int | None = None,
                    num_classes: int = NUM_CLASSES):
    """PyTorch encoder + mean pool over valid frames + linear head (a torch.nn.Module)."""
    import torch

    family = family_of(model)
    hidden = enc_cfg.d_model if family == "whisper" else enc_cfg.hidden_size

    class TorchSER(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch_encoder(model, enc_cfg, frames)
            self.head = torch.nn.Linear(hidden, num_classes)

        def forward(self, inputs, attention_mask=None, frame_mask=None):
            if family == "whisper":
                h = self.encoder(inputs).last_hidden_state  # [B, T, E]
            else:
                h = self.encoder(inputs, attention_mask=attention_mask).last_hidden_state
            if frame_mask is None:
                pooled = h.mean(1)
            else:
                w = frame_mask[:, :h.shape[1], None].to(h.dtype)
                pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
            return self.head(pooled)

    return TorchSER()


def torch_optimizer(module):
    import torch

    return torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def torch_train_step(module, opt, dtype: str = "float32") -> Callable:
    """A PyTorch train step `step(inputs, targets, **forward_kwargs) -> loss`:
    forward (bf16 autocast when asked), KL loss, backward, AdamW."""
    import torch
    import torch.nn.functional as F

    def step(inputs, targets, **kwargs):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = module(inputs, **kwargs)
        loss = F.kl_div(F.log_softmax(logits.float(), -1), targets, reduction="batchmean")
        loss.backward()
        opt.step()
        return loss

    return step


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Batch:
    """One fixed-shape benchmark batch in both frameworks' layouts."""

    jax: dict[str, Any]  # inputs, mask, targets, weights (numpy)
    torch_inputs: Any
    torch_targets: Any
    audio_seconds: float  # seconds of audio in the batch
    frames: int | None  # Whisper input frames (None for waveform models)


def random_batch(model: str, batch: int, seconds: float, num_mel: int = 80,
                 seed: int = 0) -> Batch:
    """Random log-mel frames (Whisper, 100 per second) or waveforms (16 kHz), all valid."""
    import torch

    rng = np.random.default_rng(seed)
    targets = rng.dirichlet(np.ones(NUM_CLASSES), size=batch).astype(np.float32)
    if family_of(model) == "whisper":
        frames = int(round(seconds * SAMPLE_RATE / HOP))
        x = rng.standard_normal((batch, frames, num_mel)).astype(np.float32)
        torch_x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
    else:
        frames = None
        x = (0.1 * rng.standard_normal((batch, int(seconds * SAMPLE_RATE)))).astype(np.float32)
        torch_x = torch.from_numpy(x.copy())
    jax_batch = {"inputs": x, "mask": np.ones(x.shape[:2], bool), "targets": targets,
                 "weights": np.ones(batch, np.float32)}
    return Batch(jax_batch, torch_x, torch.from_numpy(targets.copy()), batch * seconds, frames)
