"""One-command GPU check (issue 20): correctness, speed and memory of jaxser on one H200.

Run it on the GPU machine from the repository root, with that machine's own Python (jax
0.11 + CUDA plugin, flax, optax, transformers, torch; tensorflow, librosa, soundfile and
ml_collections are not needed, and nothing is installed):

    python3 bench/h200_check.py --out "$OUT/h200_check.json"

Through the device tool, as one call: run(command='python3 bench/h200_check.py --out
"$OUT/h200_check.json"', timeout_s=560). It finishes in under 8 minutes (`--budget-s`,
450 by default, bounds it; sections that no longer fit are listed under "skipped"), and
its last stdout line is one JSON object (also written to --out). Record the figures in
docs/benchmarks.md with the date and this command.

On a CPU, end to end in well under a minute with tiny models (what
tests/test_h200_check.py runs): `python bench/h200_check.py --smoke`.

What it measures, in two child processes (jax, then torch, so that neither holds GPU
memory the other needs; the jax child may use 95% of the GPU's memory), each printing a
JSON line per section as it goes, merged here into one line:

- device: backend, device kind, memory limit, jax/flax/optax/torch versions;
- matmul_bf16_tflops: a measured bf16 matmul rate (8192^3), the second MFU denominator;
- attention: cuDNN against XLA attention (both through jaxser's `dot_product_attention`,
  bf16, padding as sequence lengths) on a padded batch, outputs and q/k/v gradients,
  each as ||x - ref|| / ||ref|| against a float64 NumPy reference of the same bf16 inputs,
  valid query rows only; ok when cuDNN's errors are within bf16 tolerance (2e-2) and
  within 3x XLA's + 1e-3;
- bf16_vs_f32: one train step of a padded whisper-base batch in bfloat16 and in float32
  from the same float32 weights: the losses within 1e-2, the gradients' cosine;
- speed: the train step (encoder + masked mean pool + linear head, KL loss, jaxser's
  AdamW; bf16 compute, float32 parameters, attention 'auto' = cuDNN) of the
  whisper-large-v3 encoder on 30 s inputs (3000 log-mel frames) and of hubert-large on
  16 s inputs: s/step (median), compile time, FLOPs per step (XLA's cost analysis of the
  same step with einsum attention, lowered, not compiled: cuDNN's custom call has no
  FLOP count), MFU over 989 TFLOP/s and over the measured matmul rate; then the same
  model, batch and step in PyTorch transformers (bf16 autocast, sdpa attention, fused
  AdamW) and the throughput ratio torch_s / jaxser_s;
- memory: per model, the device memory the compiled step needs (XLA's memory analysis:
  arguments + outputs - aliased + temporaries), remat off and on; a line through two
  batch sizes (remat on) and the remat-off step's need give the largest batch that fits
  in the memory limit; each estimate is then run for one step when time is left
  ("verified").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MARK = "@@h200 "  # prefix of the children's JSON lines
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 FLOP/s (datasheet)
LR, WEIGHT_DECAY, NUM_CLASSES = 1e-4, 0.01, 8
BLOCKED_MODULES = ("tensorflow", "librosa", "soundfile", "ml_collections")

# Per model: preset, seconds of audio, batch of the speed step. --smoke: tiny stand-ins.
SPEED_MODELS = {
        "whisper-large-v3": dict(seconds=30.0, batch=16, overrides={}),
        "hubert-large": dict(seconds=16.0, batch=16, overrides={}),
}
SMOKE_MODELS = {
        "whisper-large-v3": dict(seconds=1.0, batch=2, overrides=dict(
                num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=64)),
        "hubert-large": dict(seconds=0.5, batch=2, overrides=dict(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2),
                conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4)),
}
_NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                   feat_proj_dropout=0.0, layerdrop=0.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on any backend (tests)")
    p.add_argument("--out", default="", help="also write the JSON result to this file")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="wall-clock budget of the whole check (default 450, smoke 240)")
    p.add_argument("--torch-reserve-s", type=float, default=0.0,
                   help="part of the budget kept for the torch child (default 110, smoke 60)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 8, smoke 2)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (240.0 if args.smoke else 450.0)
    args.torch_reserve_s = args.torch_reserve_s or (60.0 if args.smoke else 110.0)
    args.steps = args.steps or (2 if args.smoke else 8)
    return args


def emit(section: str, value) -> None:
    """A child's result line for one section (the parent merges them)."""
    print(MARK + json.dumps({"section": section, "value": value}), flush=True)


def note(message: str) -> None:
    print(f"[h200_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def models(args) -> dict:
    return SMOKE_MODELS if args.smoke else SPEED_MODELS


def rel(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# ============================================================================ jax child


def model_cfg(name: str, dtype: str, remat: bool, attention: str, overrides: dict) -> dict:
    """config.model as a plain dict (no ml_collections on the GPU machine)."""
    family = "whisper" if name.startswith("whisper") else "hubert"
    over = dict(overrides)
    if family != "whisper":
        over = {**_NO_DROPOUT, **over}
    return {"encoder": family, "size": name, "encoder_overrides": over, "pretrained": "",
            "pooling": "mean", "attention_heads": 16, "layer_weighted_sum": False,
            "head_hidden": 0, "dropout": 0.0, "dtype": dtype, "remat": remat,
            "attention": attention, "domain_head": False, "domain_hidden": 256}


def optim_cfg() -> dict:
    return {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "b1": 0.9, "b2": 0.999,
            "eps": 1e-8, "schedule": "constant", "warmup_steps": 0, "epoch_decay": 0.875,
            "clip_norm": 0.0, "grad_accum": 1, "freeze": (), "unfreeze_after": 0,
            "head_lr_scale": 1.0, "center_lr": 5e-3}


class JaxSide:
    """Models, batches and the jitted train step (as bench/train_step.py's jaxser side)."""

    def __init__(self, args):
        import jax

        self.jax, self.args = jax, args
        self.backend = jax.default_backend()
        self.device = jax.devices()[0]
        self._inits = {}  # model name -> jitted init (remat does not change the tree)

    def build(self, name, dtype, remat, attention, overrides):
        from jaxser.models import ser_model

        return ser_model.build_model(model_cfg(name, dtype, remat, attention, overrides),
                                     NUM_CLASSES, 1)

    def batch(self, name, enc_cfg, batch, seconds, lengths_s=None, seed=0) -> dict:
        """Random inputs (log-mel frames or waveform), prefix masks, Dirichlet targets."""
        import numpy as np

        from jaxser.constants import SAMPLE_RATE

        rng = np.random.default_rng(seed)
        per_s = 100 if name.startswith("whisper") else SAMPLE_RATE
        n = int(round(seconds * per_s))
        lengths = np.full(batch, n) if lengths_s is None else np.minimum(
                (np.asarray(lengths_s) * per_s).astype(int), n)
        if name.startswith("whisper"):
            x = rng.standard_normal((batch, n, enc_cfg.num_mel_bins)).astype(np.float32)
        else:
            x = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
        mask = np.arange(n)[None] < lengths[:, None]
        x = x * (mask[..., None] if x.ndim == 3 else mask)
        return {"inputs": x, "mask": mask,
                "targets": rng.dirichlet(np.ones(NUM_CLASSES), batch).astype(np.float32),
                "weights": np.ones(batch, np.float32)}

    def make_tx(self, params):
        try:
            from jaxser.train import optimizer

            return optimizer.make_optimizer(optim_cfg(), 1000, 1000, {"model": params})[0], \
                "jaxser"
        except Exception as e:  # noqa: BLE001 - an API change must not stop the check
            import optax

            note(f"jaxser optimizer unavailable ({e!r}); optax.adamw")
            return optax.adamw(LR, weight_decay=WEIGHT_DECAY), "optax"

    def loss_fn(self, model):
        import jax
        import jax.numpy as jnp

        from jaxser.train import losses

        def loss(params, batch):
            out = model.apply({"params": params["model"]}, batch["inputs"], batch["mask"],
                              deterministic=True)
            log_probs = jax.nn.log_softmax(out["logits"].astype(jnp.float32), -1)
            return losses.kl_divergence(log_probs, batch["targets"], batch["weights"])

        return loss

    def step_fn(self, model, tx):
        import jax
        import optax

        loss = self.loss_fn(model)

        def step(state, batch):
            value, grads = jax.value_and_grad(loss)(state["params"], batch)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates),
                    "opt_state": opt_state}, value

        return step

    def init_params(self, model, batch, name: str | None = None, abstract: bool = False):
        """{"model": float32 params}, compiled once per model `name`; `abstract`: shapes."""
        import flax.linen as nn
        import jax

        sample = (batch["inputs"][:1], batch["mask"][:1])
        if name is None or name not in self._inits:
            def init(key, inputs, mask):
                variables = model.init({"params": key, "dropout": key}, inputs, mask)
                return {"model": nn.meta.unbox(variables)["params"]}

            fn = jax.jit(init)
            if name is not None:
                self._inits[name] = fn
        else:
            fn = self._inits[name]
        if abstract:
            return jax.eval_shape(fn, jax.random.key(0), *sample)
        return fn(jax.random.key(0), *sample)


def section_device(js: JaxSide) -> dict:
    import flax
    import jax
    import optax

    dev = js.device
    stats = {}
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    limit = stats.get("bytes_limit")
    return {"backend": js.backend, "device_kind": getattr(dev, "device_kind", ""),
            "devices": jax.device_count(), "memory_limit_gib":
                None if limit is None else round(limit / 2**30, 2),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": sys.version.split()[0],
            "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def section_matmul(js: JaxSide) -> float:
    """Measured bf16 matmul rate in TFLOP/s (the best of a few timed products)."""
    import jax
    import jax.numpy as jnp

    n = 256 if js.args.smoke else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    reps = 10

    @jax.jit
    def chain(a, b):
        def body(_, x):
            return (x @ b).astype(jnp.bfloat16) * jnp.bfloat16(0.01)
        return jax.lax.fori_loop(0, reps, body, a)

    jax.block_until_ready(chain(a, b))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(a, b))
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 * reps / best / 1e12, 2)


def _reference_attention(q, k, v, lengths, w):
    """float64 attention of [B, T, H, D] inputs with prefix-masked keys, and the gradients
    of sum(out * w) (w zero on padded query rows)."""
    import numpy as np

    q, k, v, w = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, w))
    scale = q.shape[-1] ** -0.5
    valid = np.arange(k.shape[2])[None, None, None, :] < lengths[:, None, None, None]
    s = np.where(valid, q @ k.transpose(0, 1, 3, 2) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dp = w @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = ds @ k * scale
    dk = ds.transpose(0, 1, 3, 2) @ q * scale
    dv = p.transpose(0, 1, 3, 2) @ w
    return tuple(x.transpose(0, 2, 1, 3) for x in (out, dq, dk, dv))


def section_attention(js: JaxSide) -> dict:
    """cuDNN vs XLA attention (bf16, padded) against a float64 reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxser.models.attention import dot_product_attention

    b, t, h, d = (3, 40, 2, 8) if js.args.smoke else (4, 1500, 8, 64)
    lengths = np.array([t, int(0.7 * t), int(0.3 * t) + 1, 7][:b])
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for _ in range(3))
    mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
    q_valid = np.asarray(mask)
    w = rng.standard_normal((b, t, h, d)) * q_valid[:, :, None, None]
    ref = _reference_attention(q, k, v, lengths, w)
    impls = ["cudnn", "xla"] if js.backend == "gpu" else ["xla", "einsum"]
    result = {"shape_bthd": [b, t, h, d], "lengths": lengths.tolist(), "dtype": "bfloat16",
              "reference": "float64 numpy of the same bf16 inputs"}
    wj = jnp.asarray(w, jnp.float32)
    for impl in impls:
        def f(q, k, v, impl=impl):
            return dot_product_attention(q, k, v, mask, impl)

        def loss(q, k, v, f=f):
            return jnp.sum(f(q, k, v).astype(jnp.float32) * wj)

        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        errs = {"out": rel(np.asarray(out, np.float32)[q_valid], ref[0][q_valid])}
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:], strict=True):
            errs[name] = rel(np.asarray(g, np.float32), r)
        result[impl] = {key: round(val, 6) for key, val in errs.items()}
    fused, other = impls
    tol = 2e-2
    result["tolerance"] = tol
    result["ok"] = all(result[fused][key] <= tol and
                       result[fused][key] <= 3 * result[other][key] + 1e-3
                       for key in result[fused])
    if js.backend != "gpu":
        result["note"] = "no GPU: 'xla' stands in for 'cudnn', 'einsum' for 'xla'"
    return result


def section_bf16_vs_f32(js: JaxSide) -> dict:
    """One train step in bf16 and in float32 from the same weights and padded batch."""
    import jax
    import numpy as np

    name, seconds = "whisper-base", (1.0 if js.args.smoke else 8.0)
    overrides = ({"encoder_layers": 1, "d_model": 32, "encoder_attention_heads": 2,
                  "encoder_ffn_dim": 64} if js.args.smoke else {})
    lengths = [seconds, 0.75 * seconds, 0.4 * seconds, 0.1 * seconds]
    out = {"model": name, "batch": len(lengths), "seconds": lengths, "attention": "auto"}
    values, grads = {}, {}
    params = None
    for dtype in ("float32", "bfloat16"):
        model, enc_cfg = js.build(name, dtype, False, "auto", overrides)
        batch = js.batch(name, enc_cfg, len(lengths), seconds, lengths)
        if params is None:
            params = js.init_params(model, batch)
        loss = js.loss_fn(model)
        values[dtype], grads[dtype] = jax.jit(jax.value_and_grad(loss))(params, batch)
    g32 = np.concatenate([np.ravel(np.asarray(g, np.float64))
                          for g in jax.tree.leaves(grads["float32"])])
    g16 = np.concatenate([np.ravel(np.asarray(g, np.float64))
                          for g in jax.tree.leaves(grads["bfloat16"])])
    out["loss_float32"] = float(values["float32"])
    out["loss_bfloat16"] = float(values["bfloat16"])
    out["abs_diff"] = abs(out["loss_float32"] - out["loss_bfloat16"])
    out["grad_cosine"] = float(g32 @ g16 / max(np.linalg.norm(g32) * np.linalg.norm(g16),
                                               1e-30))
    out["grad_norm_rel_diff"] = float(abs(np.linalg.norm(g16) / np.linalg.norm(g32) - 1))
    out["ok"] = out["abs_diff"] <= 1e-2
    return out


def _need_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


class StepSetup:
    """One model's jitted step: state, batch, compile, run."""

    def __init__(self, js: JaxSide, name: str, spec: dict, remat: bool, batch: int,
                 attention: str = "auto", abstract: bool = False):
        """`abstract`: shapes only (compile and memory analysis, nothing allocated)."""
        import jax

        self.js, self.name = js, name
        self.model, self.enc_cfg = js.build(name, "bfloat16", remat, attention,
                                            spec["overrides"])
        host = js.batch(name, self.enc_cfg, batch, spec["seconds"])
        if abstract:
            self.batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
        else:
            self.batch = jax.device_put(host)
        params = js.init_params(self.model, host, name, abstract)
        self.tx, self.optimizer = js.make_tx(params["model"])
        opt_state = (jax.eval_shape(self.tx.init, params) if abstract else
                     jax.jit(self.tx.init)(params))
        self.state = {"params": params, "opt_state": opt_state}
        self.jitted = jax.jit(js.step_fn(self.model, self.tx), donate_argnums=(0,))

    def compile(self):
        t0 = time.perf_counter()
        compiled = self.jitted.lower(self.state, self.batch).compile()
        return compiled, time.perf_counter() - t0

    def run(self, compiled, steps: int) -> list[float]:
        import jax

        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.state, loss = compiled(self.state, self.batch)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
        self.last_loss = float(loss)
        return times


def model_flops(js: JaxSide, name: str, spec: dict, setup: StepSetup) -> float | None:
    """FLOPs of the step from XLA's cost analysis of the same step with einsum attention
    and no remat, lowered only (cuDNN's custom call and scanned layers are not counted)."""
    import jax

    model, _ = js.build(name, "bfloat16", False, "einsum", spec["overrides"])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            (setup.state, setup.batch))
    lowered = jax.jit(js.step_fn(model, setup.tx)).lower(*abstract)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def section_speed(js: JaxSide, name: str, spec: dict, matmul_tflops, deadline) -> dict:
    setup = StepSetup(js, name, spec, remat=False, batch=spec["batch"])
    compiled, compile_s = setup.compile()
    note(f"{name}: compiled in {compile_s:.1f} s")
    setup.run(compiled, 2)  # warm-up
    steps = js.args.steps
    times = setup.run(compiled, steps)
    while len(times) < 3 * steps and sum(times) < 10 and time.time() < deadline - 60:
        times += setup.run(compiled, steps)  # short steps: a few more for a stable median
    step_s = statistics.median(times)
    out = {"seconds": spec["seconds"], "batch": spec["batch"], "dtype": "bfloat16",
           "attention": "auto", "optimizer": setup.optimizer,
           "jaxser_step_s": round(step_s, 5),
           "jaxser_step_min_max_s": [round(min(times), 5), round(max(times), 5)],
           "jaxser_steps_timed": len(times), "compile_s": round(compile_s, 1),
           "audio_s_per_s": round(spec["batch"] * spec["seconds"] / step_s, 1),
           "need_gib_remat_off": round(_need_bytes(compiled) / 2**30, 3),
           "final_loss": setup.last_loss}
    try:
        flops = model_flops(js, name, spec, setup)
    except Exception as e:  # noqa: BLE001
        flops, out["flops_error"] = None, repr(e)[:300]
    out["flops_per_step"] = flops
    if flops:
        out["tflops_per_s"] = round(flops / step_s / 1e12, 2)
        out["mfu_vs_989"] = round(flops / step_s / PEAK_BF16, 4)
        if matmul_tflops:
            out["mfu_vs_measured_matmul"] = round(flops / step_s / (matmul_tflops * 1e12), 4)
    return out


def section_memory(js: JaxSide, name: str, spec: dict, speed: dict | None,
                   deadline: float) -> dict:
    """Largest batch that fits, remat off and on, from XLA's memory analysis."""
    stats = {}
    try:
        stats = js.device.memory_stats() or {}
    except Exception:  # noqa: BLE001
        pass
    limit = stats.get("bytes_limit")
    b0 = spec["batch"]
    out = {"batch_probe": b0, "limit_gib": None if limit is None else round(limit / 2**30, 2)}
    needs, compile_times = {}, []
    for batch in (b0, 2 * b0):
        compiled, compile_s = StepSetup(js, name, spec, remat=True, batch=batch,
                                        abstract=True).compile()
        compile_times.append(compile_s)
        needs[batch] = _need_bytes(compiled)
        del compiled
    slope = (needs[2 * b0] - needs[b0]) / b0
    intercept = needs[b0] - slope * b0
    slopes = {"remat_on": slope}
    out["remat_on"] = {"need_gib": {str(b): round(n / 2**30, 3) for b, n in needs.items()},
                       "gib_per_utterance": round(slope / 2**30, 4),
                       "fixed_gib": round(intercept / 2**30, 3),
                       "compile_s": [round(t, 1) for t in compile_times]}
    compile_s = {"remat_on": max(compile_times)}
    if speed and speed.get("need_gib_remat_off") is not None:
        slopes["remat_off"] = (speed["need_gib_remat_off"] * 2**30 - intercept) / b0
        compile_s["remat_off"] = speed.get("compile_s") or max(compile_times)
        out["remat_off"] = {"need_gib": {str(b0): speed["need_gib_remat_off"]},
                            "gib_per_utterance": round(slopes["remat_off"] / 2**30, 4)}
    if limit is None:
        out["note"] = "no device memory limit reported (CPU): no largest batch"
        return out
    for key, s in slopes.items():
        if s > 0:
            out[key]["max_batch_estimate"] = max(int((limit - intercept) // s), 0)
    # Run each estimate for two steps when time is left (out of memory shows as an error).
    for key in ("remat_on", "remat_off"):
        est = out.get(key, {}).get("max_batch_estimate")
        if not est:
            continue
        needed = 1.5 * compile_s[key] + 30
        if time.time() + needed > deadline:
            out[key]["verified"] = f"skipped: about {needed:.0f} s needed, time is short"
            continue
        try:
            setup = StepSetup(js, name, spec, remat=key == "remat_on", batch=est)
            compiled, _ = setup.compile()
            t = setup.run(compiled, 2)
            out[key]["verified"] = {"batch": est, "ok": True, "step_s": round(t[-1], 4),
                                    "need_gib": round(_need_bytes(compiled) / 2**30, 3)}
            del setup, compiled
        except Exception as e:  # noqa: BLE001 - out of memory is a result here
            out[key]["verified"] = {"batch": est, "ok": False, "error": repr(e)[:300]}
    return out


def jax_child(args) -> None:
    import jax

    deadline = args.deadline or time.time() + args.budget_s
    js = JaxSide(args)
    note(f"jax {jax.__version__}, backend {js.backend}, {js.device}")
    results = {}

    def run(section, fn, *a, need_s=0.0):
        if time.time() + need_s > deadline:
            emit("skipped", section)
            return None
        t0 = time.perf_counter()
        try:
            value = fn(*a)
        except Exception as e:  # noqa: BLE001 - every section reports, none stops the check
            import traceback

            traceback.print_exc()
            emit("error", {section: repr(e)[:500]})
            return None
        note(f"{section}: {time.perf_counter() - t0:.1f} s")
        results[section] = value
        emit(section, value)
        return value

    run("device", section_device, js)
    matmul = run("matmul_bf16_tflops", section_matmul, js)
    run("attention", section_attention, js)
    run("bf16_vs_f32", section_bf16_vs_f32, js)
    speed = {}
    for name, spec in models(args).items():
        speed[name] = run(f"speed/{name}", section_speed, js, name, spec, matmul, deadline,
                          need_s=0 if args.smoke else 60)
    for name, spec in list(models(args).items())[:1 if args.smoke else None]:
        run(f"memory/{name}", section_memory, js, name, spec, speed.get(name), deadline,
            need_s=0 if args.smoke else 45)  # smoke: one model shows the code path


# ========================================================================== torch child


def torch_child(args) -> None:
    import torch

    from bench import common

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    emit("torch_device", {"torch": torch.__version__, "cuda": cuda,
                          "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                          "sdpa": True, "autocast": "bfloat16", "optimizer":
                              "torch.optim.AdamW(fused=True)" if cuda else "AdamW"})
    deadline = args.deadline or time.time() + args.torch_reserve_s
    js_models = models(args)
    for name, spec in js_models.items():
        if time.time() + (5 if args.smoke else 25) > deadline:
            emit("skipped", f"torch/{name}")
            continue
        try:
            emit(f"torch/{name}", torch_speed(args, common, torch, device, name, spec))
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            emit("error", {f"torch/{name}": repr(e)[:500]})
        if cuda:
            torch.cuda.empty_cache()


def torch_speed(args, common, torch, device, name, spec) -> dict:
    import numpy as np
    import torch.nn.functional as F

    from jaxser.constants import SAMPLE_RATE
    from jaxser.models import ser_model

    enc_cfg = ser_model.encoder_config(model_cfg(name, "bfloat16", False, "auto",
                                                 spec["overrides"]))
    whisper = name.startswith("whisper")
    b = spec["batch"]
    rng = np.random.default_rng(0)
    frames = int(round(spec["seconds"] * 100)) if whisper else None
    if whisper:
        x = rng.standard_normal((b, enc_cfg.num_mel_bins, frames)).astype(np.float32)
    else:
        x = (0.1 * rng.standard_normal((b, int(spec["seconds"] * SAMPLE_RATE)))).astype(
                np.float32)
    targets = rng.dirichlet(np.ones(NUM_CLASSES), b).astype(np.float32)
    torch.manual_seed(0)
    with torch.device(device):
        module = common.torch_ser_model(name, enc_cfg, frames, NUM_CLASSES).train()
    module = module.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                            **({"fused": True} if fused else {}))
    inputs = torch.from_numpy(x).to(device)
    tgt = torch.from_numpy(targets).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = module(inputs)
        loss = F.kl_div(F.log_softmax(logits.float(), -1), tgt, reduction="batchmean")
        loss.backward()
        opt.step()
        return loss

    def timed():
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, float(loss.detach())

    for _ in range(2):
        timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed()[0] for _ in range(args.steps)]
    out = {"torch_step_s": round(statistics.median(times), 5),
           "torch_step_min_max_s": [round(min(times), 5), round(max(times), 5)],
           "batch": b, "seconds": spec["seconds"]}
    if device.type == "cuda":
        out["torch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


# =============================================================================== parent


def run_child(args, part: str, deadline: float, env: dict) -> tuple[dict, list, str]:
    """Runs one child until `deadline`; its sections, errors and the tail of its stderr."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part,
           "--deadline", str(deadline), "--steps", str(args.steps),
           "--budget-s", str(args.budget_s), "--torch-reserve-s", str(args.torch_reserve_s)]
    if args.smoke:
        cmd.append("--smoke")
    sections, errors = {}, []
    timeout = max(deadline - time.time() + 20, 5)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        code = "timeout"
    for line in stdout.splitlines():
        if line.startswith(MARK):
            item = json.loads(line[len(MARK):])
            if item["section"] == "error":
                errors.append(item["value"])
            elif item["section"] == "skipped":
                sections.setdefault("skipped", []).append(item["value"])
            else:
                sections[item["section"]] = item["value"]
    if code != 0:
        errors.append({f"{part}_child": f"exit {code}: {stderr.strip()[-800:]}"})
    return sections, errors, stderr[-3000:]


def merge(args, jax_part: dict, torch_part: dict, errors: list, started: float) -> dict:
    result = {"check": "h200", "smoke": args.smoke,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": "python3 bench/h200_check.py" + (" --smoke" if args.smoke else ""),
              "device": jax_part.get("device"), "torch": torch_part.get("torch_device"),
              "matmul_bf16_tflops": jax_part.get("matmul_bf16_tflops"),
              "attention": jax_part.get("attention"),
              "bf16_vs_f32": jax_part.get("bf16_vs_f32"), "speed": {}, "memory": {}}
    for name in models(args):
        speed = dict(jax_part.get(f"speed/{name}") or {})
        t = torch_part.get(f"torch/{name}") or {}
        speed.update({k: v for k, v in t.items() if k.startswith("torch_")})
        if speed.get("jaxser_step_s") and speed.get("torch_step_s"):
            speed["throughput_ratio"] = round(speed["torch_step_s"] / speed["jaxser_step_s"], 3)
        result["speed"][name] = speed or None
        result["memory"][name] = jax_part.get(f"memory/{name}")
    w = result["speed"].get("whisper-large-v3") or {}
    h = result["speed"].get("hubert-large") or {}
    result["goals"] = {
            "attention_ok": (result["attention"] or {}).get("ok"),
            "bf16_loss_within_1e-2": (result["bf16_vs_f32"] or {}).get("ok"),
            "whisper_mfu_ge_0.45": None if w.get("mfu_vs_989") is None
            else w["mfu_vs_989"] >= 0.45,
            "whisper_ratio_ge_1.5": None if w.get("throughput_ratio") is None
            else w["throughput_ratio"] >= 1.5,
            "hubert_ratio_ge_1.3": None if h.get("throughput_ratio") is None
            else h["throughput_ratio"] >= 1.3,
    }
    result["skipped"] = jax_part.get("skipped", []) + torch_part.get("skipped", [])
    result["errors"] = errors
    result["elapsed_s"] = round(time.time() - started, 1)
    return result


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child == "jax":
        jax_child(args)
        return None
    if args.child == "torch":
        torch_child(args)
        return None
    started = time.time()
    end = started + args.budget_s
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent)]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    jax_env = dict(env)
    jax_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # room for the largest batch
    reserve = 0.0 if args.no_torch else args.torch_reserve_s
    note(f"jax child, until {end - reserve - started:.0f} s")
    jax_part, errors, jax_err = run_child(args, "jax", end - reserve, jax_env)
    torch_part = {}
    if not args.no_torch:
        torch_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_PLATFORMS="cpu")
        note(f"torch child, until {end - started:.0f} s")
        torch_part, torch_errors, torch_err = run_child(args, "torch", end, torch_env)
        errors += torch_errors
    result = merge(args, jax_part, torch_part, errors, started)
    if errors:
        sys.stderr.write(jax_err)
    line = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
