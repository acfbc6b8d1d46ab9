"""Steady-state train-step time: jaxser against the same architecture in PyTorch transformers.

Both sides train a randomly initialised encoder + mean pool + linear head with a KL loss
and AdamW on the same fixed-shape batch (all frames valid, every dropout and LayerDrop
off), in the same precision, each framework in its own child process, one after the other,
and the medians are compared. (`--same-process` alternates the steps of both in one
process instead, so that a change in the machine's load hits both; but on CPU a jaxser
step that follows a PyTorch step then takes ~2 s longer than one that follows a jaxser
step, hubert-base 4 x 4 s: 4.7-4.9 s against 2.5-2.7 s, with or without huge pages and
with OMP_WAIT_POLICY=passive, so separate processes are the default.) Each side runs with
its own default malloc: jaxser with huge pages (jaxser.hugepages, as `jaxser train`),
PyTorch with glibc's default (huge pages made its whisper-base 4 x 30 s step 10% slower).
Printed: step times (median, min, max), audio-seconds per second, the throughput ratio,
the FLOPs of jaxser's step from XLA's cost analysis, MFU on an accelerator with a known
peak (null on CPU), the number of compilations of the step (it must compile once, during
warm-up), the machine and its load average. The last line is one JSON object.

What is compared
----------------
- jaxser: `SERModel` exactly as `jaxser train` builds it for `--config.model.size=MODEL`
  (Whisper: variable-length input with padding masks, attention implementation 'auto');
  one jitted step with the state donated; jaxser's own AdamW from the optimizer config.
- PyTorch: transformers' `WhisperEncoder` (sdpa attention) or `HubertModel` /
  `Wav2Vec2Model`, `torch.nn.Linear` head, `torch.optim.AdamW`, eager mode, bf16 through
  `torch.autocast` when `--dtype bfloat16`.
- Whisper input: `--seconds * 100` log-mel frames for both, precomputed (no feature
  extraction in the step). At 30 s that is 3000 frames, Whisper's normal input on both
  sides. For other lengths transformers' WhisperEncoder only accepts exactly
  `2 * max_source_positions` frames, so its config gets `max_source_positions = frames / 2`
  (a smaller position table; the compute is that of the frames given).
- HuBERT / wav2vec2 input: `--seconds * 16000` samples of waveform for both.

    .venv/bin/python bench/train_step.py --model whisper-base --batch 4 --seconds 30 --steps 3
    .venv/bin/python bench/train_step.py --model hubert-base --batch 4 --seconds 4
    # frozen encoder (no backward through it) against the full step, jaxser only:
    .venv/bin/python bench/train_step.py --model whisper-base --batch 4 --seconds 4 --no-torch \
        --freeze encoder

The largest batch that fits in memory, remat off and on: bench/max_batch.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="whisper-base",
                   help="preset: whisper-tiny|base|small|..., hubert-base|large, wav2vec2-*, "
                        "wavlm-base|base-plus|large, data2vec-audio-base|large")
    p.add_argument("--batch", type=int, default=4, help="utterances per step")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per framework")
    p.add_argument("--remat", action="store_true", help="rematerialise encoder layers")
    p.add_argument("--attention", default="auto", help="jaxser attention implementation")
    p.add_argument("--freeze", default="none", choices=("none", "encoder", "stem"),
                   help="train with the encoder (or its convolutional stem) frozen, both "
                        "frameworks: jaxser cuts it with stop_gradient (no backward pass), "
                        "PyTorch sets requires_grad=False")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder config field over the preset, both frameworks (repeatable; "
                        "e.g. encoder_layers=2 for a quick run)")
    p.add_argument("--no-torch", action="store_true", help="time jaxser only")
    p.add_argument("--no-jaxser", action="store_true", help="time PyTorch only")
    p.add_argument("--same-process", action="store_true",
                   help="time both frameworks in this process, alternating steps (default: "
                        "each in its own child process, one after the other)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this many seconds for a 1-min load average below "
                        "--quiet-load before timing")
    p.add_argument("--quiet-load", type=float, default=2.5)
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def freeze_patterns(args) -> tuple[str, ...]:
    """jaxser's `optim.freeze` patterns for `--freeze` (absent in other scripts: none)."""
    kind = getattr(args, "freeze", "none")
    if kind == "encoder":
        return ("encoder/*",)
    if kind == "stem":
        return (("encoder/conv*",) if common.family_of(args.model) == "whisper"
                else ("encoder/feature_extractor/*",))
    return ()


def overrides(args) -> dict[str, Any]:
    """The encoder overrides of `--override` (absent in argument sets of other scripts)."""
    return common.parse_overrides(getattr(args, "override", None))


def make_batch(args) -> tuple[common.Batch, Any]:
    """The random batch of `--batch` x `--seconds` for `--model`, and the encoder config."""
    enc_cfg = common.build_jaxser(args.model, args.dtype, args.remat, args.attention,
                                  overrides(args))[1]
    batch = common.random_batch(args.model, args.batch, args.seconds,
                                getattr(enc_cfg, "num_mel_bins", 80))
    return batch, enc_cfg


# ----------------------------------------------------------------------------- jaxser


class JaxserRunner:
    """jaxser's jitted, donated train step on one fixed batch."""

    def __init__(self, args, batch: common.Batch, counter: common.CompileCounter):
        self.model, self.enc_cfg = common.build_jaxser(args.model, args.dtype, args.remat,
                                                       args.attention, overrides(args))
        freeze = freeze_patterns(args)
        init, make_step = common.make_jaxser_step(
                self.model, common.jaxser_optimizer(freeze=freeze), freeze)
        self.batch = jax.device_put(batch.jax)
        self.state, tx = init(jax.random.key(0), self.batch["inputs"][:1],
                              self.batch["mask"][:1])
        self.step_fn = make_step(tx)
        self.tx, self.args, self.counter = tx, args, counter

    def analyse(self) -> tuple[float | None, float]:
        """Model FLOPs per step (XLA's cost analysis) and the step's temporaries in GiB
        (XLA's memory analysis), from compiling the step again after the timing.

        XLA counts the body of a loop once, whatever its trip count, so the blockwise
        attention (a scan over batch x heads) and remat (a scan over the layers) would be
        undercounted: the FLOPs are then taken from the same step with einsum attention and
        no remat (the model's FLOPs, without recomputation, as MFU counts them), one more
        compilation.
        """
        compiled = self.step_fn.lower(self.state, self.batch).compile()
        temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
        if self.args.attention != "einsum" or self.args.remat:
            model, _ = common.build_jaxser(self.args.model, self.args.dtype, False, "einsum",
                                           overrides(self.args))
            freeze = freeze_patterns(self.args)
            _, make_step = common.make_jaxser_step(
                    model, common.jaxser_optimizer(freeze=freeze), freeze)
            compiled = make_step(self.tx).lower(self.state, self.batch).compile()
        return common.cost_flops(compiled), temp_gib

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, loss = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, loss))
        self.last_loss = float(loss)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- torch


class TorchRunner:
    """transformers encoder + head + torch.optim.AdamW on the same batch."""

    def __init__(self, args, batch: common.Batch, enc_cfg):
        import torch

        torch.manual_seed(0)
        self.module = common.torch_ser_model(args.model, enc_cfg, batch.frames).train()
        kind = getattr(args, "freeze", "none")
        if kind == "encoder":
            self.module.encoder.requires_grad_(False)
        elif kind == "stem":
            encoder = self.module.encoder
            for name in ("conv1", "conv2", "feature_extractor"):
                if hasattr(encoder, name):
                    getattr(encoder, name).requires_grad_(False)
        if args.remat:
            self.module.encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        self.opt = common.torch_optimizer(self.module)
        self.step_fn = common.torch_train_step(self.module, self.opt, args.dtype)
        self.inputs, self.targets = batch.torch_inputs, batch.torch_targets

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.step_fn(self.inputs, self.targets)
        self.last_loss = float(loss.detach())
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- isolate


def _child_result(argv: list[str], flag: str) -> dict:
    """Runs this script for one framework in a child process; returns its JSON line."""
    cmd = [sys.executable, __file__, *argv, flag]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(cmd[1:])} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isolated(argv: list[str]) -> dict:
    """jaxser, then PyTorch, each in a child process; one merged JSON line."""
    result = _child_result(argv, "--no-torch")
    torch_result = _child_result(argv, "--no-jaxser")
    for key in ("torch_step_s", "torch_step_min_max_s", "torch_step_times_s",
                "torch_audio_s_per_s", "torch_page_faults_per_step",
                "torch_system_cpu_s_per_step"):
        result[key] = torch_result[key]
    result["load_average"] = [result["load_average"][0], torch_result["load_average"][1]]
    result["throughput_ratio"] = round(result["torch_step_s"] / result["jaxser_step_s"], 3)
    result["isolated"] = True
    print(f"throughput jaxser / PyTorch (separate processes): {result['throughput_ratio']:.2f}x")
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not (args.same_process or args.no_torch or args.no_jaxser):
        return isolated(argv)
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:.0f} s for load < {args.quiet_load}: "
              f"{common.wait_for_quiet(args.wait_quiet, args.quiet_load)}", flush=True)
    info = common.machine()
    print(f"machine: {info['summary']}; {info}", flush=True)
    counter = common.CompileCounter()
    batch, enc_cfg = make_batch(args)
    shape = f"{args.batch} x {args.seconds:g} s"
    if batch.frames is not None:
        shape += f" ({batch.frames} log-mel frames)"
    print(f"{args.model} {args.dtype} batch {shape} remat={args.remat}", flush=True)

    jx = tc = None
    compiles = compiles_after_warmup = None
    flops = temp_gib = None
    if not args.no_jaxser:
        t0 = time.perf_counter()
        jx = JaxserRunner(args, batch, counter)
        with counter:  # only the step's own compilations (not init's small ones)
            first = jx.step()
            for _ in range(args.warmup - 1):
                jx.step()
        print(f"jaxser: init + compile + first step {time.perf_counter() - t0:.1f} s "
              f"(first step {first:.1f} s)", flush=True)
        compiles = counter.count
    if not args.no_torch:
        tc = TorchRunner(args, batch, enc_cfg)
        for _ in range(args.warmup):
            tc.step()

    times = {"jaxser": [], "torch": []}
    # Page faults and system CPU per step: what huge-page malloc (jaxser.hugepages) removes.
    faults = {"jaxser": [], "torch": []}
    system_s = {"jaxser": [], "torch": []}
    loads = [common.load_average()]
    counter.count = 0
    with counter:
        for i in range(args.steps):
            order = [("jaxser", jx), ("torch", tc)]
            if i % 2:
                order.reverse()  # A B B A: neither side always follows the other
            for name, runner in order:
                if runner is not None:
                    before = resource.getrusage(resource.RUSAGE_SELF)
                    times[name].append(runner.step())
                    after = resource.getrusage(resource.RUSAGE_SELF)
                    faults[name].append(after.ru_minflt - before.ru_minflt)
                    system_s[name].append(after.ru_stime - before.ru_stime)
            loads.append(common.load_average())
    if jx is not None:
        compiles_after_warmup = counter.count
        flops, temp_gib = jx.analyse()
        if compiles_after_warmup:
            raise AssertionError(f"jaxser's step recompiled {compiles_after_warmup} times "
                                 "after warm-up")

    result = {
            "model": args.model, "batch": args.batch, "seconds": args.seconds,
            "dtype": args.dtype, "device": f"{info['jax_device']} ({info['cpu']}, "
                                          f"{info['cores']} cores)",
            "remat": args.remat, "freeze": args.freeze, "frames": batch.frames,
            "overrides": overrides(args), "machine": info,
    }
    for name in ("jaxser", "torch"):
        if times[name]:
            s = common.stats(times[name])
            print(f"{name:7s} step {common.fmt_stats(s)}  "
                  f"{batch.audio_seconds / s['median']:.1f} audio-s/s", flush=True)
            result[f"{name}_step_s"] = round(s["median"], 4)
            result[f"{name}_step_min_max_s"] = [round(s["min"], 4), round(s["max"], 4)]
            result[f"{name}_step_times_s"] = [round(t, 3) for t in times[name]]
            result[f"{name}_audio_s_per_s"] = round(batch.audio_seconds / s["median"], 2)
            result[f"{name}_page_faults_per_step"] = int(np.median(faults[name]))
            result[f"{name}_system_cpu_s_per_step"] = round(float(np.median(system_s[name])), 2)
            print(f"{name:7s} per step: {result[f'{name}_page_faults_per_step']} page faults, "
                  f"{result[f'{name}_system_cpu_s_per_step']} s system CPU", flush=True)
        else:
            result[f"{name}_step_s"] = None
    ratio = None
    if times["jaxser"] and times["torch"]:
        ratio = result["torch_step_s"] / result["jaxser_step_s"]
        print(f"throughput jaxser / PyTorch: {ratio:.2f}x")
    result["throughput_ratio"] = None if ratio is None else round(ratio, 3)
    result["flops_per_step"] = flops
    peak = common.peak_flops(args.dtype)
    result["mfu"] = (round(flops / result["jaxser_step_s"] / peak, 4)
                     if peak and flops and result["jaxser_step_s"] else None)
    if flops and result["jaxser_step_s"]:
        print(f"jaxser step: {flops / 1e9:.1f} GFLOP (XLA cost analysis), "
              f"{flops / result['jaxser_step_s'] / 1e9:.1f} GFLOP/s, MFU {result['mfu']}")
    result["jaxser_xla_temp_gib"] = None if temp_gib is None else round(temp_gib, 3)
    if temp_gib is not None:
        print(f"jaxser step: {temp_gib:.3f} GiB of temporaries (XLA memory analysis)")
    result["compiles"] = compiles
    result["compiles_after_warmup"] = compiles_after_warmup
    result["load_average"] = [loads[0], loads[-1]]
    if jx is not None and tc is not None:
        result["final_loss"] = {"jaxser": round(jx.last_loss, 5), "torch": round(tc.last_loss, 5)}
    print(f"load average before/after: {loads[0]} / {loads[-1]}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if "--no-torch" in sys.argv:  # jaxser alone, with its malloc as `jaxser train` runs it
        from jaxser import hugepages

        hugepages.reexec([__file__, *sys.argv[1:]])
    main()
