"""Where a train step's time goes: forward + backward of each piece, jaxser against PyTorch.

Times, in both frameworks, at the model's real shapes (`--model`, `--batch` x `--seconds`,
as `bench/train_step.py`), forward and backward (input and weight gradients) of every piece
of the encoder, and the optimizer update; then the whole train step with
`bench/train_step.py`'s machinery (`JaxserRunner`, `TorchRunner`), and checks that the
pieces, each times the number of times the step runs it, add up to the step (within
`--tolerance`, 20% by default): if they don't, the table doesn't explain the step and the
gap is printed. The pieces:

- `qkv_out` (per layer): jaxser `DenseGeneral` q, k, v [E] -> [H, D] and out [H, D] -> [E];
  PyTorch the layer's `q_proj`, `k_proj`, `v_proj`, `out_proj` (`nn.Linear`);
- `mlp` (per layer): `DenseGeneral` fc1 [E] -> [F] and fc2 [F] -> [E]; the layer's two
  `nn.Linear`;
- `attention` (per layer): `dot_product_attention` (the config's implementation, with the
  key mask the step passes); transformers' `sdpa_attention_forward` on the [B, H, T, D]
  views the layers pass it (no mask, as in the step);
- `layer_norm` (every norm at width E: 2 per layer, + 1 in HuBERT's encoder): `LayerNorm`;
  the layer's `nn.LayerNorm`;
- `gelu` (per layer, over [B, T, F]): `gelu` (`ACTIVATIONS[hidden_act]`); the layer's
  activation module;
- `conv_stem` (Whisper, once): `WhisperEncoder` with 0 layers (conv1, GELU, conv2, GELU,
  positions, final norm); transformers' `WhisperEncoder` with 0 layers;
- `feature_extractor` (HuBERT, once): `FeatureExtractor` (7 convs, group norm, GELU; lengths
  as in the step); `model.feature_extractor`;
- `feature_projection` (HuBERT, once): `FeatureProjection`; `model.feature_projection`;
- `pos_conv` (HuBERT, once): `PositionalConvEmbedding`; `model.encoder.pos_conv_embed`;
- `optimizer` (once): jaxser's AdamW update (`jaxser.train.optimizer`, jitted, donated) over
  the step's parameters; `torch.optim.AdamW.step()` over the step's module.

Each piece is one jitted function on the jaxser side (forward, `jax.vjp`, the output and
every gradient returned so XLA cannot drop any of it) and eager `forward` + `backward` on
the PyTorch side, with the same shapes, dtypes and cotangents. Not counted: the residual
additions, dropout (off), the pooling, head and loss (one [B, E] pool and an [E, 8] dense).
Splitting the step also loses the fusions across pieces (a bias add fused into the GELU),
which is part of the gap.

Each framework runs in its own child process, one after the other (PyTorch's OpenMP threads
slow the next XLA computation in the same process, see `bench/train_step.py`); jaxser with
huge-page malloc as `jaxser train` runs. `--same-process` runs both here (the tests).
`--cpus 1` pins each child to one core (both frameworks then run one thread): on a busy
machine its process CPU times stay close to the idle machine's, while wall times and
two-thread times mostly measure the waiting (docs/benchmarks.md).

    .venv/bin/python bench/ops.py --model whisper-base --batch 4 --seconds 4
    .venv/bin/python bench/ops.py --model hubert-base --batch 4 --seconds 4 --cpus 1
    .venv/bin/python bench/ops.py --model whisper-base --pieces mlp,qkv_out --no-step

Prints the machine (CPU vendor, model, family/model, ISA extensions: AVX2, AVX-512, AMX),
one table (per piece: the shape, the count per step, the median wall and process CPU time
of one call on each side, the ratios PyTorch time / jaxser time, each piece's share of the
jaxser step), the sum check in wall and CPU time, and last one JSON line (`machine`,
`pieces`, `sum_check`, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, train_step  # noqa: E402
from jaxser import hugepages  # noqa: E402

# Model pieces by their public names (see docs/benchmarks.md, "Per-piece benchmark").
from jaxser.models.attention import dot_product_attention  # noqa: E402
from jaxser.models.frontend import (  # noqa: E402
    FeatureExtractor,
    FeatureProjection,
    PositionalConvEmbedding,
)
from jaxser.models.layers import ACTIVATIONS, DenseGeneral, LayerNorm  # noqa: E402
from jaxser.models.whisper import WhisperEncoder  # noqa: E402

FRAMEWORKS = ("jaxser", "torch")
WHISPER_PIECES = ("qkv_out", "mlp", "attention", "layer_norm", "gelu", "conv_stem",
                  "optimizer")
HUBERT_PIECES = ("qkv_out", "mlp", "attention", "layer_norm", "gelu", "feature_extractor",
                 "feature_projection", "pos_conv", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="whisper-base", help="preset, as in train_step.py")
    p.add_argument("--batch", type=int, default=4, help="utterances per step")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="auto", help="jaxser attention implementation")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder config field over the preset, both frameworks (repeatable)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per piece")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per piece and step")
    p.add_argument("--steps", type=int, default=3, help="timed whole train steps")
    p.add_argument("--no-step", action="store_true",
                   help="skip the whole step (and the sum check)")
    p.add_argument("--pieces", default="", help="comma-separated subset (default: all)")
    p.add_argument("--tolerance", type=float, default=0.2,
                   help="largest |sum of pieces / step - 1| the check accepts")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when the sum check fails in both wall and CPU "
                        "time")
    p.add_argument("--frameworks", default="jaxser,torch", help="comma-separated")
    p.add_argument("--cpus", default="",
                   help="pin each child process to these CPUs (e.g. '1' or '0,1'): on a busy "
                        "machine one pinned core gives steadier figures than two shared ones "
                        "(both frameworks then size their thread pools to it)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this many seconds for a 1-min load average below "
                        "--quiet-load before each framework")
    p.add_argument("--quiet-load", type=float, default=2.5)
    p.add_argument("--same-process", action="store_true",
                   help="time both frameworks in this process (default: a child each)")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The step's shapes for one model and batch (T: frames the transformer layers see)."""

    family: str
    batch: int
    time: int  # T
    embed: int  # E
    heads: int  # H
    head_dim: int  # D
    ffn: int  # F
    layers: int
    conv_frames: int = 0  # HuBERT: frames out of the feature extractor (== time)
    conv_channels: int = 0  # HuBERT: C


def shapes_of(family: str, enc_cfg, batch: common.Batch) -> Shapes:
    b = batch.jax["inputs"].shape[0]
    if family == "whisper":
        t = (batch.frames + 1) // 2
        return Shapes(family, b, t, enc_cfg.d_model, enc_cfg.encoder_attention_heads,
                      enc_cfg.head_dim, enc_cfg.encoder_ffn_dim, enc_cfg.encoder_layers)
    samples = batch.jax["inputs"].shape[1]
    t = jax.eval_shape(lambda a: FeatureExtractor(enc_cfg).init_with_output(
            jax.random.key(0), a, None)[0], jax.ShapeDtypeStruct((1, samples), jnp.float32)
                       ).shape[1]
    return Shapes(family, b, t, enc_cfg.hidden_size, enc_cfg.num_attention_heads,
                  enc_cfg.head_dim, enc_cfg.intermediate_size, enc_cfg.num_hidden_layers,
                  t, enc_cfg.conv_dim[-1])


def piece_table(s: Shapes) -> dict[str, tuple[int, str]]:
    """piece -> (calls per train step, shape description)."""
    btE, btF = f"[{s.batch}, {s.time}, {s.embed}]", f"[{s.batch}, {s.time}, {s.ffn}]"
    common_rows = {
            "qkv_out": (s.layers, f"{btE} x 4 [{s.embed}, {s.embed}]"),
            "mlp": (s.layers, f"{btE} x [{s.embed}, {s.ffn}], {btF} x [{s.ffn}, {s.embed}]"),
            "attention": (s.layers, f"[{s.batch}, {s.time}, {s.heads}, {s.head_dim}]"),
            "gelu": (s.layers, btF),
    }
    if s.family == "whisper":
        return {**common_rows, "layer_norm": (2 * s.layers, btE),
                "conv_stem": (1, f"[{s.batch}, {2 * s.time}, mel] -> {btE}"),
                "optimizer": (1, "all parameters")}
    return {**common_rows, "layer_norm": (2 * s.layers + 1, btE),
            "feature_extractor": (1, f"[{s.batch}, samples] -> [{s.batch}, {s.time}, "
                                     f"{s.conv_channels}]"),
            "feature_projection": (1, f"[{s.batch}, {s.time}, {s.conv_channels}] -> {btE}"),
            "pos_conv": (1, btE), "optimizer": (1, "all parameters")}


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], reps: int, warmup: int) -> dict[str, float]:
    """Median / min / max wall seconds and median process CPU seconds of `fn()` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = common.stats(wall)
    out["cpu"] = float(np.median(cpu))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------- jaxser


def _randn(key: int, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _init(module, *inputs) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(module.init(jax.random.key(1), *inputs))["params"]


def jax_fwd_bwd(apply: Callable, params: Any, diff: tuple, fixed: tuple = ()) -> Callable:
    """A no-argument callable running one jitted forward + backward of
    `apply(params, *diff, *fixed)`: the output and the gradients of params and `diff`, all
    returned (nothing for XLA to drop), with a fixed random cotangent."""

    def run(params, diff, fixed, cot):
        y, vjp = jax.vjp(lambda p, d: apply(p, *d, *fixed), params, diff)
        return y, vjp(cot)

    out = jax.eval_shape(lambda p, d: apply(p, *d, *fixed), params, diff)
    leaves, tree = jax.tree.flatten(out)
    cot = jax.tree.unflatten(tree, [_randn(100 + i, x.shape, x.dtype)
                                    for i, x in enumerate(leaves)])
    jitted = jax.jit(run)
    return lambda: jax.block_until_ready(jitted(params, diff, fixed, cot))


def jaxser_pieces(enc_cfg, s: Shapes, batch: common.Batch, names) -> dict[str, Callable]:
    """piece name -> callable timing it, built with jaxser's own modules and functions."""
    whisper = s.family == "whisper"
    dtype = jnp.dtype(enc_cfg.dtype)
    b, t, e, h, d, f = s.batch, s.time, s.embed, s.heads, s.head_dim, s.ffn
    x = _randn(1, (b, t, e), dtype)
    key_mask = jnp.ones((b, t), bool)  # the step passes its (all-valid) mask in both models
    init_std = getattr(enc_cfg, "init_std", 0.02)

    def dense(features, axes, use_bias=True):
        return DenseGeneral(features, kernel_axes=axes, bias_axes=axes[-len(features):],
                            use_bias=use_bias, init_std=init_std, dtype=dtype)

    eps = enc_cfg.layer_norm_eps
    act = enc_cfg.activation_function if whisper else enc_cfg.hidden_act
    makers: dict[str, Callable[[], Callable]] = {}

    def qkv_out():
        proj = {n: dense((h, d), ("embed", "heads", "kv"), use_bias=not (whisper and n == "k"))
                for n in "qkv"}
        out = dense((e,), ("heads", "kv", "embed"))
        o = _randn(2, (b, t, h, d), dtype)
        params = {**{n: _init(m, x) for n, m in proj.items()}, "o": _init(out, o)}

        def apply(p, x, o):
            qkv = tuple(proj[n].apply({"params": p[n]}, x) for n in "qkv")
            return (*qkv, out.apply({"params": p["o"]}, o))

        return jax_fwd_bwd(apply, params, (x, o))

    def mlp():
        fc1, fc2 = dense((f,), ("embed", "mlp")), dense((e,), ("mlp", "embed"))
        g = _randn(3, (b, t, f), dtype)
        params = {"fc1": _init(fc1, x), "fc2": _init(fc2, g)}
        return jax_fwd_bwd(lambda p, x, g: (fc1.apply({"params": p["fc1"]}, x),
                                            fc2.apply({"params": p["fc2"]}, g)),
                           params, (x, g))

    def attention():
        q, k, v = (_randn(4 + i, (b, t, h, d), dtype) for i in range(3))
        return jax_fwd_bwd(lambda p, q, k, v, m: dot_product_attention(q, k, v, m,
                                                                       enc_cfg.attention),
                           {}, (q, k, v), (key_mask,))

    def layer_norm():
        ln = LayerNorm(eps, dtype=dtype)
        return jax_fwd_bwd(lambda p, x: ln.apply({"params": p}, x), _init(ln, x), (x,))

    def gelu():
        return jax_fwd_bwd(lambda p, y: ACTIVATIONS[act](y), {}, (_randn(6, (b, t, f), dtype),))

    def conv_stem():
        stem = WhisperEncoder(dataclasses.replace(enc_cfg, encoder_layers=0))
        feats, mask = jnp.asarray(batch.jax["inputs"]), jnp.asarray(batch.jax["mask"])
        params = _init(stem, feats[:1], mask[:1])
        return jax_fwd_bwd(lambda p, fe, m: stem.apply({"params": p}, fe, m).hidden_states[-1],
                           params, (), (feats, mask))

    def feature_extractor():
        fe = FeatureExtractor(enc_cfg)
        audio = jnp.asarray(batch.jax["inputs"])
        lengths = jnp.full((b,), audio.shape[1], jnp.int32)  # as the step's all-valid mask
        params = _init(fe, audio[:1], lengths[:1])
        return jax_fwd_bwd(lambda p, a, n: fe.apply({"params": p}, a, n), params, (),
                           (audio, lengths))

    def feature_projection():
        fp = FeatureProjection(enc_cfg)
        c = _randn(7, (b, t, s.conv_channels), dtype)
        return jax_fwd_bwd(lambda p, c: fp.apply({"params": p}, c, True),
                           _init(fp, c, True), (c,))

    def pos_conv():
        pc = PositionalConvEmbedding(enc_cfg)
        return jax_fwd_bwd(lambda p, x: pc.apply({"params": p}, x), _init(pc, x), (x,))

    makers.update(qkv_out=qkv_out, mlp=mlp, attention=attention, layer_norm=layer_norm,
                  gelu=gelu, conv_stem=conv_stem, feature_extractor=feature_extractor,
                  feature_projection=feature_projection, pos_conv=pos_conv)
    return {name: makers[name]() for name in names if name in makers}


def jaxser_optimizer_piece(runner: train_step.JaxserRunner) -> Callable:
    """jaxser's AdamW update (+ apply) over a copy of the step's parameters, donated."""
    import optax

    params = jax.tree.map(jnp.copy, runner.state["params"])
    opt_state = runner.tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def update(params, opt_state, grads):
        updates, opt_state = runner.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))
    state = [params, opt_state]

    def run():
        state[:] = update(state[0], state[1], grads)
        jax.block_until_ready(state)

    return run


# ----------------------------------------------------------------------------- torch


def torch_fwd_bwd(forward: Callable, inputs: tuple, module, dtype: str) -> Callable:
    """A no-argument callable: forward(*inputs), then backward with a fixed random
    cotangent into `module`'s parameters and the inputs that require grad (gradients set
    to None first, as `zero_grad(set_to_none=True)` does in the step)."""
    import torch

    params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    autocast = dtype == "bfloat16"

    def outputs():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(*inputs)
        return y if isinstance(y, tuple) else (y,)

    gen = torch.Generator().manual_seed(0)
    cots = [torch.randn(y.shape, generator=gen).to(y.dtype) for y in outputs()]

    def run():
        for p in (*params, *leaves):
            p.grad = None
        torch.autograd.backward(outputs(), cots)

    return run


def torch_pieces(encoder, enc_cfg, s: Shapes, batch: common.Batch, names,
                 dtype: str) -> dict[str, Callable]:
    """piece name -> callable timing it, with the transformers modules of the step's model."""
    import torch
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.whisper import modeling_whisper

    whisper = s.family == "whisper"
    b, t, e, h, d, f = s.batch, s.time, s.embed, s.heads, s.head_dim, s.ffn
    gen = torch.Generator().manual_seed(1)

    def randn(*shape, grad=True):
        return torch.randn(shape, generator=gen).requires_grad_(grad)

    layer = encoder.layers[0] if whisper else encoder.encoder.layers[0]
    attn = layer.self_attn if whisper else layer.attention
    if whisper:
        fc1, fc2, act = layer.fc1, layer.fc2, layer.activation_fn
        norm = layer.self_attn_layer_norm
    else:
        ff = layer.feed_forward
        fc1, fc2, act = ff.intermediate_dense, ff.output_dense, ff.intermediate_act_fn
        norm = layer.layer_norm
    x = randn(b, t, e)

    def qkv_out():
        o = randn(b, t, e)
        mods = torch.nn.ModuleList([attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj])
        return torch_fwd_bwd(lambda x, o: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x),
                                           attn.out_proj(o)), (x, o), mods, dtype)

    def mlp():
        g = randn(b, t, f)
        return torch_fwd_bwd(lambda x, g: (fc1(x), fc2(g)), (x, g),
                             torch.nn.ModuleList([fc1, fc2]), dtype)

    def attention():
        # As the layers call it: [B, T, H, D] -> [B, H, T, D] views, no mask in the step.
        q, k, v = (randn(b, t, h, d) for _ in range(3))

        def fwd(q, k, v):
            out, _ = sdpa_attention_forward(attn, q.transpose(1, 2), k.transpose(1, 2),
                                            v.transpose(1, 2), None, dropout=0.0,
                                            scaling=d ** -0.5)
            return out.reshape(b, t, e).contiguous()

        return torch_fwd_bwd(fwd, (q, k, v), None, dtype)

    def layer_norm():
        return torch_fwd_bwd(norm, (x,), norm, dtype)

    def gelu():
        return torch_fwd_bwd(act, (randn(b, t, f),), None, dtype)

    def conv_stem():
        hf = dict(enc_cfg.to_hf(), encoder_layers=0, max_source_positions=batch.frames // 2)
        stem = modeling_whisper.WhisperEncoder(
                transformers.WhisperConfig(**hf, attn_implementation="sdpa")).train()
        return torch_fwd_bwd(lambda fe: stem(fe).last_hidden_state, (batch.torch_inputs,),
                             stem, dtype)

    def feature_extractor():
        fe = encoder.feature_extractor
        return torch_fwd_bwd(fe, (batch.torch_inputs,), fe, dtype)

    def feature_projection():
        fp = encoder.feature_projection

        def fwd(c):
            y = fp(c)
            return y[0] if isinstance(y, tuple) else y

        return torch_fwd_bwd(fwd, (randn(b, t, s.conv_channels),), fp, dtype)

    def pos_conv():
        pc = encoder.encoder.pos_conv_embed
        return torch_fwd_bwd(pc, (x,), pc, dtype)

    makers = dict(qkv_out=qkv_out, mlp=mlp, attention=attention, layer_norm=layer_norm,
                  gelu=gelu, conv_stem=conv_stem, feature_extractor=feature_extractor,
                  feature_projection=feature_projection, pos_conv=pos_conv)
    return {name: makers[name]() for name in names if name in makers}


def torch_optimizer_piece(runner: train_step.TorchRunner) -> Callable:
    """torch.optim.AdamW.step() over the step's module, with fixed gradients."""
    import torch

    params = [p for p in runner.module.parameters() if p.requires_grad]

    def run():
        for p in params:
            if p.grad is None:
                p.grad = torch.full_like(p, 1e-3)
        runner.opt.step()

    return run


# ----------------------------------------------------------------------------- one side


def step_args(args) -> argparse.Namespace:
    """bench/train_step.py's arguments for the same model, batch and precision."""
    argv = ["--model", args.model, "--batch", str(args.batch), "--seconds", str(args.seconds),
            "--dtype", args.dtype, "--attention", args.attention]
    for item in args.override:
        argv += ["--override", item]
    return train_step.parse_args(argv)


def selected(args, family: str) -> tuple[str, ...]:
    names = WHISPER_PIECES if family == "whisper" else HUBERT_PIECES
    if not args.pieces:
        return names
    wanted = [n.strip() for n in args.pieces.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"unknown pieces {unknown} for {family}: {', '.join(names)}")
    return tuple(n for n in names if n in wanted)


def run_side(args, framework: str) -> dict:
    """Times every piece and (unless --no-step) the whole step for one framework."""
    sargs = step_args(args)
    family = common.family_of(args.model)
    batch, enc_cfg = train_step.make_batch(sargs)
    s = shapes_of(family, enc_cfg, batch)
    names = selected(args, family)
    if framework == "jaxser":
        runner = train_step.JaxserRunner(sargs, batch, common.CompileCounter())
        fns = jaxser_pieces(enc_cfg, s, batch, names)
        if "optimizer" in names:
            fns["optimizer"] = jaxser_optimizer_piece(runner)
    else:
        import torch

        torch.manual_seed(0)
        runner = train_step.TorchRunner(sargs, batch, enc_cfg)
        fns = torch_pieces(runner.module.encoder, enc_cfg, s, batch, names, args.dtype)
        if "optimizer" in names:
            fns["optimizer"] = torch_optimizer_piece(runner)
    pieces = {}
    for name in names:
        pieces[name] = time_calls(fns.pop(name), args.reps, args.warmup)
        print(f"  {framework} {name}: {pieces[name]['median'] * 1e3:.2f} ms "
              f"(cpu {pieces[name]['cpu'] * 1e3:.2f} ms)", flush=True)
    step = None
    if not args.no_step:
        step = time_calls(runner.step, args.steps, args.warmup)
        print(f"  {framework} whole step: {common.fmt_stats(step)}", flush=True)
    return {"framework": framework, "shapes": dataclasses.asdict(s), "pieces": pieces,
            "step": step, "load_average": common.load_average(),
            "cpus": sorted(os.sched_getaffinity(0)), "threads": _threads(framework)}


def _threads(framework: str) -> int | None:
    """PyTorch's intra-op threads (XLA:CPU sizes its pool to the CPUs it may use)."""
    if framework != "torch":
        return len(os.sched_getaffinity(0))
    import torch

    return torch.get_num_threads()


def child(args, framework: str, argv: list[str]) -> dict:
    """One framework in a child process (jaxser with huge-page malloc); its JSON line."""
    cmd = [sys.executable, __file__, *argv, "--child", framework]
    cpus = sorted({int(c) for c in args.cpus.split(",") if c.strip()})
    if cpus:  # pinned before the interpreter that imports jax and torch starts
        cmd = [sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, "
               f"{cpus}); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
               *cmd[1:]]
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:.0f} s for load < {args.quiet_load}: "
              f"{common.wait_for_quiet(args.wait_quiet, args.quiet_load)}", flush=True)
    last = ""
    with hugepages.for_children() if framework == "jaxser" else contextlib.nullcontext():
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # progress as it comes; the last line is the JSON
                if last:
                    print(last, end="", flush=True)
                last = line
    if proc.returncode != 0 or not last.startswith("{"):
        print(last, end="", flush=True)
        raise SystemExit(f"child {framework} failed with exit code {proc.returncode}")
    return json.loads(last)


# ----------------------------------------------------------------------------- report


def sum_check(sides: dict[str, dict], counts: dict[str, int], tolerance: float) -> dict:
    """Per framework: the sum over pieces of count x median against the step's median, in
    wall time (`pieces_s`, `step_s`, `gap`, `within`) and in process CPU time (`cpu_`...).

    On a busy machine the CPU-time check is the steadier one: wall time then includes
    waiting for the CPU, which hits the long step harder than the short pieces."""
    out = {}
    for fw, side in sides.items():
        entry = {}
        for prefix, key in (("", "median"), ("cpu_", "cpu")):
            total = sum(counts[n] * r[key] for n, r in side["pieces"].items())
            step = side["step"][key] if side["step"] is not None else None
            gap = None if step is None else total / step - 1.0
            entry.update({f"{prefix}pieces_s": round(total, 6),
                          f"{prefix}step_s": None if step is None else round(step, 6),
                          f"{prefix}gap": None if gap is None else round(gap, 4),
                          f"{prefix}within": None if gap is None else abs(gap) <= tolerance})
        out[fw] = entry
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _ratio(jaxser_s: float | None, torch_s: float | None) -> float | None:
    """PyTorch time / jaxser time (> 1: jaxser faster), None when a side is missing."""
    if not jaxser_s or torch_s is None:
        return None
    return round(torch_s / jaxser_s, 3)


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(sides: dict[str, dict], counts: dict[str, int], shapes: dict[str, str],
          check: dict) -> tuple[str, list[dict]]:
    """The printed table (markdown) and its JSON rows. Times are of one call; the share is
    count x the piece's CPU time over the jaxser step's CPU time."""
    jx, tc = sides.get("jaxser"), sides.get("torch")
    names = list((jx or tc)["pieces"])
    js, ts = check.get("jaxser", {}), check.get("torch", {})
    rows, lines = [], [
            "| piece | shape | per step | jaxser ms | PyTorch ms | ratio | jaxser CPU ms "
            "| PyTorch CPU ms | CPU ratio | share of jaxser step (CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        j = jx["pieces"][n] if jx else {}
        t = tc["pieces"][n] if tc else {}
        c = counts[n]
        row = {"piece": n, "shape": shapes[n], "count": c, "jaxser": j or None,
               "torch": t or None, "ratio": _ratio(j.get("median"), t.get("median")),
               "cpu_ratio": _ratio(j.get("cpu"), t.get("cpu"))}
        rows.append(row)
        share = (f"{c * j['cpu'] / js['cpu_step_s']:.0%}"
                 if j.get("cpu") and js.get("cpu_step_s") else "-")
        lines.append(f"| {n} | {shapes[n]} | {c} | {_ms(j.get('median'))} | "
                     f"{_ms(t.get('median'))} | {_x(row['ratio'])} | {_ms(j.get('cpu'))} | "
                     f"{_ms(t.get('cpu'))} | {_x(row['cpu_ratio'])} | {share} |")
    for label, suffix in (("sum of pieces x count", "pieces_s"),
                          ("whole step (train_step.py)", "step_s")):
        jw, tw, jc, tcpu = (js.get(suffix), ts.get(suffix), js.get(f"cpu_{suffix}"),
                            ts.get(f"cpu_{suffix}"))
        lines.append(f"| **{label}** | | | {_ms(jw)} | {_ms(tw)} | {_x(_ratio(jw, tw))} | "
                     f"{_ms(jc)} | {_ms(tcpu)} | {_x(_ratio(jc, tcpu))} | |")
    return "\n".join(lines), rows


def report_check(check: dict, tolerance: float) -> None:
    for fw, c in check.items():
        if c["step_s"] is None:
            print(f"{fw}: sum of pieces {c['pieces_s']:.3f} s (no whole step measured)")
            continue
        print(f"{fw}: sum of pieces vs whole step: wall {c['pieces_s']:.3f} s vs "
              f"{c['step_s']:.3f} s, gap {c['gap']:+.1%} "
              f"({'within' if c['within'] else 'OUTSIDE'} {tolerance:.0%}); CPU time "
              f"{c['cpu_pieces_s']:.3f} s vs {c['cpu_step_s']:.3f} s, gap {c['cpu_gap']:+.1%} "
              f"({'within' if c['cpu_within'] else 'OUTSIDE'} {tolerance:.0%})")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_side(args, args.child)), flush=True)
        return {}
    info = common.machine()
    print(f"machine: {info['summary']}; load {info['load_average']}", flush=True)
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        raise SystemExit(f"unknown frameworks {unknown}: {', '.join(FRAMEWORKS)}")
    sides = {}
    for fw in frameworks:
        sides[fw] = run_side(args, fw) if args.same_process else child(args, fw, argv)
    first = next(iter(sides.values()))
    s = Shapes(**first["shapes"])
    spec = piece_table(s)
    counts = {n: spec[n][0] for n in first["pieces"]}
    shapes = {n: spec[n][1] for n in first["pieces"]}
    check = sum_check(sides, counts, args.tolerance)
    text, rows = table(sides, counts, shapes, check)
    cpus = sorted({c for side in sides.values() for c in side["cpus"]})
    print(f"\n{args.model} {args.dtype}, batch {args.batch} x {args.seconds:g} s "
          f"(T = {s.time} frames in the layers, {s.layers} layers), on {info['summary']}; "
          f"CPUs {cpus}; median of {args.reps} calls per piece, {args.steps} steps; load "
          f"{[side['load_average'][0] for side in sides.values()]}")
    print(text)
    report_check(check, args.tolerance)
    result = {"model": args.model, "batch": args.batch, "seconds": args.seconds,
              "dtype": args.dtype, "attention": args.attention,
              "overrides": common.parse_overrides(args.override), "machine": info,
              "shapes": first["shapes"], "reps": args.reps, "steps": args.steps,
              "pieces": rows, "sum_check": check, "tolerance": args.tolerance,
              "step_ratio": _ratio(check.get("jaxser", {}).get("step_s"),
                                   check.get("torch", {}).get("step_s")),
              "step_cpu_ratio": _ratio(check.get("jaxser", {}).get("cpu_step_s"),
                                       check.get("torch", {}).get("cpu_step_s")),
              "load_average": {fw: side["load_average"] for fw, side in sides.items()},
              "cpus": {fw: side["cpus"] for fw, side in sides.items()},
              "threads": {fw: side["threads"] for fw, side in sides.items()},
              "same_process": args.same_process}
    print(json.dumps(result))
    if args.strict and any(c["within"] is False and c["cpu_within"] is False
                           for c in check.values()):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
